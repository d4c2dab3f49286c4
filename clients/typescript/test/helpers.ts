/** Responses whose bodies the test writes piece by piece, and a scripted fetch. */

const enc = new TextEncoder();

export function responseOf(chunks: string[], init: ResponseInit = {}): Response {
  const stream = new ReadableStream<Uint8Array>({
    start(c) {
      for (const chunk of chunks) c.enqueue(enc.encode(chunk));
      c.close();
    },
  });
  return new Response(stream, { status: 200, headers: { "content-type": "text/event-stream" }, ...init });
}

export interface Controlled {
  response: Response;
  push(text: string): void;
  close(): void;
  error(err: unknown): void;
}

export function controlledResponse(signal?: AbortSignal): Controlled {
  let ctl!: ReadableStreamDefaultController<Uint8Array>;
  let open = true;
  const stream = new ReadableStream<Uint8Array>({
    start(c) {
      ctl = c;
    },
    cancel() {
      open = false;
    },
  });
  signal?.addEventListener("abort", () => {
    if (open) {
      open = false;
      ctl.error(new DOMException("aborted", "AbortError"));
    }
  });
  return {
    response: new Response(stream, { status: 200, headers: { "content-type": "text/event-stream" } }),
    push(text) {
      if (open) ctl.enqueue(enc.encode(text));
    },
    close() {
      if (open) ctl.close();
      open = false;
    },
    error(err) {
      if (open) ctl.error(err);
      open = false;
    },
  };
}

export function jsonResponse(status: number, body: unknown, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json", ...headers } });
}

/** A Sluice event as one SSE frame. */
export function frame(event: Record<string, unknown> & { seq: number }): string {
  return `id: ${event.seq}\ndata: ${JSON.stringify({ run_id: "run1", ...event })}\n\n`;
}

export const delta = (seq: number, text: string) => frame({ type: "text_delta", seq, delta: text });
export const started = () => frame({ type: "run_started", seq: 1, thread_id: "t1", message_id: "m1", model: "demo" });
export const completed = (seq: number) =>
  frame({ type: "run_completed", seq, usage: {}, time_to_first_token_ms: 1, duration_ms: 2 });

export interface Call {
  method: string;
  url: string;
  headers: Record<string, string>;
  body: string | null;
  at: number;
}

/** A fetch that answers each call with the next handler's result, recording the calls. */
export function scriptedFetch(
  handlers: ((call: Call, signal: AbortSignal | undefined) => Response | Promise<Response>)[],
  now: () => number = () => Date.now(),
): { fetch: typeof fetch; calls: Call[] } {
  const calls: Call[] = [];
  const fetchImpl = async (input: RequestInfo | URL, init: RequestInit = {}): Promise<Response> => {
    const headers: Record<string, string> = {};
    new Headers(init.headers).forEach((v, k) => (headers[k] = v));
    const call: Call = {
      method: init.method ?? "GET",
      url: String(input),
      headers,
      body: typeof init.body === "string" ? init.body : null,
      at: now(),
    };
    calls.push(call);
    const handler = handlers[calls.length - 1];
    if (!handler) throw new TypeError(`unexpected call ${calls.length}: ${call.method} ${call.url}`);
    if (init.signal?.aborted) throw new DOMException("aborted", "AbortError");
    return handler(call, init.signal ?? undefined);
  };
  return { fetch: fetchImpl as typeof fetch, calls };
}

export const refused = (): Response => {
  throw new TypeError("fetch failed: connect ECONNREFUSED");
};
