//! A server-sent events parser that follows the WHATWG algorithm: CR, LF and CRLF line ends
//! (also when a CRLF is split between reads), one leading BOM stripped, comments ignored, multi-line
//! `data`, `id` values with NUL ignored, `retry` only when all digits, and no dispatch for an event
//! the stream ended in the middle of.
//!
//! Input is bytes as they come off the socket; lines are split on bytes (CR and LF never occur
//! inside a multi-byte UTF-8 sequence) and decoded once complete.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event` field, `message` when absent.
    pub event: String,
    pub data: String,
    /// The last event ID at dispatch time.
    pub id: String,
    /// The reconnection time (ms) in force at dispatch, if the stream ever set one.
    pub retry: Option<u64>,
}

#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous read ended with CR: a LF at the start of the next read belongs to it.
    after_cr: bool,
    bom_checked: bool,
    /// The first bytes of the stream, held until the BOM check can be made.
    head: Vec<u8>,
    data: String,
    has_data: bool,
    event: String,
    last_event_id: String,
    reconnection_time: Option<u64>,
}

impl SseParser {
    pub fn new() -> Self {
        SseParser::default()
    }

    /// The ID a reconnecting client sends as `Last-Event-ID`.
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// The reconnection time the stream asked for, in milliseconds.
    pub fn reconnection_time(&self) -> Option<u64> {
        self.reconnection_time
    }

    /// Feeds bytes; returns the events completed by them.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        const BOM: &[u8] = b"\xEF\xBB\xBF";
        let mut out = Vec::new();
        if !self.bom_checked {
            // The BOM may itself arrive split: hold bytes until three are in or they cannot be one.
            self.head.extend_from_slice(bytes);
            if self.head.len() < 3 && BOM.starts_with(&self.head) {
                return out;
            }
            self.bom_checked = true;
            let head = std::mem::take(&mut self.head);
            self.scan(head.strip_prefix(BOM).unwrap_or(&head), &mut out);
            return out;
        }
        self.scan(bytes, &mut out);
        out
    }

    fn scan(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) {
        if bytes.is_empty() {
            return;
        }
        let mut start = 0;
        if std::mem::take(&mut self.after_cr) && bytes[0] == b'\n' {
            // The LF of a CRLF split between reads.
            start = 1;
        }
        while let Some(pos) = memchr::memchr2(b'\n', b'\r', &bytes[start..]) {
            let end = start + pos;
            if self.line.is_empty() {
                self.process_line(&bytes[start..end], out);
            } else {
                self.line.extend_from_slice(&bytes[start..end]);
                let line = std::mem::take(&mut self.line);
                self.process_line(&line, out);
                // Keep the buffer's capacity for the next partial line.
                self.line = line;
                self.line.clear();
            }
            start = end + 1;
            if bytes[end] == b'\r' {
                match bytes.get(start) {
                    Some(b'\n') => start += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.line.extend_from_slice(&bytes[start..]);
    }

    fn process_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return;
        }
        // Valid UTF-8 (nearly always) is checked word by word and borrowed.
        let text = match std::str::from_utf8(line) {
            Ok(text) => std::borrow::Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(line),
        };
        let (field, value) = match text.find(':') {
            Some(pos) => {
                let v = &text[pos + 1..];
                (&text[..pos], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (&text[..], ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.last_event_id = value.to_string(),
            "retry" => {
                if !value.is_empty()
                    && value.bytes().all(|b| b.is_ascii_digit())
                    && let Ok(ms) = value.parse()
                {
                    self.reconnection_time = Some(ms);
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let retry = self.reconnection_time;
        if !self.has_data {
            self.event.clear();
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        self.has_data = false;
        let event = std::mem::take(&mut self.event);
        out.push(SseEvent {
            event: if event.is_empty() {
                "message".to_string()
            } else {
                event
            },
            data,
            id: self.last_event_id.clone(),
            retry,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> (Vec<SseEvent>, String) {
        let mut p = SseParser::new();
        let mut events = Vec::new();
        for c in chunks {
            events.extend(p.feed(c));
        }
        (events, p.last_event_id().to_string())
    }

    #[test]
    fn every_split_of_a_stream_gives_the_same_events() {
        let input = "\u{FEFF}id: 1\r\nevent: a\rdata: x\r\ndata: ü✔\n\n: c\r\ndata:y\r\n\r\ndata: unterminated".as_bytes();
        let (whole, _) = parse_all(&[input]);
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[0].data, "x\nü✔");
        assert_eq!(whole[0].event, "a");
        assert_eq!(whole[1].data, "y");
        assert_eq!(whole[1].id, "1");
        for i in 0..input.len() {
            for j in i..input.len() {
                let (split, _) = parse_all(&[&input[..i], &input[i..j], &input[j..]]);
                assert_eq!(split, whole, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn conformance_cases() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/conformance/sse-parsing/cases.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            eprintln!("skipped: shared/conformance not found beside the checkout (see its README)");
            return;
        };
        let cases: serde_json::Value = serde_json::from_str(&text).expect("cases.json parses");
        let cases = cases.as_array().expect("array");
        assert!(!cases.is_empty());
        for case in cases {
            let name = case["name"].as_str().unwrap_or("?");
            let input = case["input"].as_str().expect("input").as_bytes().to_vec();
            let chunks: Vec<Vec<u8>> = match case.get("chunks").and_then(|c| c.as_array()) {
                Some(c) => c
                    .iter()
                    .map(|s| s.as_str().unwrap_or("").as_bytes().to_vec())
                    .collect(),
                None => vec![input.clone()],
            };
            let expected: Vec<SseEvent> = case["expected"]
                .as_array()
                .expect("expected")
                .iter()
                .map(|e| SseEvent {
                    event: e["event"].as_str().unwrap_or("message").to_string(),
                    data: e["data"].as_str().unwrap_or("").to_string(),
                    id: e["id"].as_str().unwrap_or("").to_string(),
                    retry: e["retry"].as_u64(),
                })
                .collect();
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let mut p = SseParser::new();
            let mut got = Vec::new();
            for c in &refs {
                got.extend(p.feed(c));
            }
            assert_eq!(got, expected, "case {name}");
            if let Some(fs) = case.get("final_state") {
                if let Some(id) = fs["last_event_id"].as_str() {
                    assert_eq!(p.last_event_id(), id, "case {name}: last_event_id");
                }
                assert_eq!(
                    p.reconnection_time(),
                    fs["reconnection_time"].as_u64(),
                    "case {name}: retry"
                );
            }
            // And byte by byte.
            let mut p = SseParser::new();
            let mut got = Vec::new();
            for b in &input {
                got.extend(p.feed(std::slice::from_ref(b)));
            }
            assert_eq!(got, expected, "case {name} byte by byte");
        }
    }
}
