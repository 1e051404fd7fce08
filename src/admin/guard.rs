//! What an admin request must satisfy before an endpoint sees it: a `Host` that cannot be a
//! rebound DNS name, the admin token for anything that is not a read, and JSON for any body.
//! Each check answers with the JSON error the caller sends back as is; the checks know no
//! endpoint.

use std::net::{Ipv4Addr, Ipv6Addr};

use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::config::schema::AdminConfig;
use crate::config::secret::AdminToken;

/// A refused request: the status, a stable error code and a message, plus the
/// `WWW-Authenticate` challenge for a 401.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub challenge: Option<HeaderValue>,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            challenge: None,
        }
    }

    /// The header a refused response carries, if any.
    pub fn header(&self) -> Option<(http::HeaderName, HeaderValue)> {
        self.challenge.clone().map(|v| (WWW_AUTHENTICATE, v))
    }
}

/// DNS-rebinding protection: a page on `evil.example` that re-resolves its name to 127.0.0.1 can
/// make the victim's browser send requests here, but they name `evil.example` in `Host`. So
/// `Host` must be an IP literal (v4 or `[v6]`, with an optional port), `localhost`, or a name in
/// `admin.allowed_hosts`. A request without `Host` (HTTP/1.0 tools) is let through: browsers
/// always send one.
pub fn check_host(headers: &HeaderMap, allowed: &[String]) -> Result<(), Refusal> {
    let mut values = headers.get_all(HOST).iter();
    let Some(value) = values.next() else {
        return Ok(());
    };
    let refuse = |shown: &str| {
        Refusal::new(
            StatusCode::MISDIRECTED_REQUEST,
            "host_not_allowed",
            format!(
                "Host {shown:?} is not an IP address, localhost or a name in admin.allowed_hosts \
                 (DNS-rebinding protection)"
            ),
        )
    };
    if values.next().is_some() {
        return Err(refuse("<several Host headers>"));
    }
    let Ok(host) = value.to_str() else {
        return Err(refuse("<not text>"));
    };
    if host_allowed(host, allowed) {
        Ok(())
    } else {
        Err(refuse(host))
    }
}

fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let Some(name) = host_without_port(host) else {
        return false;
    };
    if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().is_ok();
    }
    if name.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| {
            let a = a.strip_suffix('.').unwrap_or(a);
            a.eq_ignore_ascii_case(name)
        })
}

/// `host[:port]` or `[v6][:port]` without the port; `None` when the port is not a number.
fn host_without_port(host: &str) -> Option<&str> {
    let (name, port) = if host.starts_with('[') {
        match host.find(']') {
            Some(end) => (&host[..=end], host[end + 1..].strip_prefix(':')),
            None => return None,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    match port {
        Some(port) if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) => None,
        _ if name.is_empty() => None,
        _ => Some(name),
    }
}

/// Requests that change something need `Authorization: Bearer <admin token>` when a token is
/// configured. A configured token that could not be resolved refuses everything (fail closed).
pub fn check_token(
    headers: &HeaderMap,
    admin: &AdminConfig,
    token: Option<&AdminToken>,
) -> Result<(), Refusal> {
    if admin.token.is_none() && admin.token_file.is_none() {
        return Ok(());
    }
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credentials)| credentials.trim());
    let refuse = |message: &str, challenge: &'static str| Refusal {
        challenge: Some(HeaderValue::from_static(challenge)),
        ..Refusal::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    };
    match (presented, token) {
        (None, _) => Err(refuse(
            "this admin request needs `Authorization: Bearer <admin token>`",
            r#"Bearer realm="outrider-admin""#,
        )),
        (Some(presented), Some(token)) if token.matches(presented.as_bytes()) => Ok(()),
        (Some(_), _) => Err(refuse(
            "the admin token is wrong",
            r#"Bearer realm="outrider-admin", error="invalid_token""#,
        )),
    }
}

/// Admin request bodies are JSON: a body with another (or no) `Content-Type` is refused with
/// 415 — which also keeps a browser form (`text/plain`, no CORS preflight) from posting one —
/// and one that does not parse with 400. An empty body needs neither.
pub fn check_json_body(headers: &HeaderMap, body: &[u8]) -> Result<(), Refusal> {
    if body.is_empty() {
        return Ok(());
    }
    let essence = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim());
    if !essence.is_some_and(|e| e.eq_ignore_ascii_case("application/json")) {
        return Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "admin request bodies must be JSON sent with `Content-Type: application/json`",
        ));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(body)
        .map(|_| ())
        .map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not valid JSON: {e}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::secret::SecretString;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hosts_that_cannot_be_rebound_are_allowed() {
        let allowed = vec!["outrider.internal".to_string()];
        for host in [
            "127.0.0.1",
            "127.0.0.1:9901",
            "10.1.2.3:9901",
            "[::1]",
            "[::1]:9901",
            "[fe80::1]:9901",
            "localhost",
            "LOCALHOST:9901",
            "localhost.:9901",
            "outrider.internal",
            "Outrider.Internal:9901",
        ] {
            assert_eq!(
                check_host(&headers(&[("host", host)]), &allowed),
                Ok(()),
                "{host}"
            );
        }
        assert_eq!(check_host(&HeaderMap::new(), &allowed), Ok(()));
        for host in [
            "evil.example",
            "evil.example:9901",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "outrider.internal.evil",
            "127.0.0.1:port",
            "127.0.0.1:",
            "[::1",
            "::1",
            ":9901",
            "",
        ] {
            let refusal = check_host(&headers(&[("host", host)]), &allowed).unwrap_err();
            assert_eq!(refusal.status, StatusCode::MISDIRECTED_REQUEST, "{host}");
            assert_eq!(refusal.code, "host_not_allowed");
        }
        assert!(check_host(
            &headers(&[("host", "127.0.0.1"), ("host", "evil.example")]),
            &allowed
        )
        .is_err());
    }

    #[test]
    fn mutations_need_the_token_when_one_is_configured() {
        let open = AdminConfig::default();
        assert_eq!(check_token(&HeaderMap::new(), &open, None), Ok(()));

        let admin = AdminConfig {
            token: Some(SecretString::new("s3cret")),
            ..AdminConfig::default()
        };
        let token = AdminToken::new("s3cret");
        let check =
            |pairs: &[(&'static str, &str)]| check_token(&headers(pairs), &admin, Some(&token));
        assert_eq!(check(&[("authorization", "Bearer s3cret")]), Ok(()));
        assert_eq!(check(&[("authorization", "bearer  s3cret")]), Ok(()));
        let missing = check(&[]).unwrap_err();
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        assert_eq!(missing.code, "unauthorized");
        assert_eq!(
            missing.header().unwrap().1,
            r#"Bearer realm="outrider-admin""#
        );
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Basic s3cret",
            "s3cret",
            "Bearer ",
        ] {
            let refusal = check(&[("authorization", wrong)]).unwrap_err();
            assert_eq!(refusal.status, StatusCode::UNAUTHORIZED, "{wrong}");
        }
        // Configured but not resolved: refuse, never open.
        assert!(check_token(
            &headers(&[("authorization", "Bearer s3cret")]),
            &admin,
            None
        )
        .is_err());
    }

    #[test]
    fn bodies_must_be_json() {
        let json = headers(&[("content-type", "application/json; charset=utf-8")]);
        assert_eq!(check_json_body(&json, br#"{"all":true}"#), Ok(()));
        assert_eq!(check_json_body(&HeaderMap::new(), b""), Ok(()));
        let refusal = check_json_body(&json, b"all=true").unwrap_err();
        assert_eq!(
            (refusal.status, refusal.code),
            (StatusCode::BAD_REQUEST, "invalid_json")
        );
        for h in [
            HeaderMap::new(),
            headers(&[("content-type", "text/plain")]),
            headers(&[("content-type", "application/x-www-form-urlencoded")]),
        ] {
            let refusal = check_json_body(&h, br#"{"all":true}"#).unwrap_err();
            assert_eq!(refusal.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        }
    }
}
