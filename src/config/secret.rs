//! Secrets named by the config: the admin token, written inline (`admin.token`, usually as
//! `${ENV}`) or read from a file (`admin.token_file`, e.g. a Kubernetes Secret mount) at start and
//! on every reload. A secret never leaves the process through `Debug` or `Serialize`, and the
//! token is kept only as a digest, compared in constant time.

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::schema::AdminConfig;
use crate::telemetry::redact::HIDDEN;

/// A credential written in the config. Serializes and debug-prints as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretString({HIDDEN})")
    }
}

impl Serialize for SecretString {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(HIDDEN)
    }
}

impl<'de> Deserialize<'de> for SecretString {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Visitor;
        // serde's own "invalid type" errors quote the value; for a secret they must not.
        const QUOTE_IT: &str = "expected a string (quote the value: a token that YAML reads as \
                                a number or a boolean would be changed)";
        impl de::Visitor<'_> for Visitor {
            type Value = SecretString;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecretString, E> {
                Ok(SecretString(v.to_string()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<SecretString, E> {
                Ok(SecretString(v))
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<SecretString, E> {
                Err(E::custom(QUOTE_IT))
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<SecretString, E> {
                Err(E::custom(QUOTE_IT))
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<SecretString, E> {
                Err(E::custom(QUOTE_IT))
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<SecretString, E> {
                Err(E::custom(QUOTE_IT))
            }
        }
        // `any`, not `str`: a deserializer asked for a string reports a number itself, quoting it.
        de.deserialize_any(Visitor)
    }
}

impl schemars::JsonSchema for SecretString {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Secret".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A credential; shown as *** in GET /config. Write it as ${ENV_VAR} rather than in the file.",
            "writeOnly": true
        })
    }
}

/// Why a token is unusable, or `None` when it is fine. It travels in an `Authorization` header,
/// so it must be visible ASCII without spaces.
pub fn token_problem(token: &str) -> Option<&'static str> {
    if token.is_empty() {
        Some("is empty")
    } else if !token.bytes().all(|b| b.is_ascii_graphic()) {
        Some("must be visible ASCII without spaces or control characters (it is sent as `Authorization: Bearer <token>`)")
    } else {
        None
    }
}

/// The token admin mutations must present. Only its BLAKE3 digest is kept: comparing digests is
/// constant-time (`blake3::Hash`'s `==`) and independent of the presented token's length.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(blake3::Hash);

impl AdminToken {
    pub fn new(token: &str) -> Self {
        Self(blake3::hash(token.as_bytes()))
    }

    /// Whether `presented` is the token, in time independent of where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        blake3::hash(presented) == self.0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdminToken({HIDDEN})")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the token in {path} {problem}")]
    Invalid { path: String, problem: &'static str },
}

/// The admin token the config asks for: `admin.token` as written, or the content of
/// `admin.token_file` read now (trailing newlines trimmed: `echo token > file` is the usual way
/// such files are written). `None` when neither is set.
pub fn admin_token(admin: &AdminConfig) -> Result<Option<AdminToken>, SecretError> {
    if let Some(token) = &admin.token {
        return Ok(Some(AdminToken::new(token.expose())));
    }
    let Some(path) = &admin.token_file else {
        return Ok(None);
    };
    // Bounded like the config file: a FIFO or a device must not hang or flood a reload.
    let text = super::load::read_config_text(std::path::Path::new(path)).map_err(|source| {
        SecretError::Read {
            path: path.clone(),
            source,
        }
    })?;
    let token = text.trim_end_matches(['\n', '\r']);
    if let Some(problem) = token_problem(token) {
        return Err(SecretError::Invalid {
            path: path.clone(),
            problem,
        });
    }
    Ok(Some(AdminToken::new(token)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s: SecretString = serde_yaml_ng::from_str("\"hunter2\"").unwrap();
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(format!("{s:?}"), "SecretString(***)");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(
            format!("{:?}", AdminToken::new("hunter2")),
            "AdminToken(***)"
        );
        // An unquoted number would be changed by YAML (0123 → 83); refuse it without echoing it.
        let err = serde_yaml_ng::from_str::<SecretString>("1234567").unwrap_err();
        assert!(!err.to_string().contains("1234567"), "{err}");
        assert!(err.to_string().contains("quote"), "{err}");
        // The loader goes through a YAML value first.
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str("1234567").unwrap();
        let err = serde_yaml_ng::from_value::<SecretString>(value).unwrap_err();
        assert!(!err.to_string().contains("1234567"), "{err}");
    }

    #[test]
    fn tokens_match_exactly() {
        let t = AdminToken::new("s3cret-token");
        assert!(t.matches(b"s3cret-token"));
        assert!(!t.matches(b"s3cret-toke"));
        assert!(!t.matches(b"s3cret-token "));
        assert!(!t.matches(b""));
        assert_eq!(token_problem("abc"), None);
        assert!(token_problem("").is_some());
        assert!(token_problem("a b").is_some());
        assert!(token_problem("a\tb").is_some());
    }

    #[test]
    fn token_files_are_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file\n").unwrap();
        let admin = AdminConfig {
            token_file: Some(path.display().to_string()),
            ..AdminConfig::default()
        };
        let token = admin_token(&admin).unwrap().unwrap();
        assert!(token.matches(b"from-file"));
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            admin_token(&admin),
            Err(SecretError::Invalid { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        let err = admin_token(&admin).unwrap_err();
        assert!(err.to_string().starts_with("cannot read "), "{err}");
        assert_eq!(admin_token(&AdminConfig::default()).unwrap(), None);
    }
}
