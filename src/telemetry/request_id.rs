//! Request ids: accepted from the client when sane, generated otherwise.

/// Longest client-supplied id we pass on; longer or odd values are replaced, not truncated.
const MAX_LEN: usize = 128;

/// Returns the client's id if it is a reasonable token, so ids stay safe in logs and headers.
pub fn accept(value: &[u8]) -> Option<&str> {
    if value.is_empty() || value.len() > MAX_LEN {
        return None;
    }
    let ok = value.iter().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'+' | b'=')
    });
    if ok {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// A random 128-bit id as 32 hex chars (UUID-sized, no dashes), cheap to make.
pub fn generate() -> String {
    String::from_utf8_lossy(&random_hex()).into_owned()
}

/// The same as [`generate`], as a header value that is cheap to clone into both the upstream
/// request and the response.
pub fn generate_header() -> http::HeaderValue {
    // Hex digits are always a valid header value.
    http::HeaderValue::from_bytes(&random_hex()).unwrap_or(http::HeaderValue::from_static("-"))
}

fn random_hex() -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut value = fastrand::u128(..);
    let mut out = [0u8; 32];
    for byte in out.iter_mut().rev() {
        *byte = HEX[(value & 0xf) as usize];
        value >>= 4;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_tokens_and_rejects_junk() {
        assert_eq!(accept(b"abc-123"), Some("abc-123"));
        assert_eq!(accept(b""), None);
        assert_eq!(accept(b"has space"), None);
        assert_eq!(accept(b"new\nline"), None);
        assert_eq!(accept(&[b'a'; 129]), None);
        let id = generate();
        assert_eq!(id.len(), 32);
        assert_ne!(id, generate());
        assert_eq!(generate_header().len(), 32);
    }
}
