//! Reads the JSON a model is still writing: the longest prefix that can be closed into a valid
//! value, closed. `{"title":"Sales","rows":[["a",1],["b"` reads as
//! `{"title":"Sales","rows":[["a",1],["b"]]}`; a string value still being written is kept as far as
//! it goes (so a document grows as it streams), while a key, a number or a literal still being
//! written is left out until it is complete.

use serde_json::Value;

#[derive(Clone, Copy, PartialEq)]
enum Expect {
    /// In an object: a key or `}`.
    Key,
    /// In an object, after a key: `:`.
    Colon,
    /// A value (after `:` in an object, or in an array).
    Value,
    /// After a value: `,` or the closing bracket.
    After,
}

/// The value the prefix `text` can be completed to, if any.
pub fn parse_partial(text: &str) -> Option<Value> {
    let bytes = text.as_bytes();
    // Open containers, innermost last: b'{' or b'['.
    let mut stack: Vec<u8> = Vec::new();
    let mut expect = Expect::Value;
    // The longest prefix known to close cleanly: (end, closing text).
    let mut safe: Option<(usize, String)> = None;
    let closers = |stack: &[u8]| -> String {
        stack
            .iter()
            .rev()
            .map(|c| if *c == b'{' { '}' } else { ']' })
            .collect()
    };
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'"' => {
                let is_key = expect == Expect::Key;
                // Scan the string; remember the last point not inside an escape.
                i += 1;
                let mut last_clean = i;
                let mut closed = false;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' => {
                            // \uXXXX takes six bytes, other escapes two.
                            let len = if bytes.get(i + 1) == Some(&b'u') {
                                6
                            } else {
                                2
                            };
                            if i + len > bytes.len() {
                                break;
                            }
                            i += len;
                            last_clean = i;
                        }
                        b'"' => {
                            closed = true;
                            i += 1;
                            break;
                        }
                        _ => {
                            i += 1;
                            last_clean = i;
                        }
                    }
                }
                if !closed {
                    if !is_key && !stack.is_empty() {
                        // A string value still being written: keep what has arrived.
                        let candidate = format!("{}\"{}", &text[..last_clean], closers(&stack));
                        return serde_json::from_str(&candidate)
                            .ok()
                            .or_else(|| close(text, &safe));
                    }
                    return close(text, &safe);
                }
                if is_key {
                    expect = Expect::Colon;
                } else {
                    expect = Expect::After;
                    safe = Some((i, closers(&stack)));
                }
                continue;
            }
            b':' if expect == Expect::Colon => expect = Expect::Value,
            b',' if expect == Expect::After => {
                expect = if stack.last() == Some(&b'{') {
                    Expect::Key
                } else {
                    Expect::Value
                };
            }
            b'{' | b'[' if expect == Expect::Value => {
                stack.push(b);
                expect = if b == b'{' {
                    Expect::Key
                } else {
                    Expect::Value
                };
                safe = Some((i + 1, closers(&stack)));
            }
            b'}' | b']' => {
                let open = if b == b'}' { b'{' } else { b'[' };
                if stack.pop() != Some(open) {
                    return close(text, &safe);
                }
                expect = Expect::After;
                safe = Some((i + 1, closers(&stack)));
            }
            _ if expect == Expect::Value => {
                // A number or a literal: complete only once a delimiter follows it.
                let end = bytes[i..]
                    .iter()
                    .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t'))
                    .map(|p| i + p);
                match end {
                    Some(end) => {
                        serde_json::from_str::<Value>(&text[i..end]).ok()?;
                        i = end;
                        expect = Expect::After;
                        safe = Some((i, closers(&stack)));
                        continue;
                    }
                    None => return close(text, &safe),
                }
            }
            _ => return close(text, &safe),
        }
        i += 1;
    }
    close(text, &safe)
}

/// Closes `text` at its last safe point, dropping a dangling `,` or key.
fn close(text: &str, safe: &Option<(usize, String)>) -> Option<Value> {
    let (end, closers) = safe.as_ref()?;
    let candidate = format!("{}{}", &text[..*end], closers);
    serde_json::from_str(&candidate).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_prefix_of_a_document_reads_as_a_growing_value() {
        let full = r#"{"title":"Q1 \"sales\"","columns":["region","total"],"rows":[["north",12.5],["south",-3],["é ✔",true]],"note":null}"#;
        let mut last_rows = 0;
        for end in 0..=full.len() {
            if !full.is_char_boundary(end) {
                continue;
            }
            let Some(v) = parse_partial(&full[..end]) else {
                assert!(end < 2, "prefix {end} should read: {}", &full[..end]);
                continue;
            };
            assert!(v.is_object(), "{v}");
            // Rows only ever grow, and cells are never invented.
            let rows = v["rows"].as_array().map(Vec::len).unwrap_or(0);
            assert!(rows >= last_rows, "rows shrank at {end}");
            last_rows = rows;
            if let Some(title) = v["title"].as_str() {
                assert!(
                    "Q1 \"sales\"".starts_with(title),
                    "title {title:?} at {end}"
                );
            }
        }
        assert_eq!(parse_partial(full), serde_json::from_str(full).ok());
        assert_eq!(
            parse_partial(r#"{"rows":[["a",1],["b""#),
            Some(json!({"rows":[["a",1],["b"]]}))
        );
        assert_eq!(
            parse_partial(r#"{"title":"Sal"#),
            Some(json!({"title":"Sal"}))
        );
        assert_eq!(
            parse_partial(r#"{"n":12"#),
            Some(json!({})),
            "a number may still grow"
        );
        assert_eq!(
            parse_partial(r##"{"markdown":"# A\nb\u00"##),
            Some(json!({"markdown":"# A\nb"}))
        );
        assert_eq!(parse_partial(r#"{"ti"#), Some(json!({})));
        assert_eq!(parse_partial("nonsense"), None);
    }
}
