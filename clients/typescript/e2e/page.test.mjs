// The web page in real headless Chromium against the real server (demo model), through a proxy
// that can cut connections. Screenshots go to e2e/screenshots/.
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { launchBrowser, shot, startProxy, startSluice } from "./harness.mjs";

let sluice;
let proxy;
let browser;

before(async () => {
  sluice = await startSluice({ tokensPerSec: 40 });
  proxy = await startProxy(sluice.url);
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await proxy?.close();
  await sluice?.stop();
});

async function openPage() {
  const page = await browser.context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${proxy.url}/`);
  await page.waitForSelector("#composer");
  return { page, errors };
}

async function sendMessage(page, text) {
  const before = await assistants(page);
  await page.fill("#input", text);
  await page.press("#input", "Enter");
  // The newest assistant message is the one this send made.
  await page.waitForFunction((n) => document.querySelectorAll(".msg.assistant").length > n, before);
}

const assistants = (page) => page.evaluate(() => document.querySelectorAll(".msg.assistant").length);

/** Waits until the last assistant message has ended; returns its status. */
async function waitEnded(page, timeout = 30_000) {
  const handle = await page.waitForFunction(
    () => {
      const all = document.querySelectorAll(".msg.assistant");
      const last = all[all.length - 1];
      const s = last?.getAttribute("data-status");
      return s && s !== "streaming" ? s : false;
    },
    null,
    { timeout, polling: 50 },
  );
  // The status is set as the terminal event arrives; its text is painted on the next frame.
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  return handle.jsonValue();
}

const lastAnswerText = (page) =>
  page.evaluate(() => {
    const all = document.querySelectorAll(".msg.assistant");
    const last = all[all.length - 1];
    return [...(last?.querySelectorAll(".answer") ?? [])].map((a) => a.textContent).join("\n");
  });

async function waitAnswerLength(page, n) {
  await page.waitForFunction(
    (min) => {
      const all = document.querySelectorAll(".msg.assistant");
      const last = all[all.length - 1];
      return [...(last?.querySelectorAll(".answer") ?? [])].map((a) => a.textContent).join("").length > min;
    },
    n,
    { timeout: 20_000, polling: 20 },
  );
}

async function api(path, init) {
  const r = await fetch(`${sluice.url}${path}`, init);
  assert.ok(r.ok, `${path}: ${r.status}`);
  return r.json();
}

describe("the web page", () => {
  it("streams the answer token by token, with thinking, a tool card and time to first token", async () => {
    const { page, errors } = await openPage();
    // The model picker lists what the server offers, the default chosen.
    await page.waitForSelector("#model option[value='demo']", { state: "attached" });
    assert.equal(await page.inputValue("#model"), "demo");
    await page.fill("#input", "How does streaming work here?");
    // Sample the answer's text at every animation frame from the moment the message is sent.
    const samples = page.evaluate(
      () =>
        new Promise((resolve) => {
          const lengths = [];
          // Each time the text got shorter: the lengths and the text's ends on both sides.
          const shrinks = [];
          let previous = "";
          const started = performance.now();
          const tick = () => {
            const all = document.querySelectorAll(".msg.assistant");
            const last = all[all.length - 1];
            const text = [...(last?.querySelectorAll(".answer") ?? [])].map((a) => a.textContent).join("");
            if (lengths[lengths.length - 1] !== text.length) lengths.push(text.length);
            if (text.length < previous.length && text.length > 0) {
              shrinks.push({ from: previous.length, to: text.length, before: previous.slice(-80), after: text.slice(-80) });
            }
            previous = text;
            const s = last?.getAttribute("data-status");
            if ((s && s !== "streaming") || performance.now() - started > 30_000) resolve({ lengths, shrinks });
            else requestAnimationFrame(tick);
          };
          tick();
        }),
    );
    await page.press("#input", "Enter");
    await page.waitForSelector(".msg.assistant .thinking:not([hidden])");
    await waitAnswerLength(page, 40);
    await shot(page, "01-streaming");
    const { lengths, shrinks } = await samples;
    assert.equal(await waitEnded(page), "complete");
    const distinct = lengths.filter((n) => n > 0);
    assert.ok(distinct.length >= 10, `the answer should appear in many paints, saw lengths ${JSON.stringify(lengths)}`);
    assert.ok(
      distinct.every((n, i) => i === 0 || n > distinct[i - 1]),
      `the text only grows while streaming; it shrank: ${JSON.stringify(shrinks)}; lengths ${JSON.stringify(lengths)}`,
    );
    const thinking = await page.textContent(".msg.assistant .thinking .reasoning");
    assert.match(thinking, /demo model/);
    const toolState = await page.getAttribute(".msg.assistant .tool", "data-state");
    assert.equal(toolState, "done");
    const ttft = Number(await page.getAttribute(".msg.assistant .ttft", "data-ms"));
    assert.ok(ttft >= 0 && ttft < 10_000, `time to first token shown: ${ttft}`);
    assert.match(await page.textContent(".msg.assistant h2"), /Demo answer/, "markdown is rendered");
    await shot(page, "02-complete");
    assert.deepEqual(errors, []);
    await page.close();
  });

  it("shows a table and a chart first as intermediate, then final, with versions and CSV", async () => {
    const { page, errors } = await openPage();
    await sendMessage(page, "Show me a table of the events");
    const table = ".artifact[data-kind='table']";
    await page.waitForSelector(`${table}[data-status='intermediate']`, { timeout: 20_000, polling: "raf" });
    assert.equal(await page.textContent(`${table} .badge`), "creating…");
    await shot(page, "03-table-intermediate");
    await page.waitForSelector(`${table}[data-status='final']`, { timeout: 20_000 });
    // Every state the page showed, in order: several intermediate ones, then the final one.
    const shown = (kind) =>
      page.evaluate((k) => window.sluice.stats.artifactStates.filter((s) => s.startsWith(`${k}:`)), kind);
    const tableStates = await shown("table");
    assert.ok(tableStates.filter((s) => s === "table:intermediate:v1").length >= 2, JSON.stringify(tableStates));
    assert.equal(tableStates[tableStates.length - 1], "table:final:v1");
    assert.ok(tableStates.indexOf("table:final:v1") > tableStates.indexOf("table:intermediate:v1"));
    assert.equal(await page.textContent(`${table} .badge`), "v1");
    assert.equal(await page.locator(`${table} tbody tr`).count(), 7);
    const csvHref = await page.getAttribute(`${table} a[download]`, "href");
    const csv = await (await fetch(new URL(csvHref, proxy.url))).text();
    assert.match(csv, /^event,what it carries\r?\n/);
    assert.equal(await page.locator(`${table} select option`).count(), 1);
    await waitEnded(page);

    await sendMessage(page, "Now draw a chart of it");
    // While it streams the list stays pinned to the bottom…
    await waitAnswerLength(page, 60);
    const gap = () =>
      page.evaluate(() => {
        const m = document.getElementById("messages");
        return { below: m.scrollHeight - m.scrollTop - m.clientHeight, top: m.scrollTop, overflow: m.scrollHeight > m.clientHeight };
      });
    const pinnedNow = await gap();
    assert.ok(pinnedNow.overflow, "the thread is taller than the view");
    assert.ok(pinnedNow.below < 48, `pinned to the bottom while streaming: ${JSON.stringify(pinnedNow)}`);
    // …until the reader scrolls up: then it stays where they put it while text keeps coming.
    await page.evaluate(() => (document.getElementById("messages").scrollTop = 0));
    const grownFrom = (await lastAnswerText(page)).length;
    await page.waitForTimeout(400);
    assert.ok((await lastAnswerText(page)).length > grownFrom, "text kept coming");
    assert.equal((await gap()).top, 0, "the view was not pulled back down");
    const chart = ".artifact[data-kind='chart']";
    // The chart's intermediate state lasts a few hundred milliseconds: screenshot it if it is
    // still there, and check from the page's record that it was shown before the final one.
    const caught = await page
      .waitForSelector(`${chart}[data-status='intermediate']`, { timeout: 10_000, polling: "raf" })
      .then(() => true, () => false);
    if (caught) await shot(page, "04-chart-intermediate");
    await page.waitForSelector(`${chart}[data-status='final'] canvas`, { timeout: 20_000 });
    assert.equal(await waitEnded(page), "complete");
    const chartStates = await shown("chart");
    assert.ok(chartStates.includes("chart:intermediate:v1"), JSON.stringify(chartStates));
    assert.equal(chartStates[chartStates.length - 1], "chart:final:v1");
    await shot(page, "05-chart-final");

    // A new version of the table: both versions can be shown, and the CSV is the latest.
    await sendMessage(page, "Add a row to the table");
    await page.waitForSelector(`${table}[data-version='2'][data-status='final']`, { timeout: 20_000 });
    assert.equal(await waitEnded(page), "complete");
    assert.equal(await page.locator(`${table} select option`).count(), 2);
    assert.equal(await page.locator(`${table} tbody tr`).count(), 8);
    await page.selectOption(`${table} select`, "1");
    await page.waitForSelector(`${table}[data-version='1']`);
    assert.equal(await page.locator(`${table} tbody tr`).count(), 7);
    await shot(page, "05b-table-version-1");
    await page.selectOption(`${table} select`, "2");
    await page.waitForSelector(`${table}[data-version='2']`);
    assert.equal(await page.locator(`${table} tbody tr`).count(), 8);
    const csv2 = await (await fetch(new URL(csvHref, proxy.url))).text();
    assert.equal(csv2.trim().split(/\r?\n/).length, 9, "header and eight rows");
    assert.deepEqual(errors, []);
    await page.close();
  });

  it("stops the run when Stop is pressed", async () => {
    const { page } = await openPage();
    await sendMessage(page, "Tell me something long");
    await waitAnswerLength(page, 20);
    const runId = await page.getAttribute(".msg.assistant", "data-run-id");
    await page.click("#stop");
    assert.equal(await waitEnded(page), "cancelled");
    const frozen = await lastAnswerText(page);
    await page.waitForTimeout(500);
    assert.equal(await lastAnswerText(page), frozen, "no text after the cancel");
    const run = await api(`/v1/runs/${runId}`);
    assert.equal(run.status, "cancelled");
    assert.ok(await page.isHidden("#stop"));
    // The half-written table was never made: the panel does not keep it.
    assert.equal(await page.locator(".artifact[data-status='intermediate']").count(), 0);
    await shot(page, "06-stopped");
    await page.close();
  });

  it("resumes after the server side cuts the stream, text intact and not doubled", async () => {
    const { page, errors } = await openPage();
    await sendMessage(page, "Survive a dropped connection please");
    await waitAnswerLength(page, 30);
    const before = proxy.requests.length;
    assert.ok(proxy.cutStreams() >= 1, "an event stream was open to cut");
    await page.waitForSelector("#conn:not([hidden])", { timeout: 5_000, polling: "raf" });
    await shot(page, "07-reconnecting");
    assert.equal(await waitEnded(page), "complete");
    const resume = proxy.requests.slice(before).find((r) => r.path.endsWith("/events"));
    assert.ok(resume, "the page reconnected to the run's events");
    assert.match(resume.headers["last-event-id"] ?? "", /^\d+(\.\d+)?$/, "with Last-Event-ID");
    assert.ok(await page.evaluate(() => window.sluice.stats.reconnects) >= 1);
    const live = await lastAnswerText(page);
    assert.equal(live.split("You asked:").length, 2, "the answer appears once");
    // The same message rendered from what the server stored must read exactly the same.
    await page.reload();
    await page.waitForSelector(".msg.assistant[data-status='complete']");
    assert.equal(await lastAnswerText(page), live);
    // A finished message shows its time to first token too (from its run).
    await page.waitForSelector(".msg.assistant .ttft[data-ms]");
    assert.deepEqual(errors, []);
    await page.close();
  });

  it("picks the live stream back up after a reload mid-run", async () => {
    const { page, errors } = await openPage();
    await sendMessage(page, "Keep going while I reload");
    await waitAnswerLength(page, 30);
    const runId = await page.getAttribute(".msg.assistant", "data-run-id");
    await page.reload();
    await page.waitForSelector(`.msg.assistant[data-run-id='${runId}']`);
    const after = await page.getAttribute(`.msg.assistant[data-run-id='${runId}']`, "data-status");
    assert.equal(after, "streaming", "the run is still going and shown as such");
    await shot(page, "08-after-reload");
    assert.equal(await waitEnded(page), "complete");
    const live = await lastAnswerText(page);
    const thread = await api(`/v1/threads/${(await api(`/v1/runs/${runId}`)).thread_id}`);
    const stored = thread.messages.find((m) => m.run_id === runId);
    assert.equal(stored.status, "complete");
    await page.reload();
    await page.waitForSelector(`.msg.assistant[data-run-id='${runId}'][data-status='complete']`);
    assert.equal(await lastAnswerText(page), live, "the replayed live view equals the stored message");
    assert.deepEqual(errors, []);
    await page.close();
  });

  it("keeps <script> and <img onerror> in model output inert", async () => {
    const { page } = await openPage();
    const dialogs = [];
    page.on("dialog", (d) => {
      dialogs.push(d.message());
      void d.dismiss();
    });
    const evil = `<script>window.__pwned = 1; alert(1)</script> <img src=x onerror="window.__pwned = 2; alert(2)"> [link](javascript:alert(3))`;
    await sendMessage(page, evil);
    assert.equal(await waitEnded(page), "complete");
    const answer = await lastAnswerText(page);
    assert.ok(answer.includes("<script>window.__pwned"), `the script tag shows as text: ${answer.slice(0, 200)}`);
    assert.ok(answer.includes("onerror="), "the img tag shows as text");
    assert.equal(await page.evaluate(() => window.__pwned), undefined);
    assert.equal(await page.locator("#messages script, #messages img, #messages a[href^='javascript']").count(), 0);
    assert.ok((await page.textContent(".msg.user")).includes("<script>"), "the user's own message is text too");
    await page.waitForTimeout(300);
    assert.deepEqual(dialogs, []);
    await shot(page, "09-inert-markup");
    await page.close();
  });

  it("follows a run over the WebSocket transport in the page", async () => {
    const { page } = await openPage();
    const result = await page.evaluate(async () => {
      const { WebSocketTransport, wsUrlFor } = window.sluice;
      const t = new WebSocketTransport({ url: wsUrlFor(location) });
      const types = [];
      const run = t.startRun(undefined, { content: "over a socket" }, { onEvent: (e) => types.push(e.type) });
      const outcome = await run.done;
      t.close();
      return { types, terminal: outcome.terminal.type, seqs: types.length };
    });
    assert.equal(result.terminal, "run_completed");
    assert.equal(result.types[0], "run_started");
    assert.ok(result.types.includes("text_delta"));
    await page.close();
  });

  it("asks for an API key when the server has keys, then works with it", async () => {
    const keyed = await startSluice({ apiKeys: "alice:s3cret-key" });
    try {
      const page = await browser.context.newPage();
      await page.goto(`${keyed.url}/`);
      await page.waitForSelector("#key-form:not([hidden])");
      assert.match(await page.textContent("#notice"), /API key/);
      await page.fill("#key-input", "wrong-key");
      await page.press("#key-input", "Enter");
      await page.waitForSelector("#key-form:not([hidden])");
      await page.fill("#key-input", "s3cret-key");
      await page.press("#key-input", "Enter");
      await page.waitForSelector("#key-form", { state: "hidden" });
      await sendMessage(page, "hello with a key");
      assert.equal(await waitEnded(page), "complete");
      const threads = await (
        await fetch(`${keyed.url}/v1/threads`, { headers: { authorization: "Bearer s3cret-key" } })
      ).json();
      assert.equal(threads.threads.length, 1, "the thread belongs to the key's owner");
      await shot(page, "10-api-key");
      await page.close();
    } finally {
      await keyed.stop();
    }
  });
});
