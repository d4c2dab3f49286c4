/**
 * The same runs over one WebSocket (`GET /v1/ws`): every run this transport follows shares the
 * socket, which keeps a browser tab far from its six-connections-per-origin limit. When the socket
 * drops, it reconnects with the same backoff and re-subscribes each run after the last `seq` it
 * delivered; a socket silent past `heartbeatTimeoutMs` (it is pinged every `pingIntervalMs`) is
 * taken as dead.
 */

import { type RetryOptions, DEFAULT_RETRY, backoffDelay } from "./backoff.js";
import { StreamError } from "./errors.js";
import { type FollowOptions, type StartOptions, newIdempotencyKey } from "./client.js";
import { RunStream } from "./run.js";
import type { RunRequest, SluiceEvent } from "./types.js";

/** The part of the WebSocket API this transport uses (the browser's, or `ws` in Node). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: unknown) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

export type WebSocketFactory = (url: string) => WebSocketLike;

export interface WebSocketTransportOptions {
  /** `ws://host:port/v1/ws`; in a page, `wsUrlFor(location)` builds it. */
  url: string;
  /** Sent as `?access_token=` (a browser cannot set headers on a WebSocket). */
  apiKey?: string;
  /** Opens a socket (default: `new WebSocket(url)`). */
  connect?: WebSocketFactory;
  retry?: Partial<RetryOptions>;
  /** A ping is sent after this much silence. Default 15000. */
  pingIntervalMs?: number;
  /** No message for this long (pongs included) means the socket is dead. Default 40000. 0 = off. */
  heartbeatTimeoutMs?: number;
  random?: () => number;
}

const OPEN = 1;

export function wsUrlFor(location: { protocol: string; host: string }): string {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/v1/ws`;
}

class WsRun extends RunStream {
  /** The start to send (until `run_accepted` names the run). */
  start: { requestId: string; threadId: string | undefined; request: RunRequest; key: string } | undefined;
  constructor(options: FollowOptions | StartOptions, after: number, runId?: string) {
    super(options, after);
    this.id = runId;
  }
}

export class WebSocketTransport {
  private readonly options: Required<Omit<WebSocketTransportOptions, "apiKey">> & { apiKey?: string };
  private readonly retry: RetryOptions;
  private socket: WebSocketLike | null = null;
  private runs = new Set<WsRun>();
  private failures = 0;
  private nextRequest = 1;
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private pingTimer: ReturnType<typeof setTimeout> | null = null;
  private deadTimer: ReturnType<typeof setTimeout> | null = null;
  private closedByUser = false;

  constructor(options: WebSocketTransportOptions) {
    this.options = {
      connect: (url) => new WebSocket(url) as unknown as WebSocketLike,
      retry: {},
      pingIntervalMs: 15_000,
      heartbeatTimeoutMs: 40_000,
      random: Math.random,
      ...options,
    };
    this.retry = { ...DEFAULT_RETRY, ...options.retry };
  }

  /** Starts a run (on `threadId`, or a new thread) and follows it. */
  startRun(threadId: string | undefined, request: RunRequest, options: StartOptions = {}): RunStream {
    const run = new WsRun(options, 0);
    run.start = {
      requestId: `r${this.nextRequest++}`,
      threadId,
      request,
      key: options.idempotencyKey ?? newIdempotencyKey(),
    };
    this.add(run);
    return run;
  }

  /** Follows a run that exists, from after `after`. */
  followRun(runId: string, options: FollowOptions = {}): RunStream {
    const run = new WsRun(options, options.after ?? 0, runId);
    this.add(run);
    return run;
  }

  /** Cancels a run on the server. */
  cancelRun(runId: string): void {
    this.send({ type: "cancel", run_id: runId });
  }

  /** Closes the socket and stops following every run. */
  close(): void {
    this.closedByUser = true;
    for (const run of [...this.runs]) run.close();
    this.runs.clear();
    this.clearTimers();
    this.socket?.close(1000, "client closed");
    this.socket = null;
  }

  private add(run: WsRun): void {
    this.closedByUser = false;
    this.runs.add(run);
    const forget = () => {
      this.runs.delete(run);
      if (run.runId && this.socket?.readyState === OPEN) {
        this.send({ type: "unsubscribe", run_id: run.runId });
      }
    };
    run.done.then(forget, forget);
    if (this.socket?.readyState === OPEN) this.announce(run);
    else this.ensureSocket();
  }

  /** Tells the server about a run: start it, or follow it from after its last delivered `seq`. */
  private announce(run: WsRun): void {
    if (run.closed) return;
    if (run.start && run.runId === undefined) {
      const { requestId, threadId, request, key } = run.start;
      // The socket's user_message takes these fields only (on_disconnect has no meaning here). The
      // key makes a start re-sent after a reconnect give back the run the first one made.
      const { content, model, agent, on_busy } = request;
      this.send({
        type: "user_message",
        request_id: requestId,
        idempotency_key: key,
        thread_id: threadId,
        content,
        model,
        agent,
        on_busy,
      });
    } else if (run.runId !== undefined) {
      this.send({ type: "subscribe", run_id: run.runId, after: run.deliveredSeq });
    }
  }

  private send(message: object): void {
    if (this.socket?.readyState === OPEN) this.socket.send(JSON.stringify(message));
  }

  private ensureSocket(): void {
    if (this.socket || this.reconnectTimer || this.closedByUser) return;
    let socket: WebSocketLike;
    const url = this.options.apiKey
      ? `${this.options.url}?access_token=${encodeURIComponent(this.options.apiKey)}`
      : this.options.url;
    try {
      socket = this.options.connect(url);
    } catch (err) {
      this.lost(new StreamError("NETWORK", `cannot open ${this.options.url}`, { cause: err }));
      return;
    }
    this.socket = socket;
    socket.onopen = () => {
      for (const run of this.runs) {
        run.setStatus("streaming");
        this.announce(run);
      }
      this.alive();
    };
    socket.onmessage = (ev) => {
      this.alive();
      this.receive(typeof ev.data === "string" ? ev.data : String(ev.data));
    };
    socket.onerror = () => {};
    socket.onclose = () => {
      if (this.socket !== socket) return;
      this.socket = null;
      this.lost(new StreamError("NETWORK", "the WebSocket closed"));
    };
  }

  private receive(text: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(text) as Record<string, unknown>;
    } catch {
      return; // Not ours to read; Sluice sends JSON only.
    }
    const type = msg.type;
    if (type === "pong") return;
    if (type === "run_accepted") {
      const run = this.byRequest(msg.request_id);
      if (run && typeof msg.run_id === "string") {
        run.setRunId(msg.run_id);
        run.start = undefined;
      }
      return;
    }
    if (type === "request_error") {
      const run = this.byRequest(msg.request_id) ?? this.byRun(msg.run_id);
      if (!run) return;
      const code = typeof msg.code === "string" ? msg.code : undefined;
      if (code === "STREAM_RESET" && run.runId) {
        run.reset();
        this.send({ type: "subscribe", run_id: run.runId, after: 0 });
        return;
      }
      run.fail(new StreamError("SERVER", String(msg.message ?? code), { code, retryable: false }));
      return;
    }
    const run = this.byRun(msg.run_id);
    if (!run || typeof msg.seq !== "number") return;
    if (run.deliver(msg as unknown as SluiceEvent) !== "duplicate") this.failures = 0;
  }

  private byRequest(id: unknown): WsRun | undefined {
    if (typeof id !== "string") return undefined;
    for (const run of this.runs) if (run.start?.requestId === id) return run;
    return undefined;
  }

  private byRun(id: unknown): WsRun | undefined {
    if (typeof id !== "string") return undefined;
    for (const run of this.runs) if (run.runId === id) return run;
    return undefined;
  }

  /** The socket died: retry with backoff while runs are followed; give up after the retries. */
  private lost(error: StreamError): void {
    this.clearTimers();
    if (this.closedByUser || this.runs.size === 0) return;
    if (this.failures >= this.retry.maxRetries) {
      const err = new StreamError("MAX_RETRIES_EXCEEDED", `gave up after ${this.retry.maxRetries} retries: ${error.message}`, {
        cause: error,
        retryable: false,
      });
      for (const run of [...this.runs]) run.fail(err);
      return;
    }
    const delay = backoffDelay(this.failures, this.retry, this.options.random);
    this.failures++;
    for (const run of this.runs) run.setStatus("reconnecting", { attempt: this.failures, delayMs: delay, error });
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      this.ensureSocket();
    }, delay);
  }

  /** A message came: push the ping and the dead-socket deadline out. */
  private alive(): void {
    if (this.pingTimer) clearTimeout(this.pingTimer);
    if (this.deadTimer) clearTimeout(this.deadTimer);
    this.pingTimer = setTimeout(() => this.send({ type: "ping" }), this.options.pingIntervalMs);
    const dead = this.options.heartbeatTimeoutMs;
    if (dead > 0) {
      this.deadTimer = setTimeout(() => {
        const socket = this.socket;
        this.socket = null;
        socket?.close(4000, "heartbeat timeout");
        this.lost(new StreamError("TIMEOUT", `no message (not even a pong) for ${dead} ms`));
      }, dead);
    }
  }

  private clearTimers(): void {
    for (const t of [this.pingTimer, this.deadTimer, this.reconnectTimer]) if (t) clearTimeout(t);
    this.pingTimer = this.deadTimer = this.reconnectTimer = null;
  }
}
