/**
 * Model output to the page, safely. Markdown goes through markdown-it with raw HTML off (a `<script>`
 * in the text is escaped to the characters `<script>`) and then through DOMPurify, so that neither a
 * markdown-it bug nor a later option change can put live markup or script in the page. The server's
 * Content-Security-Policy allows no inline script either. Everything else (titles, table cells, tool
 * names, the user's own message) is set with `textContent`.
 */

import DOMPurify from "dompurify";
import MarkdownIt from "markdown-it";
import * as charts from "chart.js";
import type { Chart, ChartConfiguration } from "chart.js";

// Only the parts the four chart kinds use, so the rest of Chart.js stays out of the bundle.
charts.Chart.register(
  charts.ArcElement,
  charts.BarController,
  charts.BarElement,
  charts.CategoryScale,
  charts.Filler,
  charts.Legend,
  charts.LineController,
  charts.LineElement,
  charts.LinearScale,
  charts.PieController,
  charts.PointElement,
  charts.ScatterController,
  charts.Title,
  charts.Tooltip,
);

const md = new MarkdownIt({ html: false, linkify: true, breaks: false });

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

export function markdownToSafeHtml(text: string): string {
  return DOMPurify.sanitize(md.render(text), { USE_PROFILES: { html: true } });
}

export function renderMarkdown(el: HTMLElement, text: string): void {
  el.innerHTML = markdownToSafeHtml(text);
}

export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className?: string,
  text?: string,
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const cellText = (v: unknown): string =>
  v === null || v === undefined ? "" : typeof v === "object" ? JSON.stringify(v) : String(v);

export function renderTable(body: HTMLElement, data: unknown): void {
  const d = (data ?? {}) as { columns?: unknown[]; rows?: unknown[][] };
  const table = el("table");
  const head = table.createTHead().insertRow();
  for (const c of d.columns ?? []) head.appendChild(el("th", undefined, cellText(c)));
  const tbody = table.createTBody();
  for (const row of d.rows ?? []) {
    const tr = tbody.insertRow();
    for (const cell of Array.isArray(row) ? row : [row]) tr.insertCell().textContent = cellText(cell);
  }
  body.replaceChildren(table);
}

const PALETTE = ["#2f6fed", "#e8833a", "#2f855a", "#c53030", "#805ad5", "#d69e2e"];

interface ChartData {
  chart_type?: string;
  labels?: unknown[];
  series?: { name?: unknown; values?: unknown[] }[];
}

/** Draws or updates the chart in `body`; returns the Chart so later states update it in place. */
export function renderChart(body: HTMLElement, title: string, data: unknown, existing: Chart | null): Chart {
  const d = (data ?? {}) as ChartData;
  const kind = d.chart_type ?? "bar";
  const labels = (d.labels ?? []).map(cellText);
  const series = d.series ?? [];
  const type = kind === "area" ? "line" : kind === "scatter" || kind === "pie" || kind === "line" ? kind : "bar";
  const datasets = series.map((s, i) => {
    const color = PALETTE[i % PALETTE.length] ?? "#888";
    const values = (s.values ?? []).map((v) => (typeof v === "number" ? v : Number(v)));
    return {
      label: cellText(s.name),
      data: type === "scatter" ? values.map((y, x) => ({ x, y })) : values,
      backgroundColor: type === "pie" ? labels.map((_, j) => PALETTE[j % PALETTE.length] ?? "#888") : color,
      borderColor: color,
      fill: kind === "area",
    };
  });
  if (existing && (existing.config as { type?: string }).type === type) {
    existing.data.labels = labels;
    existing.data.datasets = datasets as never;
    existing.update("none");
    return existing;
  }
  existing?.destroy();
  const box = el("div", "chart-box");
  const canvas = el("canvas");
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", title);
  box.appendChild(canvas);
  body.replaceChildren(box);
  const config = {
    type,
    data: { labels, datasets },
    options: { responsive: true, maintainAspectRatio: false, animation: false, plugins: { legend: { display: true } } },
  } as unknown as ChartConfiguration;
  return new charts.Chart(canvas, config);
}
