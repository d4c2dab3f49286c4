import { afterEach, describe, expect, it, vi } from "vitest";
import { SSEParser, SSEStreamReader, type SSEEvent } from "../src/sse.js";
import { detectMessage } from "../src/format.js";
import { StreamError } from "../src/errors.js";
import { controlledResponse, responseOf } from "./helpers.js";

const enc = new TextEncoder();

function parseChunks(chunks: (string | Uint8Array)[]): { events: SSEEvent[]; parser: SSEParser } {
  const parser = new SSEParser();
  const events: SSEEvent[] = [];
  for (const c of chunks) events.push(...parser.feed(typeof c === "string" ? enc.encode(c) : c));
  events.push(...parser.end());
  return { events, parser };
}

/** Every way of cutting `bytes` in two and in three gives the same events as the whole. */
function expectSplitInvariant(bytes: Uint8Array): SSEEvent[] {
  const whole = parseChunks([bytes]).events;
  for (let i = 0; i <= bytes.length; i++) {
    for (let j = i; j <= bytes.length; j += 3) {
      const got = parseChunks([bytes.slice(0, i), bytes.slice(i, j), bytes.slice(j)]).events;
      expect(got, `split at ${i},${j}`).toEqual(whole);
    }
  }
  return whole;
}

const ev = (data: string, more: Partial<SSEEvent> = {}): SSEEvent => ({
  event: "message",
  data,
  id: "",
  retry: null,
  ...more,
});

describe("SSEParser (WHATWG event stream interpretation)", () => {
  it("ends lines at LF, CRLF and CR alike", () => {
    expect(parseChunks(["data: a\n\n"]).events).toEqual([ev("a")]);
    expect(parseChunks(["data: a\r\n\r\n"]).events).toEqual([ev("a")]);
    expect(parseChunks(["data: a\r\r"]).events).toEqual([ev("a")]);
    expect(parseChunks(["data: a\rdata: b\n\r\n"]).events).toEqual([ev("a\nb")]);
  });

  it("takes a CRLF split between two chunks as one line end", () => {
    // Were the LF read as a second line end, the blank line would dispatch `a` early, alone.
    const { events } = parseChunks(["data: a\r", "\ndata: b\r", "\n\r", "\n"]);
    expect(events).toEqual([ev("a\nb")]);
  });

  it("decodes a multi-byte character split between chunks once", () => {
    const bytes = enc.encode("data: ü✔😀\n\n");
    for (let i = 0; i <= bytes.length; i++) {
      const { events } = parseChunks([bytes.slice(0, i), bytes.slice(i)]);
      expect(events, `split at ${i}`).toEqual([ev("ü✔😀")]);
    }
  });

  it("strips one leading BOM only, and turns invalid bytes into U+FFFD", () => {
    const bom = new Uint8Array([0xef, 0xbb, 0xbf]);
    const body = enc.encode("data: x\n\n");
    const twice = new Uint8Array([...bom, ...bom, ...body]);
    // The second BOM is part of the first line's field name: "\uFEFFdata" is not "data".
    expect(parseChunks([twice]).events).toEqual([]);
    expect(parseChunks([new Uint8Array([...bom, ...body])]).events).toEqual([ev("x")]);
    expect(parseChunks([bom.slice(0, 1), bom.slice(1), body]).events).toEqual([ev("x")]);
    expect(parseChunks([new Uint8Array([...enc.encode("data: a"), 0xff, 0x0a, 0x0a])]).events).toEqual([
      ev("a\ufffd"),
    ]);
  });

  it("ignores comments and unknown fields, and reads a field without a colon", () => {
    const { events, parser } = parseChunks([": heartbeat\nfoo: bar\ndata\ndata:x\n\n"]);
    expect(events).toEqual([ev("\nx")]);
    expect(parser.comments).toBe(1);
  });

  it("removes exactly one space after the colon", () => {
    expect(parseChunks(["data:  two\n\n"]).events).toEqual([ev(" two")]);
  });

  it("joins multi-line data with LF and drops the last LF", () => {
    expect(parseChunks(["data: a\ndata:\ndata: b\n\n"]).events).toEqual([ev("a\n\nb")]);
  });

  it("names the event, and resets the name at each blank line", () => {
    expect(parseChunks(["event: x\ndata: 1\n\ndata: 2\n\n"]).events).toEqual([
      ev("1", { event: "x" }),
      ev("2"),
    ]);
  });

  it("carries the id over, updates it on a blank line without data, ignores an id with NUL", () => {
    const { events, parser } = parseChunks([
      "id: 1\ndata: a\n\n",
      "data: b\n\n",
      "id: 2\n\n",
      "data: c\n\n",
      "id: 3\u0000x\ndata: d\n\n",
      "id\ndata: e\n\n",
    ]);
    expect(events.map((e) => e.id)).toEqual(["1", "1", "2", "2", ""]);
    expect(parser.lastEventId).toBe("");
  });

  it("takes retry only as ASCII digits, at once, even without dispatch", () => {
    const { events, parser } = parseChunks([
      "retry: 1500\n\n",
      "data: a\n\n",
      "retry: 12a\ndata: b\n\n",
      "retry:\ndata: c\n\n",
      "retry: -5\ndata: d\n\n",
      "retry: 3000\n",
    ]);
    expect(events.map((e) => e.retry)).toEqual([1500, 1500, 1500, 1500]);
    expect(parser.reconnectionTime).toBe(3000);
  });

  it("never dispatches an unterminated last event", () => {
    expect(parseChunks(["data: a\n\ndata: b\n"]).events).toEqual([ev("a")]);
    expect(parseChunks(["data: a\n\ndata: b"]).events).toEqual([ev("a")]);
  });

  it("does not dispatch a blank line with no data", () => {
    expect(parseChunks(["event: x\n\n\n\ndata: y\n\n"]).events).toEqual([ev("y")]);
  });

  it("gives the same events however the bytes are cut", () => {
    const events = expectSplitInvariant(
      enc.encode("\ufeff: c\r\nevent: a\r\ndata: x\r\ndata: ü✔\r\rid: 7\nretry: 10\ndata: y\n\ndata: z"),
    );
    expect(events).toEqual([ev("x\nü✔", { event: "a" }), ev("y", { id: "7", retry: 10 })]);
  });
});

describe("format detection", () => {
  const sse = (data: string, event = "message"): SSEEvent => ({ event, data, id: "", retry: null });

  it("reads Sluice events", () => {
    const m = detectMessage(sse('{"type":"text_delta","run_id":"r","seq":3,"delta":"hi"}'));
    expect(m.format).toBe("sluice");
    expect(m.type).toBe("text_delta");
  });

  it("reads the legacy {type, data} form", () => {
    const m = detectMessage(sse('{"type":"chunk","data":{"content":"Hello","index":0}}'));
    expect(m).toMatchObject({ format: "legacy", type: "chunk", data: { content: "Hello", index: 0 } });
  });

  it("reads plain-text data lines as chunks, and [DONE] as the end", () => {
    expect(detectMessage(sse("plain words"))).toMatchObject({ format: "text", type: "chunk", data: { content: "plain words" } });
    expect(detectMessage(sse("42"))).toMatchObject({ format: "text", data: { content: "42" } });
    expect(detectMessage(sse("{not json"))).toMatchObject({ format: "text", data: { content: "{not json" } });
    expect(detectMessage(sse("[DONE]")).type).toBe("done");
  });

  it("reads other JSON as json, typed by its type field or the event name", () => {
    expect(detectMessage(sse('{"chunk":"t","type":"status","extra":1,"more":2}'))).toMatchObject({ format: "json", type: "status" });
    expect(detectMessage(sse("[1,2]", "numbers"))).toMatchObject({ format: "json", type: "numbers" });
  });
});

describe("SSEStreamReader", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it("yields messages, counts bytes and events, and reports completion", async () => {
    const body = 'id: 1\ndata: {"type":"text_delta","run_id":"r","seq":1,"delta":"Hel"}\n\n' +
      ": ping\n\n" +
      'id: 2\ndata: {"type":"text_delta","run_id":"r","seq":2,"delta":"lo"}\n\n';
    const reader = new SSEStreamReader(responseOf([body.slice(0, 30), body.slice(30)]));
    const seen: string[] = [];
    let complete: unknown;
    reader.on("data", (m) => seen.push(m.type)).on("complete", (c) => (complete = c));
    const text = await reader.readToCompletion();
    expect(text).toBe("Hello");
    expect(seen).toEqual(["text_delta", "text_delta"]);
    expect(reader.eventsReceived).toBe(2);
    expect(reader.bytesReceived).toBe(enc.encode(body).length);
    expect(reader.lastEventId).toBe("2");
    expect(reader.isStreaming).toBe(false);
    expect(complete).toMatchObject({ text: "Hello", lastEventId: "2", eventsReceived: 2 });
  });

  it("drives legacy callbacks: chunks and statuses", async () => {
    const body =
      'data: {"type":"status","data":{"message":"Processing...","progress":0.5}}\n\n' +
      'data: {"type":"chunk","data":{"content":"Hel","index":0}}\n\n' +
      "data: lo\n\n" +
      'data: {"type":"complete","data":{"final_response":"Hello"}}\n\n';
    const chunks: string[] = [];
    const statuses: [string, number | undefined][] = [];
    const text = await new SSEStreamReader(responseOf([body])).readToCompletion({
      onChunk: (c) => chunks.push(c),
      onStatus: (m, p) => statuses.push([m, p]),
    });
    expect(chunks).toEqual(["Hel", "lo"]);
    expect(statuses).toEqual([["Processing...", 0.5]]);
    expect(text).toBe("Hello");
  });

  it("is streaming while reading, and cancel() ends it with CANCELLED", async () => {
    const ctl = controlledResponse();
    const reader = new SSEStreamReader(ctl.response);
    const errors: StreamError[] = [];
    reader.on("error", (e) => errors.push(e));
    const it = reader.readEvents();
    ctl.push("data: one\n\n");
    const first = await it.next();
    expect(first.value).toMatchObject({ type: "chunk", data: { content: "one" } });
    expect(reader.isStreaming).toBe(true);
    const pending = it.next();
    reader.cancel();
    await expect(pending).rejects.toMatchObject({ type: "CANCELLED" });
    expect(errors.map((e) => e.type)).toEqual(["CANCELLED"]);
    expect(reader.isStreaming).toBe(false);
  });

  it("fails with TIMEOUT when no byte comes within the idle limit", async () => {
    vi.useFakeTimers();
    const ctl = controlledResponse();
    const reader = new SSEStreamReader(ctl.response, { idleTimeoutMs: 5000 });
    const it = reader.readEvents();
    const first = it.next();
    ctl.push(": heartbeat\n\n");
    await vi.advanceTimersByTimeAsync(4000);
    ctl.push(": heartbeat\n\n"); // a heartbeat is a sign of life
    await vi.advanceTimersByTimeAsync(4000);
    let settled = false;
    first.then(() => (settled = true), () => (settled = true));
    await vi.advanceTimersByTimeAsync(0);
    expect(settled).toBe(false);
    await vi.advanceTimersByTimeAsync(1100);
    await expect(first).rejects.toMatchObject({ type: "TIMEOUT" });
  });

  it("classifies a body that errors mid-stream as NETWORK", async () => {
    const ctl = controlledResponse();
    const reader = new SSEStreamReader(ctl.response);
    const it = reader.readEvents();
    ctl.push("data: a\n\n");
    await it.next();
    ctl.error(new TypeError("network error"));
    await expect(it.next()).rejects.toMatchObject({ type: "NETWORK" });
  });
});
