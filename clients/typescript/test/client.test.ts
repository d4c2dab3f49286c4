import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { SluiceClient } from "../src/client.js";
import { StreamError, classify, errorFromResponse, parseRetryAfter } from "../src/errors.js";
import { DEFAULT_RETRY, backoffDelay } from "../src/backoff.js";
import type { ConnectionStatus, StatusInfo } from "../src/run.js";
import type { SluiceEvent } from "../src/types.js";
import {
  completed,
  controlledResponse,
  delta,
  jsonResponse,
  refused,
  responseOf,
  scriptedFetch,
  started,
} from "./helpers.js";

const noJitter = () => 0.5; // random() = 0.5 puts the jitter at zero

function collect() {
  const events: SluiceEvent[] = [];
  const statuses: [ConnectionStatus, StatusInfo][] = [];
  return {
    events,
    statuses,
    onEvent: (e: SluiceEvent) => events.push(e),
    onStatus: (s: ConnectionStatus, i: StatusInfo) => statuses.push([s, i]),
    text: () => events.map((e) => (e.type === "text_delta" ? e.delta : "")).join(""),
  };
}

describe("following a run across dropped connections", () => {
  beforeEach(() => vi.useFakeTimers());
  afterEach(() => vi.useRealTimers());

  it("resumes with Last-Event-ID and delivers each event exactly once", async () => {
    const { fetch, calls } = scriptedFetch([
      // The first connection delivers 1..4, then the network drops it mid-frame.
      () => {
        const c = controlledResponse();
        c.push(started() + delta(2, "Hel") + delta(3, "lo, ") + delta(4, "wor") + "id: 5\ndata: {\"ty");
        setTimeout(() => c.error(new TypeError("network error")), 10);
        return c.response;
      },
      // The server replays from after the cursor; a stale proxy might repeat one: it must not show twice.
      () => responseOf([delta(4, "wor"), delta(5, "ld"), completed(6)]),
    ]);
    const client = new SluiceClient({ fetch, random: noJitter });
    const seen = collect();
    const run = client.startRun("t1", { content: "hi" }, seen);
    await vi.advanceTimersByTimeAsync(2000);
    const outcome = await run.done;
    expect(seen.text()).toBe("Hello, world");
    expect(seen.events.map((e) => e.seq)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(outcome.terminal?.type).toBe("run_completed");
    expect(calls[0]).toMatchObject({ method: "POST", url: "/v1/threads/t1/runs/stream" });
    expect(JSON.parse(calls[0]?.body ?? "")).toEqual({ content: "hi" });
    expect(calls[1]).toMatchObject({ method: "GET", url: "/v1/runs/run1/events" });
    expect(calls[1]?.headers["last-event-id"]).toBe("4");
    expect(seen.statuses.map(([s]) => s)).toEqual(["streaming", "reconnecting", "streaming", "closed"]);
  });

  it("treats a body that ends before the terminal event as a drop", async () => {
    const { fetch, calls } = scriptedFetch([
      () => responseOf([started(), delta(2, "a")]),
      () => responseOf([delta(3, "b"), completed(4)]),
    ]);
    const seen = collect();
    const run = new SluiceClient({ fetch, random: noJitter }).followRun("run1", seen);
    await vi.advanceTimersByTimeAsync(1000);
    await run.done;
    expect(seen.text()).toBe("ab");
    expect(calls[0]?.headers["last-event-id"]).toBeUndefined();
    expect(calls[1]?.headers["last-event-id"]).toBe("2");
  });

  it("iterates the events with for await", async () => {
    const { fetch } = scriptedFetch([() => responseOf([started(), delta(2, "x"), completed(3)])]);
    const run = new SluiceClient({ fetch }).followRun("run1");
    const types: string[] = [];
    for await (const e of run) types.push(e.type);
    expect(types).toEqual(["run_started", "text_delta", "run_completed"]);
  });

  it("starts over when the server answers STREAM_RESET", async () => {
    const { fetch, calls } = scriptedFetch([
      () => responseOf([started(), delta(2, "lost")]),
      () => jsonResponse(409, { error: { code: "STREAM_RESET", message: "events after 1 were lost" } }),
      () => responseOf([started(), frame3()]),
    ]);
    function frame3() {
      return `id: 2.2\ndata: ${JSON.stringify({ type: "run_interrupted", run_id: "run1", seq: 2, reason: "crash", durable_seq: 1 })}\n\n`;
    }
    let resets = 0;
    const seen = collect();
    const run = new SluiceClient({ fetch, random: noJitter }).followRun("run1", { ...seen, onReset: () => resets++ });
    await vi.advanceTimersByTimeAsync(5000);
    const outcome = await run.done;
    expect(resets).toBe(1);
    expect(calls[2]?.headers["last-event-id"]).toBeUndefined();
    expect(outcome.terminal?.type).toBe("run_interrupted");
    expect(run.lastEventId).toBe("2.2");
  });
});

describe("backoff", () => {
  beforeEach(() => vi.useFakeTimers());
  afterEach(() => vi.useRealTimers());

  it("doubles from 1 s, capped at the maximum, spread by the jitter", () => {
    const opts = { ...DEFAULT_RETRY, maxDelayMs: 5000 };
    expect([0, 1, 2, 3, 4].map((a) => backoffDelay(a, opts, noJitter))).toEqual([1000, 2000, 4000, 5000, 5000]);
    expect(backoffDelay(1, opts, () => 0)).toBe(1600);
    expect(backoffDelay(1, opts, () => 0.999999)).toBe(2400);
  });

  it("waits 1 s, 2 s, 4 s between attempts, and starts over after progress", async () => {
    const { fetch, calls } = scriptedFetch(
      [
        refused,
        refused,
        refused,
        () => responseOf([started()]), // progress: the next failure waits 1 s again
        refused,
        () => responseOf([completed(2)]),
      ],
      () => Date.now(),
    );
    const t0 = Date.now();
    const run = new SluiceClient({ fetch, random: noJitter }).followRun("run1");
    await vi.advanceTimersByTimeAsync(20_000);
    await run.done;
    const gaps = calls.map((c, i) => c.at - (i === 0 ? t0 : (calls[i - 1]?.at ?? 0)));
    expect(gaps).toEqual([0, 1000, 2000, 4000, 1000, 2000]);
  });

  it("honours Retry-After on 503", async () => {
    const { fetch, calls } = scriptedFetch([
      () => jsonResponse(503, { error: { code: "UNAVAILABLE", message: "busy" } }, { "retry-after": "7" }),
      () => responseOf([started(), completed(2)]),
    ]);
    const t0 = Date.now();
    const run = new SluiceClient({ fetch, random: noJitter }).followRun("run1");
    await vi.advanceTimersByTimeAsync(10_000);
    await run.done;
    expect((calls[1]?.at ?? 0) - t0).toBe(7000);
  });
});

describe("heartbeat", () => {
  beforeEach(() => vi.useFakeTimers());
  afterEach(() => vi.useRealTimers());

  it("takes a connection silent past the heartbeat deadline as dead and resumes", async () => {
    let firstClosed = false;
    const { fetch, calls } = scriptedFetch([
      (_call, signal) => {
        const c = controlledResponse(signal);
        c.push(started() + delta(2, "a"));
        void c.response.body; // then nothing, not even a heartbeat
        signal?.addEventListener("abort", () => (firstClosed = true));
        return c.response;
      },
      () => responseOf([delta(3, "b"), completed(4)]),
    ]);
    const seen = collect();
    const run = new SluiceClient({ fetch, heartbeatTimeoutMs: 30_000, random: noJitter }).followRun("run1", seen);
    await vi.advanceTimersByTimeAsync(29_000);
    expect(calls.length).toBe(1);
    await vi.advanceTimersByTimeAsync(1_000 + 1_000 + 10);
    await run.done;
    const reconnecting = seen.statuses.find(([s]) => s === "reconnecting");
    expect(reconnecting?.[1].error?.type).toBe("TIMEOUT");
    expect(calls[1]?.headers["last-event-id"]).toBe("2");
    expect(seen.text()).toBe("ab");
    expect(firstClosed || calls.length === 2).toBe(true);
  });

  it("keeps a connection that only sends heartbeats", async () => {
    const { fetch, calls } = scriptedFetch([
      () => {
        const c = controlledResponse();
        c.push(started());
        const beat = setInterval(() => c.push(": heartbeat\n\n"), 15_000);
        setTimeout(() => {
          clearInterval(beat);
          c.push(completed(2));
        }, 120_000);
        return c.response;
      },
    ]);
    const run = new SluiceClient({ fetch, heartbeatTimeoutMs: 40_000 }).followRun("run1");
    await vi.advanceTimersByTimeAsync(121_000);
    expect((await run.done).terminal?.type).toBe("run_completed");
    expect(calls.length).toBe(1);
  });
});

describe("error classification", () => {
  it("classifies what fetch and readers throw", () => {
    expect(classify(new TypeError("fetch failed")).type).toBe("NETWORK");
    expect(classify(new DOMException("x", "AbortError")).type).toBe("CANCELLED");
    expect(classify(new DOMException("x", "TimeoutError")).type).toBe("TIMEOUT");
    expect(classify(new SyntaxError("bad json")).type).toBe("PARSE");
    const same = new StreamError("SERVER", "x", { status: 500 });
    expect(classify(same)).toBe(same);
  });

  it("reads the server's code and decides what is retryable", async () => {
    const e404 = await errorFromResponse(jsonResponse(404, { error: { code: "NOT_FOUND", message: 'no run "x"' } }));
    expect(e404).toMatchObject({ type: "SERVER", status: 404, code: "NOT_FOUND", retryable: false });
    expect(e404.message).toContain('no run "x"');
    const e500 = await errorFromResponse(new Response("oops", { status: 500 }));
    expect(e500).toMatchObject({ type: "SERVER", status: 500, retryable: true });
    expect((await errorFromResponse(jsonResponse(429, {}))).retryable).toBe(true);
    expect(new StreamError("PARSE", "x").retryable).toBe(false);
    expect(new StreamError("NETWORK", "x").retryable).toBe(true);
    expect(parseRetryAfter("3")).toBe(3000);
    expect(parseRetryAfter("soon")).toBeUndefined();
  });

  it("fails at once, without retrying, on a 4xx", async () => {
    const { fetch, calls } = scriptedFetch([
      () => jsonResponse(404, { error: { code: "NOT_FOUND", message: "no run" } }),
    ]);
    const run = new SluiceClient({ fetch }).followRun("nope");
    await expect(run.done).rejects.toMatchObject({ type: "SERVER", code: "NOT_FOUND" });
    expect(calls.length).toBe(1);
  });

  it("ends with CANCELLED when the caller closes", async () => {
    const { fetch } = scriptedFetch([(_c, signal) => controlledResponse(signal).response]);
    const run = new SluiceClient({ fetch }).followRun("run1");
    await new Promise((r) => setTimeout(r, 5));
    run.close();
    await expect(run.done).rejects.toMatchObject({ type: "CANCELLED" });
  });

  it("reports a JSON answer that is not JSON as PARSE", async () => {
    const { fetch } = scriptedFetch([() => new Response("<html>proxy error</html>", { status: 200 })]);
    await expect(new SluiceClient({ fetch }).getRun("x")).rejects.toMatchObject({ type: "PARSE" });
  });
});

describe("fallback to the non-streaming endpoint", () => {
  beforeEach(() => vi.useFakeTimers());
  afterEach(() => vi.useRealTimers());

  const run = { id: "run1", thread_id: "t1", message_id: "m1", status: "completed" };
  const message = { id: "m1", role: "assistant", content: "the whole answer", status: "complete" };

  it("uses runs/wait when the stream could never start", async () => {
    const { fetch, calls } = scriptedFetch([
      refused,
      refused,
      refused,
      () => jsonResponse(200, { run, message }),
    ]);
    const seen = collect();
    const stream = new SluiceClient({ fetch, retry: { maxRetries: 2 }, random: noJitter }).startRun(
      "t1",
      { content: "hi" },
      seen,
    );
    await vi.advanceTimersByTimeAsync(10_000);
    const outcome = await stream.done;
    expect(outcome.fallback?.message?.content).toBe("the whole answer");
    expect(calls[3]).toMatchObject({ method: "POST", url: "/v1/threads/t1/runs/wait" });
    // With the start's key: if one of the failed attempts did start the run, this waits for it.
    expect(calls[3]?.headers["idempotency-key"]).toBe(calls[0]?.headers["idempotency-key"]);
    expect(seen.statuses.map(([s]) => s)).toContain("fallback");
  });

  it("polls the run when it is known, then reads its message", async () => {
    const { fetch, calls } = scriptedFetch([
      () => responseOf([started()]),
      refused,
      refused,
      () => jsonResponse(200, { ...run, status: "running" }),
      () => jsonResponse(200, run),
      () => jsonResponse(200, { id: "t1", messages: [message] }),
    ]);
    const stream = new SluiceClient({ fetch, retry: { maxRetries: 2 }, random: noJitter }).followRun("run1");
    await vi.advanceTimersByTimeAsync(10_000);
    const outcome = await stream.done;
    expect(outcome.fallback?.run.status).toBe("completed");
    expect(outcome.fallback?.message?.content).toBe("the whole answer");
    expect(calls.slice(3).map((c) => c.url)).toEqual(["/v1/runs/run1", "/v1/runs/run1", "/v1/threads/t1"]);
  });

  it("ends with MAX_RETRIES_EXCEEDED when the fallback is off or fails too", async () => {
    const off = scriptedFetch([refused, refused, refused]);
    const a = new SluiceClient({ fetch: off.fetch, retry: { maxRetries: 2 }, fallback: false, random: noJitter }).followRun("run1");
    const b = new SluiceClient({
      fetch: scriptedFetch([refused, refused, refused, refused, refused, refused]).fetch,
      retry: { maxRetries: 2 },
      random: noJitter,
    }).followRun("run1");
    const ea = expect(a.done).rejects.toMatchObject({ type: "MAX_RETRIES_EXCEEDED" });
    const eb = expect(b.done).rejects.toMatchObject({ type: "MAX_RETRIES_EXCEEDED" });
    await vi.advanceTimersByTimeAsync(20_000);
    await ea;
    await eb;
    expect(off.calls.length).toBe(3);
  });
});

describe("a retried start that finds its first attempt running", () => {
  beforeEach(() => vi.useFakeTimers());
  afterEach(() => vi.useRealTimers());

  it("follows that run instead of failing with CONFLICT", async () => {
    const { fetch, calls } = scriptedFetch([
      refused, // the answer was lost, but the run had started
      () => jsonResponse(409, { error: { code: "CONFLICT", message: "thread busy" } }),
      () => jsonResponse(200, { id: "t1", messages: [{ id: "m1", role: "assistant", status: "streaming", run_id: "run1" }] }),
      () => responseOf([started(), completed(2)]),
    ]);
    const stream = new SluiceClient({ fetch, random: noJitter }).startRun("t1", { content: "hi" });
    await vi.advanceTimersByTimeAsync(5_000);
    expect((await stream.done).runId).toBe("run1");
    expect(calls[3]?.url).toBe("/v1/runs/run1/events");
    // Both attempts carried one idempotency key (a server that knows it answers the same run).
    const key = calls[0]?.headers["idempotency-key"];
    expect(key).toMatch(/^[0-9a-f-]{32,36}$/);
    expect(calls[1]?.headers["idempotency-key"]).toBe(key);
  });
});

describe("background mode", () => {
  it("creates the run with POST, then follows its events", async () => {
    const { fetch, calls } = scriptedFetch([
      () => jsonResponse(202, { id: "run1", thread_id: "t1", status: "running" }),
      () => responseOf([started(), completed(2)]),
    ]);
    const stream = new SluiceClient({ fetch, apiKey: "k" }).startRun(undefined, { content: "hi" }, { mode: "background" });
    await stream.done;
    expect(calls.map((c) => `${c.method} ${c.url}`)).toEqual(["POST /v1/runs", "GET /v1/runs/run1/events"]);
    expect(calls[0]?.headers["idempotency-key"]).toBeTruthy();
    expect(calls[1]?.headers.authorization).toBe("Bearer k");
  });
});
