import { StreamError } from "./errors.js";

export interface RetryOptions {
  /** Reconnection attempts after a failure before giving up (or falling back). Default 5. */
  maxRetries: number;
  /** The first delay; each later one doubles: 1 s, 2 s, 4 s, … Default 1000. */
  baseDelayMs: number;
  /** No delay is longer than this. Default 30000. */
  maxDelayMs: number;
  /** Each delay is spread uniformly by ± this fraction, so clients do not return in step. Default 0.2. */
  jitter: number;
}

export const DEFAULT_RETRY: RetryOptions = {
  maxRetries: 5,
  baseDelayMs: 1000,
  maxDelayMs: 30_000,
  jitter: 0.2,
};

/** The delay before retry number `attempt` (0-based): base·2^attempt, capped, then jittered. */
export function backoffDelay(
  attempt: number,
  options: RetryOptions,
  random: () => number = Math.random,
): number {
  const exp = Math.min(options.maxDelayMs, options.baseDelayMs * 2 ** Math.min(attempt, 30));
  const spread = exp * options.jitter * (random() * 2 - 1);
  return Math.max(0, Math.min(options.maxDelayMs, Math.round(exp + spread)));
}

/** Resolves after `ms`, or rejects with `CANCELLED` as soon as `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(new StreamError("CANCELLED", "cancelled"));
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(new StreamError("CANCELLED", "cancelled"));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
