//! Turning YAML text into a validated [`Config`], collecting every problem with its position.
//!
//! serde stops at the first error, so each top-level section and each route is deserialized on
//! its own, and problems found after parsing (a route naming a missing upstream, …) are located
//! through a map from key paths to positions built by a separate YAML event pass.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_yaml_ng::{Mapping, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use super::schema::{AdminConfig, Config, RouteConfig};
use super::secret::{self, AdminToken};

/// One problem in a config file, with a 1-based position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{}", render_problems(file, problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// Each problem as `FILE:LINE:COL: message`.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Read { .. } => vec![self.to_string()],
            ConfigError::Invalid { file, problems } => problems
                .iter()
                .map(|p| format!("{file}:{}:{}: {}", p.line, p.column, p.message))
                .collect(),
        }
    }
}

fn render_problems(file: &str, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("{file}:{}:{}: {}", p.line, p.column, p.message));
    }
    out
}

/// Largest config file read; anything bigger is certainly not a config (or not a file).
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Reads a config file's text: a regular file (symlinks followed, as in a ConfigMap) of at most
/// [`MAX_CONFIG_BYTES`], so a FIFO or a device can neither hang a reload nor exhaust memory.
pub fn read_config_text(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_CONFIG_BYTES} bytes"),
        ));
    }
    Ok(text)
}

/// Reads, interpolates, parses and validates a config file.
pub fn load_file(path: &Path) -> Result<(Config, String), ConfigError> {
    let text = read_config_text(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let config = parse_str(&text, &path.display().to_string())?;
    Ok((config, text))
}

/// Parses YAML text (already read) into a validated config; `file` names it in messages.
pub fn parse_str(text: &str, file: &str) -> Result<Config, ConfigError> {
    let invalid = |problems| ConfigError::Invalid {
        file: file.to_string(),
        problems,
    };
    let text = interpolate_env(text, &|name| std::env::var(name).ok()).map_err(invalid)?;
    let spans = SpanMap::build(&text).map_err(|p| invalid(vec![p]))?;
    let root: Value = if text.trim().is_empty() {
        Value::Mapping(Mapping::new())
    } else {
        serde_yaml_ng::from_str(&text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            invalid(vec![Problem {
                line,
                column,
                message: e.to_string(),
            }])
        })?
    };
    let mut problems = Vec::new();
    // Even when some sections are malformed, the well-formed rest is checked too, so one run
    // lists every problem.
    let parsed = deserialize_sections(root, &spans, &mut problems);
    if let Some(parsed) = &parsed {
        validate(parsed, &spans, &mut problems);
    }
    match parsed {
        Some(parsed) if problems.is_empty() && parsed.complete => Ok(parsed.config),
        _ => {
            problems.sort_by_key(|p| (p.line, p.column));
            problems.dedup();
            Err(invalid(problems))
        }
    }
}

/// Replaces `${VAR}` and `${VAR:-default}`; `$${` is a literal `${`. An unset variable without
/// a default is an error rather than an empty string, so a missing secret is noticed at load.
pub fn interpolate_env(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<Problem>> {
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
    for (line_index, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        let mut column = 1;
        while let Some(start) = rest.find('$') {
            out.push_str(&rest[..start]);
            column += rest[..start].chars().count();
            let after = &rest[start..];
            if let Some(literal) = after.strip_prefix("$${") {
                out.push_str("${");
                rest = literal;
                column += 3;
                continue;
            }
            if !after.starts_with("${") {
                out.push('$');
                rest = &after[1..];
                column += 1;
                continue;
            }
            let Some(end) = after.find('}') else {
                problems.push(Problem {
                    line: line_index + 1,
                    column,
                    message:
                        "unterminated `${` (write ${VAR} or ${VAR:-default}, or $${ for a literal)"
                            .into(),
                });
                out.push_str(after);
                rest = "";
                break;
            };
            let inner = &after[2..end];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            let valid_name =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                problems.push(Problem {
                    line: line_index + 1,
                    column,
                    message: format!(
                        "invalid environment variable name {name:?} in `${{{inner}}}`"
                    ),
                });
            } else {
                match (lookup(name), default) {
                    (Some(value), _) => out.push_str(&value),
                    (None, Some(default)) => out.push_str(default),
                    (None, None) => problems.push(Problem {
                        line: line_index + 1,
                        column,
                        message: format!(
                            "environment variable {name} is not set (use ${{{name}:-default}} to make it optional)"
                        ),
                    }),
                }
            }
            column += after[..=end].chars().count();
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// Positions of keys and values by path (`routes[1].cache.ttl`).
#[derive(Debug, Default)]
pub struct SpanMap {
    keys: HashMap<String, (usize, usize)>,
    values: HashMap<String, (usize, usize)>,
}

impl SpanMap {
    pub fn build(text: &str) -> Result<Self, Problem> {
        let mut builder = SpanBuilder::default();
        let mut parser = Parser::new_from_str(text);
        parser.load(&mut builder, false).map_err(|e| Problem {
            line: e.marker().line(),
            column: e.marker().col() + 1,
            message: format!("invalid YAML: {}", e.info()),
        })?;
        Ok(builder.map)
    }

    /// Position of the value at `path`, or of the nearest enclosing node that has one.
    pub fn value_at(&self, path: &str) -> (usize, usize) {
        let mut path = path.to_string();
        loop {
            if let Some(pos) = self.values.get(&path).or_else(|| self.keys.get(&path)) {
                return *pos;
            }
            match parent_path(&path) {
                Some(parent) => path = parent,
                None => return (1, 1),
            }
        }
    }

    /// Position of the key at `path` (for "unknown field" errors), else of its value.
    pub fn key_at(&self, path: &str) -> (usize, usize) {
        self.keys
            .get(path)
            .copied()
            .unwrap_or_else(|| self.value_at(path))
    }

    fn problem(&self, path: &str, message: impl Into<String>) -> Problem {
        let (line, column) = self.value_at(path);
        Problem {
            line,
            column,
            message: message.into(),
        }
    }
}

fn parent_path(path: &str) -> Option<String> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(path[..cut].to_string())
}

fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

enum Frame {
    Map {
        path: String,
        pending_key: Option<String>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

#[derive(Default)]
struct SpanBuilder {
    stack: Vec<Frame>,
    map: SpanMap,
}

impl SpanBuilder {
    /// The path a new node takes at the current position; `None` when the node is a map key.
    fn place_node(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, pending_key }) => {
                pending_key.take().map(|key| join_key(path, &key))
            }
        }
    }
}

impl MarkedEventReceiver for SpanBuilder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = (mark.line(), mark.col() + 1);
        match ev {
            Event::Scalar(value, ..) => match self.place_node() {
                Some(path) => {
                    self.map.values.insert(path, pos);
                }
                None => {
                    if let Some(Frame::Map { path, pending_key }) = self.stack.last_mut() {
                        self.map.keys.insert(join_key(path, &value), pos);
                        *pending_key = Some(value);
                    }
                }
            },
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                // A complex key cannot be addressed by path; give it a placeholder name.
                let path = self.place_node().unwrap_or_else(|| "?".to_string());
                self.map.values.entry(path.clone()).or_insert(pos);
                if matches!(ev, Event::MappingStart(..)) {
                    self.stack.push(Frame::Map {
                        path,
                        pending_key: None,
                    });
                } else {
                    self.stack.push(Frame::Seq { path, next: 0 });
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Alias(_) => {
                self.place_node();
            }
            _ => {}
        }
    }
}

fn deserialize_at<T: DeserializeOwned>(
    value: Value,
    base: &str,
    spans: &SpanMap,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(err) => {
            let mut path = base.to_string();
            for segment in err.path().iter() {
                match segment {
                    serde_path_to_error::Segment::Seq { index } => {
                        path = format!("{path}[{index}]")
                    }
                    serde_path_to_error::Segment::Map { key } => path = join_key(&path, key),
                    serde_path_to_error::Segment::Enum { .. }
                    | serde_path_to_error::Segment::Unknown => {}
                }
            }
            let message = err.into_inner().to_string();
            let (line, column) = match unknown_field_name(&message) {
                Some(field) => {
                    // The path may or may not already end with the unknown key itself.
                    let own = join_key(&parent_path(&path).unwrap_or_default(), field);
                    if path == own {
                        path = parent_path(&path).unwrap_or_default();
                    }
                    spans.key_at(&join_key(&path, field))
                }
                None => spans.value_at(&path),
            };
            let label = if path.is_empty() {
                String::new()
            } else {
                format!("{path}: ")
            };
            problems.push(Problem {
                line,
                column,
                message: format!("{label}{message}"),
            });
            None
        }
    }
}

fn unknown_field_name(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// The well-formed part of a config, and what was left out of it.
struct Parsed {
    config: Config,
    /// Original index in the file of each route in `config.routes`.
    route_indices: Vec<usize>,
    failed_sections: HashSet<String>,
    complete: bool,
}

fn deserialize_sections(
    root: Value,
    spans: &SpanMap,
    problems: &mut Vec<Problem>,
) -> Option<Parsed> {
    let Value::Mapping(root) = root else {
        problems.push(spans.problem("", "the config must be a mapping of keys to values"));
        return None;
    };
    let mut sections = Mapping::new();
    let mut routes = Vec::new();
    let mut route_indices = Vec::new();
    let mut failed_sections = HashSet::new();
    for (key, value) in root {
        let name = key.as_str().unwrap_or("?").to_string();
        if name == "routes" {
            match value {
                Value::Sequence(items) => {
                    for (i, item) in items.into_iter().enumerate() {
                        let base = format!("routes[{i}]");
                        match deserialize_at::<RouteConfig>(item, &base, spans, problems) {
                            Some(route) => {
                                routes.push(route);
                                route_indices.push(i);
                            }
                            None => {
                                failed_sections.insert(name.clone());
                            }
                        }
                    }
                }
                Value::Null => {}
                _ => {
                    problems.push(spans.problem("routes", "routes: expected a list of routes"));
                    failed_sections.insert(name);
                }
            }
            continue;
        }
        // Each section alone, so one bad section does not hide the problems of the others.
        let mut single = Mapping::new();
        single.insert(key.clone(), value.clone());
        if deserialize_at::<Config>(Value::Mapping(single), "", spans, problems).is_none() {
            failed_sections.insert(name);
        } else {
            sections.insert(key, value);
        }
    }
    let mut config: Config = deserialize_at(Value::Mapping(sections), "", spans, problems)?;
    config.routes = routes;
    Some(Parsed {
        config,
        route_indices,
        complete: failed_sections.is_empty(),
        failed_sections,
    })
}

const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

fn validate(parsed: &Parsed, spans: &SpanMap, problems: &mut Vec<Problem>) {
    let config = &parsed.config;
    let failed = |section: &str| parsed.failed_sections.contains(section);
    let mut check_addr = |path: &str, addr: &str| {
        if addr.parse::<SocketAddr>().is_err() {
            problems.push(spans.problem(
                path,
                format!("{path}: {addr:?} is not an IP:port address (e.g. 0.0.0.0:8080)"),
            ));
        }
    };
    if !failed("listen") {
        check_addr("listen", &config.listen);
    }
    if !failed("admin") {
        check_addr("admin.listen", &config.admin.listen);
    }
    if config.listen == config.admin.listen && !failed("listen") && !failed("admin") {
        problems.push(spans.problem(
            "admin.listen",
            "admin.listen must differ from listen: the admin port is not the traffic port",
        ));
    }
    if !failed("admin") {
        validate_admin(&config.admin, spans, problems);
    }
    if !failed("telemetry") {
        validate_otlp(&config.telemetry.otlp, spans, problems);
    }
    if !failed("limits") {
        for (path, message) in config.limits.problems() {
            problems.push(spans.problem(path, message));
        }
    }
    if !failed("models") {
        for p in crate::inference::validate_models(&config.models) {
            problems.push(spans.problem(&p.path, format!("{}: {}", p.path, p.message)));
        }
    }
    if config.threads > 1024 {
        problems.push(spans.problem("threads", "threads: at most 1024"));
    }

    for (name, upstream) in &config.upstreams {
        let path = format!("upstreams.{name}");
        if let Err(message) = super::compile::parse_upstream_url(&upstream.url) {
            problems.push(spans.problem(&format!("{path}.url"), format!("{path}.url: {message}")));
        }
        if upstream.connect_timeout.get().is_zero() {
            problems.push(spans.problem(
                &format!("{path}.connect_timeout"),
                format!("{path}.connect_timeout: must be greater than zero"),
            ));
        }
        if upstream.timeout.get().is_zero() {
            problems.push(spans.problem(
                &format!("{path}.timeout"),
                format!("{path}.timeout: must be greater than zero"),
            ));
        }
    }

    let redis = &config.cache.redis;
    if !redis.url.is_empty() {
        if let Err(e) = redis::Client::open(redis.url.as_str()) {
            problems.push(spans.problem(
                "cache.redis.url",
                format!("cache.redis.url: not a valid Redis URL (redis://[:password@]host[:port][/db] or rediss://…): {e}"),
            ));
        }
    }
    for (path, message) in redis_endpoint_problems(redis) {
        problems.push(spans.problem(&path, message));
    }
    if redis.timeout.get().is_zero() {
        problems.push(spans.problem(
            "cache.redis.timeout",
            "cache.redis.timeout: must be greater than zero",
        ));
    }
    if config.cache.lock_timeout.get().is_zero() {
        problems.push(spans.problem(
            "cache.lock_timeout",
            "cache.lock_timeout: must be greater than zero",
        ));
    }
    if config.cache.default_ttl.get().is_zero() {
        problems.push(spans.problem(
            "cache.default_ttl",
            "cache.default_ttl: must be greater than zero",
        ));
    }

    if config.routes.is_empty() && !failed("routes") {
        problems.push(spans.problem(
            "routes",
            "routes: at least one route is needed, or every request would be a 404",
        ));
    }
    let mut seen = HashSet::new();
    for (route, i) in config.routes.iter().zip(&parsed.route_indices) {
        let base = format!("routes[{i}]");
        if route.name.trim().is_empty() {
            problems.push(spans.problem(
                &format!("{base}.name"),
                format!("{base}.name: must not be empty"),
            ));
        } else if !seen.insert(route.name.as_str()) {
            problems.push(spans.problem(
                &format!("{base}.name"),
                format!("{base}.name: duplicate route name {:?}", route.name),
            ));
        }
        match &route.upstream {
            None if !crate::pipeline::registry::answers_without_upstream(route) => {
                problems.push(spans.problem(
                    &base,
                    format!("{base}.upstream: required (only a route whose stages answer every request, such as inference with fallback: error, may leave it out)"),
                ));
            }
            Some(upstream) if !config.upstreams.contains_key(upstream) && !failed("upstreams") => {
                let known: Vec<&str> = config.upstreams.keys().map(String::as_str).collect();
                problems.push(spans.problem(
                    &format!("{base}.upstream"),
                    format!(
                        "{base}.upstream: no upstream named {:?} (defined: {})",
                        upstream,
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
            _ => {}
        }
        let m = &route.matcher;
        match (&m.path, &m.path_prefix) {
            (None, None) => problems.push(spans.problem(
                &format!("{base}.match"),
                format!("{base}.match: needs `path` or `path_prefix` (use path_prefix: / to match everything)"),
            )),
            (Some(_), Some(_)) => problems.push(spans.problem(
                &format!("{base}.match"),
                format!("{base}.match: give either `path` or `path_prefix`, not both"),
            )),
            _ => {}
        }
        for (key, value) in [("path", &m.path), ("path_prefix", &m.path_prefix)] {
            if let Some(p) = value {
                if !p.starts_with('/') {
                    problems.push(spans.problem(
                        &format!("{base}.match.{key}"),
                        format!("{base}.match.{key}: must start with '/' (got {p:?})"),
                    ));
                }
            }
        }
        if route.max_body.0 == 0 {
            problems.push(spans.problem(
                &format!("{base}.max_body"),
                format!("{base}.max_body: must be greater than zero"),
            ));
        }
        for (j, method) in m.methods.iter().enumerate() {
            if !KNOWN_METHODS.contains(&method.to_ascii_uppercase().as_str()) {
                problems.push(spans.problem(
                    &format!("{base}.match.methods[{j}]"),
                    format!("{base}.match.methods[{j}]: unknown HTTP method {method:?}"),
                ));
            }
        }
    }
    // Each capability checks its own section.
    let route_paths: Vec<String> = parsed
        .route_indices
        .iter()
        .map(|i| format!("routes[{i}]"))
        .collect();
    let mut field_problems = Vec::new();
    crate::pipeline::registry::validate(config, &route_paths, &mut field_problems);
    for p in field_problems {
        problems.push(spans.problem(&p.path, format!("{}: {}", p.path, p.message)));
    }
}

fn validate_admin(admin: &AdminConfig, spans: &SpanMap, problems: &mut Vec<Problem>) {
    if admin.token.is_some() && admin.token_file.is_some() {
        problems.push(spans.problem(
            "admin.token_file",
            "admin: give either token or token_file, not both",
        ));
    }
    if let Some(problem) = admin
        .token
        .as_ref()
        .and_then(|t| secret::token_problem(t.expose()))
    {
        problems.push(spans.problem("admin.token", format!("admin.token {problem}")));
    }
    if admin
        .token_file
        .as_deref()
        .is_some_and(|p| p.trim().is_empty())
    {
        problems.push(spans.problem("admin.token_file", "admin.token_file: must not be empty"));
    }
    let exposed = admin
        .listen
        .parse::<SocketAddr>()
        .is_ok_and(|addr| !addr.ip().to_canonical().is_loopback());
    if exposed && admin.token.is_none() && admin.token_file.is_none() {
        problems.push(spans.problem(
            "admin.listen",
            format!(
                "admin.listen {} is not a loopback address: set admin.token or admin.token_file, \
                 so that only holders of the token can reload or purge",
                admin.listen
            ),
        ));
    }
    for (i, host) in admin.allowed_hosts.iter().enumerate() {
        if !is_host_name(host) {
            let path = format!("admin.allowed_hosts[{i}]");
            problems.push(spans.problem(
                &path,
                format!(
                    "{path}: {host:?} is not a host name (no scheme, port or path; e.g. outrider.internal)"
                ),
            ));
        }
    }
    if admin.read_timeout.get().is_zero() {
        problems.push(spans.problem(
            "admin.read_timeout",
            "admin.read_timeout: must be greater than zero",
        ));
    }
}

fn validate_otlp(otlp: &super::schema::OtlpConfig, spans: &SpanMap, problems: &mut Vec<Problem>) {
    if let Some(ratio) = otlp.sample_ratio {
        if !(0.0..=1.0).contains(&ratio) {
            problems.push(spans.problem(
                "telemetry.otlp.sample_ratio",
                format!("telemetry.otlp.sample_ratio: {ratio} is not between 0.0 and 1.0"),
            ));
        }
    }
    let endpoint = otlp.endpoint.trim();
    if !endpoint.is_empty() {
        let usable = endpoint.parse::<http::Uri>().ok().is_some_and(|uri| {
            matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
        });
        if !usable {
            problems.push(spans.problem(
                "telemetry.otlp.endpoint",
                format!(
                    "telemetry.otlp.endpoint: {:?} is not an http:// or https:// URL (e.g. http://otel-collector:4318)",
                    crate::telemetry::redact::url(endpoint)
                ),
            ));
        }
    }
    for (name, value) in &otlp.headers {
        let path = format!("telemetry.otlp.headers.{name}");
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            problems.push(spans.problem(
                &path,
                format!("telemetry.otlp.headers: {name:?} is not a valid header name"),
            ));
        } else if http::HeaderValue::from_str(value).is_err() {
            problems.push(spans.problem(
                &path,
                format!("telemetry.otlp.headers.{name}: the value is not a valid header value"),
            ));
        }
    }
    if otlp.max_queue == 0 {
        problems.push(spans.problem(
            "telemetry.otlp.max_queue",
            "telemetry.otlp.max_queue: must be at least 1",
        ));
    }
    if otlp.timeout.is_some_and(|t| t.get().is_zero()) {
        problems.push(spans.problem(
            "telemetry.otlp.timeout",
            "telemetry.otlp.timeout: must be greater than zero",
        ));
    }
}

/// `cluster_nodes` against `url`, and `tls` against the URL schemes; (path, message) pairs.
fn redis_endpoint_problems(redis: &super::schema::RedisConfig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let nodes = &redis.cluster_nodes;
    if !nodes.is_empty() && !redis.url.trim().is_empty() {
        out.push((
            "cache.redis.cluster_nodes".to_owned(),
            "cache.redis.cluster_nodes: give cache.redis.url (one server) or cluster_nodes (a Redis Cluster), not both".to_owned(),
        ));
    }
    for (i, node) in nodes.iter().enumerate() {
        let valid = redis::Client::open(node.trim())
            .map_err(|e| e.to_string())
            .and_then(|c| match c.get_connection_info().addr {
                redis::ConnectionAddr::Unix(_) => {
                    Err("a cluster node must be host:port, not a unix socket".to_owned())
                }
                _ => Ok(()),
            });
        if let Err(e) = valid {
            out.push((
                format!("cache.redis.cluster_nodes.{i}"),
                format!("cache.redis.cluster_nodes[{i}]: not a valid node URL (redis://host:port or rediss://host:port): {e}"),
            ));
        }
    }
    let tls_scheme = |u: &str| u.trim_start().to_ascii_lowercase().starts_with("rediss://");
    if nodes.iter().any(|n| tls_scheme(n)) && !nodes.iter().all(|n| tls_scheme(n)) {
        out.push((
            "cache.redis.cluster_nodes".to_owned(),
            "cache.redis.cluster_nodes: mix of redis:// and rediss://; use one scheme for every node".to_owned(),
        ));
    }
    if let Some(tls) = &redis.tls {
        let urls: Vec<&str> = if nodes.is_empty() {
            vec![redis.url.as_str()]
        } else {
            nodes.iter().map(String::as_str).collect()
        };
        if !urls.iter().all(|u| tls_scheme(u)) {
            out.push((
                "cache.redis.tls".to_owned(),
                "cache.redis.tls: needs rediss:// URLs (cache.redis.url or every cluster node)"
                    .to_owned(),
            ));
        }
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            out.push((
                "cache.redis.tls".to_owned(),
                "cache.redis.tls: cert_file and key_file go together (mutual TLS needs both)"
                    .to_owned(),
            ));
        }
        for (key, file) in [
            ("ca_file", &tls.ca_file),
            ("cert_file", &tls.cert_file),
            ("key_file", &tls.key_file),
        ] {
            if file.as_deref().is_some_and(|f| f.trim().is_empty()) {
                out.push((
                    format!("cache.redis.tls.{key}"),
                    format!("cache.redis.tls.{key}: must not be empty (leave it out instead)"),
                ));
            }
        }
    }
    out
}

/// A DNS name as it appears in a `Host` header, without port: dot-separated labels of letters,
/// digits, `-` and `_`.
fn is_host_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// The admin token for a config loaded from `text` (`admin.token_file` is read now); a file that
/// cannot be used is reported at the position of `admin.token_file`, like any config problem.
pub fn resolve_admin_token(
    config: &Config,
    text: &str,
    file: &str,
) -> Result<Option<AdminToken>, ConfigError> {
    secret::admin_token(&config.admin).map_err(|e| {
        let (line, column) = SpanMap::build(text)
            .map(|spans| spans.value_at("admin.token_file"))
            .unwrap_or((1, 1));
        ConfigError::Invalid {
            file: file.to_string(),
            problems: vec![Problem {
                line,
                column,
                message: format!("admin.token_file: {e}"),
            }],
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match parse_str(text, "t.yaml") {
            Ok(_) => vec![],
            Err(e) => e.lines(),
        }
    }

    const GOOD: &str = "upstreams:\n  app: { url: \"http://127.0.0.1:8000\" }\nroutes:\n  - name: all\n    match: { path_prefix: / }\n    upstream: app\n";

    #[test]
    fn minimal_config_is_valid() {
        let config = parse_str(GOOD, "t.yaml").unwrap();
        assert_eq!(config.listen, "0.0.0.0:8080");
        assert_eq!(config.routes.len(), 1);
    }

    #[test]
    fn zero_lock_timeout_and_limits_are_positioned() {
        let text = format!(
            "{GOOD}cache:\n  lock_timeout: 0s\nlimits:\n  keepalive_timeout: 0s\n  max_header_size: 2MiB\n"
        );
        let p = problems(&text);
        assert_eq!(
            p,
            [
                "t.yaml:8:17: cache.lock_timeout: must be greater than zero",
                "t.yaml:10:22: limits.keepalive_timeout: must be greater than zero",
                "t.yaml:11:20: limits.max_header_size: must be between 1KiB and 1MiB (got 2MiB)",
            ]
        );
    }

    #[test]
    fn route_cache_bounds_are_positioned() {
        let text = GOOD.replace(
            "upstream: app\n",
            "upstream: app\n    cache: { vary: match, max_variants: 0, client_directives: always }\n",
        );
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("unknown variant `always`"), "{p:?}");
        let p = problems(&text.replace("always", "honour"));
        assert_eq!(
            p,
            ["t.yaml:7:41: routes[0].cache.max_variants: must be between 1 and 64"]
        );
    }

    #[test]
    fn redis_cluster_and_tls_are_checked() {
        let ok = format!(
            "{GOOD}cache:\n  redis:\n    cluster_nodes: [\"rediss://10.0.0.1:6379\", \"rediss://10.0.0.2:6379\"]\n    tls: {{ ca_file: /etc/ca.pem }}\n"
        );
        assert_eq!(problems(&ok), Vec::<String>::new());
        let both = format!(
            "{GOOD}cache:\n  redis:\n    url: redis://a:6379\n    cluster_nodes: [\"redis://b:6379\", \"rediss://c:6379\", \"nope://\"]\n    tls: {{ cert_file: /c.pem }}\n"
        );
        let p = problems(&both);
        for want in [
            "cache.redis.cluster_nodes: give cache.redis.url (one server) or cluster_nodes",
            "cache.redis.cluster_nodes[2]: not a valid node URL",
            "cache.redis.cluster_nodes: mix of redis:// and rediss://",
            "cache.redis.tls: needs rediss:// URLs",
            "cache.redis.tls: cert_file and key_file go together",
        ] {
            assert!(p.iter().any(|l| l.contains(want)), "{want}: {p:?}");
        }
        assert!(p.iter().all(|l| l.starts_with("t.yaml:")), "{p:?}");
    }

    #[test]
    fn unknown_key_points_at_the_key() {
        let text = "upstreams:\n  app: { url: \"http://127.0.0.1:8000\", timout: 1s }\nroutes:\n  - name: all\n    match: { path_prefix: / }\n    upstream: app\n    cahce: {}\n";
        let p = problems(text);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("t.yaml:2:"), "{p:?}");
        assert!(p[0].contains("unknown field `timout`"), "{p:?}");
        assert!(
            p[1].starts_with("t.yaml:7:5: routes[0]: unknown field `cahce`"),
            "{p:?}"
        );
    }

    #[test]
    fn all_semantic_problems_are_listed_with_positions() {
        let text = "upstreams:\n  app: { url: \"http://127.0.0.1:8000\" }\nroutes:\n  - name: a\n    match: { path_prefix: / }\n    upstream: nope\n  - name: a\n    match: { path: x }\n    upstream: app\n";
        let p = problems(text);
        assert!(
            p.iter()
                .any(|l| l.starts_with("t.yaml:6:15:") && l.contains("no upstream named \"nope\"")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|l| l.starts_with("t.yaml:7:11:") && l.contains("duplicate route name")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|l| l.starts_with("t.yaml:8:") && l.contains("must start with '/'")),
            "{p:?}"
        );
    }

    #[test]
    fn bad_duration_and_syntax_errors_have_positions() {
        let text =
            "upstreams:\n  app: { url: \"http://127.0.0.1:8000\", timeout: soon }\nroutes: []\n";
        let p = problems(text);
        assert!(
            p.iter()
                .any(|l| l.starts_with("t.yaml:2:") && l.contains("invalid duration")),
            "{p:?}"
        );
        let p = problems("routes: [\n  - name: x\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("invalid YAML"), "{p:?}");
    }

    #[test]
    fn env_interpolation() {
        let lookup = |name: &str| (name == "SET").then(|| "value".to_string());
        assert_eq!(interpolate_env("a: ${SET}", &lookup).unwrap(), "a: value");
        assert_eq!(
            interpolate_env("a: ${UNSET:-dflt}", &lookup).unwrap(),
            "a: dflt"
        );
        assert_eq!(interpolate_env("a: ${UNSET:-}", &lookup).unwrap(), "a: ");
        assert_eq!(
            interpolate_env("a: $${SET} $5", &lookup).unwrap(),
            "a: ${SET} $5"
        );
        let err = interpolate_env("x: 1\na: ${UNSET}", &lookup).unwrap_err();
        assert_eq!((err[0].line, err[0].column), (2, 4));
        assert!(interpolate_env("a: ${OPEN", &lookup).is_err());
        assert!(interpolate_env("a: ${BAD-NAME}", &lookup).is_err());
    }

    #[test]
    fn an_exposed_admin_port_needs_a_token() {
        let exposed = format!("admin: {{ listen: \"0.0.0.0:9901\" }}\n{GOOD}");
        let p = problems(&exposed);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("t.yaml:1:18: admin.listen 0.0.0.0:9901 is not a loopback address"),
            "{p:?}"
        );
        for ok in [
            "admin: { listen: \"0.0.0.0:9901\", token: \"t0ken\" }\n",
            "admin: { listen: \"[::]:9901\", token_file: /run/secrets/token }\n",
            "admin: { listen: \"127.0.0.2:9901\" }\n",
            "admin: { listen: \"[::1]:9901\" }\n",
        ] {
            assert_eq!(
                problems(&format!("{ok}{GOOD}")),
                Vec::<String>::new(),
                "{ok}"
            );
        }
        assert!(!problems(&format!("admin: {{ listen: \"[::]:9901\" }}\n{GOOD}")).is_empty());
    }

    #[test]
    fn admin_settings_are_checked() {
        let p = problems(&format!(
            "admin:\n  token: \"a b\"\n  token_file: /x\n  allowed_hosts: [ok.example, \"http://x\", \"h:80\"]\n  read_timeout: 0s\n{GOOD}"
        ));
        let expected = [
            "t.yaml:2:10: admin.token must be visible ASCII",
            "t.yaml:3:15: admin: give either token or token_file, not both",
            "t.yaml:4:31: admin.allowed_hosts[1]: \"http://x\" is not a host name",
            "t.yaml:4:43: admin.allowed_hosts[2]",
            "t.yaml:5:17: admin.read_timeout: must be greater than zero",
        ];
        assert_eq!(p.len(), expected.len(), "{p:?}");
        for (got, want) in p.iter().zip(expected) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
        assert!(!problems(&format!("admin: {{ token: \"\" }}\n{GOOD}")).is_empty());
        assert!(!problems(&format!("admin: {{ token: 1234 }}\n{GOOD}"))[0].contains("1234"));
    }

    #[test]
    fn an_unreadable_token_file_is_reported_at_its_key() {
        let text = format!("admin:\n  token_file: /nonexistent/token\n{GOOD}");
        let config = parse_str(&text, "t.yaml").unwrap();
        let err = resolve_admin_token(&config, &text, "t.yaml").unwrap_err();
        let lines = err.lines();
        assert!(
            lines[0].starts_with("t.yaml:2:15: admin.token_file: cannot read /nonexistent/token"),
            "{lines:?}"
        );
    }

    #[test]
    fn the_embedded_default_is_valid() {
        let text = include_str!("../../config/outrider.yaml");
        parse_str(text, "config/outrider.yaml").unwrap();
    }
}
