/**
 * A followed run, whatever the transport: it hands each event to the caller exactly once, in
 * order, across reconnections (events at or below the last `seq` delivered are dropped), and ends
 * with the run's terminal event — or, after the retries, the non-streaming fallback's result.
 */

import { StreamError } from "./errors.js";
import { type Message, type Run, type SluiceEvent, isTerminal } from "./types.js";

export type ConnectionStatus = "connecting" | "streaming" | "reconnecting" | "fallback" | "closed";

export interface StatusInfo {
  /** The retry about to be made (1-based), when reconnecting. */
  attempt?: number;
  /** How long until it is made. */
  delayMs?: number;
  /** What went wrong. */
  error?: StreamError;
}

export interface RunHandlers {
  /** Each event, once, in order. */
  onEvent?: (event: SluiceEvent) => void;
  /** The connection's state: show "reconnecting…" on `reconnecting`. */
  onStatus?: (status: ConnectionStatus, info: StatusInfo) => void;
  /**
   * The server lost events this client had already been given (it crashed before storing them):
   * discard what was rendered for this run; the events follow again from the first.
   */
  onReset?: () => void;
}

export interface FallbackResult {
  run: Run;
  message: Message | null;
}

export interface RunOutcome {
  runId: string;
  /** The terminal event (`run_completed`, `run_failed`, `run_cancelled`, `run_interrupted`). */
  terminal: SluiceEvent | null;
  /** Set when the stream could not be kept and the result came from the non-streaming endpoint. */
  fallback?: FallbackResult;
}

export class RunStream implements AsyncIterable<SluiceEvent> {
  /** Resolves with the outcome; rejects with a `StreamError`. */
  readonly done: Promise<RunOutcome>;
  protected readonly handlers: RunHandlers;
  protected readonly abort = new AbortController();
  protected lastSeq = 0;
  protected cursor = "";
  protected id: string | undefined;
  private settled = false;
  private resolveDone!: (o: RunOutcome) => void;
  private rejectDone!: (e: StreamError) => void;
  /** Events for `for await`; kept only while someone iterates, or when there is no `onEvent`. */
  private queue: SluiceEvent[] = [];
  private iterating = false;
  private wake: (() => void) | null = null;
  private failure: StreamError | null = null;
  private finished = false;
  private state: ConnectionStatus = "connecting";

  constructor(handlers: RunHandlers, after = 0) {
    this.handlers = handlers;
    this.lastSeq = after;
    this.cursor = after > 0 ? String(after) : "";
    this.done = new Promise((resolve, reject) => {
      this.resolveDone = resolve;
      this.rejectDone = reject;
    });
    // A caller that only iterates or only uses callbacks must not see an unhandled rejection.
    this.done.catch(() => {});
  }

  /** The run's id, once known (at once when following; from `run_started` when starting one). */
  get runId(): string | undefined {
    return this.id;
  }
  /** The resume cursor: the SSE id of the last event delivered (`""` before any). */
  get lastEventId(): string {
    return this.cursor;
  }
  get status(): ConnectionStatus {
    return this.state;
  }
  get closed(): boolean {
    return this.settled;
  }
  /** The `seq` of the last event delivered (where a transport resumes from). */
  get deliveredSeq(): number {
    return this.lastSeq;
  }

  /** Stops following (the run itself goes on); `done` rejects with `CANCELLED`. */
  close(): void {
    this.fail(new StreamError("CANCELLED", "closed by the caller"));
  }

  /**
   * Delivers an event unless it was delivered before (for transports). Answers `duplicate`,
   * `event` (a new one: the connection is making progress) or `terminal` (the run ended).
   */
  deliver(event: SluiceEvent, sseId?: string): "duplicate" | "event" | "terminal" {
    if (this.settled) return "duplicate";
    this.id ??= event.run_id;
    if (event.seq <= this.lastSeq) return "duplicate";
    this.lastSeq = event.seq;
    this.cursor = sseId || String(event.seq);
    this.handlers.onEvent?.(event);
    if (this.iterating || !this.handlers.onEvent) this.push(event);
    if (isTerminal(event)) {
      this.finish({ runId: event.run_id, terminal: event });
      return "terminal";
    }
    return "event";
  }

  /** The run's id, learnt by a transport (a start's answer). */
  setRunId(id: string): void {
    this.id = id;
  }

  /** Forget what was delivered: the server's log was reset (see `onReset`). For transports. */
  reset(): void {
    this.lastSeq = 0;
    this.cursor = "";
    this.handlers.onReset?.();
  }

  /** For transports: the connection's state, passed on to `onStatus`. */
  setStatus(status: ConnectionStatus, info: StatusInfo = {}): void {
    if (this.settled && status !== "closed") return;
    this.state = status;
    this.handlers.onStatus?.(status, info);
  }

  finish(outcome: RunOutcome): void {
    if (this.settled) return;
    this.settled = true;
    this.finished = true;
    this.setStatus("closed");
    this.abort.abort();
    this.resolveDone(outcome);
    this.wake?.();
  }

  fail(error: StreamError): void {
    if (this.settled) return;
    this.settled = true;
    this.failure = error;
    this.setStatus("closed", { error });
    this.abort.abort();
    this.rejectDone(error);
    this.wake?.();
  }

  private push(event: SluiceEvent): void {
    this.queue.push(event);
    this.wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<SluiceEvent> {
    this.iterating = true;
    for (;;) {
      const next = this.queue.shift();
      if (next) {
        yield next;
        continue;
      }
      if (this.failure && this.failure.type !== "CANCELLED") throw this.failure;
      if (this.finished || this.failure) return;
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
      this.wake = null;
    }
  }
}
