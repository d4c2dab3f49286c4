/**
 * What can go wrong while streaming, in six classes a caller can act on:
 *
 * - `NETWORK`: the connection failed or dropped (retryable).
 * - `TIMEOUT`: the server went silent past the heartbeat deadline (retryable).
 * - `SERVER`: the server answered with an error status; `status` and the server's stable `code`
 *   say which. 5xx, 429 and 503 are retryable; other 4xx are not (retrying cannot fix them).
 * - `PARSE`: the stream or a response body could not be read as what it claims to be.
 * - `CANCELLED`: the caller cancelled.
 * - `MAX_RETRIES_EXCEEDED`: every retry failed (and the fallback, when enabled); `cause` is the
 *   last underlying error.
 */
export const StreamErrorType = {
  NETWORK: "NETWORK",
  TIMEOUT: "TIMEOUT",
  SERVER: "SERVER",
  PARSE: "PARSE",
  CANCELLED: "CANCELLED",
  MAX_RETRIES: "MAX_RETRIES_EXCEEDED",
} as const;

export type StreamErrorType = (typeof StreamErrorType)[keyof typeof StreamErrorType];

export interface StreamErrorInit {
  status?: number;
  code?: string;
  retryable?: boolean;
  cause?: unknown;
}

export class StreamError extends Error {
  readonly type: StreamErrorType;
  /** HTTP status, for `SERVER` errors. */
  readonly status: number | undefined;
  /** The server's stable error code (`NOT_FOUND`, `STREAM_RESET`, …), when it sent one. */
  readonly code: string | undefined;
  /** Whether trying again may succeed. */
  readonly retryable: boolean;

  constructor(type: StreamErrorType, message: string, init: StreamErrorInit = {}) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.name = "StreamError";
    this.type = type;
    this.status = init.status;
    this.code = init.code;
    this.retryable = init.retryable ?? defaultRetryable(type, init.status);
  }
}

function defaultRetryable(type: StreamErrorType, status: number | undefined): boolean {
  switch (type) {
    case "NETWORK":
    case "TIMEOUT":
      return true;
    case "SERVER":
      return status === undefined || status >= 500 || status === 429 || status === 408;
    default:
      return false;
  }
}

/** Turns anything thrown by fetch, a reader or a timer into a `StreamError`. */
export function classify(err: unknown): StreamError {
  if (err instanceof StreamError) return err;
  const name = err instanceof Error || isDomException(err) ? (err as Error).name : "";
  const message = err instanceof Error ? err.message : String(err);
  if (name === "AbortError") return new StreamError("CANCELLED", "cancelled", { cause: err });
  if (name === "TimeoutError") return new StreamError("TIMEOUT", message, { cause: err });
  if (err instanceof SyntaxError) return new StreamError("PARSE", message, { cause: err });
  // fetch rejects with a TypeError for refused, reset and DNS failures alike; a reader whose
  // connection drops mid-body rejects with a TypeError (browsers) or a network-ish Error (Node).
  return new StreamError("NETWORK", message || "network error", { cause: err });
}

function isDomException(err: unknown): boolean {
  return typeof DOMException !== "undefined" && err instanceof DOMException;
}

/**
 * The `StreamError` for a non-2xx response: reads Sluice's `{"error":{"code","message"}}` body
 * when there is one, so the caller sees the server's own words.
 */
export async function errorFromResponse(response: Response): Promise<StreamError> {
  let code: string | undefined;
  let message = `HTTP ${response.status}`;
  try {
    const text = await response.text();
    try {
      const body = JSON.parse(text) as { error?: { code?: unknown; message?: unknown } };
      if (typeof body.error?.code === "string") code = body.error.code;
      if (typeof body.error?.message === "string") message = `${message}: ${body.error.message}`;
    } catch {
      if (text.trim()) message = `${message}: ${text.trim().slice(0, 200)}`;
    }
  } catch {
    // The body could not be read; the status says enough.
  }
  const retryAfter = response.headers.get("retry-after");
  const err = new StreamError("SERVER", message, { status: response.status, code });
  if (retryAfter !== null) (err as { retryAfterMs?: number }).retryAfterMs = parseRetryAfter(retryAfter);
  return err;
}

/** `Retry-After` as milliseconds: delta-seconds or an HTTP date; undefined when unreadable. */
export function parseRetryAfter(value: string): number | undefined {
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) return Number(trimmed) * 1000;
  const at = Date.parse(trimmed);
  return Number.isNaN(at) ? undefined : Math.max(0, at - Date.now());
}
