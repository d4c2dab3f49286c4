/**
 * Which wire format a message is in, decided per message so one reader serves Sluice and the older
 * backends seed 002 describes:
 *
 * - `sluice`: a Sluice event, `{"type", "run_id", "seq", …}` (docs/protocol.md).
 * - `legacy`: `{"type": "chunk" | "status" | "error" | "complete", "data": {…}}`.
 * - `json`: any other JSON value; `type` is its `type` field, else the SSE event name.
 * - `text`: a plain-text `data:` line; it reads as a `chunk` whose `content` is the text
 *   (`[DONE]`, the OpenAI-style end marker, reads as `done`).
 */

import type { SSEEvent } from "./sse.js";

export type WireFormat = "sluice" | "legacy" | "json" | "text";

export interface StreamMessage {
  format: WireFormat;
  /** The message type: the Sluice event type, the legacy type, or `chunk` for plain text. */
  type: string;
  /** The Sluice event object; the legacy form's `data`; other JSON as it is; `{content}` for text. */
  data: unknown;
  /** The SSE event the message came in (its `id` is the resume cursor). */
  sse: SSEEvent;
}

export function detectMessage(sse: SSEEvent): StreamMessage {
  const raw = sse.data;
  const first = raw.trimStart().charCodeAt(0);
  // Only objects and arrays are taken as JSON: a text line such as `42` or `true` stays text.
  if (first === 123 /* { */ || first === 91 /* [ */) {
    let value: unknown;
    try {
      value = JSON.parse(raw);
    } catch {
      value = undefined;
    }
    if (value !== undefined) return fromJson(value, sse);
  }
  if (raw === "[DONE]") return { format: "text", type: "done", data: null, sse };
  return {
    format: "text",
    type: sse.event === "message" ? "chunk" : sse.event,
    data: { content: raw },
    sse,
  };
}

function fromJson(value: unknown, sse: SSEEvent): StreamMessage {
  if (isObject(value) && typeof value.type === "string") {
    if (typeof value.run_id === "string" && typeof value.seq === "number") {
      return { format: "sluice", type: value.type, data: value, sse };
    }
    if ("data" in value && Object.keys(value).length <= 3) {
      return { format: "legacy", type: value.type, data: value.data, sse };
    }
    return { format: "json", type: value.type, data: value, sse };
  }
  return {
    format: "json",
    type: sse.event === "message" ? "json" : sse.event,
    data: value,
    sse,
  };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}
