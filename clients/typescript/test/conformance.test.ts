/**
 * The shared SSE parser cases (../shared/conformance/sse-parsing/cases.json, beside the checkout):
 * each fed whole, in its given chunks (text or bytes), and one byte at a time.
 */
import { existsSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { SSEParser, type SSEEvent } from "../src/sse.js";

const path = fileURLToPath(new URL("../../../../shared/conformance/sse-parsing/cases.json", import.meta.url));

interface Case {
  name: string;
  input: string;
  chunks?: string[];
  chunks_bytes_hex?: string[];
  input_bytes_hex?: string;
  expected: SSEEvent[];
  final_state?: { last_event_id: string; reconnection_time: number | null };
}

const hex = (h: string) => new Uint8Array((h.match(/../g) ?? []).map((b) => parseInt(b, 16)));
const enc = new TextEncoder();

function run(chunks: Uint8Array[]): { events: SSEEvent[]; parser: SSEParser } {
  const parser = new SSEParser();
  const events: SSEEvent[] = [];
  for (const c of chunks) events.push(...parser.feed(c));
  events.push(...parser.end());
  return { events, parser };
}

if (!existsSync(path)) {
  console.log("skipped: shared/conformance not found beside the checkout (see its README)");
  it.skip("shared SSE conformance cases", () => {});
} else {
  const cases = JSON.parse(readFileSync(path, "utf8")) as Case[];
  describe("shared SSE conformance cases", () => {
    it("has cases", () => expect(cases.length).toBeGreaterThan(30));
    for (const c of cases) {
      it(c.name, () => {
        const wire = c.input_bytes_hex ? hex(c.input_bytes_hex) : enc.encode(c.input);
        const ways: [string, Uint8Array[]][] = [["whole", [wire]]];
        if (c.chunks_bytes_hex) ways.push(["byte chunks", c.chunks_bytes_hex.map(hex)]);
        else if (c.chunks && !c.input_bytes_hex) ways.push(["chunks", c.chunks.map((s) => enc.encode(s))]);
        ways.push(["byte by byte", Array.from(wire, (b) => new Uint8Array([b]))]);
        for (const [how, chunks] of ways) {
          const { events, parser } = run(chunks);
          expect(events, how).toEqual(c.expected);
          if (c.final_state) {
            expect(parser.lastEventId, `${how}: last event id`).toBe(c.final_state.last_event_id);
            expect(parser.reconnectionTime, `${how}: retry`).toBe(c.final_state.reconnection_time);
          }
        }
      });
    }
  });
}
