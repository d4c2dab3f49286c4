//! The SSE parser on any bytes: never panics, and reading the bytes in two pieces (split where the
//! first two input bytes say) dispatches exactly what reading them whole does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_protocol::sse::{SseEvent, SseParser};

fn read(pieces: &[&[u8]]) -> (Vec<SseEvent>, String, Option<u64>) {
    let mut parser = SseParser::new();
    let mut events = Vec::new();
    for piece in pieces {
        events.extend(parser.feed(piece));
    }
    (
        events,
        parser.last_event_id().to_string(),
        parser.reconnection_time(),
    )
}

fuzz_target!(|data: &[u8]| {
    let Some((split, bytes)) = data.split_first_chunk::<2>() else {
        return;
    };
    let at = usize::from(u16::from_le_bytes(*split)) % (bytes.len() + 1);
    let whole = read(&[bytes]);
    let (a, b) = bytes.split_at(at);
    assert_eq!(whole, read(&[a, b]), "split at {at}");
});
