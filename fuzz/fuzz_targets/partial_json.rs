//! The partial-JSON reader (a tool call's arguments while they stream) on any text: never panics,
//! and a complete JSON object reads as what serde_json reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_engine::partial_json::parse_partial;

fuzz_target!(|text: &str| {
    let partial = parse_partial(text);
    if let Ok(value @ serde_json::Value::Object(_)) =
        serde_json::from_str::<serde_json::Value>(text)
    {
        assert_eq!(partial, Some(value), "a complete object");
    }
});
