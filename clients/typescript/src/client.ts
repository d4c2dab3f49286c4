/**
 * The high-level client: threads, runs, artifacts, and following a run over SSE so that a dropped
 * connection costs nothing. After a drop it reconnects with `Last-Event-ID` (exponential backoff
 * with jitter, honouring `Retry-After`), treats a silent connection as dead once no byte — not even
 * a heartbeat — came for `heartbeatTimeoutMs`, and after `retry.maxRetries` failures falls back to
 * the non-streaming endpoints (`POST …/runs/wait`, or polling `GET /v1/runs/{id}`).
 */

import { type RetryOptions, DEFAULT_RETRY, backoffDelay, sleep } from "./backoff.js";
import { StreamError, classify, errorFromResponse } from "./errors.js";
import { type FallbackResult, type RunHandlers, type RunOutcome, RunStream } from "./run.js";
import { SSEStreamReader } from "./sse.js";
import { type WebSocketFactory, WebSocketTransport } from "./ws.js";
import type {
  Artifact,
  Message,
  ModelInfo,
  Run,
  RunRequest,
  SluiceEvent,
  Thread,
} from "./types.js";

export interface ClientOptions {
  /** Where Sluice is, e.g. `http://127.0.0.1:8080`; `""` (default) = same origin. */
  baseUrl?: string;
  /** Sent as `Authorization: Bearer …` when set. */
  apiKey?: string;
  /** The fetch to use (default: the global one). */
  fetch?: typeof fetch;
  retry?: Partial<RetryOptions>;
  /** No byte for this long means the connection is dead. Sluice's heartbeat is 15 s: default 40 s. 0 = off. */
  heartbeatTimeoutMs?: number;
  /** After the retries, get the result from the non-streaming endpoint. Default true. */
  fallback?: boolean;
  /** How often the fallback polls a run that is still going. Default 1000 ms. */
  pollIntervalMs?: number;
  /** Randomness for the jitter (tests pin it). */
  random?: () => number;
  /**
   * How runs are followed: `sse` (default; one connection per run) or `websocket` (every run on
   * one socket, `GET /v1/ws`). Threads, artifacts and cancels always use plain HTTP.
   */
  transport?: "sse" | "websocket";
  /** The WebSocket URL (default: `baseUrl`, or the page's origin, with ws: or wss:). */
  webSocketUrl?: string;
  /** Opens the socket (default: `new WebSocket(url)`). */
  connectWebSocket?: WebSocketFactory;
}

export interface StartOptions extends RunHandlers {
  /**
   * `stream` (default): `POST …/runs/stream` and read its body. `background`: `POST …/runs`
   * (202 with the run), then follow `GET /v1/runs/{id}/events`: the run never depends on this
   * connection.
   */
  mode?: "stream" | "background";
  /**
   * Sent as `Idempotency-Key` with the start and with every retry of it, so that a start whose
   * answer was lost is not made twice (the server gives back the run the first attempt made).
   * Default: a fresh random key per `startRun`.
   */
  idempotencyKey?: string;
}

export interface FollowOptions extends RunHandlers {
  /** Follow from after this `seq` (0 = the whole log). */
  after?: number;
}

type Resolved = Required<
  Omit<ClientOptions, "apiKey" | "retry" | "webSocketUrl" | "connectWebSocket">
> & {
  apiKey: string | undefined;
  retry: RetryOptions;
};

export class SluiceClient {
  readonly options: Resolved;
  private readonly socket: WebSocketTransport | null;

  constructor(options: ClientOptions = {}) {
    this.options = {
      baseUrl: (options.baseUrl ?? "").replace(/\/+$/, ""),
      apiKey: options.apiKey,
      fetch: options.fetch ?? ((input, init) => globalThis.fetch(input, init)),
      retry: { ...DEFAULT_RETRY, ...options.retry },
      heartbeatTimeoutMs: options.heartbeatTimeoutMs ?? 40_000,
      fallback: options.fallback ?? true,
      pollIntervalMs: options.pollIntervalMs ?? 1000,
      random: options.random ?? Math.random,
      transport: options.transport ?? "sse",
    };
    this.socket =
      this.options.transport === "websocket"
        ? new WebSocketTransport({
            url: options.webSocketUrl ?? webSocketUrlOf(this.options.baseUrl),
            apiKey: options.apiKey,
            retry: this.options.retry,
            random: this.options.random,
            heartbeatTimeoutMs: this.options.heartbeatTimeoutMs,
            ...(options.connectWebSocket ? { connect: options.connectWebSocket } : {}),
          })
        : null;
  }

  /** Closes the WebSocket, if runs are followed over one. */
  close(): void {
    this.socket?.close();
  }

  url(path: string): string {
    return this.options.baseUrl + path;
  }

  headers(extra: Record<string, string> = {}): Record<string, string> {
    const h: Record<string, string> = { ...extra };
    if (this.options.apiKey) h.authorization = `Bearer ${this.options.apiKey}`;
    return h;
  }

  /** A JSON request; a non-2xx answer becomes a `SERVER` error with the server's code. */
  async request<T>(
    method: string,
    path: string,
    body?: unknown,
    signal?: AbortSignal,
    extraHeaders: Record<string, string> = {},
  ): Promise<T> {
    let response: Response;
    try {
      response = await this.options.fetch(this.url(path), {
        method,
        headers: this.headers({
          ...(body === undefined ? {} : { "content-type": "application/json" }),
          ...extraHeaders,
        }),
        body: body === undefined ? null : JSON.stringify(body),
        signal: signal ?? null,
      });
    } catch (err) {
      throw classify(err);
    }
    if (!response.ok) throw await errorFromResponse(response);
    if (response.status === 204) return undefined as T;
    const text = await response.text();
    try {
      return JSON.parse(text) as T;
    } catch (err) {
      throw new StreamError("PARSE", `${method} ${path}: the answer is not JSON`, { cause: err });
    }
  }

  createThread(title?: string): Promise<Thread> {
    return this.request("POST", "/v1/threads", title === undefined ? {} : { title });
  }
  async listThreads(): Promise<Thread[]> {
    return (await this.request<{ threads: Thread[] }>("GET", "/v1/threads")).threads;
  }
  getThread(id: string): Promise<Thread> {
    return this.request("GET", `/v1/threads/${encodeURIComponent(id)}`);
  }
  deleteThread(id: string): Promise<void> {
    return this.request("DELETE", `/v1/threads/${encodeURIComponent(id)}`);
  }
  getRun(id: string): Promise<Run> {
    return this.request("GET", `/v1/runs/${encodeURIComponent(id)}`);
  }
  /** Cancels the run on the server (every follower sees `run_cancelled`). */
  cancelRun(id: string): Promise<Run> {
    return this.request("POST", `/v1/runs/${encodeURIComponent(id)}/cancel`);
  }
  getArtifact(id: string, version?: number): Promise<Artifact> {
    const base = `/v1/artifacts/${encodeURIComponent(id)}`;
    return this.request("GET", version === undefined ? base : `${base}/versions/${version}`);
  }
  artifactCsvUrl(id: string): string {
    return this.url(`/v1/artifacts/${encodeURIComponent(id)}.csv`);
  }
  async models(): Promise<{ default: string; models: ModelInfo[] }> {
    return this.request("GET", "/v1/models");
  }
  /**
   * Runs to the end without streaming: `{run, message}`. With the key of an earlier start, it
   * waits for that run instead of starting another.
   */
  runAndWait(threadId: string | undefined, request: RunRequest, idempotencyKey?: string): Promise<FallbackResult> {
    const headers: Record<string, string> = idempotencyKey ? { "idempotency-key": idempotencyKey } : {};
    return this.request("POST", `${runsPath(threadId)}/wait`, request, undefined, headers);
  }

  /** Starts a run (on `threadId`, or on a new thread) and follows it. */
  startRun(threadId: string | undefined, request: RunRequest, options: StartOptions = {}): RunStream {
    if (this.socket) return this.socket.startRun(threadId, request, options);
    const key = options.idempotencyKey ?? newIdempotencyKey();
    const run = new SseRun(this, options, 0, { threadId, request, mode: options.mode ?? "stream", key });
    void run.drive();
    return run;
  }

  /** Follows a run that exists (attach, or resume from `after`). */
  followRun(runId: string, options: FollowOptions = {}): RunStream {
    if (this.socket) return this.socket.followRun(runId, options);
    const run = new SseRun(this, options, options.after ?? 0, undefined, runId);
    void run.drive();
    return run;
  }
}

/** `http://host/x` → `ws://host/x/v1/ws`; `""` → the page's own origin. */
function webSocketUrlOf(baseUrl: string): string {
  if (!baseUrl && typeof location !== "undefined") {
    return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/v1/ws`;
  }
  return `${baseUrl.replace(/^http/, "ws")}/v1/ws`;
}

function runsPath(threadId: string | undefined): string {
  return threadId === undefined ? "/v1/runs" : `/v1/threads/${encodeURIComponent(threadId)}/runs`;
}

interface Start {
  threadId: string | undefined;
  request: RunRequest;
  mode: "stream" | "background";
  key: string;
}

/** A random key: `crypto.randomUUID` where it exists (secure contexts), else 128 random bits. */
export function newIdempotencyKey(): string {
  const c = globalThis.crypto;
  if (typeof c?.randomUUID === "function") return c.randomUUID();
  const bytes = new Uint8Array(16);
  c.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A run followed over SSE. */
class SseRun extends RunStream {
  private readonly client: SluiceClient;
  private start: Start | undefined;
  /** Set when a connection delivered a new event: the backoff starts over after it. */
  private progressed = false;

  constructor(client: SluiceClient, handlers: RunHandlers, after: number, start?: Start, runId?: string) {
    super(handlers, after);
    this.client = client;
    this.start = start;
    this.id = runId;
  }

  async drive(): Promise<void> {
    const { retry, random } = this.client.options;
    let failures = 0;
    let lastError: StreamError | undefined;
    while (!this.closed) {
      try {
        await this.connect();
        if (this.closed) return;
        // The body ended without the terminal event: the connection was cut.
        throw new StreamError("NETWORK", "the stream ended before the run did");
      } catch (e) {
        if (this.closed) return;
        const err = classify(e);
        if (err.type === "CANCELLED") {
          this.fail(err);
          return;
        }
        if (err.code === "STREAM_RESET") {
          this.reset();
        } else if (err.code === "CONFLICT" && this.start && failures > 0 && (await this.adoptBusyRun())) {
          // A retried start found the first attempt's run going: follow that one instead.
        } else if (!err.retryable) {
          this.fail(err);
          return;
        }
        lastError = err;
        if (this.progressed) failures = 0;
        this.progressed = false;
        if (failures >= retry.maxRetries) {
          await this.fallBack(lastError);
          return;
        }
        const wait = (err as { retryAfterMs?: number }).retryAfterMs ?? backoffDelay(failures, retry, random);
        failures++;
        this.setStatus("reconnecting", { attempt: failures, delayMs: wait, error: err });
        try {
          await sleep(wait, this.abort.signal);
        } catch {
          return; // closed while waiting
        }
      }
    }
  }

  private async connect(): Promise<void> {
    const c = this.client;
    let response: Response;
    if (this.id === undefined && this.start?.mode === "background") {
      const run = await c.request<Run>("POST", runsPath(this.start.threadId), this.start.request, this.abort.signal, {
        "idempotency-key": this.start.key,
      });
      this.id = run.id;
    }
    const resuming = this.id !== undefined;
    try {
      response = await c.options.fetch(
        resuming
          ? c.url(`/v1/runs/${encodeURIComponent(this.id ?? "")}/events`)
          : c.url(`${runsPath(this.start?.threadId)}/stream`),
        resuming
          ? {
              method: "GET",
              headers: c.headers(this.cursor ? { "last-event-id": this.cursor, accept: "text/event-stream" } : { accept: "text/event-stream" }),
              signal: this.abort.signal,
            }
          : {
              method: "POST",
              headers: c.headers({
                "content-type": "application/json",
                accept: "text/event-stream",
                ...(this.start ? { "idempotency-key": this.start.key } : {}),
              }),
              body: JSON.stringify(this.start?.request ?? {}),
              signal: this.abort.signal,
            },
      );
    } catch (err) {
      throw classify(err);
    }
    if (!response.ok) throw await errorFromResponse(response);
    this.setStatus("streaming");
    const reader = new SSEStreamReader(response, {
      signal: this.abort.signal,
      idleTimeoutMs: c.options.heartbeatTimeoutMs,
    });
    for await (const message of reader.readEvents()) {
      if (message.format !== "sluice") continue;
      const delivered = this.deliver(message.data as SluiceEvent, message.sse.id);
      if (delivered === "terminal") return;
      if (delivered === "event") this.progressed = true;
    }
  }

  /** After a retried start answered CONFLICT: the first attempt did start; follow its run. */
  private async adoptBusyRun(): Promise<boolean> {
    const threadId = this.start?.threadId;
    if (threadId === undefined) return false;
    try {
      const thread = await this.client.getThread(threadId);
      const going = (thread.messages ?? []).filter(
        (m) => m.role === "assistant" && m.status === "streaming" && m.run_id,
      );
      const last = going[going.length - 1];
      if (!last?.run_id) return false;
      this.id = last.run_id;
      return true;
    } catch {
      return false;
    }
  }

  /** The non-streaming way to the same result; `MAX_RETRIES_EXCEEDED` if that fails too. */
  private async fallBack(lastError: StreamError): Promise<void> {
    const c = this.client;
    const giveUp = (cause: unknown) =>
      this.fail(
        new StreamError("MAX_RETRIES_EXCEEDED", `gave up after ${c.options.retry.maxRetries} retries: ${lastError.message}`, {
          cause,
          retryable: false,
        }),
      );
    if (!c.options.fallback) {
      giveUp(lastError);
      return;
    }
    this.setStatus("fallback", { error: lastError });
    try {
      let result: FallbackResult;
      if (this.id === undefined && this.start) {
        result = await c.runAndWait(this.start.threadId, this.start.request, this.start.key);
      } else {
        result = await this.pollToEnd(this.id ?? "");
      }
      if (this.closed) return;
      const outcome: RunOutcome = { runId: result.run.id, terminal: null, fallback: result };
      this.finish(outcome);
    } catch (err) {
      if (!this.closed) giveUp(err);
    }
  }

  private async pollToEnd(runId: string): Promise<FallbackResult> {
    const c = this.client;
    let failures = 0;
    for (;;) {
      try {
        const run = await c.getRun(runId);
        if (run.status !== "running" && run.status !== "queued") {
          const thread = await c.getThread(run.thread_id);
          const message: Message | null = thread.messages?.find((m) => m.id === run.message_id) ?? null;
          return { run, message };
        }
        failures = 0;
      } catch (err) {
        const e = classify(err);
        if (!e.retryable || ++failures > c.options.retry.maxRetries) throw e;
      }
      await sleep(c.options.pollIntervalMs, this.abort.signal);
    }
  }
}
