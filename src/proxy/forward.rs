//! What outrider changes on a request before it reaches the upstream, and the request-target
//! rule that keeps what the app routes on equal to what outrider routed and keyed on.

use std::net::IpAddr;

use pingora_http::authority::{raw_target_authority, RawTargetAuthority};
use pingora_http::RequestHeader;

use crate::config::Upstream;

/// The headers outrider sets on every request it forwards, foreground or background:
/// `x-request-id`, `X-Forwarded-For` (appended), `X-Forwarded-Proto` (when absent), one
/// `Content-Length` where the client repeated an identical one, and for a TLS
/// upstream (a provider API, which routes by Host) its own Host with the client's kept in
/// `X-Forwarded-Host`.
pub fn apply_forwarding_headers(
    req: &mut RequestHeader,
    client_ip: Option<IpAddr>,
    upstream: Option<&Upstream>,
    request_id: &http::HeaderValue,
) -> pingora_error::Result<()> {
    req.insert_header("x-request-id", request_id.clone())?;
    collapse_content_length(req)?;
    if let Some(ip) = client_ip {
        use std::fmt::Write;
        let mut forwarded = String::with_capacity(48);
        if let Some(prior) = req
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            forwarded.push_str(prior);
            forwarded.push_str(", ");
        }
        let _ = write!(forwarded, "{ip}");
        req.insert_header("x-forwarded-for", forwarded)?;
    }
    // Behind an ingress that terminated TLS the client's scheme is already recorded; keep it.
    if !req.headers.contains_key("x-forwarded-proto") {
        req.insert_header("x-forwarded-proto", http::HeaderValue::from_static("http"))?;
    }
    if let Some(upstream) = upstream.filter(|u| u.tls) {
        // A local app sees the client's Host; only the rewritten case needs X-Forwarded-Host.
        if let Some(host) = req.headers.get(http::header::HOST).cloned() {
            if !req.headers.contains_key("x-forwarded-host") {
                req.insert_header("x-forwarded-host", host)?;
            }
        }
        let host = if upstream.port == 443 {
            upstream.host.clone()
        } else {
            format!("{}:{}", upstream.host, upstream.port)
        };
        req.insert_header(http::header::HOST, host)?;
    }
    Ok(())
}

/// Pingora accepts repeated identical `Content-Length` values (`5` twice, or `5, 5`) as one
/// length and refuses differing ones (RFC 9110 §8.6) but forwards them as sent; the upstream
/// gets the one value, so it never has to reconcile framing itself (some servers refuse it).
fn collapse_content_length(req: &mut RequestHeader) -> pingora_error::Result<()> {
    let mut values = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
    let (Some(first), second) = (values.next(), values.next()) else {
        return Ok(());
    };
    if second.is_none() && !first.as_bytes().contains(&b',') {
        return Ok(());
    }
    let length = first
        .as_bytes()
        .split(|b| *b == b',')
        .next()
        .map(|v| v.trim_ascii())
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(length) => req.insert_header(http::header::CONTENT_LENGTH, length),
        // Pingora validated the values; anything else is left as it came.
        None => Ok(()),
    }
}

/// Why a request target cannot be forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("absolute-form request target names {authority:?} but Host is {host:?}")]
    AuthorityMismatch { authority: String, host: String },
    #[error("absolute-form request target without a Host header")]
    MissingHost,
    #[error("request target cannot be rewritten to origin-form")]
    Unrewritable,
    #[error("request target has an ambiguous authority")]
    Ambiguous,
    #[error("HTTP/1.1 request without a Host header")]
    NoHost,
    #[error("more than one Host header")]
    SeveralHosts,
    #[error("Host header is not visible ASCII")]
    BadHost,
}

/// Rewrites an absolute-form target (`GET http://shop/a?b HTTP/1.1`) to origin-form (`/a?b`),
/// keeping the path and query bytes exactly, after checking that its authority is the Host.
///
/// Routing and cache keys use the path and the Host header; an upstream such as uvicorn routes
/// on the raw target instead, so forwarding the absolute form would let a request be keyed as
/// one resource and answered as another (nginx forwards origin-form for the same reason). The
/// target is classified by Pingora's own parser, so both agree on where the authority ends.
pub fn to_origin_form(req: &mut RequestHeader) -> Result<(), TargetError> {
    let origin = match raw_target_authority(req.raw_path()) {
        RawTargetAuthority::None => return Ok(()),
        RawTargetAuthority::AmbiguousAuthority => return Err(TargetError::Ambiguous),
        RawTargetAuthority::Absolute {
            scheme,
            authority,
            path_and_query,
        } => {
            let host = req
                .headers
                .get(http::header::HOST)
                .ok_or(TargetError::MissingHost)?;
            if !same_authority(authority, host.as_bytes(), scheme) {
                return Err(TargetError::AuthorityMismatch {
                    authority: String::from_utf8_lossy(authority).into_owned(),
                    host: String::from_utf8_lossy(host.as_bytes()).into_owned(),
                });
            }
            match path_and_query.first() {
                None => b"/".to_vec(),
                Some(b'/') => path_and_query.to_vec(),
                Some(_) => [b"/".as_slice(), path_and_query].concat(),
            }
        }
    };
    req.set_raw_path(&origin)
        .map_err(|_| TargetError::Unrewritable)
}

/// RFC 9112 §3.2: an HTTP/1.1 request must carry exactly one Host, and it is keyed and
/// forwarded as text, so it must be visible ASCII. Anything else is refused with 400 rather than
/// keyed under an empty or lossy name.
pub fn check_host(req: &RequestHeader) -> Result<(), TargetError> {
    let mut hosts = req.headers.get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version == http::Version::HTTP_11 => Err(TargetError::NoHost),
        (Some(_), Some(_)) => Err(TargetError::SeveralHosts),
        (Some(host), None) if !host.as_bytes().iter().all(|b| (0x21..0x7f).contains(b)) => {
            Err(TargetError::BadHost)
        }
        _ => Ok(()),
    }
}

/// Authority and Host name the same origin: equal ignoring ASCII case, where an explicit default
/// port (`:80` for http, `:443` for https) equals none.
fn same_authority(authority: &[u8], host: &[u8], scheme: &[u8]) -> bool {
    let default_port: &[u8] = if scheme.eq_ignore_ascii_case(b"https") {
        b":443"
    } else {
        b":80"
    };
    let strip = |v: &[u8]| -> Vec<u8> {
        let v = v.trim_ascii();
        let v = v.strip_suffix(default_port).unwrap_or(v);
        v.to_ascii_lowercase()
    };
    strip(authority) == strip(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(target: &str, host: Option<&str>) -> RequestHeader {
        let mut r = RequestHeader::build("GET", target.as_bytes(), None).unwrap();
        if let Some(h) = host {
            r.insert_header("host", h).unwrap();
        }
        r
    }

    #[test]
    fn absolute_form_becomes_origin_form_byte_exact() {
        let mut r = req("http://shop/api/items/1?x=%2e%2e", Some("shop"));
        to_origin_form(&mut r).unwrap();
        assert_eq!(r.raw_path(), b"/api/items/1?x=%2e%2e");
        assert_eq!(r.uri.path(), "/api/items/1");
        let mut r = req("http://Shop:80?q", Some("shop"));
        to_origin_form(&mut r).unwrap();
        assert_eq!(r.raw_path(), b"/?q");
        let mut r = req("http://shop/a/../b", Some("shop"));
        to_origin_form(&mut r).unwrap();
        assert_eq!(r.raw_path(), b"/a/../b", "never normalised");
    }

    #[test]
    fn identical_content_lengths_go_upstream_as_one() {
        let lengths = |r: &RequestHeader| -> Vec<Vec<u8>> {
            r.headers
                .get_all("content-length")
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect()
        };
        let mut r = req("/", Some("shop"));
        r.append_header("content-length", "5").unwrap();
        r.append_header("content-length", "5").unwrap();
        collapse_content_length(&mut r).unwrap();
        assert_eq!(lengths(&r), [b"5".to_vec()]);
        let mut r = req("/", Some("shop"));
        r.append_header("content-length", " 7 , 7").unwrap();
        collapse_content_length(&mut r).unwrap();
        assert_eq!(lengths(&r), [b"7".to_vec()]);
        // A single value, or none, is untouched.
        let mut r = req("/", Some("shop"));
        r.append_header("content-length", "12").unwrap();
        collapse_content_length(&mut r).unwrap();
        assert_eq!(lengths(&r), [b"12".to_vec()]);
        let mut r = req("/", Some("shop"));
        collapse_content_length(&mut r).unwrap();
        assert!(lengths(&r).is_empty());
    }

    #[test]
    fn origin_form_is_left_alone() {
        let mut r = req("/a/%2e%2e/b", Some("shop"));
        to_origin_form(&mut r).unwrap();
        assert_eq!(r.raw_path(), b"/a/%2e%2e/b");
    }

    #[test]
    fn host_rules() {
        assert_eq!(check_host(&req("/", Some("shop:8080"))), Ok(()));
        assert_eq!(check_host(&req("/", None)), Err(TargetError::NoHost));
        let mut two = req("/", Some("a"));
        two.append_header("host", "b").unwrap();
        assert_eq!(check_host(&two), Err(TargetError::SeveralHosts));
        let mut odd = req("/", None);
        odd.insert_header(
            "host",
            http::HeaderValue::from_bytes(b"sh\xc3\xb6p").unwrap(),
        )
        .unwrap();
        assert_eq!(check_host(&odd), Err(TargetError::BadHost));
        let mut http10 = req("/", None);
        http10.set_version(http::Version::HTTP_10);
        assert_eq!(check_host(&http10), Ok(()));
    }

    #[test]
    fn authority_must_match_host() {
        let mut r = req("http://evil/api", Some("shop"));
        assert!(matches!(
            to_origin_form(&mut r),
            Err(TargetError::AuthorityMismatch { .. })
        ));
        let mut r = req("http://shop/api", None);
        assert_eq!(to_origin_form(&mut r), Err(TargetError::MissingHost));
        let mut r = req("https://shop:443/api", Some("SHOP"));
        assert!(to_origin_form(&mut r).is_ok());
    }
}
