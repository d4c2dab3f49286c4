/**
 * The page served at `/`. Everything it shows comes from the run's events as they arrive: the
 * reasoning in a "Thinking" block, the answer as markdown, a card per tool call, and artifacts that
 * fill in while the model writes them. Rendering is batched to one pass per animation frame, so a
 * fast model costs one layout per frame, not one per token.
 */

import { SluiceClient } from "../src/client.js";
import { StreamError } from "../src/errors.js";
import type { RunOutcome, RunStream } from "../src/run.js";
import type { Artifact, Message, SluiceEvent } from "../src/types.js";
import { WebSocketTransport, wsUrlFor } from "../src/ws.js";
import { el, markdownToSafeHtml, renderChart, renderMarkdown, renderTable } from "./render.js";
import type { Chart } from "chart.js";

const $ = <T extends HTMLElement>(id: string): T => {
  const node = document.getElementById(id);
  if (!node) throw new Error(`the page has no #${id}`);
  return node as T;
};

const KEY_STORAGE = "sluice.apiKey";
let client = new SluiceClient({ apiKey: localStorage.getItem(KEY_STORAGE) ?? undefined });

/** What the page has done, for the person debugging it (and the end-to-end tests). */
const stats = { reconnects: 0, events: 0, paints: 0, resets: 0, artifactStates: [] as string[] };
Object.assign(window, { sluice: { get client() { return client; }, stats, SluiceClient, WebSocketTransport, wsUrlFor } });

// ---------------------------------------------------------------------------------------------
// Rendering: dirty views are redrawn once per frame; the list stays pinned to the bottom while
// streaming unless the reader scrolled up.

const messagesEl = $<HTMLDivElement>("messages");
let pinned = true;
messagesEl.addEventListener("scroll", () => {
  pinned = messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 48;
});

const dirty = new Set<{ paint(): void }>();
/** A view with nothing to draw: scheduling it just brings the next frame's scroll-to-end. */
const SCROLL_ONLY = { paint(): void {} };
let frame = 0;
function schedule(view: { paint(): void }): void {
  dirty.add(view);
  if (!frame) frame = requestAnimationFrame(flush);
}
function flush(): void {
  frame = 0;
  for (const v of dirty) v.paint();
  dirty.clear();
  stats.paints++;
  if (pinned) messagesEl.scrollTop = messagesEl.scrollHeight;
}

// ---------------------------------------------------------------------------------------------
// One assistant message.

/**
 * One run of answer text. While it streams, the part before its last blank line (outside a code
 * fence) is settled: it is rendered once, appended to `settled`, and never touched again; only the
 * paragraph being written is re-rendered each frame. So a frame costs the size of the newest
 * paragraph, not of the whole answer. When the block ends it is rendered whole, once, so what
 * stays on screen is exactly what the full text renders to (a list split by a blank line joins up).
 */
interface TextBlock {
  node: HTMLDivElement;
  settled: HTMLDivElement;
  tail: HTMLDivElement;
  text: string;
  /** `text[..settledEnd]` is rendered into `settled`. */
  settledEnd: number;
  painted: number;
  /** Ended: render whole on the next paint, then leave alone. */
  ended: boolean;
  whole: boolean;
}

const FENCE = /^ {0,3}(```|~~~)/gm;

/** Where the settled part may grow to: just after the last blank line outside a code fence. */
function settleCut(text: string, from: number): number {
  const cut = text.lastIndexOf("\n\n");
  if (cut + 2 <= from) return from;
  const fences = text.slice(from, cut).match(FENCE)?.length ?? 0;
  return fences % 2 === 0 ? cut + 2 : from;
}

class AssistantView {
  readonly root = el("article", "msg assistant");
  private readonly thinking = el("details", "thinking");
  private readonly reasoning = el("div", "reasoning");
  private readonly blocks = el("div", "blocks");
  private readonly meta = el("footer", "meta");
  private readonly ttftEl = el("span", "ttft");
  private readonly stateEl = el("span", "state");
  private reasoningText = "";
  private reasoningPainted = -1;
  private block: TextBlock | null = null;
  private textBlocks: TextBlock[] = [];
  private tools = new Map<string, HTMLDivElement>();
  /** When the user pressed send (live runs only): the page's own time to first token. */
  sentAt: number | null = null;
  private firstTokenAt: number | null = null;
  runId: string | null = null;

  constructor() {
    this.thinking.appendChild(el("summary", undefined, "Thinking"));
    this.thinking.appendChild(this.reasoning);
    this.thinking.hidden = true;
    this.meta.append(this.ttftEl, this.stateEl);
    this.root.append(this.thinking, this.blocks, this.meta);
    this.setState("streaming");
  }

  setState(state: string, detail?: string): void {
    this.root.dataset.status = state;
    this.stateEl.className = `state ${state}`;
    this.stateEl.textContent = detail ? `${state}: ${detail}` : state === "complete" ? "" : state;
  }

  /** Forget everything shown (the server's log was reset; the events follow again). */
  clear(): void {
    this.reasoningText = "";
    this.reasoningPainted = -1;
    this.block = null;
    this.textBlocks = [];
    this.tools.clear();
    this.blocks.replaceChildren();
    this.thinking.hidden = true;
    schedule(this);
  }

  apply(e: SluiceEvent): void {
    stats.events++;
    switch (e.type) {
      case "run_started":
        this.runId = e.run_id;
        this.root.dataset.runId = e.run_id;
        this.root.dataset.messageId = e.message_id;
        break;
      case "reasoning_delta":
        this.firstToken();
        this.reasoningText += e.delta;
        this.thinking.hidden = false;
        if (!this.textBlocks.length) this.thinking.open = true;
        schedule(this);
        break;
      case "text_delta":
        this.firstToken();
        if (this.thinking.open && !this.textBlocks.length) this.thinking.open = false;
        this.appendText(e.delta);
        break;
      case "text_done":
        this.endBlock();
        break;
      case "function_call_delta":
        this.endBlock();
        this.tool(e.call_id, e.name, "writing", "writing arguments…");
        break;
      case "function_call_done":
        this.tool(e.call_id, e.name, "writing", "arguments ready");
        break;
      case "tool_execution_started":
        this.tool(e.call_id, e.tool_name, "running", "running…");
        break;
      case "tool_execution_progress": {
        const pct = typeof e.fraction === "number" ? ` ${Math.round(e.fraction * 100)}%` : "";
        this.tool(e.call_id, e.tool_name, "running", `${e.step}${pct}${e.message ? ` — ${e.message}` : ""}`);
        break;
      }
      case "tool_execution_completed":
        this.tool(e.call_id, e.tool_name, "done", "done");
        break;
      case "tool_execution_failed":
        this.tool(e.call_id, e.tool_name, "failed", e.error.message);
        break;
      case "artifact_intermediate":
      case "artifact_final":
        artifactsPanel.upsert(e.artifact);
        break;
      case "run_completed": {
        this.endAll();
        this.setState("complete");
        const ms = this.firstTokenAt !== null && this.sentAt !== null ? Math.round(this.firstTokenAt - this.sentAt) : e.time_to_first_token_ms;
        this.showTtft(ms, e.time_to_first_token_ms);
        break;
      }
      case "run_failed":
        this.endAll();
        this.setState("failed", e.error.message);
        artifactsPanel.dropUnfinished(e.run_id);
        break;
      case "run_cancelled":
        this.endAll();
        this.setState("cancelled");
        artifactsPanel.dropUnfinished(e.run_id);
        break;
      case "run_interrupted":
        this.endAll();
        this.setState("interrupted", "the server stopped during this run");
        artifactsPanel.dropUnfinished(e.run_id);
        break;
      default:
        break;
    }
  }

  private firstToken(): void {
    if (this.firstTokenAt !== null) return;
    this.firstTokenAt = performance.now();
    if (this.sentAt !== null) this.showTtft(Math.round(this.firstTokenAt - this.sentAt), null);
  }

  showTtft(ms: number | null, server: number | null): void {
    if (ms === null || ms === undefined) return;
    this.ttftEl.dataset.ms = String(ms);
    this.ttftEl.textContent = `first token ${ms} ms`;
    if (server !== null) this.ttftEl.title = `the server measured ${server} ms from the request to the model's first token`;
  }

  /** The current text block is complete: render it whole. */
  private endBlock(): void {
    if (this.block) {
      this.block.ended = true;
      schedule(this);
    }
    this.block = null;
  }

  /** The run ended: every block is complete. */
  private endAll(): void {
    for (const b of this.textBlocks) b.ended = true;
    this.block = null;
    schedule(this);
  }

  private appendText(delta: string): void {
    if (!this.block) {
      const node = el("div", "markdown answer");
      const settled = el("div");
      const tail = el("div");
      node.append(settled, tail);
      this.blocks.appendChild(node);
      this.block = { node, settled, tail, text: "", settledEnd: 0, painted: -1, ended: false, whole: false };
      this.textBlocks.push(this.block);
    }
    this.block.text += delta;
    schedule(this);
  }

  private tool(callId: string, name: string, state: string, step: string): void {
    let card = this.tools.get(callId);
    if (!card) {
      this.endBlock();
      card = el("div", "tool");
      card.dataset.callId = callId;
      card.append(el("span", "icon"), el("span", "name", name), el("span", "step"));
      this.blocks.appendChild(card);
      this.tools.set(callId, card);
    }
    if (card.dataset.state === "done" || card.dataset.state === "failed") return;
    card.dataset.state = state;
    const stepEl = card.querySelector(".step");
    if (stepEl) stepEl.textContent = step;
    schedule(this);
  }

  paint(): void {
    if (this.reasoningPainted !== this.reasoningText.length) {
      this.reasoning.textContent = this.reasoningText;
      this.reasoningPainted = this.reasoningText.length;
    }
    for (const b of this.textBlocks) {
      if (b.whole) continue;
      if (b.ended) {
        renderMarkdown(b.node, b.text);
        b.whole = true;
        continue;
      }
      if (b.painted === b.text.length) continue;
      const cut = settleCut(b.text, b.settledEnd);
      if (cut > b.settledEnd) {
        b.settled.insertAdjacentHTML("beforeend", markdownToSafeHtml(b.text.slice(b.settledEnd, cut)));
        b.settledEnd = cut;
      }
      renderMarkdown(b.tail, b.text.slice(b.settledEnd));
      b.painted = b.text.length;
    }
  }

  /** A stored message (no live run): its turns when it called tools, else its text. */
  showStored(m: Message): void {
    this.runId = m.run_id ?? null;
    if (m.run_id) this.root.dataset.runId = m.run_id;
    this.root.dataset.messageId = m.id;
    if (m.reasoning) {
      this.reasoningText = m.reasoning;
      this.thinking.hidden = false;
    }
    const turns = (m.turns ?? []) as { role: string; content?: string; tool_calls?: { id: string; name: string }[]; tool_call_id?: string; tool_name?: string; content_error?: unknown }[];
    if (turns.length) {
      for (const t of turns) {
        if (t.role === "assistant") {
          if (t.content) this.appendText(t.content);
          this.endBlock();
          for (const c of t.tool_calls ?? []) this.tool(c.id, c.name, "done", "done");
        }
      }
    } else if (m.content) {
      this.appendText(m.content);
    }
    this.endAll();
    this.setState(m.status === "complete" ? "complete" : m.status);
    schedule(this);
  }
}

// ---------------------------------------------------------------------------------------------
// Artifacts: one card each, first "creating…" (intermediate), then final with its versions and,
// for tables, a CSV download.

class ArtifactCard {
  readonly root = el("section", "artifact");
  private readonly title = el("span", "title");
  private readonly badge = el("span", "badge");
  private readonly versions = el("select");
  private readonly csv = el("a", undefined, "CSV");
  private readonly body = el("div", "body");
  private chart: Chart | null = null;
  latest: Artifact;

  constructor(a: Artifact) {
    this.latest = a;
    this.root.dataset.artifactId = a.id;
    this.versions.setAttribute("aria-label", "version");
    this.versions.addEventListener("change", () => void this.showVersion(Number(this.versions.value)));
    this.csv.setAttribute("download", "");
    const header = el("header");
    header.append(this.title, this.badge, this.versions, this.csv);
    this.root.append(header, this.body);
    this.show(a, true);
  }

  show(a: Artifact, isLatest: boolean): void {
    if (isLatest) this.latest = a;
    // Every state shown, oldest first (the last 200): intermediate states can be brief.
    stats.artifactStates.push(`${a.kind}:${a.status}:v${a.version}`);
    if (stats.artifactStates.length > 200) stats.artifactStates.shift();
    this.root.dataset.status = a.status;
    this.root.dataset.kind = a.kind;
    this.root.dataset.version = String(a.version);
    this.title.textContent = a.title || a.kind;
    this.badge.textContent =
      a.status === "intermediate"
        ? "creating…"
        : a.version === this.latest.version
          ? `v${a.version}`
          : `v${a.version} of ${this.latest.version}`;
    const final = this.latest.status === "final";
    this.versions.hidden = !final;
    if (final && this.versions.options.length !== this.latest.version) {
      this.versions.replaceChildren(
        ...Array.from({ length: this.latest.version }, (_, i) => {
          const o = el("option", undefined, `v${i + 1}`);
          o.value = String(i + 1);
          return o;
        }),
      );
    }
    if (final) this.versions.value = String(a.version);
    this.csv.hidden = !(final && a.kind === "table");
    this.csv.href = client.artifactCsvUrl(a.id);
    if (a.kind === "table") renderTable(this.body, a.data);
    else if (a.kind === "chart") this.chart = renderChart(this.body, a.title, a.data, this.chart);
    else {
      const doc = el("div", "markdown");
      const d = a.data as { markdown?: unknown } | null;
      renderMarkdown(doc, typeof d?.markdown === "string" ? d.markdown : "");
      this.body.replaceChildren(doc);
    }
  }

  private async showVersion(v: number): Promise<void> {
    if (v === this.latest.version) {
      this.show(this.latest, true);
      return;
    }
    try {
      this.show(await client.getArtifact(this.latest.id, v), false);
    } catch (err) {
      notice(`Could not load version ${v}: ${(err as Error).message}`);
    }
  }

  remove(): void {
    this.chart?.destroy();
    this.root.remove();
  }
}

const artifactsPanel = {
  list: $<HTMLDivElement>("artifact-list"),
  cards: new Map<string, ArtifactCard>(),
  upsert(a: Artifact): void {
    const card = this.cards.get(a.id);
    if (!card) {
      const c = new ArtifactCard(a);
      this.cards.set(a.id, c);
      this.list.querySelector(".empty")?.remove();
      this.list.prepend(c.root);
      return;
    }
    const l = card.latest;
    if (l.version > a.version || (l.version === a.version && l.status === "final" && a.status === "intermediate")) return;
    card.show(a, true);
  },
  /** A run ended before its create_* call ran: what it showed was never made. */
  dropUnfinished(runId: string): void {
    for (const [id, card] of this.cards) {
      if (card.latest.run_id === runId && card.latest.status === "intermediate") {
        card.remove();
        this.cards.delete(id);
      }
    }
  },
  clear(): void {
    for (const c of this.cards.values()) c.remove();
    this.cards.clear();
    this.list.replaceChildren(el("p", "empty", "Tables, charts and documents the agent makes appear here."));
  },
};

// ---------------------------------------------------------------------------------------------
// Threads, sending, following.

let threadId: string | null = null;
let generation = 0;
let active: { run: RunStream; view: AssistantView } | null = null;
const input = $<HTMLTextAreaElement>("input");
const sendBtn = $<HTMLButtonElement>("send");
const stopBtn = $<HTMLButtonElement>("stop");
const conn = $<HTMLSpanElement>("conn");

function notice(text: string | null): void {
  const n = $<HTMLDivElement>("notice");
  n.hidden = text === null;
  n.textContent = text ?? "";
}

function setBusy(busy: boolean): void {
  sendBtn.disabled = busy;
  stopBtn.hidden = !busy;
  stopBtn.disabled = false;
}

function userBubble(text: string): void {
  const m = el("article", "msg user", text);
  messagesEl.appendChild(m);
}

function follow(run: RunStream, view: AssistantView): void {
  active = { run, view };
  setBusy(true);
  const mine = generation;
  run.done
    .then((outcome: RunOutcome) => {
      if (outcome.fallback?.message) {
        view.clear();
        view.showStored(outcome.fallback.message);
        notice("The live stream could not be kept; this is the finished answer.");
      }
    })
    .catch((err: unknown) => {
      if (err instanceof StreamError && err.type === "CANCELLED") return;
      if (err instanceof StreamError && err.status === 401) askForKey();
      view.setState("error", (err as Error).message);
      notice(`Lost the stream: ${(err as Error).message}`);
    })
    .finally(() => {
      if (generation !== mine || active?.run !== run) return;
      active = null;
      conn.hidden = true;
      setBusy(false);
      void refreshThreads();
    });
}

function handlers(view: AssistantView) {
  return {
    onEvent: (e: SluiceEvent) => view.apply(e),
    onStatus: (s: string, info: { attempt?: number; delayMs?: number }) => {
      if (s === "reconnecting") {
        stats.reconnects++;
        conn.hidden = false;
        conn.textContent = `reconnecting… (attempt ${info.attempt ?? 1})`;
      } else if (s === "fallback") {
        conn.hidden = false;
        conn.textContent = "fetching the finished answer…";
      } else {
        conn.hidden = true;
      }
    },
    onReset: () => {
      stats.resets++;
      view.clear();
    },
  };
}

async function send(text: string): Promise<void> {
  notice(null);
  const mine = generation;
  if (threadId === null) {
    const thread = await client.createThread(text.replace(/\s+/g, " ").trim().slice(0, 60));
    if (mine !== generation) return;
    threadId = thread.id;
    history.replaceState(null, "", `#/t/${thread.id}`);
    $("thread-title").textContent = thread.title ?? "Untitled";
    void refreshThreads();
  }
  userBubble(text);
  const view = new AssistantView();
  view.sentAt = performance.now();
  messagesEl.appendChild(view.root);
  pinned = true;
  schedule(view);
  const model = modelSelect.value || undefined;
  follow(client.startRun(threadId, { content: text, model }, handlers(view)), view);
}

async function openThread(id: string | null): Promise<void> {
  const mine = ++generation;
  active?.run.close();
  active = null;
  setBusy(false);
  conn.hidden = true;
  notice(null);
  threadId = id;
  messagesEl.replaceChildren();
  artifactsPanel.clear();
  markCurrent();
  if (id === null) {
    $("thread-title").textContent = "New thread";
    input.focus();
    return;
  }
  let thread;
  try {
    thread = await client.getThread(id);
  } catch (err) {
    if (mine !== generation) return;
    if (err instanceof StreamError && err.status === 401) askForKey();
    notice(`Could not open the thread: ${(err as Error).message}`);
    return;
  }
  if (mine !== generation) return;
  $("thread-title").textContent = thread.title || "Untitled";
  for (const a of thread.artifacts ?? []) artifactsPanel.upsert(a);
  const stored: [string, AssistantView][] = [];
  for (const m of thread.messages ?? []) {
    if (m.role === "user") {
      userBubble(m.content);
      continue;
    }
    const view = new AssistantView();
    messagesEl.appendChild(view.root);
    if (m.status === "streaming" && m.run_id) {
      // Still going: replay its events from the first and keep following it live.
      follow(client.followRun(m.run_id, handlers(view)), view);
    } else {
      view.showStored(m);
      if (m.run_id) stored.push([m.run_id, view]);
    }
  }
  // Time to first token of the finished messages, from their runs (the newest fifty).
  for (const [runId, view] of stored.slice(-50)) {
    client.getRun(runId).then(
      (run) => {
        if (mine === generation) view.showTtft(run.time_to_first_token_ms ?? null, run.time_to_first_token_ms ?? null);
      },
      () => {},
    );
  }
  pinned = true;
  schedule(SCROLL_ONLY); // the next frame scrolls the loaded thread to its end
}

function markCurrent(): void {
  for (const a of document.querySelectorAll<HTMLAnchorElement>("#threads a")) {
    a.classList.toggle("current", a.dataset.threadId === threadId);
  }
}

async function refreshThreads(): Promise<void> {
  let threads;
  try {
    threads = await client.listThreads();
  } catch (err) {
    if (err instanceof StreamError && err.status === 401) askForKey();
    return;
  }
  const list = $<HTMLUListElement>("threads");
  list.replaceChildren(
    ...threads.map((t) => {
      const li = el("li");
      const a = el("a", undefined, t.title || "Untitled");
      a.href = `#/t/${t.id}`;
      a.dataset.threadId = t.id;
      a.title = new Date(t.created_at).toLocaleString();
      li.appendChild(a);
      return li;
    }),
  );
  markCurrent();
}

// The models the server offers; the choice is remembered in this browser.
const MODEL_STORAGE = "sluice.model";
const modelSelect = $<HTMLSelectElement>("model");
modelSelect.addEventListener("change", () => localStorage.setItem(MODEL_STORAGE, modelSelect.value));

async function loadModels(): Promise<void> {
  let list;
  try {
    list = await client.models();
  } catch {
    return; // 401 is handled by the thread list; without models the server's default applies
  }
  const remembered = localStorage.getItem(MODEL_STORAGE);
  modelSelect.replaceChildren(
    ...list.models.map((m) => {
      const o = el("option", undefined, m.default ? `${m.id} (default)` : m.id);
      o.value = m.id;
      return o;
    }),
  );
  const known = list.models.some((m) => m.id === remembered);
  modelSelect.value = known && remembered ? remembered : list.default;
  modelSelect.hidden = list.models.length < 2 && !known;
}

function askForKey(): void {
  $("key-form").hidden = false;
  notice("This server needs an API key.");
}

function route(): void {
  const m = /^#\/t\/([\w-]+)$/.exec(location.hash);
  const id = m?.[1] ?? null;
  if (id !== threadId || id === null) void openThread(id);
}

// ---------------------------------------------------------------------------------------------

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || active) return;
  input.value = "";
  send(text).catch((err: unknown) => {
    if (err instanceof StreamError && err.status === 401) askForKey();
    notice(`Could not send: ${(err as Error).message}`);
  });
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $<HTMLFormElement>("composer").requestSubmit();
  }
});
stopBtn.addEventListener("click", () => {
  const runId = active?.run.runId;
  if (!runId) return;
  stopBtn.disabled = true;
  client.cancelRun(runId).catch((err: unknown) => notice(`Could not stop: ${(err as Error).message}`));
});
$("new-thread").addEventListener("click", () => {
  history.pushState(null, "", "#/");
  void openThread(null);
});
$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $<HTMLInputElement>("key-input").value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  client = new SluiceClient({ apiKey: key || undefined });
  $("key-form").hidden = true;
  void refreshThreads();
  void loadModels();
  void openThread(threadId);
});
window.addEventListener("hashchange", route);

void refreshThreads();
void loadModels();
route();
