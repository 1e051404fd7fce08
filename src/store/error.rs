use thiserror::Error;

/// Errors of the cache core. Data-path callers never see Redis errors (those degrade to a miss);
/// these surface only from construction, decoding and admin operations such as purge.
#[derive(Debug, Error)]
pub enum CacheError {
    /// The stored bytes are not an entry this build can read (corrupt, foreign or another version).
    #[error("cannot decode cache entry: {0}")]
    Decode(&'static str),
    /// Settings that can never work (for example an unparsable Redis URL).
    #[error("invalid cache settings: {0}")]
    Config(String),
    /// Registering the cache metrics failed (usually: already registered on this registry).
    #[error("cannot register cache metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A purge target that cannot name anything (for example a key that is not 64 hex digits).
    #[error("invalid purge target: {0}")]
    InvalidTarget(String),
    /// Redis failed while an admin operation needed it.
    #[error("redis error: {0}")]
    Redis(String),
}
