//! Any bytes as a config file: a config or positioned problems, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = outrider::config::parse_str(text, "f.yaml") {
            for line in e.lines() {
                assert!(line.starts_with("f.yaml:"), "{line}");
            }
        }
    }
});
