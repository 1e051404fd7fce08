//! outrider: a Pingora reverse-proxy sidecar. `server::run` builds and runs everything from a
//! config; `main.rs` is only the command line around it.

pub mod admin;
pub mod buffering;
pub mod cache;
pub mod cache_headers;
pub mod config;
pub mod graphql;
pub mod inference;
pub mod limits;
pub mod llm;
pub mod pipeline;
pub mod proxy;
pub mod server;
pub mod slo;
pub mod store;
pub mod telemetry;
pub mod upstream_by_header;
