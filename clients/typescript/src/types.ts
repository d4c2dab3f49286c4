/** Sluice's wire types, as docs/protocol.md defines them. */

export interface Usage {
  input_tokens: number;
  output_tokens: number;
  reasoning_tokens: number;
  total_tokens: number;
}

export interface ErrorObject {
  code: string;
  message: string;
}

export type ArtifactKind = "table" | "chart" | "document";

export interface Artifact {
  id: string;
  thread_id: string;
  run_id: string;
  kind: ArtifactKind;
  title: string;
  version: number;
  status: "intermediate" | "final";
  data: unknown;
  created_at: number;
}

interface Base<T extends string> {
  type: T;
  run_id: string;
  seq: number;
}

export type SluiceEvent =
  | (Base<"run_started"> & { thread_id: string; message_id: string; model: string })
  | (Base<"reasoning_delta"> & { delta: string })
  | Base<"reasoning_done">
  | (Base<"text_delta"> & { delta: string })
  | Base<"text_done">
  | (Base<"function_call_delta"> & { call_id: string; name: string; delta: string })
  | (Base<"function_call_done"> & { call_id: string; name: string; arguments: string })
  | (Base<"tool_execution_started"> & { call_id: string; tool_name: string })
  | (Base<"tool_execution_progress"> & {
      call_id: string;
      tool_name: string;
      step: string;
      fraction?: number;
      message?: string;
    })
  | (Base<"tool_execution_completed"> & { call_id: string; tool_name: string; result: unknown })
  | (Base<"tool_execution_failed"> & { call_id: string; tool_name: string; error: ErrorObject })
  | (Base<"artifact_intermediate"> & { artifact: Artifact })
  | (Base<"artifact_final"> & { artifact: Artifact })
  | (Base<"usage"> & { usage: Usage })
  | (Base<"error"> & { error: ErrorObject })
  | (Base<"run_completed"> & {
      usage: Usage;
      time_to_first_token_ms: number | null;
      duration_ms: number;
      stop_reason?: string;
    })
  | (Base<"run_failed"> & { error: ErrorObject })
  | (Base<"run_cancelled"> & { reason: string })
  | (Base<"run_interrupted"> & { reason: string; durable_seq: number });

export type SluiceEventType = SluiceEvent["type"];

export const TERMINAL_TYPES: ReadonlySet<string> = new Set([
  "run_completed",
  "run_failed",
  "run_cancelled",
  "run_interrupted",
]);

export function isTerminal(event: { type: string }): boolean {
  return TERMINAL_TYPES.has(event.type);
}

export interface Thread {
  id: string;
  title?: string | null;
  created_at: number;
  messages?: Message[];
  artifacts?: Artifact[];
}

export interface Message {
  id: string;
  thread_id: string;
  role: "user" | "assistant";
  content: string;
  reasoning?: string;
  status: "streaming" | "complete" | "incomplete";
  run_id?: string | null;
  created_at: number;
  turns?: unknown[];
}

export type RunStatus = "queued" | "running" | "completed" | "failed" | "cancelled" | "interrupted";

export interface Run {
  id: string;
  thread_id: string;
  model: string;
  status: RunStatus;
  user_message_id: string;
  message_id: string;
  usage?: Usage | null;
  time_to_first_token_ms?: number | null;
  last_seq: number;
  error?: ErrorObject | null;
  created_at: number;
  ended_at?: number | null;
}

export interface RunRequest {
  content: string;
  model?: string;
  agent?: string;
  on_busy?: "reject" | "queue" | "interrupt";
  on_disconnect?: "continue" | "cancel";
}

export interface ModelInfo {
  id: string;
  kind: string;
  default: boolean;
}
