//! Cache keys: a BLAKE3 hash over length-prefixed request parts, plus the namespace and label
//! that purge needs. The hash is the identity; namespace and label only locate it.

use std::fmt;

/// Domain tags keep keys of different derivations apart even when their parts coincide.
const HTTP_DOMAIN: &[u8] = b"outrider.cache.http.v1";
const PARTS_DOMAIN: &[u8] = b"outrider.cache.parts.v1";
const VARIANT_DOMAIN: &[u8] = b"outrider.cache.variant.v1";

/// The identity of one cached response.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// BLAKE3 over every input that can change the response.
    pub hash: [u8; 32],
    /// Route name or feature (`"apq"`, `"llm"`, …); purge by route uses it.
    pub namespace: String,
    /// URL path for HTTP entries; purge by path prefix matches on it.
    pub label: String,
}

/// Collects length-prefixed parts and hashes them in one call: BLAKE3 over one small buffer is
/// several times cheaper than many tiny `update` calls on the request path.
struct Parts {
    buf: Vec<u8>,
}

impl Parts {
    fn with_capacity(n: usize) -> Self {
        Parts {
            buf: Vec::with_capacity(n),
        }
    }

    /// Writes a part with its length first so `("ab", "c")` and `("a", "bc")` never hash alike.
    #[inline]
    fn put(&mut self, part: &[u8]) {
        self.buf
            .extend_from_slice(&(part.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(part);
    }

    /// Optional parts carry a presence byte so `None` and `Some("")` differ.
    #[inline]
    fn put_opt(&mut self, part: Option<&[u8]>) {
        match part {
            None => self.buf.push(0),
            Some(p) => {
                self.buf.push(1);
                self.put(p);
            }
        }
    }

    #[inline]
    fn count(&mut self, n: usize) {
        self.buf.extend_from_slice(&(n as u64).to_le_bytes());
    }

    fn finish(self) -> [u8; 32] {
        *blake3::hash(&self.buf).as_bytes()
    }
}

impl CacheKey {
    /// Key for a plain HTTP response.
    ///
    /// `HEAD` is keyed as `GET` so a HEAD is answered from the GET entry. The host is compared
    /// case-insensitively. `vary` must be given in a stable order (the route's configured order)
    /// with lowercased names and values as raw bytes (two different non-UTF-8 values must not
    /// meet); an absent header should be passed with an empty value or left out consistently.
    /// `credential` is hashed, never stored.
    pub fn http(
        namespace: &str,
        method: &str,
        host: &str,
        path: &str,
        query: Option<&str>,
        vary: &[(&str, &[u8])],
        credential: Option<&[u8]>,
    ) -> Self {
        let vary_len: usize = vary.iter().map(|(n, v)| n.len() + v.len() + 16).sum();
        let mut h = Parts::with_capacity(
            HTTP_DOMAIN.len()
                + namespace.len()
                + host.len()
                + path.len()
                + query.map_or(0, str::len)
                + credential.map_or(0, <[u8]>::len)
                + vary_len
                + 96,
        );
        h.put(HTTP_DOMAIN);
        h.put(namespace.as_bytes());
        let method = if method.eq_ignore_ascii_case("HEAD") {
            "GET"
        } else {
            method
        };
        h.put(method.as_bytes());
        h.buf.extend_from_slice(&(host.len() as u64).to_le_bytes());
        h.buf.extend(host.bytes().map(|b| b.to_ascii_lowercase()));
        h.put(path.as_bytes());
        h.put_opt(query.map(str::as_bytes));
        h.count(vary.len());
        for (name, value) in vary {
            h.put(name.as_bytes());
            h.put(value);
        }
        h.put_opt(credential);
        CacheKey {
            hash: h.finish(),
            namespace: namespace.to_owned(),
            label: path.to_owned(),
        }
    }

    /// Key for features that derive identity from their own canonical parts (APQ hash,
    /// canonical LLM prompt, model features). The namespace is part of the hash so two
    /// features never share an entry by accident.
    pub fn from_parts(namespace: &str, label: &str, parts: &[&[u8]]) -> Self {
        let total: usize = parts.iter().map(|p| p.len() + 8).sum();
        let mut h = Parts::with_capacity(PARTS_DOMAIN.len() + namespace.len() + total + 32);
        h.put(PARTS_DOMAIN);
        h.put(namespace.as_bytes());
        h.count(parts.len());
        for p in parts {
            h.put(p);
        }
        CacheKey {
            hash: h.finish(),
            namespace: namespace.to_owned(),
            label: label.to_owned(),
        }
    }

    /// The key of one variant of this key's response (`Vary`), by the variant's id: same
    /// namespace and label, so purging the URL purges its variants.
    pub fn variant(&self, id: &str) -> Self {
        let mut h = Parts::with_capacity(VARIANT_DOMAIN.len() + id.len() + 64);
        h.put(VARIANT_DOMAIN);
        h.put(&self.hash);
        h.put(id.as_bytes());
        CacheKey {
            hash: h.finish(),
            namespace: self.namespace.clone(),
            label: self.label.clone(),
        }
    }

    /// Lowercase hex of the hash: the form admins purge by and Redis keys end with.
    pub fn hex(&self) -> String {
        hex32(&self.hash)
    }
}

pub(crate) fn hex32(hash: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in hash {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// Parses 64 hex digits back into a hash; `None` for anything else.
pub(crate) fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheKey")
            .field("namespace", &self.namespace)
            .field("label", &self.label)
            .field("hash", &self.hex())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CacheKey {
        CacheKey::http("items", "GET", "example.com", "/a", Some("x=1"), &[], None)
    }

    #[test]
    fn stable_and_pinned() {
        assert_eq!(base(), base());
        // Pinned so an accidental change of derivation (which would orphan every stored entry)
        // is a deliberate, visible edit.
        let k = CacheKey::from_parts("apq", "q", &[b"abc"]);
        assert_eq!(
            k.hex(),
            "66db2e17a1c5790ccd11f129d472c3b9da743c14e360d60e161a355ba3099596"
        );
        assert_eq!(
            base().hex(),
            "0131f85bf3ba2d58c462132f272d16a41d034e2adb92f75d19dd13d9b0d1cfc2"
        );
        assert_eq!(k, CacheKey::from_parts("apq", "q", &[b"abc"]));
        assert_eq!(parse_hex32(&k.hex()), Some(k.hash));
    }

    #[test]
    fn every_input_changes_the_hash() {
        let b = base().hash;
        let variants = [
            CacheKey::http("other", "GET", "example.com", "/a", Some("x=1"), &[], None),
            CacheKey::http("items", "POST", "example.com", "/a", Some("x=1"), &[], None),
            CacheKey::http("items", "GET", "example.org", "/a", Some("x=1"), &[], None),
            CacheKey::http("items", "GET", "example.com", "/b", Some("x=1"), &[], None),
            CacheKey::http("items", "GET", "example.com", "/a", Some("x=2"), &[], None),
            CacheKey::http("items", "GET", "example.com", "/a", None, &[], None),
            CacheKey::http("items", "GET", "example.com", "/a", Some(""), &[], None),
            CacheKey::http(
                "items",
                "GET",
                "example.com",
                "/a",
                Some("x=1"),
                &[("accept-language", b"de".as_slice())],
                None,
            ),
            CacheKey::http(
                "items",
                "GET",
                "example.com",
                "/a",
                Some("x=1"),
                &[],
                Some(b"Bearer a"),
            ),
        ];
        for v in &variants {
            assert_ne!(v.hash, b, "{v:?}");
        }
        let de = CacheKey::http(
            "i",
            "GET",
            "h",
            "/",
            None,
            &[("accept-language", b"de".as_slice())],
            None,
        );
        let fr = CacheKey::http(
            "i",
            "GET",
            "h",
            "/",
            None,
            &[("accept-language", b"fr".as_slice())],
            None,
        );
        assert_ne!(de.hash, fr.hash);
        let c1 = CacheKey::http("i", "GET", "h", "/", None, &[], Some(b"token-1"));
        let c2 = CacheKey::http("i", "GET", "h", "/", None, &[], Some(b"token-2"));
        assert_ne!(c1.hash, c2.hash);
        assert_ne!(
            CacheKey::http("i", "GET", "h", "/", None, &[], None).hash,
            CacheKey::http("i", "GET", "h", "/", None, &[], Some(b"")).hash
        );
    }

    #[test]
    fn head_uses_get_entry_and_host_case_is_ignored() {
        let get = CacheKey::http("i", "GET", "Example.COM", "/", None, &[], None);
        let head = CacheKey::http("i", "HEAD", "example.com", "/", None, &[], None);
        assert_eq!(get.hash, head.hash);
    }

    #[test]
    fn length_prefix_prevents_ambiguity() {
        let a = CacheKey::from_parts("n", "l", &[b"ab", b"c"]);
        let b = CacheKey::from_parts("n", "l", &[b"a", b"bc"]);
        let c = CacheKey::from_parts("n", "l", &[b"abc"]);
        assert_ne!(a.hash, b.hash);
        assert_ne!(a.hash, c.hash);
        // Moving a boundary between path and query must not collide either.
        let p = CacheKey::http("i", "GET", "h", "/a?b", None, &[], None);
        let q = CacheKey::http("i", "GET", "h", "/a", Some("b"), &[], None);
        assert_ne!(p.hash, q.hash);
        let v1 = CacheKey::http("i", "GET", "h", "/", None, &[("ab", b"c".as_slice())], None);
        let v2 = CacheKey::http("i", "GET", "h", "/", None, &[("a", b"bc".as_slice())], None);
        assert_ne!(v1.hash, v2.hash);
        // Namespace is part of the hash for both derivations.
        assert_ne!(
            CacheKey::from_parts("apq", "l", &[b"x"]).hash,
            CacheKey::from_parts("llm", "l", &[b"x"]).hash
        );
    }

    #[test]
    fn label_is_path_and_does_not_affect_parts_identity_only_location() {
        let k = CacheKey::http("i", "GET", "h", "/p/q", Some("z"), &[], None);
        assert_eq!(k.label, "/p/q");
        assert_eq!(
            CacheKey::from_parts("n", "one", &[b"x"]).hash,
            CacheKey::from_parts("n", "two", &[b"x"]).hash
        );
    }

    #[test]
    fn parse_hex_rejects_garbage() {
        assert_eq!(parse_hex32("zz"), None);
        assert_eq!(parse_hex32(&"g".repeat(64)), None);
        assert_eq!(parse_hex32(&"é".repeat(32)), None);
    }
}
