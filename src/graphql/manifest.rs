//! An Apollo persisted-query manifest (`apollo-persisted-query-manifest`, version 1): the
//! operations a client build may send, by id and body. Read when the config is loaded.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;

use super::operation::{normalized, normalized_within, significant_tokens, TOKEN_LIMIT};
use super::protocol::sha256_hex;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an Apollo persisted-query manifest: {message}")]
    Format { path: String, message: String },
}

#[derive(Deserialize)]
struct File {
    format: String,
    version: u32,
    operations: Vec<FileOperation>,
}

#[derive(Deserialize)]
struct FileOperation {
    id: String,
    name: Option<String>,
    #[serde(rename = "type")]
    _kind: Option<String>,
    body: String,
}

/// One listed operation.
#[derive(Debug, Clone)]
pub struct ListedOperation {
    pub name: Option<String>,
    pub body: String,
}

/// The manifest, indexed for the request path.
#[derive(Debug, Default)]
pub struct Manifest {
    /// By manifest id and by the SHA-256 of the body (what APQ clients send).
    by_id: HashMap<String, usize>,
    operations: Vec<ListedOperation>,
    names: HashSet<String>,
    /// Bodies as `operation::normalized` reduces them: freeform requests laid out differently
    /// from the manifest still match, as in Apollo Router.
    normalized: HashSet<String>,
    /// The most significant tokens in a listed body: a longer document is no listed one.
    max_tokens: usize,
}

impl Manifest {
    pub fn load(path: &str) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ManifestError::Format {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Manifest, String> {
        let file: File = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if file.format != "apollo-persisted-query-manifest" || file.version != 1 {
            return Err(format!(
                "format {:?} version {} (expected apollo-persisted-query-manifest version 1)",
                file.format, file.version
            ));
        }
        let mut manifest = Manifest::default();
        for op in file.operations {
            let index = manifest.operations.len();
            manifest.by_id.insert(op.id.to_ascii_lowercase(), index);
            manifest.by_id.insert(sha256_hex(&op.body), index);
            if let Some(name) = &op.name {
                manifest.names.insert(name.clone());
            }
            if let Some(normal) = normalized(&op.body) {
                manifest.normalized.insert(normal);
                manifest.max_tokens = manifest
                    .max_tokens
                    .max(significant_tokens(&op.body, TOKEN_LIMIT));
            }
            manifest.operations.push(ListedOperation {
                name: op.name,
                body: op.body,
            });
        }
        Ok(manifest)
    }

    /// The operation with this id or body hash.
    pub fn get(&self, id_or_hash: &str) -> Option<&ListedOperation> {
        self.operations.get(*self.by_id.get(id_or_hash)?)
    }

    pub fn len(&self) -> usize {
        self.operations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.operations.is_empty()
    }

    /// Whether a freeform document is a listed operation up to layout, comments, commas and
    /// the order of its definitions.
    pub fn lists_document(&self, query: &str) -> bool {
        !self.normalized.is_empty()
            && normalized_within(query, self.max_tokens)
                .is_some_and(|n| self.normalized.contains(&n))
    }

    /// Whether an operation name appears in the manifest (a bounded metric label).
    pub fn has_name(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_by_id_and_body_hash() {
        let m = Manifest::parse(
            r#"{"format":"apollo-persisted-query-manifest","version":1,
                "operations":[{"id":"abc","name":"Q","type":"query","body":"query Q { a }"}]}"#,
        )
        .unwrap();
        assert_eq!(m.get("abc").and_then(|o| o.name.as_deref()), Some("Q"));
        assert!(m.get(&sha256_hex("query Q { a }")).is_some());
        assert!(m.get("nope").is_none());
        assert!(m.has_name("Q"));
        assert!(m.lists_document("# reformatted\nquery Q {\n  a,\n}"));
        assert!(!m.lists_document("query Q { b }"));
        assert!(Manifest::parse(r#"{"format":"other","version":1,"operations":[]}"#).is_err());
        assert!(Manifest::parse("[").is_err());
    }
}
