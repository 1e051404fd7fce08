//! The compiled form of a config: what the request path reads. Built once per (re)load so the
//! per-request work is a linear scan over pre-parsed matchers, never string parsing.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use super::schema::Config;
use super::secret::AdminToken;
use crate::pipeline::registry::{build_stages, Services};
use crate::pipeline::Stage;

/// A validated config plus its route table; swapped as one unit on reload.
#[derive(Debug)]
pub struct ActiveConfig {
    pub config: Arc<Config>,
    pub routes: Vec<Route>,
    /// Every upstream by name: a stage may send a request to another one than its route's.
    pub upstreams: std::collections::HashMap<String, Arc<Upstream>>,
    /// Increases by one with each successful load; visible in `/config` and logs.
    pub generation: u64,
    /// The token admin mutations need (`admin.token`, or `admin.token_file` as read for this
    /// generation); `None` when none is configured.
    pub admin_token: Option<AdminToken>,
}

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    matcher: PathMatcher,
    /// Bit per method (see [`method_bit`]); 0 means any method.
    methods: u16,
    /// `None` for a route whose stages answer every request.
    pub upstream: Option<Arc<Upstream>>,
    /// The capabilities this route enables, in the order their hooks run.
    pub stages: Vec<Arc<dyn Stage>>,
    /// Bound on a request body read for a stage.
    pub max_body: usize,
    /// The path template this route matches (`/graphql`, `/api/items*`), for `http.route`.
    pub http_route: Arc<str>,
}

impl Route {
    /// The upstream's per-operation timeout (the default one for a route without upstream).
    pub fn upstream_timeout(&self) -> Duration {
        self.upstream
            .as_ref()
            .map_or(Duration::from_secs(30), |u| u.timeout)
    }
}

#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    Prefix(String),
}

impl ActiveConfig {
    /// Compiles a config that has already passed validation, with its resolved admin token
    /// ([`super::load::resolve_admin_token`]).
    pub fn compile(
        config: Config,
        generation: u64,
        services: &Services,
        admin_token: Option<AdminToken>,
    ) -> Result<Self, String> {
        let mut upstreams = std::collections::HashMap::new();
        for (name, u) in &config.upstreams {
            let (tls, host, port) = parse_upstream_url(&u.url)?;
            upstreams.insert(
                name.clone(),
                Arc::new(Upstream {
                    name: name.clone(),
                    tls,
                    host: host.clone(),
                    port,
                    connect_timeout: u.connect_timeout.get(),
                    timeout: u.timeout.get(),
                    fixed: host
                        .parse::<IpAddr>()
                        .ok()
                        .map(|ip| SocketAddr::new(ip, port)),
                    resolved: ArcSwapOption::empty(),
                }),
            );
        }
        crate::pipeline::registry::prepare(&config, services)?;
        let mut routes = Vec::with_capacity(config.routes.len());
        for r in &config.routes {
            let upstream = match &r.upstream {
                Some(name) => Some(
                    upstreams
                        .get(name)
                        .cloned()
                        .ok_or_else(|| format!("route {} names a missing upstream", r.name))?,
                ),
                None => None,
            };
            let (matcher, http_route) = match (&r.matcher.path, &r.matcher.path_prefix) {
                (Some(p), _) => (PathMatcher::Exact(p.clone()), p.clone()),
                (None, Some(p)) => (PathMatcher::Prefix(p.clone()), format!("{p}*")),
                (None, None) => return Err(format!("route {} has no matcher", r.name)),
            };
            let methods = r
                .matcher
                .methods
                .iter()
                .map(|m| method_bit(&m.to_ascii_uppercase()))
                .fold(0u16, |acc, bit| acc | bit);
            // HEAD is GET without the body (RFC 9110 §9.3.2): a GET route answers it too.
            let methods = if methods & method_bit("GET") != 0 {
                methods | method_bit("HEAD")
            } else {
                methods
            };
            let stages = build_stages(&config, r, services)?;
            routes.push(Route {
                name: Arc::from(r.name.as_str()),
                matcher,
                methods,
                upstream,
                stages,
                max_body: usize::try_from(r.max_body.0).unwrap_or(usize::MAX),
                http_route: Arc::from(http_route),
            });
        }
        Ok(ActiveConfig {
            config: Arc::new(config),
            routes,
            upstreams,
            generation,
            admin_token,
        })
    }

    /// Index of the first route whose path and method match.
    pub fn match_route(&self, method: &str, path: &str) -> Option<usize> {
        let bit = method_bit(method);
        self.routes.iter().position(|r| {
            (r.methods == 0 || r.methods & bit != 0)
                && match &r.matcher {
                    PathMatcher::Exact(p) => path == p,
                    PathMatcher::Prefix(p) => path.starts_with(p.as_str()),
                }
        })
    }
}

/// Methods outside the known set get their own bit so they match only "any method" routes.
fn method_bit(method: &str) -> u16 {
    match method {
        "GET" => 1,
        "HEAD" => 1 << 1,
        "POST" => 1 << 2,
        "PUT" => 1 << 3,
        "DELETE" => 1 << 4,
        "PATCH" => 1 << 5,
        "OPTIONS" => 1 << 6,
        "TRACE" => 1 << 7,
        "CONNECT" => 1 << 8,
        _ => 1 << 15,
    }
}

/// Splits an upstream URL into (tls, host, port); refuses paths, queries and unknown schemes.
pub fn parse_upstream_url(url: &str) -> Result<(bool, String, u16), String> {
    // Messages reach `outrider check` output and reload logs: never echo a credential.
    let shown = crate::telemetry::redact::url(url);
    let (tls, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else {
        return Err(format!("{shown:?} must start with http:// or https://"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err(format!(
            "{shown:?} must not contain a path: outrider forwards the request path unchanged"
        ));
    }
    if authority.contains('@') {
        return Err(format!(
            "{shown:?}: credentials in upstream URLs are not supported"
        ));
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{shown:?}: unterminated IPv6 address"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p
                .parse()
                .map_err(|_| format!("{shown:?}: invalid port {p:?}"))?,
            None if after.is_empty() => default_port,
            None => return Err(format!("{shown:?}: unexpected text after the address")),
        };
        (host.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, p)) => (
                host.to_string(),
                p.parse()
                    .map_err(|_| format!("{shown:?}: invalid port {p:?}"))?,
            ),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(format!("{shown:?}: missing host"));
    }
    if port == 0 {
        return Err(format!("{shown:?}: port 0 is not a valid upstream port"));
    }
    Ok((tls, host, port))
}

/// How long a DNS answer for an upstream host is reused.
const RESOLVE_TTL: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    fixed: Option<SocketAddr>,
    resolved: ArcSwapOption<(SocketAddr, Instant)>,
}

impl Upstream {
    /// The address to connect to. Hostnames (compose service names, k8s DNS) are resolved off
    /// the request path's critical section and cached briefly, so a DNS change is picked up.
    pub async fn address(&self) -> std::io::Result<SocketAddr> {
        if let Some(addr) = self.fixed {
            return Ok(addr);
        }
        let cached = self.resolved.load_full();
        if let Some(cached) = cached.as_ref() {
            if cached.1.elapsed() < RESOLVE_TTL {
                return Ok(cached.0);
            }
        }
        // Bounded like a connect, and a failed refresh keeps using the last good answer so a
        // DNS hiccup does not turn into 502s.
        let lookup = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::lookup_host((self.host.as_str(), self.port)),
        )
        .await;
        let fresh = match lookup {
            Ok(Ok(addrs)) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                // IPv4 first: `localhost` lists ::1 first, while uvicorn binds 127.0.0.1.
                addrs
                    .iter()
                    .find(|a| a.is_ipv4())
                    .or_else(|| addrs.first())
                    .copied()
            }
            Ok(Err(e)) => {
                if let Some(cached) = cached.as_ref() {
                    tracing::warn!(host = %self.host, error = %e, "DNS lookup failed; using the last known address");
                    return Ok(cached.0);
                }
                return Err(e);
            }
            Err(_) => None,
        };
        match (fresh, cached.as_ref()) {
            (Some(addr), _) => {
                self.resolved.store(Some(Arc::new((addr, Instant::now()))));
                Ok(addr)
            }
            (None, Some(cached)) => Ok(cached.0),
            (None, None) => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} did not resolve in time or to any address", self.host),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_str;

    #[test]
    fn upstream_urls() {
        assert_eq!(
            parse_upstream_url("http://127.0.0.1:8000"),
            Ok((false, "127.0.0.1".into(), 8000))
        );
        assert_eq!(
            parse_upstream_url("https://api.openai.com/"),
            Ok((true, "api.openai.com".into(), 443))
        );
        assert_eq!(
            parse_upstream_url("http://[::1]:81"),
            Ok((false, "::1".into(), 81))
        );
        assert!(parse_upstream_url("ftp://x").is_err());
        assert!(parse_upstream_url("http://x:8000/api").is_err());
        assert!(parse_upstream_url("http://x:port").is_err());
        assert!(parse_upstream_url("http://:80").is_err());
    }

    #[test]
    fn first_matching_route_wins() {
        let text = "upstreams:\n  app: { url: \"http://127.0.0.1:1\" }\nroutes:\n  - { name: exact, match: { path: /a }, upstream: app }\n  - { name: get-only, match: { path_prefix: /a, methods: [get] }, upstream: app }\n  - { name: rest, match: { path_prefix: / }, upstream: app }\n";
        let active = ActiveConfig::compile(
            parse_str(text, "t").unwrap(),
            1,
            &Services::in_memory().unwrap(),
            None,
        )
        .unwrap();
        let name = |m, p| {
            active
                .match_route(m, p)
                .map(|i| active.routes[i].name.to_string())
        };
        assert_eq!(name("POST", "/a").as_deref(), Some("exact"));
        assert_eq!(name("GET", "/ab").as_deref(), Some("get-only"));
        assert_eq!(name("POST", "/ab").as_deref(), Some("rest"));
        assert_eq!(name("BREW", "/ab").as_deref(), Some("rest"));
        assert_eq!(
            name("HEAD", "/ab").as_deref(),
            Some("get-only"),
            "GET routes take HEAD"
        );
    }
}
