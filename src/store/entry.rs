//! The stored entry and its versioned binary encoding (the value kept in Redis). Every feature
//! stores this one shape: the HTTP cache a response, others their own bytes in `body` with
//! whatever metadata they need in `headers`. The store only reads `stored_at` and `retention`;
//! what "fresh" means is the owning feature's business.
//!
//! Layout (all integers little-endian):
//! `magic "ORC\0"` · `version u8` · `status u16` · `stored_at nanos u64` · `ttl nanos u64` ·
//! `retention nanos u64` · `namespace (u16 len, bytes)` · `label (u32 len, bytes)` ·
//! `header count u32` · per header `(u16 name len, name, u32 value len, value)` ·
//! `body (u64 len, bytes)`. Nothing may follow the body.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::CacheError;

const MAGIC: &[u8; 4] = b"ORC\0";
/// Bump on any layout change; readers reject other versions (a miss, then overwritten).
const VERSION: u8 = 2;
/// A complete response (or a feature's value) as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    /// Header names are lowercase; values are kept as bytes because origins send non-UTF-8.
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
    pub stored_at: SystemTime,
    /// Freshness lifetime the origin gave (or the route's at store time); features decide
    /// freshness from it and their live config.
    pub ttl: Duration,
    /// How long after `stored_at` the store keeps the entry at all (L1 expiry, Redis `PX`).
    pub retention: Duration,
    pub namespace: String,
    pub label: String,
}

impl StoredResponse {
    /// Age by the wall clock; a clock that moved backwards gives zero rather than an error.
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.stored_at).unwrap_or(Duration::ZERO)
    }

    /// How long after `stored_at` the entry is kept.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// Time left until the retention ends (zero if already past).
    pub fn remaining_retention(&self, now: SystemTime) -> Duration {
        self.retention().saturating_sub(self.age(now))
    }

    /// Approximate memory footprint; the L1 weigher and size limits use it.
    pub fn approx_size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 48)
            .sum();
        self.body.len() + headers + self.namespace.len() + self.label.len() + 160
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.approx_size());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.status.to_le_bytes());
        let stored = self
            .stored_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        for d in [stored, self.ttl, self.retention] {
            out.extend_from_slice(&nanos(d).to_le_bytes());
        }
        put_u16_str(&mut out, self.namespace.as_bytes());
        put_u32_bytes(&mut out, self.label.as_bytes());
        out.extend_from_slice(&(self.headers.len() as u32).to_le_bytes());
        for (name, value) in &self.headers {
            put_u16_str(&mut out, name.as_bytes());
            put_u32_bytes(&mut out, value);
        }
        out.extend_from_slice(&(self.body.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes a copy of `buf`. Prefer [`StoredResponse::decode_bytes`] when the bytes are
    /// already shared: header values and body then point into it without copying.
    pub fn decode(buf: &[u8]) -> Result<Self, CacheError> {
        Self::decode_bytes(Bytes::copy_from_slice(buf))
    }

    pub fn decode_bytes(buf: Bytes) -> Result<Self, CacheError> {
        let mut r = Reader { buf: &buf, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(CacheError::Decode("bad magic"));
        }
        if r.u8()? != VERSION {
            return Err(CacheError::Decode("unsupported version"));
        }
        let status = r.u16()?;
        let stored_at = UNIX_EPOCH
            .checked_add(Duration::from_nanos(r.u64()?))
            .ok_or(CacheError::Decode("stored_at out of range"))?;
        let ttl = Duration::from_nanos(r.u64()?);
        let retention = Duration::from_nanos(r.u64()?);
        let ns_len = r.u16()? as usize;
        let namespace = r.string(ns_len)?;
        let label_len = r.u32()? as usize;
        let label = r.string(label_len)?;
        let count = r.u32()? as usize;
        // Every header needs at least 6 bytes; refusing impossible counts up front keeps a
        // hostile value from making us allocate gigabytes.
        if count > r.remaining() / 6 {
            return Err(CacheError::Decode("header count exceeds input"));
        }
        let mut headers = Vec::with_capacity(count);
        for _ in 0..count {
            let n = r.u16()? as usize;
            let name = r.string(n)?;
            let v = r.u32()? as usize;
            let start = r.pos;
            r.take(v)?;
            headers.push((name, buf.slice(start..start + v)));
        }
        let body_len = usize::try_from(r.u64()?).map_err(|_| CacheError::Decode("body length"))?;
        let start = r.pos;
        r.take(body_len)?;
        if r.remaining() != 0 {
            return Err(CacheError::Decode("trailing bytes"));
        }
        let body = buf.slice(start..start + body_len);
        Ok(StoredResponse {
            status,
            headers,
            body,
            stored_at,
            ttl,
            retention,
            namespace,
            label,
        })
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Names longer than u16 cannot be real header names or namespaces; they are cut rather than
/// letting encode fail (the entry is then merely not found under that name).
fn put_u16_str(out: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s);
}

fn put_u32_bytes(out: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(u32::MAX as usize)];
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CacheError> {
        if n > self.remaining() {
            return Err(CacheError::Decode("truncated"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CacheError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, CacheError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, CacheError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, CacheError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, CacheError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn string(&mut self, n: usize) -> Result<String, CacheError> {
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| CacheError::Decode("invalid utf-8"))
    }
}

/// A realistic entry for tests across the module.
#[cfg(test)]
pub(crate) fn sample_entry(body_len: usize) -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: vec![
            (
                "content-type".into(),
                Bytes::from_static(b"application/json"),
            ),
            ("x-odd".into(), Bytes::from_static(b"\xff\x00bin")),
        ],
        body: Bytes::from(vec![b'x'; body_len]),
        stored_at: UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
        ttl: Duration::from_secs(60),
        retention: Duration::from_secs(660),
        namespace: "items".into(),
        label: "/api/items/1".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> StoredResponse {
        sample_entry(n)
    }

    #[test]
    fn roundtrip() {
        for len in [0, 1, 1024, 70_000] {
            let e = sample(len);
            let enc = e.encode();
            assert_eq!(StoredResponse::decode(&enc).ok(), Some(e.clone()));
            assert_eq!(StoredResponse::decode_bytes(Bytes::from(enc)).ok(), Some(e));
        }
    }

    #[test]
    fn corrupt_inputs_are_errors_not_panics() {
        let enc = sample(100).encode();
        for cut in 0..enc.len() {
            assert!(StoredResponse::decode(&enc[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad_magic = enc.clone();
        bad_magic[0] = b'X';
        assert!(matches!(
            StoredResponse::decode(&bad_magic),
            Err(CacheError::Decode("bad magic"))
        ));
        let mut bad_version = enc.clone();
        bad_version[4] = VERSION + 1;
        assert!(matches!(
            StoredResponse::decode(&bad_version),
            Err(CacheError::Decode("unsupported version"))
        ));
        let mut trailing = enc.clone();
        trailing.push(0);
        assert!(StoredResponse::decode(&trailing).is_err());
        assert!(StoredResponse::decode(b"").is_err());
        assert!(StoredResponse::decode(b"{\"json\":true}").is_err());
        // A header count claiming billions must be refused without allocating.
        let mut huge = Vec::new();
        huge.extend_from_slice(MAGIC);
        huge.push(VERSION);
        huge.extend_from_slice(&[0; 2 + 24]);
        huge.extend_from_slice(&0u16.to_le_bytes());
        huge.extend_from_slice(&0u32.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(StoredResponse::decode(&huge).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        let enc = sample(64).encode();
        for i in 0..20_000 {
            let v: Vec<u8> = if i % 2 == 0 {
                (0..rng.usize(0..300)).map(|_| rng.u8(..)).collect()
            } else {
                // Flip bytes of a valid entry: exercises every length field.
                let mut v = enc.clone();
                for _ in 0..rng.usize(1..4) {
                    let at = rng.usize(..v.len());
                    v[at] = rng.u8(..);
                }
                v
            };
            let _ = StoredResponse::decode(&v);
        }
    }

    #[test]
    fn retention_and_ttl_left() {
        let e = sample(0);
        let t0 = e.stored_at;
        let at = |s: u64| t0 + Duration::from_secs(s);
        // A clock step backwards must not make the entry older or error.
        assert_eq!(e.age(t0 - Duration::from_secs(5)), Duration::ZERO);
        assert_eq!(e.retention(), Duration::from_secs(660));
        assert_eq!(e.remaining_retention(at(600)), Duration::from_secs(60));
        assert_eq!(e.remaining_retention(at(700)), Duration::ZERO);
    }
}
