//! Request targets and Host values: rewritten to origin-form byte-exact or refused, never
//! normalised, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrider::proxy::forward;

fuzz_target!(|data: &[u8]| {
    let (target, host) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"shop"[..]),
    };
    let Ok(mut req) = pingora_http::RequestHeader::build("GET", target, None) else {
        return;
    };
    if let Ok(host) = http::HeaderValue::from_bytes(host) {
        let _ = req.insert_header("host", host);
    }
    let before = req.raw_path().to_vec();
    if forward::check_host(&req).is_ok() && forward::to_origin_form(&mut req).is_ok() {
        let after = req.raw_path();
        // Only a scheme and authority may be removed from the front; the rest is untouched.
        assert!(
            before.ends_with(after) || (after.starts_with(b"/") && before.ends_with(&after[1..])),
            "{before:?} -> {after:?}"
        );
    }
});
