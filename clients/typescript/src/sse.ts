/**
 * Server-sent events, read exactly as the WHATWG HTML standard's "interpreting an event stream"
 * says a browser reads them: UTF-8 decoded (one leading BOM stripped, bad bytes become U+FFFD),
 * lines ended by CRLF, LF or CR — also when a CRLF or a multi-byte character is split between two
 * chunks —, comments ignored, `data` lines joined with LF, `id` carried over to later events (and
 * ignored when it holds U+0000), `retry` only when it is all ASCII digits, and an unterminated last
 * event never dispatched.
 */

import { StreamError, classify } from "./errors.js";
import { type StreamMessage, detectMessage } from "./format.js";

export interface SSEEvent {
  /** The event type; `"message"` when the stream named none. */
  event: string;
  data: string;
  /** The stream's last event ID at the moment of dispatch (`""` until one is set). */
  id: string;
  /** The reconnection time in ms at the moment of dispatch, or null when none was set. */
  retry: number | null;
}

/** An incremental parser: feed it bytes (or text) in any pieces; it returns the complete events. */
export class SSEParser {
  private decoder = new TextDecoder("utf-8");
  private line = "";
  /** The previous chunk ended in CR: an LF that starts the next one belongs to that line end. */
  private afterCR = false;
  private data = "";
  private hasData = false;
  private eventType = "";
  private idBuffer = "";
  /** The last event ID string and reconnection time, as the standard keeps them on the source. */
  lastEventId = "";
  reconnectionTime: number | null = null;
  /** Comment lines seen (Sluice's heartbeats are comments). */
  comments = 0;

  /** Feeds raw bytes; a multi-byte character split across calls is decoded once whole. */
  feed(chunk: Uint8Array): SSEEvent[] {
    return this.feedText(this.decoder.decode(chunk, { stream: true }));
  }

  /** Feeds already-decoded text (the caller stripped any BOM). */
  feedText(text: string): SSEEvent[] {
    const out: SSEEvent[] = [];
    let start = 0;
    let i = 0;
    if (this.afterCR && text.length > 0) {
      this.afterCR = false;
      if (text.charCodeAt(0) === 10) start = i = 1;
    }
    for (; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      const line = this.line + text.slice(start, i);
      this.line = "";
      if (c === 13) {
        if (i + 1 < text.length) {
          if (text.charCodeAt(i + 1) === 10) i++;
        } else {
          this.afterCR = true;
        }
      }
      start = i + 1;
      this.processLine(line, out);
    }
    if (start < text.length) this.line += text.slice(start);
    return out;
  }

  /** Ends the stream: flushes the decoder; an unterminated line or event is dropped, per the standard. */
  end(): SSEEvent[] {
    const rest = this.decoder.decode();
    const out = rest ? this.feedText(rest) : [];
    this.line = "";
    this.data = "";
    this.hasData = false;
    this.eventType = "";
    return out;
  }

  private processLine(line: string, out: SSEEvent[]): void {
    if (line === "") {
      this.dispatch(out);
      return;
    }
    if (line.charCodeAt(0) === 58 /* : */) {
      this.comments++;
      return;
    }
    const colon = line.indexOf(":");
    let field: string;
    let value: string;
    if (colon === -1) {
      field = line;
      value = "";
    } else {
      field = line.slice(0, colon);
      value = line.slice(line.charCodeAt(colon + 1) === 32 ? colon + 2 : colon + 1);
    }
    switch (field) {
      case "event":
        this.eventType = value;
        break;
      case "data":
        this.data += value + "\n";
        this.hasData = true;
        break;
      case "id":
        if (!value.includes("\0")) this.idBuffer = value;
        break;
      case "retry":
        if (/^[0-9]+$/.test(value)) this.reconnectionTime = Number(value);
        break;
      default:
        break; // Unknown fields are ignored.
    }
  }

  private dispatch(out: SSEEvent[]): void {
    this.lastEventId = this.idBuffer;
    if (!this.hasData) {
      this.data = "";
      this.eventType = "";
      return;
    }
    out.push({
      event: this.eventType || "message",
      data: this.data.slice(0, -1),
      id: this.lastEventId,
      retry: this.reconnectionTime,
    });
    this.data = "";
    this.hasData = false;
    this.eventType = "";
  }
}

export interface SSEStreamReaderOptions {
  /** Aborting it cancels the reader (the error is `CANCELLED`). */
  signal?: AbortSignal;
  /**
   * Milliseconds without a single byte (Sluice sends a heartbeat comment every 15 s of silence)
   * after which the connection is taken as dead and reading fails with `TIMEOUT`. 0 = never.
   */
  idleTimeoutMs?: number;
}

export interface StreamingCallbacks {
  /** A piece of answer text (Sluice `text_delta`, legacy `chunk`, or a plain-text line). */
  onChunk?: (text: string) => void;
  /** A status line (legacy `status`). */
  onStatus?: (message: string, progress?: number) => void;
  /** Every message, whatever its kind. */
  onMessage?: (message: StreamMessage) => void;
}

export interface CompleteInfo {
  text: string;
  lastEventId: string;
  eventsReceived: number;
  bytesReceived: number;
}

type Listener<T> = (value: T) => void;

/**
 * Reads a fetch `Response` whose body is an event stream. `readEvents()` yields each message as it
 * is complete (format detected per message: Sluice events, the legacy `{"type","data"}` form, other
 * JSON, or plain text); `readToCompletion()` drives it with callbacks and returns the text.
 */
export class SSEStreamReader {
  private readonly response: Response;
  private readonly options: SSEStreamReaderOptions;
  private readonly parser = new SSEParser();
  private reader: ReadableStreamDefaultReader<Uint8Array> | null = null;
  private streaming = false;
  private cancelled = false;
  private started = false;
  private bytes = 0;
  private events = 0;
  private listeners = {
    data: [] as Listener<StreamMessage>[],
    error: [] as Listener<StreamError>[],
    complete: [] as Listener<CompleteInfo>[],
  };
  private text = "";

  constructor(response: Response, options: SSEStreamReaderOptions = {}) {
    this.response = response;
    this.options = options;
  }

  get isStreaming(): boolean {
    return this.streaming;
  }
  get bytesReceived(): number {
    return this.bytes;
  }
  get eventsReceived(): number {
    return this.events;
  }
  /** The last event ID the stream set (what a resume sends as `Last-Event-ID`). */
  get lastEventId(): string {
    return this.parser.lastEventId;
  }
  /** The reconnection time the stream asked for with `retry:`, if any. */
  get retry(): number | null {
    return this.parser.reconnectionTime;
  }

  on(event: "data", callback: Listener<StreamMessage>): this;
  on(event: "error", callback: Listener<StreamError>): this;
  on(event: "complete", callback: Listener<CompleteInfo>): this;
  on(event: "data" | "error" | "complete", callback: Listener<never>): this {
    (this.listeners[event] as Listener<never>[]).push(callback);
    return this;
  }

  /** Stops reading; a pending `readEvents()` ends with a `CANCELLED` error. */
  cancel(): void {
    if (this.cancelled) return;
    this.cancelled = true;
    this.streaming = false;
    this.reader?.cancel().catch(() => {});
  }

  async *readEvents(): AsyncGenerator<StreamMessage, void, undefined> {
    if (this.started) throw new StreamError("PARSE", "an SSEStreamReader can be read only once");
    this.started = true;
    const body = this.response.body;
    if (!body) throw this.fail(new StreamError("PARSE", "the response has no body"));
    const signal = this.options.signal;
    const onAbort = () => this.cancel();
    signal?.addEventListener("abort", onAbort, { once: true });
    if (signal?.aborted) this.cancel();
    this.reader = body.getReader();
    this.streaming = !this.cancelled;
    try {
      for (;;) {
        if (this.cancelled) throw new StreamError("CANCELLED", "cancelled");
        const { done, value } = await this.readChunk(this.reader);
        if (this.cancelled) throw new StreamError("CANCELLED", "cancelled");
        const parsed = done ? this.parser.end() : this.parser.feed(value);
        if (!done) this.bytes += value.byteLength;
        for (const sse of parsed) {
          this.events++;
          const message = detectMessage(sse);
          this.text += textOf(message);
          for (const l of this.listeners.data) l(message);
          yield message;
        }
        if (done) break;
      }
      this.streaming = false;
      const info: CompleteInfo = {
        text: this.text,
        lastEventId: this.parser.lastEventId,
        eventsReceived: this.events,
        bytesReceived: this.bytes,
      };
      for (const l of this.listeners.complete) l(info);
    } catch (err) {
      const error = this.cancelled && !(err instanceof StreamError && err.type === "TIMEOUT")
        ? new StreamError("CANCELLED", "cancelled", { cause: err })
        : classify(err);
      throw this.fail(error);
    } finally {
      this.streaming = false;
      signal?.removeEventListener("abort", onAbort);
      if (!this.cancelled) this.reader.cancel().catch(() => {});
    }
  }

  async readToCompletion(callbacks: StreamingCallbacks = {}): Promise<string> {
    for await (const message of this.readEvents()) {
      callbacks.onMessage?.(message);
      const chunk = textOf(message);
      if (chunk) callbacks.onChunk?.(chunk);
      if (message.type === "status") {
        const d = message.data as { message?: unknown; progress?: unknown };
        callbacks.onStatus?.(
          typeof d?.message === "string" ? d.message : "",
          typeof d?.progress === "number" ? d.progress : undefined,
        );
      }
    }
    return this.text;
  }

  private fail(error: StreamError): StreamError {
    this.streaming = false;
    for (const l of this.listeners.error) l(error);
    return error;
  }

  /** One read, raced against the idle deadline. */
  private readChunk(
    reader: ReadableStreamDefaultReader<Uint8Array>,
  ): Promise<ReadableStreamReadResult<Uint8Array>> {
    const idle = this.options.idleTimeoutMs ?? 0;
    if (idle <= 0) return reader.read();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new StreamError("TIMEOUT", `no data (not even a heartbeat) for ${idle} ms`));
        this.cancelled = true;
        this.streaming = false;
        reader.cancel().catch(() => {});
      }, idle);
      reader.read().then(
        (r) => {
          clearTimeout(timer);
          resolve(r);
        },
        (e: unknown) => {
          clearTimeout(timer);
          reject(e);
        },
      );
    });
  }
}

/** The answer text a message carries, in whichever format it came. */
export function textOf(message: StreamMessage): string {
  switch (message.format) {
    case "sluice": {
      const e = message.data as { type?: string; delta?: unknown };
      return e.type === "text_delta" && typeof e.delta === "string" ? e.delta : "";
    }
    case "legacy":
    case "json":
    case "text": {
      if (message.type !== "chunk") return "";
      const d = message.data as { content?: unknown } | null;
      return typeof d?.content === "string" ? d.content : "";
    }
  }
}
