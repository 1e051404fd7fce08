//! Arbitrary bytes as a stored value (what a foreign writer or corruption leaves in Redis):
//! an entry or an error, and a decoded entry re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrider::store::StoredResponse;

fuzz_target!(|data: &[u8]| {
    if let Ok(entry) = StoredResponse::decode(data) {
        assert_eq!(StoredResponse::decode(&entry.encode()).ok(), Some(entry));
    }
});
