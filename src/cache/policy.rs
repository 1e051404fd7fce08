//! HTTP caching policy (an RFC 9111 subset for a shared cache) as pure functions over `http`
//! types, plus the `cache-status` (RFC 9211), `x-cache-status` and `age` header values.
//!
//! No Pingora types and no I/O: the stage extracts headers and applies the decisions.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, Method};

use crate::store::StoredResponse;

pub use crate::cache_headers::{
    age_header_value, credential_bytes, directive_seconds as seconds, directives,
    has_directive as has, CacheStatus, Directive, CACHE_NAME,
};

/// The per-route cache rules, compiled from the route's `cache:` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePolicy {
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// Extra retention for entries with validators, so they can be revalidated (304).
    pub keep: Duration,
    /// Entries are kept at least this long (the longest route lifetime in the config), so a
    /// TTL raised by a reload applies to entries already stored.
    pub retention_floor: Duration,
    /// Responses to requests with `Authorization`/`Cookie` may be cached; the key then includes
    /// a hash of the credential so callers never see each other's responses.
    pub shared: bool,
    /// Take `s-maxage`/`max-age`/`Expires` from the upstream instead of the route TTL.
    pub respect_origin: bool,
    /// Freshness for responses without explicit freshness (with `respect_origin`).
    pub heuristic: HeuristicPolicy,
    /// A response with explicit freshness may be stored whatever its final status (RFC 9111
    /// §3); `statuses` then only bounds heuristic freshness.
    pub explicit_any_status: bool,
    /// A valid `CDN-Cache-Control` (RFC 9213) replaces `Cache-Control` and `Expires`.
    pub cdn_cache_control: bool,
    /// The upstream's `stale-while-revalidate`/`stale-if-error` replace the route's windows.
    pub origin_stale: bool,
    /// A response varying on unkeyed headers is stored with the request's values of them and
    /// served only to requests that match (RFC 9111 §4.1).
    pub vary_match: bool,
    /// With `vary_match`, how many variants of one URL stay reachable.
    pub max_variants: usize,
    pub statuses: Vec<u16>,
    /// Include the query string in the key.
    pub key_query: bool,
    /// Request headers (lowercase) whose values are part of the key.
    pub key_headers: Vec<String>,
    /// A client's `Cache-Control: no-cache` refetches (and may replace) the entry; otherwise it
    /// is served from the cache like any request, as shared caches such as Varnish do.
    pub client_refresh: bool,
    /// A request's `max-age`, `min-fresh` and `max-stale` (RFC 9111 §5.2.1) narrow or widen
    /// which stored responses may answer it; otherwise they are ignored, as nginx and Varnish
    /// do. `only-if-cached` is always honoured: it never reaches the upstream.
    pub client_directives: bool,
    /// Freshness lifetime of negative answers (`NEGATIVE_STATUSES`) when stored.
    pub negative_ttl: Option<Duration>,
    /// Request headers (lowercase) removed before forwarding.
    pub strip_headers: Vec<String>,
    /// Longest wait for another request's fetch of the same key (`cache.lock_timeout`).
    pub lock_timeout: Duration,
}

/// The positive part of RFC 9111 §4.2.2's heuristically cacheable statuses (minus 206: ranges
/// are not stored). Stored by default.
pub const DEFAULT_STATUSES: &[u16] = &[200, 203, 204, 300, 301, 308];
/// The negative part: stored only with a route's `negative_ttl` (or when listed in `statuses`),
/// so a passing 404 is not served to everyone for the full TTL.
pub const NEGATIVE_STATUSES: &[u16] = &[404, 405, 410, 414, 501];

impl Default for RoutePolicy {
    fn default() -> Self {
        RoutePolicy {
            ttl: Duration::from_secs(60),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            keep: Duration::from_secs(3600),
            retention_floor: Duration::ZERO,
            shared: false,
            respect_origin: false,
            heuristic: HeuristicPolicy::RouteTtl,
            explicit_any_status: false,
            cdn_cache_control: false,
            origin_stale: false,
            vary_match: false,
            max_variants: 8,
            statuses: DEFAULT_STATUSES.to_vec(),
            key_query: true,
            key_headers: Vec::new(),
            client_refresh: false,
            client_directives: false,
            negative_ttl: None,
            strip_headers: Vec::new(),
            lock_timeout: Duration::from_secs(5),
        }
    }
}

/// Where freshness comes from when the origin gave none (RFC 9111 §4.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeuristicPolicy {
    /// The route's TTL (outrider's historical behaviour).
    RouteTtl,
    /// 10 % of the time since `Last-Modified`, at most `max`, for heuristically cacheable
    /// statuses (or `public` responses); without `Last-Modified`, not stored.
    LastModified { max: Duration },
    /// Not stored.
    Never,
}

/// The largest delta-seconds a cache must handle (RFC 9111 §1.2.2); larger ages saturate.
const MAX_DELTA: u64 = 1 << 31;

/// An HTTP date (RFC 9110 §5.6.7: IMF-fixdate, RFC 850 or asctime); `None` when invalid.
/// Leniently, names in any case and a weekday that disagrees with the date (it is redundant)
/// are accepted; anything else malformed is invalid.
pub fn http_date(value: &http::HeaderValue) -> Option<SystemTime> {
    let text = value.to_str().ok()?.trim();
    if let Ok(t) = httpdate::parse_http_date(text) {
        return Some(t);
    }
    let mut fixed = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.eq_ignore_ascii_case("gmt") {
            out.push_str("GMT");
        } else {
            for (i, c) in word.chars().enumerate() {
                out.push(if i == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                });
            }
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphabetic() {
            word.push(c);
        } else {
            flush(&mut word, &mut fixed);
            fixed.push(c);
        }
    }
    flush(&mut word, &mut fixed);
    if let Ok(t) = httpdate::parse_http_date(&fixed) {
        return Some(t);
    }
    // IMF-fixdate and asctime start with a three-letter weekday.
    if fixed.get(3..4).is_some_and(|c| c == "," || c == " ") {
        for day in ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"] {
            fixed.replace_range(..3, day);
            if let Ok(t) = httpdate::parse_http_date(&fixed) {
                return Some(t);
            }
        }
    }
    None
}

/// The `Age` the response arrived with (RFC 9111 §5.1): the first value of the first line when
/// it is a non-negative integer (saturating at 2^31), otherwise ignored; at least the time
/// since its `Date` when that is in the past (§4.2.3's apparent age).
pub fn initial_age(resp: &HeaderMap, now: SystemTime) -> Duration {
    let age = resp
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .map_or(0, |v| v.parse::<u64>().unwrap_or(MAX_DELTA).min(MAX_DELTA));
    let apparent = resp
        .get(header::DATE)
        .and_then(http_date)
        .and_then(|date| now.duration_since(date).ok())
        .map_or(0, |d| d.as_secs());
    Duration::from_secs(age.max(apparent))
}

/// The freshness lifetime the origin gave explicitly (RFC 9111 §4.2.1): `s-maxage`, `max-age`,
/// else `Expires` minus `Date` (or minus `now` when `Date` is invalid). An invalid `Expires`
/// means already stale (zero).
fn explicit_lifetime(resp: &HeaderMap, cc: &[Directive], now: SystemTime) -> Option<Duration> {
    if let Some(s) = seconds(cc, "s-maxage").or_else(|| seconds(cc, "max-age")) {
        return Some(Duration::from_secs(s));
    }
    let expires = resp.get(header::EXPIRES)?;
    let Some(expires) = http_date(expires) else {
        return Some(Duration::ZERO);
    };
    let date = resp.get(header::DATE).and_then(http_date).unwrap_or(now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

/// `CDN-Cache-Control` (RFC 9213) as directives, or `None` when absent or invalid: it is a
/// Structured Fields dictionary (RFC 8941), so lowercase keys, and `max-age`/`s-maxage` must be
/// integers; an invalid field is ignored as a whole.
pub fn cdn_directives(resp: &HeaderMap) -> Option<Vec<Directive>> {
    let mut out = Vec::new();
    for value in resp.get_all("cdn-cache-control") {
        let text = value.to_str().ok()?;
        for member in text.split(',') {
            let member = member.trim_matches(|c| c == ' ' || c == '\t');
            // Parameters (`;a=1`) do not change the directive.
            let member = member.split(';').next().unwrap_or("");
            let (name, value) = match member.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (member, None),
            };
            let key_ok = name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'*')
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b));
            if !key_ok {
                return None;
            }
            let value = match value {
                None => None,
                Some(v)
                    if v.len() <= 15 && !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    Some(v.to_owned())
                }
                // Non-integer values are fine for other directives, never for lifetimes.
                Some(_) if name == "max-age" || name == "s-maxage" => return None,
                Some(v) => Some(v.trim_matches('"').to_owned()),
            };
            out.push(Directive {
                name: name.to_owned(),
                value,
            });
        }
    }
    (!out.is_empty()).then_some(out)
}

/// RFC 9111 §4.2.2: statuses that may be given heuristic freshness.
fn heuristically_cacheable(status: u16) -> bool {
    DEFAULT_STATUSES.contains(&status) || NEGATIVE_STATUSES.contains(&status)
}

/// A status a cache may store with explicit freshness: final, complete and not a 304.
fn storable_with_explicit_freshness(status: u16) -> bool {
    (200..=599).contains(&status) && status != 206 && status != 304
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestDecision {
    /// Look up, serve on hit, fetch and store on miss. `credential` (when `Some`) must be hashed
    /// into the key.
    Lookup { credential: Option<Vec<u8>> },
    /// The client asked to skip the cache (`no-cache`): fetch, and the response may be stored.
    Refresh { credential: Option<Vec<u8>> },
    /// Neither look up nor store.
    Bypass(BypassReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BypassReason {
    Method,
    NoStore,
    Credentials,
}

impl BypassReason {
    pub fn as_str(self) -> &'static str {
        match self {
            BypassReason::Method => "method",
            BypassReason::NoStore => "no-store",
            BypassReason::Credentials => "credentials",
        }
    }
}

/// Why a response is not stored (for logs and `cache-status` detail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotStorable {
    Status(u16),
    NoStore,
    Private,
    /// `no-cache` would require revalidation on every use, which this cache does not do.
    NoCache,
    SetCookie,
    VaryStar,
    /// The response varies on a request header the route does not key on; storing it would
    /// serve one client's variant to another.
    VaryNotKeyed(String),
    /// The origin's `s-maxage`/`max-age` is 0.
    ZeroMaxAge,
    /// The route's TTL is 0.
    ZeroTtl,
    /// No explicit freshness and the route gives no heuristic freshness to this response.
    NoFreshness,
}

impl NotStorable {
    pub fn as_str(&self) -> &'static str {
        match self {
            NotStorable::Status(_) => "status",
            NotStorable::NoStore => "no-store",
            NotStorable::Private => "private",
            NotStorable::NoCache => "no-cache",
            NotStorable::SetCookie => "set-cookie",
            NotStorable::VaryStar => "vary-star",
            NotStorable::VaryNotKeyed(_) => "vary-not-keyed",
            NotStorable::ZeroMaxAge => "max-age-zero",
            NotStorable::ZeroTtl => "ttl-zero",
            NotStorable::NoFreshness => "no-freshness",
        }
    }
}

/// Whether a stored response's own `Cache-Control` forbids serving it stale from a shared
/// cache: `must-revalidate`, `proxy-revalidate`, `s-maxage` or `no-cache` (RFC 9111 §5.2.2.2,
/// .4, .8, .10).
/// The route's stale windows then do not apply to it.
pub fn forbids_stale(stored_headers: &[(String, Bytes)]) -> bool {
    let cc = stored_cache_control(stored_headers);
    has(&cc, "must-revalidate")
        || has(&cc, "proxy-revalidate")
        || has(&cc, "s-maxage")
        || has(&cc, "no-cache")
}

/// The directives of a stored response's `Cache-Control`.
fn stored_cache_control(stored_headers: &[(String, Bytes)]) -> Vec<Directive> {
    let mut map = HeaderMap::new();
    for (name, value) in stored_headers {
        if name == "cache-control" {
            if let Ok(value) = http::HeaderValue::from_bytes(value) {
                map.append(header::CACHE_CONTROL, value);
            }
        }
    }
    directives(&map, header::CACHE_CONTROL)
}

/// The stale windows (while-revalidate, if-error) of a stored response: the route's, or with
/// `origin_stale` the upstream's own `stale-while-revalidate`/`stale-if-error` (RFC 5861)
/// where it gave them.
pub fn stale_windows(
    stored_headers: &[(String, Bytes)],
    policy: &RoutePolicy,
) -> (Duration, Duration) {
    let route = (policy.stale_while_revalidate, policy.stale_if_error);
    if !policy.origin_stale {
        return route;
    }
    let cc = stored_cache_control(stored_headers);
    (
        seconds(&cc, "stale-while-revalidate").map_or(route.0, Duration::from_secs),
        seconds(&cc, "stale-if-error").map_or(route.1, Duration::from_secs),
    )
}

pub fn request_decision(method: &Method, req: &HeaderMap, route: &RoutePolicy) -> RequestDecision {
    if method != Method::GET && method != Method::HEAD {
        return RequestDecision::Bypass(BypassReason::Method);
    }
    let cc = directives(req, header::CACHE_CONTROL);
    if has(&cc, "no-store") {
        return RequestDecision::Bypass(BypassReason::NoStore);
    }
    let credential = credential_bytes(req);
    if credential.is_some() && !route.shared {
        return RequestDecision::Bypass(BypassReason::Credentials);
    }
    // RFC 9111 §5.4: Pragma only counts when there is no Cache-Control.
    let pragma_no_cache = !req.contains_key(header::CACHE_CONTROL)
        && has(&directives(req, header::PRAGMA), "no-cache");
    if route.client_refresh && (has(&cc, "no-cache") || pragma_no_cache) {
        RequestDecision::Refresh { credential }
    } else {
        RequestDecision::Lookup { credential }
    }
}

/// Values of the route's key headers in configured order (absent headers as empty), as raw
/// bytes, ready for [`CacheKey::http`](crate::store::CacheKey::http). Multiple values are joined
/// with a line feed, which no header value can contain, so two header lines `a` and `b` never
/// key like one line `a, b`.
pub fn vary_values(req: &HeaderMap, route: &RoutePolicy) -> Vec<(String, Vec<u8>)> {
    route
        .key_headers
        .iter()
        .map(|name| (name.to_ascii_lowercase(), all_values(req, name)))
        .collect()
}

/// Every value of header `name`, in order, joined with `\n` (never part of a value), as bytes.
pub fn all_values(req: &HeaderMap, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, v) in req.get_all(name).iter().enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// Whether a response may be stored, and for how long it is fresh (its lifetime less the age
/// it arrived with when the route respects the origin).
pub fn response_storable(
    status: u16,
    resp: &HeaderMap,
    route: &RoutePolicy,
) -> Result<Duration, NotStorable> {
    response_storable_at(status, resp, route, SystemTime::now())
}

pub fn response_storable_at(
    status: u16,
    resp: &HeaderMap,
    route: &RoutePolicy,
    now: SystemTime,
) -> Result<Duration, NotStorable> {
    let cdn = if route.cdn_cache_control {
        cdn_directives(resp)
    } else {
        None
    };
    let targeted = cdn.is_some();
    let cc = cdn.unwrap_or_else(|| directives(resp, header::CACHE_CONTROL));
    let explicit = if targeted {
        // RFC 9213 §2.1: Cache-Control and Expires are then ignored.
        seconds(&cc, "s-maxage")
            .or_else(|| seconds(&cc, "max-age"))
            .map(Duration::from_secs)
    } else if route.respect_origin {
        explicit_lifetime(resp, &cc, now)
    } else {
        seconds(&cc, "s-maxage")
            .or_else(|| seconds(&cc, "max-age"))
            .map(Duration::from_secs)
    };
    // In RFC mode (`explicit_any_status`), explicit freshness stores any final status and the
    // Last-Modified heuristic every heuristically cacheable one (or a `public` response).
    let status_ok = route.statuses.contains(&status)
        || (route.explicit_any_status
            && match explicit {
                Some(_) => storable_with_explicit_freshness(status),
                None => {
                    matches!(route.heuristic, HeuristicPolicy::LastModified { .. })
                        && (heuristically_cacheable(status) || has(&cc, "public"))
                }
            });
    if !status_ok {
        return Err(NotStorable::Status(status));
    }
    if has(&cc, "no-store") {
        return Err(NotStorable::NoStore);
    }
    if has(&cc, "private") {
        return Err(NotStorable::Private);
    }
    // RFC 9111 §5.2.2.4: a no-cache response may be stored if every use is revalidated. With an
    // RFC heuristic mode and a validator it is stored with zero freshness, so each request makes
    // a conditional request; otherwise it is not stored.
    let revalidate_always = has(&cc, "no-cache");
    if revalidate_always
        && (matches!(route.heuristic, HeuristicPolicy::RouteTtl)
            || !(resp.contains_key(header::ETAG) || resp.contains_key(header::LAST_MODIFIED)))
    {
        return Err(NotStorable::NoCache);
    }
    if resp.contains_key(header::SET_COOKIE) {
        return Err(NotStorable::SetCookie);
    }
    for d in directives(resp, header::VARY) {
        if d.name == "*" {
            return Err(NotStorable::VaryStar);
        }
        if !route.vary_match
            && !route
                .key_headers
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&d.name))
        {
            return Err(NotStorable::VaryNotKeyed(d.name));
        }
    }
    if revalidate_always {
        return Ok(Duration::ZERO);
    }
    let ttl = if route.respect_origin {
        // The response may already have aged upstream (a CDN or cache in front of the app).
        let age = initial_age(resp, now);
        match explicit {
            Some(lifetime) if lifetime <= age => return Err(NotStorable::ZeroMaxAge),
            Some(lifetime) => lifetime - age,
            None => heuristic_lifetime(status, resp, &cc, route, now)?,
        }
    } else if explicit == Some(Duration::ZERO) {
        // An explicit (or invalid, hence stale) zero lifetime is honoured even when the route
        // sets its own TTL: the origin said this must not be reused.
        return Err(NotStorable::ZeroMaxAge);
    } else {
        route.ttl
    };
    let ttl = match route.negative_ttl {
        Some(negative) if NEGATIVE_STATUSES.contains(&status) => ttl.min(negative),
        _ => ttl,
    };
    if ttl.is_zero() {
        return Err(NotStorable::ZeroTtl);
    }
    Ok(ttl)
}

/// Freshness for a response without explicit freshness, per the route's heuristic.
fn heuristic_lifetime(
    status: u16,
    resp: &HeaderMap,
    cc: &[Directive],
    route: &RoutePolicy,
    now: SystemTime,
) -> Result<Duration, NotStorable> {
    match route.heuristic {
        HeuristicPolicy::RouteTtl => Ok(route.ttl),
        HeuristicPolicy::Never => Err(NotStorable::NoFreshness),
        HeuristicPolicy::LastModified { max } => {
            if !heuristically_cacheable(status) && !has(cc, "public") {
                return Err(NotStorable::Status(status));
            }
            let last_modified = resp
                .get(header::LAST_MODIFIED)
                .and_then(http_date)
                .ok_or(NotStorable::NoFreshness)?;
            let date = resp.get(header::DATE).and_then(http_date).unwrap_or(now);
            let since = date
                .duration_since(last_modified)
                .map_err(|_| NotStorable::NoFreshness)?;
            Ok((since / 10).min(max))
        }
    }
}

/// Response headers worth storing: hop-by-hop headers and ones the cache recomputes (`age`,
/// `date` stays) are dropped.
pub fn storable_headers(resp: &HeaderMap) -> Vec<(String, Bytes)> {
    // Names listed in `Connection` are hop-by-hop too (RFC 9110 §7.6.1).
    let connection_listed: Vec<String> = directives(resp, header::CONNECTION)
        .into_iter()
        .map(|d| d.name)
        .collect();
    resp.iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            !matches!(
                n,
                "connection"
                    | "keep-alive"
                    | "proxy-connection"
                    | "proxy-authenticate"
                    | "proxy-authorization"
                    | "te"
                    | "trailer"
                    | "transfer-encoding"
                    | "upgrade"
                    | "age"
                    | "set-cookie"
                    | "x-cache-status"
                    | "cache-status"
            ) && !connection_listed.iter().any(|c| c == n)
        })
        .map(|(n, v)| (n.as_str().to_owned(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

/// Where a stored entry stands for this route now. The one freshness rule: judged from the
/// entry's stored time and the route's live config, so an edited TTL or stale window applies
/// to entries already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Serve it, and refresh it in the background.
    StaleWhileRevalidate,
    /// Serve it only if the upstream fails.
    StaleIfErrorOnly,
    /// Not servable; revalidate it (when it has validators) or fetch anew.
    Expired,
}

/// The freshness lifetime in force for `entry`: the origin's when the route respects it.
pub fn effective_ttl(entry: &StoredResponse, policy: &RoutePolicy) -> Duration {
    if policy.respect_origin {
        return entry.ttl;
    }
    match policy.negative_ttl {
        Some(negative) if NEGATIVE_STATUSES.contains(&entry.status) => policy.ttl.min(negative),
        _ => policy.ttl,
    }
}

pub fn freshness(entry: &StoredResponse, policy: &RoutePolicy, now: SystemTime) -> Freshness {
    let ttl = effective_ttl(entry, policy);
    let age = entry.age(now);
    if age < ttl {
        Freshness::Fresh
    } else if forbids_stale(&entry.headers) {
        // The origin said never stale (must-revalidate & co): revalidate or refetch.
        Freshness::Expired
    } else {
        let (swr, sie) = stale_windows(&entry.headers, policy);
        if age < ttl.saturating_add(swr) {
            Freshness::StaleWhileRevalidate
        } else if age < ttl.saturating_add(sie.max(swr)) {
            Freshness::StaleIfErrorOnly
        } else {
            Freshness::Expired
        }
    }
}

/// What a request's own `Cache-Control` asks of a stored response (RFC 9111 §5.2.1).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// `max-age`: no response older than this.
    pub max_age: Option<Duration>,
    /// `min-fresh`: only a response still fresh this much longer.
    pub min_fresh: Option<Duration>,
    /// `max-stale`: a stale response will do, up to this far past its lifetime (`Some(None)`:
    /// any staleness).
    pub max_stale: Option<Option<Duration>>,
    /// `only-if-cached`: answer from the cache or with 504, never from the upstream.
    pub only_if_cached: bool,
}

impl ClientLimits {
    /// The request's limits on this route (nothing to parse without a `Cache-Control`).
    pub fn of(req: &HeaderMap, route: &RoutePolicy) -> ClientLimits {
        if !req.contains_key(header::CACHE_CONTROL) {
            return ClientLimits::default();
        }
        let cc = directives(req, header::CACHE_CONTROL);
        let mut limits = ClientLimits {
            only_if_cached: has(&cc, "only-if-cached"),
            ..ClientLimits::default()
        };
        if route.client_directives {
            limits.max_age = seconds(&cc, "max-age").map(Duration::from_secs);
            limits.min_fresh = seconds(&cc, "min-fresh").map(Duration::from_secs);
            limits.max_stale = cc.iter().find(|d| d.name == "max-stale").map(|d| {
                d.value
                    .as_ref()
                    .map(|_| Duration::from_secs(seconds(&cc, "max-stale").unwrap_or(0)))
            });
        }
        limits
    }

    fn narrows_or_widens(&self) -> bool {
        self.max_age.is_some() || self.min_fresh.is_some() || self.max_stale.is_some()
    }

    /// `state` (the entry's [`freshness`]) as this request sees it: `Fresh` when the entry may
    /// answer it (a stale one too, within `max-stale`, unless the origin forbids serving it
    /// stale), `Expired` when it is too old for the request, else unchanged.
    pub fn apply(
        &self,
        state: Freshness,
        entry: &StoredResponse,
        policy: &RoutePolicy,
        now: SystemTime,
    ) -> Freshness {
        if !self.narrows_or_widens() {
            return state;
        }
        let age = entry.age(now);
        if self.max_age.is_some_and(|max| age > max) {
            return Freshness::Expired;
        }
        let ttl = effective_ttl(entry, policy);
        if age < ttl {
            let left = ttl - age;
            return if self.min_fresh.is_some_and(|min| left < min) {
                Freshness::Expired
            } else {
                state
            };
        }
        let stale_for = age - ttl;
        if self.min_fresh.is_some() {
            return Freshness::Expired;
        }
        match self.max_stale {
            Some(limit)
                if limit.is_none_or(|limit| stale_for <= limit)
                    && !forbids_stale(&entry.headers) =>
            {
                // Within a stale-while-revalidate window the entry is still refreshed, so
                // clients that always accept stale answers do not keep it stale for good.
                if state == Freshness::StaleWhileRevalidate {
                    state
                } else {
                    Freshness::Fresh
                }
            }
            // §5.2.1.1: a client with `max-age` and no `max-stale` wants no stale answer.
            _ if self.max_age.is_some() => Freshness::Expired,
            _ => state,
        }
    }
}

/// Seconds of freshness left (negative once stale), for `cache-status: ttl=`.
pub fn ttl_left(entry: &StoredResponse, policy: &RoutePolicy, now: SystemTime) -> i64 {
    effective_ttl(entry, policy).as_secs() as i64 - entry.age(now).as_secs() as i64
}

/// Stored pseudo-headers that record the request's value of a header the response varies on
/// (never served: their names are not valid header names).
pub const VARY_PREFIX: &str = "@vary:";

/// A request header's values as a `Vary` comparison sees them (RFC 9111 §4.1): all lines
/// combined, list members trimmed, so `a,b`, `a, b` and two lines `a` / `b` are the same; an
/// absent header differs from an empty one.
pub fn vary_request_value(req: &HeaderMap, name: &str) -> Bytes {
    if name.eq_ignore_ascii_case("accept-language") {
        return language_ranges(req);
    }
    let mut out = Vec::new();
    let mut present = false;
    for v in req.get_all(name) {
        for member in v.as_bytes().split(|b| *b == b',') {
            let member = member.trim_ascii();
            if present {
                out.extend_from_slice(b", ");
            }
            present = true;
            out.extend_from_slice(member);
        }
    }
    if !present {
        return Bytes::from_static(b"\0absent");
    }
    Bytes::from(out)
}

/// `Accept-Language` as a set of language ranges: case, whitespace and order do not change
/// which languages (with which weights) the client accepts.
fn language_ranges(req: &HeaderMap) -> Bytes {
    let mut members: Vec<Vec<u8>> = req
        .get_all(header::ACCEPT_LANGUAGE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|m| {
            m.iter()
                .filter(|b| !b.is_ascii_whitespace())
                .map(u8::to_ascii_lowercase)
                .collect::<Vec<u8>>()
        })
        .collect();
    if members.is_empty() {
        return Bytes::from_static(b"\0absent");
    }
    members.sort_unstable();
    Bytes::from(members.join(&b", "[..]))
}

/// Pseudo-header of a primary entry (`vary: match`): the ids of its URL's stored variants,
/// newest first, so a request for another variant finds it under its own key.
pub const VARIANTS_HEADER: &str = "@variants";

/// The id of the variant `headers` (a stored entry's) records, from its `Vary` names and the
/// request values it was selected by; `None` for a response that varies on nothing unkeyed.
pub fn variant_id(headers: &[(String, Bytes)]) -> Option<String> {
    id_of_members(headers, |_, recorded| recorded.clone())
}

/// The id a request would select among the variants of `primary`'s URL: `primary`'s `Vary`
/// names with the request's values.
pub fn requested_variant_id(primary: &[(String, Bytes)], req: &HeaderMap) -> Option<String> {
    id_of_members(primary, |header, _| vary_request_value(req, header))
}

/// Hashes the `Vary` names recorded in `headers`, each with the value `value` gives for it
/// (from the record, or from a request); the same function for both keeps the ids equal.
fn id_of_members(
    headers: &[(String, Bytes)],
    value: impl Fn(&str, &Bytes) -> Bytes,
) -> Option<String> {
    let mut hasher = blake3::Hasher::new();
    let mut any = false;
    for (name, recorded) in headers {
        if let Some(header) = name.strip_prefix(VARY_PREFIX) {
            any = true;
            hash_member(&mut hasher, header.as_bytes(), &value(header, recorded));
        }
    }
    any.then(|| short_id(&hasher))
}

fn hash_member(hasher: &mut blake3::Hasher, name: &[u8], value: &[u8]) {
    for part in [name, value] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
}

/// 64 bits: ids only tell apart the few variants of one URL, and a served variant's recorded
/// values are compared with the request's anyway.
fn short_id(hasher: &blake3::Hasher) -> String {
    hasher.finalize().to_hex()[..16].to_string()
}

/// The variant ids a primary entry lists.
pub fn listed_variants(headers: &[(String, Bytes)]) -> Vec<String> {
    headers
        .iter()
        .find(|(n, _)| n == VARIANTS_HEADER)
        .map(|(_, v)| {
            v.split(|b| *b == b',')
                .filter(|id| !id.is_empty())
                .map(|id| String::from_utf8_lossy(id).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether two stored entries vary on the same headers (in the same order).
pub fn same_vary_names(a: &[(String, Bytes)], b: &[(String, Bytes)]) -> bool {
    let names = |h: &[(String, Bytes)]| -> Vec<String> {
        h.iter()
            .filter(|(n, _)| n.starts_with(VARY_PREFIX))
            .map(|(n, _)| n.clone())
            .collect()
    };
    names(a) == names(b)
}

/// The pseudo-headers to store with a response that varies on headers outside the key.
pub fn vary_record(resp: &HeaderMap, req: &HeaderMap, route: &RoutePolicy) -> Vec<(String, Bytes)> {
    directives(resp, header::VARY)
        .into_iter()
        .filter(|d| {
            !route
                .key_headers
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&d.name))
        })
        .map(|d| {
            let value = vary_request_value(req, &d.name);
            (format!("{VARY_PREFIX}{}", d.name), value)
        })
        .collect()
}

/// Whether a stored entry was selected by the same values of its `Vary` headers as `req` has.
pub fn variant_matches(entry: &StoredResponse, req: &HeaderMap) -> bool {
    entry
        .headers
        .iter()
        .all(|(name, value)| match name.strip_prefix(VARY_PREFIX) {
            Some(header) => vary_request_value(req, header) == *value,
            None => true,
        })
}

/// Whether stored headers carry a validator a conditional request can use.
pub fn has_validator(headers: &[(String, Bytes)]) -> bool {
    headers
        .iter()
        .any(|(n, _)| n == "etag" || n == "last-modified")
}

/// How long the store keeps an entry with freshness lifetime `ttl`: its stale windows, at least
/// the config's longest route lifetime, plus `keep` when it can be revalidated.
pub fn retention(ttl: Duration, headers: &[(String, Bytes)], policy: &RoutePolicy) -> Duration {
    let (swr, sie) = stale_windows(headers, policy);
    let lifetime = ttl.saturating_add(swr.max(sie));
    let base = lifetime.max(policy.retention_floor);
    if has_validator(headers) {
        base.saturating_add(policy.keep)
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in pairs {
            m.append(*n, HeaderValue::from_static(v));
        }
        m
    }

    fn route() -> RoutePolicy {
        RoutePolicy::default()
    }

    #[test]
    fn client_limits_narrow_and_widen_only_where_honoured() {
        let now = SystemTime::now();
        // 100 s old with a 200 s lifetime: fresh for 100 s more.
        let entry = |headers: Vec<(String, Bytes)>| StoredResponse {
            status: 200,
            headers,
            body: Bytes::new(),
            stored_at: now - Duration::from_secs(100),
            ttl: Duration::from_secs(200),
            retention: Duration::from_secs(3600),
            namespace: String::new(),
            label: String::new(),
        };
        let fresh = entry(Vec::new());
        let honour = RoutePolicy {
            respect_origin: true,
            client_directives: true,
            ..route()
        };
        let apply = |cc: &'static str, e: &StoredResponse, r: &RoutePolicy| {
            let limits = ClientLimits::of(&h(&[("cache-control", cc)]), r);
            limits.apply(freshness(e, r, now), e, r, now)
        };
        assert_eq!(apply("max-age=150", &fresh, &honour), Freshness::Fresh);
        assert_eq!(apply("max-age=50", &fresh, &honour), Freshness::Expired);
        assert_eq!(apply("min-fresh=50", &fresh, &honour), Freshness::Fresh);
        assert_eq!(apply("min-fresh=150", &fresh, &honour), Freshness::Expired);
        // A route that ignores them: the entry's own freshness stands.
        let ignore = RoutePolicy {
            client_directives: false,
            ..honour.clone()
        };
        assert_eq!(apply("max-age=0", &fresh, &ignore), Freshness::Fresh);
        assert!(
            ClientLimits::of(&h(&[("cache-control", "only-if-cached")]), &ignore).only_if_cached
        );

        // 50 s past a 50 s lifetime.
        let mut stale = entry(Vec::new());
        stale.ttl = Duration::from_secs(50);
        assert_eq!(apply("max-stale=60", &stale, &honour), Freshness::Fresh);
        assert_eq!(apply("max-stale", &stale, &honour), Freshness::Fresh);
        assert_eq!(apply("max-stale=10", &stale, &honour), Freshness::Expired);
        assert_eq!(
            apply("max-stale, min-fresh=1", &stale, &honour),
            Freshness::Expired
        );
        assert_eq!(apply("max-stale=60", &stale, &ignore), Freshness::Expired);
        let mut forbidden = entry(vec![(
            "cache-control".into(),
            Bytes::from("must-revalidate"),
        )]);
        forbidden.ttl = Duration::from_secs(50);
        assert_eq!(apply("max-stale", &forbidden, &honour), Freshness::Expired);
    }

    #[test]
    fn only_get_and_head() {
        let r = route();
        assert_eq!(
            request_decision(&Method::GET, &h(&[]), &r),
            RequestDecision::Lookup { credential: None }
        );
        assert_eq!(
            request_decision(&Method::HEAD, &h(&[]), &r),
            RequestDecision::Lookup { credential: None }
        );
        for m in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            assert_eq!(
                request_decision(&m, &h(&[]), &r),
                RequestDecision::Bypass(BypassReason::Method)
            );
        }
    }

    #[test]
    fn client_no_cache_is_ignored_unless_the_route_honours_it() {
        let r = route();
        for pairs in [
            &[("cache-control", "no-cache")][..],
            &[("pragma", "no-cache")],
        ] {
            assert_eq!(
                request_decision(&Method::GET, &h(pairs), &r),
                RequestDecision::Lookup { credential: None }
            );
        }
    }

    #[test]
    fn request_cache_control() {
        let r = RoutePolicy {
            client_refresh: true,
            ..route()
        };
        let d = |pairs| request_decision(&Method::GET, &h(pairs), &r);
        assert_eq!(
            d(&[("cache-control", "no-store")]),
            RequestDecision::Bypass(BypassReason::NoStore)
        );
        assert_eq!(
            d(&[("cache-control", "max-age=0, No-Store")]),
            RequestDecision::Bypass(BypassReason::NoStore)
        );
        assert_eq!(
            d(&[("cache-control", "no-cache")]),
            RequestDecision::Refresh { credential: None }
        );
        assert_eq!(
            d(&[("pragma", "no-cache")]),
            RequestDecision::Refresh { credential: None }
        );
        // Pragma is ignored when Cache-Control is present.
        assert_eq!(
            d(&[("pragma", "no-cache"), ("cache-control", "max-age=10")]),
            RequestDecision::Lookup { credential: None }
        );
        assert_eq!(
            d(&[("cache-control", "max-age=0")]),
            RequestDecision::Lookup { credential: None }
        );
    }

    #[test]
    fn credentials_bypass_unless_shared() {
        let mut r = RoutePolicy {
            client_refresh: true,
            ..route()
        };
        let auth = h(&[("authorization", "Bearer a")]);
        let cookie = h(&[("cookie", "sid=1")]);
        assert_eq!(
            request_decision(&Method::GET, &auth, &r),
            RequestDecision::Bypass(BypassReason::Credentials)
        );
        assert_eq!(
            request_decision(&Method::GET, &cookie, &r),
            RequestDecision::Bypass(BypassReason::Credentials)
        );
        r.shared = true;
        let RequestDecision::Lookup {
            credential: Some(a),
        } = request_decision(&Method::GET, &auth, &r)
        else {
            panic!("expected lookup with credential");
        };
        let RequestDecision::Lookup {
            credential: Some(b),
        } = request_decision(&Method::GET, &h(&[("authorization", "Bearer b")]), &r)
        else {
            panic!("expected lookup with credential");
        };
        assert_ne!(a, b);
        // Header boundaries cannot be shifted to collide.
        assert_ne!(
            credential_bytes(&h(&[("authorization", "x"), ("cookie", "y")])),
            credential_bytes(&h(&[("authorization", "xcookie"), ("cookie", "")]))
        );
        assert!(matches!(
            request_decision(
                &Method::GET,
                &h(&[("authorization", "a"), ("cache-control", "no-cache")]),
                &r
            ),
            RequestDecision::Refresh {
                credential: Some(_)
            }
        ));
        assert_eq!(
            request_decision(
                &Method::GET,
                &h(&[("authorization", "a"), ("cache-control", "no-store")]),
                &r
            ),
            RequestDecision::Bypass(BypassReason::NoStore)
        );
    }

    #[test]
    fn storable_statuses() {
        let r = route();
        for s in [200, 203, 204, 300, 301, 308] {
            assert_eq!(response_storable(s, &h(&[]), &r), Ok(r.ttl), "{s}");
        }
        for s in [
            201, 206, 302, 304, 400, 404, 405, 410, 414, 500, 501, 502, 503,
        ] {
            assert_eq!(
                response_storable(s, &h(&[]), &r),
                Err(NotStorable::Status(s))
            );
        }
        let custom = RoutePolicy {
            statuses: vec![302],
            ..route()
        };
        assert!(response_storable(302, &h(&[]), &custom).is_ok());
        assert!(response_storable(200, &h(&[]), &custom).is_err());
        // Negative caching is opt-in, with its own (shorter) lifetime.
        let negative = RoutePolicy {
            statuses: [DEFAULT_STATUSES, NEGATIVE_STATUSES].concat(),
            negative_ttl: Some(Duration::from_secs(5)),
            ..route()
        };
        assert_eq!(
            response_storable(404, &h(&[]), &negative),
            Ok(Duration::from_secs(5))
        );
        assert_eq!(response_storable(200, &h(&[]), &negative), Ok(r.ttl));
    }

    #[test]
    fn response_directives() {
        let r = route();
        let s = |pairs| response_storable(200, &h(pairs), &r);
        assert_eq!(
            s(&[("cache-control", "no-store")]),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            s(&[("cache-control", "public, PRIVATE")]),
            Err(NotStorable::Private)
        );
        assert_eq!(
            s(&[("cache-control", "private=\"set-cookie, x\"")]),
            Err(NotStorable::Private)
        );
        assert_eq!(
            s(&[("cache-control", "no-cache")]),
            Err(NotStorable::NoCache)
        );
        assert_eq!(s(&[("set-cookie", "a=b")]), Err(NotStorable::SetCookie));
        assert_eq!(s(&[("vary", "*")]), Err(NotStorable::VaryStar));
        assert_eq!(
            s(&[("vary", "Accept, *")]),
            Err(NotStorable::VaryNotKeyed("accept".into()))
        );
        assert_eq!(
            s(&[("vary", "Accept-Encoding")]),
            Err(NotStorable::VaryNotKeyed("accept-encoding".into()))
        );
        let keyed = RoutePolicy {
            key_headers: vec!["accept-language".into()],
            ..route()
        };
        assert!(response_storable(200, &h(&[("vary", "Accept-Language")]), &keyed).is_ok());
        // The route's TTL applies when the route does not respect the origin, but an explicit
        // zero lifetime is always honoured.
        assert_eq!(s(&[("cache-control", "max-age=30")]), Ok(r.ttl));
        assert_eq!(
            s(&[("cache-control", "max-age=0")]),
            Err(NotStorable::ZeroMaxAge)
        );
        assert_eq!(
            s(&[("cache-control", "s-maxage=0, max-age=60")]),
            Err(NotStorable::ZeroMaxAge)
        );
        assert_eq!(s(&[("cache-control", "s-maxage=60, max-age=0")]), Ok(r.ttl));
    }

    #[test]
    fn stale_is_forbidden_by_revalidation_directives() {
        let stored = |cc: &str| vec![("cache-control".to_string(), Bytes::from(cc.to_string()))];
        assert!(forbids_stale(&stored("max-age=60, must-revalidate")));
        assert!(forbids_stale(&stored("Proxy-Revalidate")));
        assert!(forbids_stale(&stored("s-maxage=30")));
        assert!(!forbids_stale(&stored("max-age=60")));
        assert!(!forbids_stale(&[]));
    }

    #[test]
    fn origin_ttl() {
        let r = RoutePolicy {
            respect_origin: true,
            ..route()
        };
        let s = |pairs| response_storable(200, &h(pairs), &r);
        assert_eq!(
            s(&[("cache-control", "max-age=30, s-maxage=90")]),
            Ok(Duration::from_secs(90))
        );
        assert_eq!(
            s(&[("cache-control", "max-age=30")]),
            Ok(Duration::from_secs(30))
        );
        assert_eq!(
            s(&[("cache-control", "max-age=\"45\"")]),
            Ok(Duration::from_secs(45))
        );
        assert_eq!(
            s(&[("cache-control", "s-maxage=0, max-age=60")]),
            Err(NotStorable::ZeroMaxAge)
        );
        assert_eq!(
            s(&[("cache-control", "max-age=0")]),
            Err(NotStorable::ZeroMaxAge)
        );
        // Invalid freshness information means stale (RFC 9111 §4.2.1): not stored.
        for bad in ["max-age=abc", "max-age=-1", "max-age=1.5", "max-age"] {
            assert_eq!(
                response_storable(200, &h(&[("cache-control", bad)]), &r),
                Err(NotStorable::ZeroMaxAge),
                "{bad}"
            );
        }
        // Huge values saturate at 2^31 seconds instead of overflowing later.
        assert_eq!(
            s(&[("cache-control", "s-maxage=99999999999999999999999")]),
            Ok(Duration::from_secs(1 << 31))
        );
        // Age already spent upstream is subtracted.
        assert_eq!(
            s(&[("cache-control", "max-age=60"), ("age", "55")]),
            Ok(Duration::from_secs(5))
        );
        assert_eq!(
            s(&[("cache-control", "max-age=60"), ("age", "60")]),
            Err(NotStorable::ZeroMaxAge)
        );
        assert_eq!(s(&[]), Ok(r.ttl));
        let zero = RoutePolicy {
            ttl: Duration::ZERO,
            ..route()
        };
        assert_eq!(
            response_storable(200, &h(&[]), &zero),
            Err(NotStorable::ZeroTtl)
        );
    }

    #[test]
    fn directive_parsing_edge_cases() {
        let d = directives(
            &h(&[(
                "cache-control",
                " , max-age=5,,private=\"a,b\" , x=\"q\\\"\"",
            )]),
            header::CACHE_CONTROL,
        );
        let names: Vec<_> = d.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["max-age", "private", "x"]);
        assert_eq!(d[1].value.as_deref(), Some("a,b"));
        let mut m = HeaderMap::new();
        m.append(
            "cache-control",
            HeaderValue::from_bytes(b"no-store\xff").unwrap_or(HeaderValue::from_static("x")),
        );
        let _ = directives(&m, header::CACHE_CONTROL);
    }

    #[test]
    fn headers_to_store() {
        let stored = storable_headers(&h(&[
            ("content-type", "text/plain"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("age", "3"),
            ("etag", "\"v1\""),
        ]));
        let names: Vec<_> = stored.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "etag"]);
    }

    #[test]
    fn vary_values_in_route_order() {
        let r = RoutePolicy {
            key_headers: vec!["accept-language".into(), "x-tenant".into()],
            ..route()
        };
        let v = vary_values(&h(&[("x-tenant", "t1"), ("accept-language", "de")]), &r);
        assert_eq!(
            v,
            [
                ("accept-language".to_owned(), b"de".to_vec()),
                ("x-tenant".to_owned(), b"t1".to_vec())
            ]
        );
        let v = vary_values(&h(&[]), &r);
        assert_eq!(v[1], ("x-tenant".to_owned(), Vec::new()));
        // Non-UTF-8 values stay distinct (no lossy replacement characters).
        let mut a = HeaderMap::new();
        a.append(
            "x-tenant",
            HeaderValue::from_bytes(b"\xff").unwrap_or(HeaderValue::from_static("")),
        );
        let mut b = HeaderMap::new();
        b.append(
            "x-tenant",
            HeaderValue::from_bytes(b"\xfe").unwrap_or(HeaderValue::from_static("")),
        );
        assert_ne!(vary_values(&a, &r), vary_values(&b, &r));
        // Every value counts, not just the first.
        let mut two = HeaderMap::new();
        two.append("x-tenant", HeaderValue::from_static("a"));
        two.append("x-tenant", HeaderValue::from_static("b"));
        assert_eq!(vary_values(&two, &r)[1].1, b"a\nb".to_vec());
        let mut one = HeaderMap::new();
        one.append("x-tenant", HeaderValue::from_static("a, b"));
        assert_ne!(vary_values(&two, &r), vary_values(&one, &r));
    }

    #[test]
    fn status_headers() {
        assert_eq!(
            CacheStatus::Hit { ttl: 42 }.header_value(),
            "outrider; hit; ttl=42"
        );
        assert_eq!(CacheStatus::Hit { ttl: 42 }.x_cache_status(), "HIT");
        assert_eq!(
            CacheStatus::Miss { stored: true }.header_value(),
            "outrider; fwd=miss; stored"
        );
        assert_eq!(
            CacheStatus::Miss { stored: false }.header_value(),
            "outrider; fwd=miss"
        );
        assert_eq!(
            CacheStatus::StaleWhileRevalidate { ttl: -3 }.header_value(),
            "outrider; hit; ttl=-3"
        );
        assert_eq!(
            CacheStatus::StaleWhileRevalidate { ttl: -3 }.x_cache_status(),
            "STALE"
        );
        assert_eq!(
            CacheStatus::StaleIfError {
                ttl: -30,
                fwd_status: Some(503)
            }
            .header_value(),
            "outrider; fwd=stale; fwd-status=503; ttl=-30"
        );
        assert_eq!(
            CacheStatus::Expired { stored: true }.header_value(),
            "outrider; fwd=stale; stored"
        );
        assert_eq!(
            CacheStatus::Expired { stored: true }.x_cache_status(),
            "EXPIRED"
        );
        assert_eq!(
            CacheStatus::Revalidated { stored: true }.x_cache_status(),
            "REVALIDATED"
        );
        assert_eq!(CacheStatus::Bypass.header_value(), "outrider; fwd=bypass");
        assert_eq!(
            CacheStatus::Refresh { stored: true }.header_value(),
            "outrider; fwd=request; stored"
        );
        assert_eq!(age_header_value(Duration::from_millis(2999)), "2");
    }

    #[test]
    fn freshness_follows_the_live_policy() {
        let mut e = crate::store::entry_for_tests(0);
        e.headers.clear();
        let t0 = e.stored_at;
        let at = |s: u64| t0 + Duration::from_secs(s);
        let p = RoutePolicy {
            ttl: Duration::from_secs(60),
            stale_while_revalidate: Duration::from_secs(30),
            stale_if_error: Duration::from_secs(600),
            ..route()
        };
        assert_eq!(freshness(&e, &p, t0), Freshness::Fresh);
        assert_eq!(freshness(&e, &p, at(59)), Freshness::Fresh);
        assert_eq!(freshness(&e, &p, at(60)), Freshness::StaleWhileRevalidate);
        assert_eq!(freshness(&e, &p, at(89)), Freshness::StaleWhileRevalidate);
        assert_eq!(freshness(&e, &p, at(90)), Freshness::StaleIfErrorOnly);
        assert_eq!(freshness(&e, &p, at(659)), Freshness::StaleIfErrorOnly);
        assert_eq!(freshness(&e, &p, at(660)), Freshness::Expired);
        // A clock step backwards must not make the entry older.
        assert_eq!(
            freshness(&e, &p, t0 - Duration::from_secs(5)),
            Freshness::Fresh
        );
        // Raising the TTL applies to the stored entry at once.
        let raised = RoutePolicy {
            ttl: Duration::from_secs(600),
            ..p.clone()
        };
        assert_eq!(freshness(&e, &raised, at(300)), Freshness::Fresh);
        // Stale-if-error shorter than stale-while-revalidate: SWR wins, then expired.
        let short_sie = RoutePolicy {
            stale_if_error: Duration::from_secs(10),
            ..p.clone()
        };
        assert_eq!(
            freshness(&e, &short_sie, at(85)),
            Freshness::StaleWhileRevalidate
        );
        assert_eq!(freshness(&e, &short_sie, at(90)), Freshness::Expired);
        let origin = RoutePolicy {
            respect_origin: true,
            ..p.clone()
        };
        e.ttl = Duration::from_secs(5);
        assert_eq!(
            freshness(&e, &origin, at(6)),
            Freshness::StaleWhileRevalidate
        );
    }

    #[test]
    fn retention_covers_windows_floor_and_keep() {
        let p = RoutePolicy {
            ttl: Duration::from_secs(60),
            stale_while_revalidate: Duration::from_secs(30),
            stale_if_error: Duration::from_secs(10),
            keep: Duration::from_secs(3600),
            retention_floor: Duration::from_secs(300),
            ..route()
        };
        let plain: Vec<(String, Bytes)> = vec![];
        let etag = vec![("etag".to_string(), Bytes::from_static(b"\"v\""))];
        assert_eq!(
            retention(Duration::from_secs(60), &plain, &p),
            Duration::from_secs(300)
        );
        assert_eq!(
            retention(Duration::from_secs(600), &plain, &p),
            Duration::from_secs(630)
        );
        assert_eq!(
            retention(Duration::from_secs(60), &etag, &p),
            Duration::from_secs(3900)
        );
    }
}
