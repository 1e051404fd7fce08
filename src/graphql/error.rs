//! The GraphQL stage's refusals. Each has a stable `extensions.code` (Apollo Router's where it
//! has one) and an HTTP status, and is answered as a GraphQL response (`{"errors": [...]}`), so
//! GraphQL clients read it like any other GraphQL error.

use bytes::Bytes;
use serde_json::json;

use crate::pipeline::Answer;

/// What Apollo Router sends with errors that must not be cached anywhere: a `NOT_FOUND` that a
/// CDN kept would outlive the registration that follows it.
pub const DONT_CACHE: &str = "private, no-cache, must-revalidate";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GraphqlError {
    #[error("PersistedQueryNotFound")]
    NotFound,
    #[error("provided sha does not match query")]
    HashMismatch,
    #[error("unsupported persisted query version (only version 1 exists)")]
    UnsupportedVersion,
    #[error("{0}")]
    BadPersistedQuery(String),
    #[error("the body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("GraphQL request body larger than max_body ({limit} bytes)")]
    TooLarge { limit: usize },
    #[error("Mutations can only be sent over HTTP POST")]
    MutationOverGet,
    #[error("The operation body was not found in the persisted query safelist")]
    NotInSafelist,
    /// A batch or a non-JSON body on a route that enforces the safelist.
    #[error("batched requests and non-JSON bodies cannot be checked against the persisted query safelist")]
    Unverifiable,
}

impl GraphqlError {
    /// `extensions.code` of the error.
    pub fn code(&self) -> &'static str {
        match self {
            GraphqlError::NotFound => "PERSISTED_QUERY_NOT_FOUND",
            GraphqlError::HashMismatch => "PERSISTED_QUERY_HASH_MISMATCH",
            GraphqlError::UnsupportedVersion => "PERSISTED_QUERY_VERSION_NOT_SUPPORTED",
            GraphqlError::BadPersistedQuery(_) => "INVALID_PERSISTED_QUERY",
            GraphqlError::InvalidJson(_) | GraphqlError::InvalidRequest(_) => {
                "INVALID_GRAPHQL_REQUEST"
            }
            GraphqlError::TooLarge { .. } => "GRAPHQL_REQUEST_TOO_LARGE",
            GraphqlError::MutationOverGet => "MUTATION_FORBIDDEN",
            GraphqlError::NotInSafelist | GraphqlError::Unverifiable => "QUERY_NOT_IN_SAFELIST",
        }
    }

    /// The HTTP status Apollo Router answers with (200 for `NOT_FOUND`: it is a GraphQL-level
    /// answer the client acts on).
    pub fn status(&self) -> u16 {
        match self {
            GraphqlError::NotFound => 200,
            GraphqlError::MutationOverGet => 405,
            GraphqlError::NotInSafelist | GraphqlError::Unverifiable => 403,
            _ => 400,
        }
    }

    /// The complete response for this error.
    pub fn answer(&self) -> Option<Answer> {
        let body = json!({
            "errors": [{
                "message": self.to_string(),
                "extensions": { "code": self.code() },
            }]
        });
        let body = Bytes::from(body.to_string());
        let mut headers = vec![("cache-control", DONT_CACHE)];
        if *self == GraphqlError::MutationOverGet {
            headers.push(("allow", "POST"));
        }
        Answer::json(self.status(), body, &headers)
    }
}
