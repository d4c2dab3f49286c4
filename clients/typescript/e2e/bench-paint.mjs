// Benchmark (not a test): how smoothly the page paints a fast, long answer.
//   node e2e/bench-paint.mjs [tokens] [tokens_per_sec] [tokens_per_paragraph]
// Starts the upstream simulator and sluice (default model: the simulator over OpenAI Chat
// Completions, one word per token), opens the page in headless Chromium, sends one message and
// records the intervals between animation frames while the answer streams, against a baseline of
// the same page idle for as long. Prints one JSON line; docs/BENCHMARKS.md records the figures.
import { spawn } from "node:child_process";
import { launchBrowser, startSluice } from "./harness.mjs";
import net from "node:net";

const tokens = Number(process.argv[2] ?? 4000);
const rate = Number(process.argv[3] ?? 2000);

function freePort() {
  return new Promise((ok) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

const simPort = await freePort();
const bin = process.env.SLUICE_BIN;
const sim = spawn(bin, ["simulate", "--listen", `127.0.0.1:${simPort}`], { stdio: "ignore" });
await new Promise((r) => setTimeout(r, 500));
process.env.OPENAI_BASE_URL = `http://127.0.0.1:${simPort}/v1`;
process.env.OPENAI_API_KEY = "sim";
const gapUs = Math.round(1e6 / rate);
const para = Number(process.argv[4] ?? 60);
process.env.SLUICE_DEFAULT_MODEL = `openai-chat/sim?tokens=${tokens}&gap_us=${gapUs}&para=${para}`;
const sluice = await startSluice();
const browser = await launchBrowser();
try {
  const page = await browser.context.newPage();
  await page.goto(`${sluice.url}/`);
  await page.waitForSelector("#composer");
  const frames = (untilDone, maxMs) =>
    page.evaluate(
      ({ untilDone, maxMs }) =>
        new Promise((resolve) => {
          const gaps = [];
          let last = performance.now();
          const start = last;
          const tick = (t) => {
            gaps.push(t - last);
            last = t;
            const all = document.querySelectorAll(".msg.assistant");
            const s = all[all.length - 1]?.getAttribute("data-status");
            const done = untilDone ? s && s !== "streaming" : false;
            if (done || t - start > maxMs) resolve({ gaps, ms: t - start });
            else requestAnimationFrame(tick);
          };
          requestAnimationFrame(tick);
        }),
      { untilDone, maxMs },
    );
  const summary = ({ gaps, ms }) => {
    const sorted = [...gaps].sort((a, b) => a - b);
    const q = (p) => sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))] ?? 0;
    return {
      ms: Math.round(ms),
      frames: gaps.length,
      p50: +q(0.5).toFixed(1),
      p95: +q(0.95).toFixed(1),
      max: +Math.max(...gaps).toFixed(1),
      over50: gaps.filter((g) => g > 50).length,
    };
  };
  await page.fill("#input", "stream fast");
  const streaming = frames(true, 120_000);
  await page.press("#input", "Enter");
  const busy = summary(await streaming);
  const chars = await page.evaluate(() => {
    const all = document.querySelectorAll(".msg.assistant .answer");
    return all[all.length - 1]?.textContent.length ?? 0;
  });
  const idle = summary(await frames(false, busy.ms));
  console.log(JSON.stringify({ tokens, tokens_per_sec: rate, tokens_per_paragraph: para, answer_chars: chars, streaming: busy, idle_baseline: idle, p95_ratio: +(busy.p95 / idle.p95).toFixed(2) }));
} finally {
  await browser.close();
  await sluice.stop();
  sim.kill("SIGTERM");
}
