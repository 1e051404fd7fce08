//! The GraphQL-over-HTTP request as clients send it (POST JSON body, or GET query parameters)
//! and the automatic-persisted-query extension, parsed strictly: anything malformed is a
//! [`GraphqlError`] with a stable code, never a half-understood request sent on.

use bytes::Bytes;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::error::GraphqlError;

/// The one APQ protocol version there is.
const APQ_VERSION: u64 = 1;

/// What the client sent, before APQ resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphqlRequest {
    pub query: Option<String>,
    pub operation_name: Option<String>,
    /// `variables` as sent (an object), `None` when absent or null.
    pub variables: Option<Map<String, Value>>,
    /// `extensions` other than `persistedQuery`, kept for the upstream.
    pub extensions: Map<String, Value>,
    pub persisted: Option<PersistedQuery>,
}

/// `extensions.persistedQuery` of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistedQuery {
    /// Lowercase hex SHA-256 of the query text.
    pub hash: String,
}

/// How a body is to be treated.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    One(Box<GraphqlRequest>),
    /// A JSON array of operations: passed through untouched (APQ and caching do not apply).
    Batch,
}

/// Lowercase hex SHA-256 of a query text (the APQ identity).
pub fn sha256_hex(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
    }
    out
}

/// Parses a POST body.
pub fn parse_body(body: &[u8]) -> Result<Parsed, GraphqlError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        // Still must be JSON: a broken array is refused like a broken object.
        serde_json::from_slice::<serde::de::IgnoredAny>(body)
            .map_err(|e| GraphqlError::InvalidJson(e.to_string()))?;
        return Ok(Parsed::Batch);
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| GraphqlError::InvalidJson(e.to_string()))?;
    let Value::Object(mut map) = value else {
        return Err(GraphqlError::InvalidRequest(
            "the body must be a JSON object (or an array for a batch)".into(),
        ));
    };
    // Taken out of the parsed body, not copied: this runs on every hit.
    from_fields(
        map.remove("query"),
        map.remove("operationName"),
        map.remove("variables"),
        map.remove("extensions"),
    )
    .map(|r| Parsed::One(Box::new(r)))
}

/// Parses a GET query string; `None` when it carries no GraphQL request at all (e.g. a
/// browser asking for the app's GraphQL IDE page).
pub fn parse_query_string(query: &str) -> Result<Option<GraphqlRequest>, GraphqlError> {
    let (mut q, mut name, mut vars, mut ext) = (None, None, None, None);
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let slot = match key.as_ref() {
            "query" => &mut q,
            "operationName" => &mut name,
            "variables" => &mut vars,
            "extensions" => &mut ext,
            _ => continue,
        };
        if slot.is_some() {
            return Err(GraphqlError::InvalidRequest(format!(
                "the {key} parameter is given more than once"
            )));
        }
        *slot = Some(value.into_owned());
    }
    if q.is_none() && ext.is_none() {
        return Ok(None);
    }
    let json = |name: &str, text: Option<String>| -> Result<Option<Value>, GraphqlError> {
        text.filter(|t| !t.is_empty())
            .map(|t| {
                serde_json::from_str(&t).map_err(|e| {
                    GraphqlError::InvalidRequest(format!("the {name} parameter is not JSON: {e}"))
                })
            })
            .transpose()
    };
    let vars = json("variables", vars)?;
    let ext = json("extensions", ext)?;
    from_fields(q.map(Value::String), name.map(Value::String), vars, ext).map(Some)
}

fn from_fields(
    query: Option<Value>,
    operation_name: Option<Value>,
    variables: Option<Value>,
    extensions: Option<Value>,
) -> Result<GraphqlRequest, GraphqlError> {
    let string = |name: &str, v: Option<Value>| match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(GraphqlError::InvalidRequest(format!(
            "{name} must be a string"
        ))),
    };
    let query = string("query", query)?;
    let operation_name = string("operationName", operation_name)?.filter(|n| !n.is_empty());
    let variables = match variables {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            return Err(GraphqlError::InvalidRequest(
                "variables must be an object".into(),
            ))
        }
    };
    let mut extensions = match extensions {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(GraphqlError::InvalidRequest(
                "extensions must be an object".into(),
            ))
        }
    };
    let persisted = extensions
        .remove("persistedQuery")
        .map(persisted_query)
        .transpose()?;
    Ok(GraphqlRequest {
        query,
        operation_name,
        variables,
        extensions,
        persisted,
    })
}

/// `extensions.persistedQuery`: `{version: 1, sha256Hash: <64 hex>}`; other keys are ignored
/// (clients add their own).
fn persisted_query(value: Value) -> Result<PersistedQuery, GraphqlError> {
    let Value::Object(map) = value else {
        return Err(GraphqlError::BadPersistedQuery(
            "extensions.persistedQuery must be an object".into(),
        ));
    };
    match map.get("version") {
        Some(Value::Number(n)) if n.as_u64() == Some(APQ_VERSION) => {}
        Some(Value::Number(_)) => return Err(GraphqlError::UnsupportedVersion),
        _ => {
            return Err(GraphqlError::BadPersistedQuery(
                "extensions.persistedQuery.version must be the number 1".into(),
            ))
        }
    }
    let hash = match map.get("sha256Hash") {
        Some(Value::String(h)) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            h.to_ascii_lowercase()
        }
        _ => {
            return Err(GraphqlError::BadPersistedQuery(
                "extensions.persistedQuery.sha256Hash must be 64 hexadecimal digits".into(),
            ))
        }
    };
    Ok(PersistedQuery { hash })
}

impl GraphqlRequest {
    /// The plain GraphQL request the upstream gets: the query text in full, no APQ extension.
    pub fn upstream_body(&self, query: &str) -> Bytes {
        let mut map = Map::new();
        map.insert("query".into(), Value::String(query.to_owned()));
        if let Some(name) = &self.operation_name {
            map.insert("operationName".into(), Value::String(name.clone()));
        }
        if let Some(vars) = &self.variables {
            map.insert("variables".into(), Value::Object(vars.clone()));
        }
        if !self.extensions.is_empty() {
            map.insert("extensions".into(), Value::Object(self.extensions.clone()));
        }
        Bytes::from(Value::Object(map).to_string())
    }

    /// The variables in one canonical text (keys sorted at every level), for cache keys.
    pub fn canonical_variables(&self) -> String {
        // serde_json's map is ordered by key (no `preserve_order`), so its text is canonical.
        self.variables
            .as_ref()
            .and_then(|v| serde_json::to_string(v).ok())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(body: &str) -> GraphqlRequest {
        match parse_body(body.as_bytes()) {
            Ok(Parsed::One(r)) => *r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hash_of_a_query_is_apollo_s() {
        // The example hash of Apollo's APQ documentation, for `{__typename}`.
        assert_eq!(
            sha256_hex("{__typename}"),
            "ecf4edb46db40b5132295c0291d62fb65d6759a9eedfa4d5d612dd5ec54a6b38"
        );
    }

    #[test]
    fn post_bodies() {
        let r = one(
            r#"{"query":"{a}","operationName":null,"variables":{"b":1,"a":2},
               "extensions":{"persistedQuery":{"version":1,"sha256Hash":"ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789","x":1},"clientLibrary":{"name":"x"}}}"#,
        );
        assert_eq!(r.query.as_deref(), Some("{a}"));
        assert_eq!(r.operation_name, None);
        assert_eq!(r.canonical_variables(), r#"{"a":2,"b":1}"#);
        assert!(r
            .persisted
            .as_ref()
            .is_some_and(|p| p.hash.starts_with("abcdef")));
        let upstream: Value = serde_json::from_slice(&r.upstream_body("{a}")).unwrap();
        assert!(upstream["extensions"].get("persistedQuery").is_none());
        assert_eq!(upstream["extensions"]["clientLibrary"]["name"], "x");
        assert_eq!(
            parse_body(b" [{\"query\":\"{a}\"}]").unwrap(),
            Parsed::Batch
        );
    }

    #[test]
    fn bad_inputs_have_stable_codes() {
        let code = |body: &str| parse_body(body.as_bytes()).unwrap_err().code();
        assert_eq!(code("{"), "INVALID_GRAPHQL_REQUEST");
        assert_eq!(code("[1,"), "INVALID_GRAPHQL_REQUEST");
        assert_eq!(code("42"), "INVALID_GRAPHQL_REQUEST");
        assert_eq!(code(r#"{"query":1}"#), "INVALID_GRAPHQL_REQUEST");
        assert_eq!(code(r#"{"variables":[]}"#), "INVALID_GRAPHQL_REQUEST");
        assert_eq!(
            code(r#"{"extensions":{"persistedQuery":{"version":2,"sha256Hash":"00"}}}"#),
            "PERSISTED_QUERY_VERSION_NOT_SUPPORTED"
        );
        assert_eq!(
            code(r#"{"extensions":{"persistedQuery":{"version":1,"sha256Hash":"xyz"}}}"#),
            "INVALID_PERSISTED_QUERY"
        );
        assert_eq!(
            code(r#"{"extensions":{"persistedQuery":"abc"}}"#),
            "INVALID_PERSISTED_QUERY"
        );
    }

    #[test]
    fn get_parameters() {
        let ext = r#"{"persistedQuery":{"version":1,"sha256Hash":"ecf4edb46db40b5132295c0291d62fb65d6759a9eedfa4d5d612dd5ec54a6b38"}}"#;
        let qs: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("operationName", "Q")
            .append_pair("variables", r#"{"id":"1"}"#)
            .append_pair("extensions", ext)
            .finish();
        let r = parse_query_string(&qs).unwrap().unwrap();
        assert_eq!(r.query, None);
        assert_eq!(r.operation_name.as_deref(), Some("Q"));
        assert!(r.persisted.is_some());
        assert_eq!(parse_query_string("").unwrap(), None);
        assert!(parse_query_string("query=%7Ba%7D&query=x").is_err());
        assert!(parse_query_string("query=%7Ba%7D&variables=nope").is_err());
    }
}
