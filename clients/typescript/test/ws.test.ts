import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { WebSocketTransport, type WebSocketLike } from "../src/ws.js";
import type { SluiceEvent } from "../src/types.js";

class FakeSocket implements WebSocketLike {
  readyState = 0;
  sent: Record<string, unknown>[] = [];
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: unknown) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  constructor(readonly url: string) {}
  send(data: string) {
    this.sent.push(JSON.parse(data) as Record<string, unknown>);
  }
  close() {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({});
  }
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  receive(msg: object) {
    this.onmessage?.({ data: JSON.stringify(msg) });
  }
  event(seq: number, type = "text_delta", extra: object = {}) {
    this.receive({ type, run_id: "run1", seq, delta: `d${seq}`, ...extra });
  }
}

function transport(opts: Partial<ConstructorParameters<typeof WebSocketTransport>[0]> = {}) {
  const sockets: FakeSocket[] = [];
  const t = new WebSocketTransport({
    url: "ws://127.0.0.1:1/v1/ws",
    connect: (url) => {
      const s = new FakeSocket(url);
      sockets.push(s);
      return s;
    },
    random: () => 0.5,
    ...opts,
  });
  return { t, sockets, last: () => sockets[sockets.length - 1] as FakeSocket };
}

describe("WebSocketTransport", () => {
  beforeEach(() => vi.useFakeTimers());
  afterEach(() => vi.useRealTimers());

  it("starts a run, learns its id, and delivers its events", async () => {
    const { t, last } = transport({ apiKey: "secret key" });
    const events: SluiceEvent[] = [];
    const run = t.startRun("t1", { content: "hi" }, { onEvent: (e) => events.push(e) });
    expect(last().url).toBe("ws://127.0.0.1:1/v1/ws?access_token=secret%20key");
    last().open();
    expect(last().sent[0]).toEqual({
      type: "user_message",
      request_id: "r1",
      idempotency_key: expect.any(String),
      thread_id: "t1",
      content: "hi",
    });
    last().receive({ type: "run_accepted", request_id: "r1", run_id: "run1", thread_id: "t1" });
    expect(run.runId).toBe("run1");
    last().event(1, "run_started");
    last().event(2);
    last().event(3, "run_completed");
    expect((await run.done).terminal?.type).toBe("run_completed");
    expect(events.map((e) => e.seq)).toEqual([1, 2, 3]);
    t.close();
  });

  it("re-sends an unanswered start after a reconnect with the same idempotency key", async () => {
    const { t, sockets, last } = transport();
    t.startRun(undefined, { content: "hi" });
    last().open();
    const first = last().sent[0];
    last().close(); // dropped before run_accepted: the server may or may not have started it
    await vi.advanceTimersByTimeAsync(1000);
    expect(sockets.length).toBe(2);
    last().open();
    const again = last().sent[0];
    expect(again?.type).toBe("user_message");
    expect(typeof first?.idempotency_key).toBe("string");
    expect(again?.idempotency_key).toBe(first?.idempotency_key);
    t.close();
  });

  it("reconnects with backoff and resubscribes after the last seq, never delivering twice", async () => {
    const { t, sockets, last } = transport();
    const seqs: number[] = [];
    const statuses: string[] = [];
    const run = t.followRun("run1", { onEvent: (e) => seqs.push(e.seq), onStatus: (s) => statuses.push(s) });
    last().open();
    expect(last().sent[0]).toEqual({ type: "subscribe", run_id: "run1", after: 0 });
    last().event(1, "run_started");
    last().event(2);
    last().close(); // the network drops the socket
    expect(statuses).toContain("reconnecting");
    await vi.advanceTimersByTimeAsync(999);
    expect(sockets.length).toBe(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(sockets.length).toBe(2);
    last().open();
    expect(last().sent[0]).toEqual({ type: "subscribe", run_id: "run1", after: 2 });
    last().event(2); // a repeat must not show twice
    last().event(3);
    last().event(4, "run_completed");
    await run.done;
    expect(seqs).toEqual([1, 2, 3, 4]);
    t.close();
  });

  it("pings a silent socket and takes it as dead when nothing answers", async () => {
    const { t, sockets, last } = transport({ pingIntervalMs: 1000, heartbeatTimeoutMs: 3000 });
    const statuses: [string, string | undefined][] = [];
    t.followRun("run1", { onStatus: (s, i) => statuses.push([s, i.error?.type]) });
    last().open();
    await vi.advanceTimersByTimeAsync(1000);
    expect(last().sent.at(-1)).toEqual({ type: "ping" });
    last().receive({ type: "pong" }); // alive: the deadline moves
    await vi.advanceTimersByTimeAsync(2500);
    expect(sockets.length).toBe(1);
    await vi.advanceTimersByTimeAsync(600);
    expect(statuses).toContainEqual(["reconnecting", "TIMEOUT"]);
    await vi.advanceTimersByTimeAsync(1000);
    expect(sockets.length).toBe(2);
    t.close();
  });

  it("fails a run the server refuses, and gives up after the retries", async () => {
    const { t, last } = transport({ retry: { maxRetries: 1 } });
    const refused = t.followRun("nope");
    const dropped = t.followRun("run1");
    last().open();
    last().receive({ type: "request_error", code: "NOT_FOUND", message: "no run", run_id: "nope" });
    await expect(refused.done).rejects.toMatchObject({ type: "SERVER", code: "NOT_FOUND" });
    last().close();
    await vi.advanceTimersByTimeAsync(1000);
    last().close(); // the retry fails too
    await expect(dropped.done).rejects.toMatchObject({ type: "MAX_RETRIES_EXCEEDED" });
    t.close();
  });

  it("starts over after STREAM_RESET", async () => {
    const { t, last } = transport();
    let resets = 0;
    const seqs: number[] = [];
    const run = t.followRun("run1", { after: 9, onReset: () => resets++, onEvent: (e) => seqs.push(e.seq) });
    last().open();
    last().receive({ type: "request_error", code: "STREAM_RESET", message: "lost", run_id: "run1" });
    expect(resets).toBe(1);
    expect(last().sent.at(-1)).toEqual({ type: "subscribe", run_id: "run1", after: 0 });
    last().event(1, "run_started");
    last().event(2, "run_interrupted");
    await run.done;
    expect(seqs).toEqual([1, 2]);
    t.close();
  });
});

describe("SluiceClient over the WebSocket transport", () => {
  it("routes startRun and followRun to one socket, the same interface as SSE", async () => {
    const { SluiceClient } = await import("../src/client.js");
    const sockets: FakeSocket[] = [];
    const client = new SluiceClient({
      baseUrl: "http://127.0.0.1:7420",
      transport: "websocket",
      connectWebSocket: (url) => {
        const s = new FakeSocket(url);
        sockets.push(s);
        return s;
      },
      fetch: (() => {
        throw new Error("no HTTP expected");
      }) as unknown as typeof fetch,
    });
    const started = client.startRun(undefined, { content: "hi", on_disconnect: "cancel" }, { idempotencyKey: "k-42" });
    const followed = client.followRun("run1", { after: 3 });
    expect(sockets.length).toBe(1);
    const s = sockets[0] as FakeSocket;
    expect(s.url).toBe("ws://127.0.0.1:7420/v1/ws");
    s.open();
    expect(s.sent).toEqual([
      { type: "user_message", request_id: "r1", idempotency_key: "k-42", content: "hi" },
      { type: "subscribe", run_id: "run1", after: 3 },
    ]);
    s.receive({ type: "run_accepted", request_id: "r1", run_id: "run2", thread_id: "t9" });
    s.receive({ type: "run_completed", run_id: "run2", seq: 9 });
    s.receive({ type: "run_cancelled", run_id: "run1", seq: 4, reason: "x" });
    expect((await started.done).runId).toBe("run2");
    expect((await followed.done).terminal?.type).toBe("run_cancelled");
    client.close();
  });
});
