//! Each provider adapter on any bytes: never panics, and a response read in two pieces (split
//! where the input says) gives the same events and the same error as one read whole.
//! Input: one byte picks the adapter, two bytes the split, the rest is the response body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_providers::decode::{ByteDecoder, Decoder, Framing};
use sluice_providers::{ModelEvent, anthropic, ollama, openai_chat, openai_responses};

fn adapter(pick: u8) -> (Framing, Box<dyn Decoder>) {
    match pick % 4 {
        0 => (
            Framing::Sse,
            Box::<openai_responses::ResponsesDecoder>::default(),
        ),
        1 => (Framing::Sse, Box::<openai_chat::ChatDecoder>::default()),
        2 => (Framing::Sse, Box::<anthropic::AnthropicDecoder>::default()),
        _ => (Framing::Ndjson, Box::<ollama::OllamaDecoder>::default()),
    }
}

fn read(pick: u8, pieces: &[&[u8]]) -> (Vec<ModelEvent>, Option<String>) {
    let (framing, decoder) = adapter(pick);
    let mut bytes = ByteDecoder::new(framing, decoder);
    let mut out = Vec::new();
    for piece in pieces {
        if let Err(e) = bytes.feed(piece, &mut out) {
            return (out, Some(format!("{:?}: {}", e.code, e.message)));
        }
    }
    match bytes.finish(&mut out) {
        Err(e) => (out, Some(format!("{:?}: {}", e.code, e.message))),
        Ok(()) => (out, None),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Some((split, body)) = rest.split_first_chunk::<2>() else {
        return;
    };
    let at = usize::from(u16::from_le_bytes(*split)) % (body.len() + 1);
    let whole = read(pick, &[body]);
    let (a, b) = body.split_at(at);
    assert_eq!(
        whole,
        read(pick, &[a, b]),
        "adapter {} split at {at}",
        pick % 4
    );
});
