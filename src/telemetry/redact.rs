//! Hiding credentials in text that operators read: logs, error messages and `GET /config`.
//! One function for every URL-valued string, so a log line and the admin view cannot disagree
//! about what is secret.

use std::borrow::Cow;

/// What a hidden value is replaced with.
pub const HIDDEN: &str = "***";

/// Whether a name (a config key or a URL query parameter) names a credential.
pub fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["token", "password", "passwd", "secret", "api_key", "apikey"]
        .iter()
        .any(|needle| name.contains(needle))
}

/// Query parameters that carry a password in the URL forms outrider accepts
/// (`unix:///run/redis.sock?pass=…` for Redis), besides every [`is_secret_name`].
fn is_secret_param(name: &str) -> bool {
    matches!(name.to_ascii_lowercase().as_str(), "pass" | "pwd" | "auth") || is_secret_name(name)
}

/// `text` with the credentials of a URL hidden: the password of `user:password@` (or the
/// whole userinfo when it has no `:`, as in `https://TOKEN@host`) and the values of credential
/// query parameters (`?pass=`, `?password=`, `?token=`, …). Text without `://` is returned as is.
///
/// Everything before the *last* `@` counts as userinfo, so a password that itself contains
/// `@`, `/` or `?` is hidden whole; a URL with an `@` later in its path is over-redacted, which
/// is the safe way to be wrong.
pub fn url(text: &str) -> Cow<'_, str> {
    let Some((scheme, rest)) = text.split_once("://") else {
        return Cow::Borrowed(text);
    };
    // A scheme is letters, digits, `+`, `-`, `.`; anything else means `://` is not a URL's.
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    out.push_str(scheme);
    out.push_str("://");
    let after_userinfo = match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.split_once(':') {
                Some((user, _)) if !user.contains(['/', '?', '#']) => {
                    out.push_str(user);
                    out.push(':');
                }
                _ => {}
            }
            out.push_str(HIDDEN);
            out.push('@');
            &rest[at + 1..]
        }
        None => rest,
    };
    match after_userinfo.split_once('?') {
        Some((before, query)) => {
            out.push_str(before);
            out.push('?');
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            for (i, pair) in query.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                match pair.split_once('=') {
                    Some((name, _)) if is_secret_param(name) => {
                        out.push_str(name);
                        out.push('=');
                        out.push_str(HIDDEN);
                    }
                    _ => out.push_str(pair),
                }
            }
            if let Some(fragment) = fragment {
                out.push('#');
                out.push_str(fragment);
            }
        }
        None => out.push_str(after_userinfo),
    }
    if out == text {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_hidden() {
        assert_eq!(
            url("redis://:s3cret@redis:6379/0"),
            "redis://:***@redis:6379/0"
        );
        assert_eq!(url("rediss://user:pw@host"), "rediss://user:***@host");
        assert_eq!(
            url("rediss://default:pw@cache.example:6380/#insecure"),
            "rediss://default:***@cache.example:6380/#insecure"
        );
        // A bare userinfo may be the credential itself (https://TOKEN@host).
        assert_eq!(url("https://ghp_abc@github.com"), "https://***@github.com");
    }

    #[test]
    fn passwords_with_reserved_characters_are_hidden_whole() {
        assert_eq!(
            url("redis://user:p@ss@host:6379"),
            "redis://user:***@host:6379"
        );
        assert_eq!(url("redis://:a/b?c@host"), "redis://:***@host");
        assert_eq!(url("redis://us/er:pw@host"), "redis://***@host");
    }

    #[test]
    fn credential_query_parameters_are_hidden() {
        assert_eq!(
            url("unix:///run/redis.sock?db=1&pass=s3cret"),
            "unix:///run/redis.sock?db=1&pass=***"
        );
        assert_eq!(
            url("redis+unix:///run/redis.sock?user=app&password=s3cret#x"),
            "redis+unix:///run/redis.sock?user=app&password=***#x"
        );
        assert_eq!(
            url("http://h/p?api_key=k&access_token=t&q=1"),
            "http://h/p?api_key=***&access_token=***&q=1"
        );
        assert_eq!(
            url("redis://:pw@h/0?protocol=resp3&Pass=x"),
            "redis://:***@h/0?protocol=resp3&Pass=***"
        );
    }

    #[test]
    fn other_text_is_untouched() {
        for s in [
            "http://127.0.0.1:8000",
            "redis://redis:6379/0?protocol=resp3",
            "unix:///run/redis.sock",
            "plain text",
            "user@example.com",
            "a ://b@c",
            "",
        ] {
            assert!(matches!(url(s), Cow::Borrowed(_)), "{s}");
        }
    }

    #[test]
    fn secret_names() {
        for name in [
            "token",
            "admin_token",
            "Password",
            "client_secret",
            "api_key",
            "x-apikey",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in ["url", "key", "key_prefix", "headers", "listen"] {
            assert!(!is_secret_name(name), "{name}");
        }
    }
}
