//! Configuration: the YAML schema, loading with positioned errors, the compiled route table and
//! the live handle that swaps it atomically on reload.

pub mod compile;
pub mod live;
pub mod load;
pub mod schema;
pub mod secret;
pub mod units;

pub use compile::{ActiveConfig, Route, Upstream};
pub use live::{LiveConfig, ReloadOutcome};
pub use load::{load_file, parse_str, ConfigError, Problem};
pub use schema::Config;

/// The default config, embedded so `outrider run` works with no file at all.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/outrider.yaml");

/// The JSON Schema of the whole config file, generated from the types the loader uses, so an
/// editor can complete and check keys (`outrider schema > outrider.schema.json`).
pub fn json_schema() -> serde_json::Value {
    let mut schema = schemars::schema_for!(Config);
    schema.insert(
        "title".into(),
        serde_json::Value::String("outrider configuration".into()),
    );
    schema.to_value()
}
