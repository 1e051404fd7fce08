//! RFC 9111 freshness end to end (a route with `respect_origin` and a `heuristic`): real
//! sockets, the built binary, a fake origin that sets the response headers each test asks for.

#![allow(clippy::disallowed_types)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, SystemTime};

use support::{client, Backend, Proxy};

fn config(app: &str) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{app}", timeout: 5s }}
routes:
  - name: rfc
    match: {{ path_prefix: /rfc }}
    upstream: app
    cache: {{ ttl: 1h, respect_origin: true, heuristic: last_modified, heuristic_max: 1h, vary: match }}
  - name: strict
    match: {{ path_prefix: /strict }}
    upstream: app
    cache: {{ ttl: 1h, respect_origin: true, heuristic: none }}
  - name: cdn
    match: {{ path_prefix: /cdn }}
    upstream: app
    cache: {{ ttl: 1h, respect_origin: true, heuristic: none, cdn_cache_control: true, origin_stale: true }}
  - name: validated
    match: {{ path_prefix: /etag }}
    upstream: app
    cache: {{ ttl: 1h, respect_origin: true, heuristic: last_modified }}
  - name: client
    match: {{ path_prefix: /client }}
    upstream: app
    cache: {{ ttl: 1h, respect_origin: true, heuristic: none, client_directives: honour }}
  - name: swr-variants
    match: {{ path_prefix: /swr-variants }}
    upstream: app
    cache: {{ ttl: 1s, stale_while_revalidate: 1h, vary: match }}
  - name: variants
    match: {{ path_prefix: /variants }}
    upstream: app
    cache: {{ ttl: 1h, respect_origin: true, heuristic: none, vary: match, max_variants: 2 }}
  - name: legacy
    match: {{ path_prefix: /legacy }}
    upstream: app
    cache: {{ ttl: 1h, respect_origin: true }}
"#
    )
}

struct Got {
    status: u16,
    cache: String,
    cache_status: String,
    age: Option<u64>,
}

/// GETs `path` (under a with-headers resource) with the response headers given as a query.
async fn get(proxy: &Proxy, path: &str) -> Got {
    let resp = client().get(proxy.url(path)).send().await.unwrap();
    let h = |n: &str| {
        resp.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
    };
    Got {
        status: resp.status().as_u16(),
        cache: h("x-cache-status").unwrap_or_default(),
        cache_status: h("cache-status").unwrap_or_default(),
        age: h("age").and_then(|a| a.parse().ok()),
    }
}

/// Whether the second of two identical requests was answered from the cache.
async fn reused(proxy: &Proxy, app: &Backend, path: &str) -> bool {
    let first = get(proxy, path).await;
    assert_ne!(first.cache, "HIT", "{path}: the first request cannot hit");
    let second = get(proxy, path).await;
    let hit = second.cache == "HIT";
    let upstream = app.hits(path.split('?').next().unwrap());
    assert_eq!(upstream, if hit { 1 } else { 2 }, "{path}");
    hit
}

fn date(offset_secs: i64) -> String {
    let now = SystemTime::now();
    let at = if offset_secs >= 0 {
        now + Duration::from_secs(offset_secs as u64)
    } else {
        now - Duration::from_secs(offset_secs.unsigned_abs())
    };
    httpdate::fmt_http_date(at).replace(' ', "%20")
}

/// `cache-status: …; ttl=N` as a number.
fn ttl(got: &Got) -> i64 {
    got.cache_status
        .split("ttl=")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ttl in {:?}", got.cache_status))
}

#[tokio::test]
async fn only_origin_given_freshness_is_used() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    // RFC 9111 §4.2: without explicit freshness or a heuristic, a response is not reused.
    assert!(!reused(&proxy, &app, "/rfc/none/with-headers?x=1").await);
    assert!(!reused(&proxy, &app, "/strict/none/with-headers?x=1").await);
    // The route's `ttl` still applies to such responses when no heuristic is chosen.
    assert!(reused(&proxy, &app, "/legacy/none/with-headers?x=1").await);
    assert!(
        reused(
            &proxy,
            &app,
            "/rfc/max-age/with-headers?cache-control=max-age=60"
        )
        .await
    );
    assert!(
        reused(
            &proxy,
            &app,
            "/strict/max-age/with-headers?cache-control=max-age=60"
        )
        .await
    );
}

#[tokio::test]
async fn expires_gives_freshness_and_invalid_dates_mean_stale() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let future = format!(
        "/rfc/expires-future/with-headers?date={}&expires={}",
        date(0),
        date(600)
    );
    assert!(reused(&proxy, &app, &future).await);
    let hit = get(&proxy, &future).await;
    assert!((590..=600).contains(&ttl(&hit)), "{}", hit.cache_status);
    // §5.3: lifetime is Expires minus Date, whatever the local clock says.
    let skewed = format!(
        "/rfc/expires-skewed/with-headers?date={}&expires={}",
        date(3600),
        date(3000)
    );
    assert!(!reused(&proxy, &app, &skewed).await, "Expires before Date");
    let past = format!("/rfc/expires-past/with-headers?expires={}", date(-60));
    assert!(!reused(&proxy, &app, &past).await);
    // §5.3: an invalid Expires (such as "0") means already expired.
    for (i, bad) in ["0", "tomorrow", "Thu,%2001%20Jan%202099"]
        .iter()
        .enumerate()
    {
        let path = format!("/rfc/expires-bad-{i}/with-headers?expires={bad}");
        assert!(!reused(&proxy, &app, &path).await, "{bad}");
    }
    // max-age wins over Expires (§5.3).
    let both = format!(
        "/rfc/both/with-headers?cache-control=max-age=60&expires={}",
        date(-60)
    );
    assert!(reused(&proxy, &app, &both).await);
}

#[tokio::test]
async fn heuristic_freshness_is_a_tenth_of_the_last_modified_age_bounded() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    // Modified 1000 s ago: fresh for about 100 s.
    let recent = format!(
        "/rfc/lm-recent/with-headers?date={}&last-modified={}",
        date(0),
        date(-1000)
    );
    assert!(reused(&proxy, &app, &recent).await);
    let t = ttl(&get(&proxy, &recent).await);
    assert!((95..=100).contains(&t), "ttl {t}");
    // Modified 30 days ago: bounded by heuristic_max (1 h).
    let old = format!(
        "/rfc/lm-old/with-headers?last-modified={}",
        date(-30 * 86400)
    );
    assert!(reused(&proxy, &app, &old).await);
    let t = ttl(&get(&proxy, &old).await);
    assert!((3590..=3600).contains(&t), "ttl {t}");
    // `heuristic: none` never guesses.
    let strict = format!("/strict/lm/with-headers?last-modified={}", date(-86400));
    assert!(!reused(&proxy, &app, &strict).await);
    // §4.2.2: heuristics only for heuristically cacheable statuses.
    let created = format!(
        "/rfc/lm-201/with-headers?status=201&last-modified={}",
        date(-86400)
    );
    assert!(!reused(&proxy, &app, &created).await);
}

#[tokio::test]
async fn explicit_freshness_makes_other_statuses_storable() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    for status in [302, 404, 410, 500, 599] {
        let path =
            format!("/rfc/status-{status}/with-headers?status={status}&cache-control=max-age=60");
        assert!(reused(&proxy, &app, &path).await, "{status}");
        assert_eq!(get(&proxy, &path).await.status, status);
    }
    // The legacy route keeps its status list.
    assert!(
        !reused(
            &proxy,
            &app,
            "/legacy/s/with-headers?status=500&cache-control=max-age=60"
        )
        .await
    );
}

#[tokio::test]
async fn the_age_it_arrived_with_counts() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    // §4.2.3: an entry that arrived 40 s old is served 40 s old, with 60 s of freshness left.
    let aged = "/rfc/aged/with-headers?cache-control=max-age=100&age=40";
    assert!(reused(&proxy, &app, aged).await);
    let hit = get(&proxy, aged).await;
    assert!(
        hit.age.is_some_and(|a| (40..=42).contains(&a)),
        "{:?}",
        hit.age
    );
    assert!((58..=60).contains(&ttl(&hit)), "{}", hit.cache_status);
    // Already older than its lifetime: not reused.
    assert!(
        !reused(
            &proxy,
            &app,
            "/rfc/old/with-headers?cache-control=max-age=100&age=100"
        )
        .await
    );
    // A list means its first value (§5.1); values that are not delta-seconds are ignored.
    let listed = "/rfc/listed/with-headers?cache-control=max-age=100&age=30,%2090";
    assert!(reused(&proxy, &app, listed).await);
    assert!(get(&proxy, listed)
        .await
        .age
        .is_some_and(|a| (30..=32).contains(&a)));
    for (i, bad) in ["abc", "-7200", "7200.0"].iter().enumerate() {
        let path = format!("/rfc/age-bad-{i}/with-headers?cache-control=max-age=100&age={bad}");
        assert!(reused(&proxy, &app, &path).await, "{bad}");
    }
    // Ages of 2^31 s and beyond saturate: always stale.
    let huge = "/rfc/huge/with-headers?cache-control=max-age=100&age=99999999999999999999";
    assert!(!reused(&proxy, &app, huge).await);
}

#[tokio::test]
async fn conditional_requests_are_answered_from_a_fresh_entry() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let path = format!(
        "/rfc/cond/with-headers?cache-control=max-age=600&etag=W/\"v1\"&last-modified={}",
        date(-3600)
    );
    assert!(reused(&proxy, &app, &path).await);
    let send = |name: &'static str, value: String| {
        let url = proxy.url(&path);
        async move { client().get(url).header(name, value).send().await.unwrap() }
    };
    // RFC 9110 §13.1.2: If-None-Match uses the weak comparison; any listed tag may match.
    for value in ["\"v1\"", "W/\"v1\"", "\"v0\", W/\"v1\"", "*"] {
        let resp = send("if-none-match", value.to_string()).await;
        assert_eq!(resp.status(), 304, "{value}");
        assert_eq!(resp.headers()["etag"], "W/\"v1\"");
        assert!(resp.headers().get("content-length").is_none());
        assert!(resp.bytes().await.unwrap().is_empty());
    }
    assert_eq!(send("if-none-match", "\"v2\"".into()).await.status(), 200);
    // §13.1.3: If-Modified-Since at or after Last-Modified: not modified; before it: modified.
    let since = httpdate::fmt_http_date(SystemTime::now());
    assert_eq!(send("if-modified-since", since).await.status(), 304);
    let before = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(7200));
    assert_eq!(send("if-modified-since", before).await.status(), 200);
    assert_eq!(app.hits("/rfc/cond/with-headers"), 1, "all from the cache");
}

#[tokio::test]
async fn unsafe_requests_invalidate_what_they_change() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let path = "/rfc/doc/with-headers?cache-control=max-age=600";
    let stored = |p: &'static str| {
        let proxy = &proxy;
        async move { get(proxy, p).await.cache == "HIT" }
    };
    get(&proxy, path).await;
    assert!(stored(path).await);
    // RFC 9111 §4.4: a successful unsafe request evicts the target URI's entry.
    for method in ["POST", "PUT", "DELETE", "PATCH", "M-SEARCH"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = client().request(m, proxy.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(!stored(path).await, "{method} invalidated");
        assert!(stored(path).await, "refilled");
    }
    // ... and same-origin Location / Content-Location targets; another origin's are left.
    let other = "/rfc/other/with-headers?cache-control=max-age=600";
    get(&proxy, other).await;
    let post = |location: String| {
        let url = proxy.url(&format!("/rfc/form/with-headers?{location}"));
        async move { client().post(url).send().await.unwrap().status() }
    };
    let host = proxy
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    post(format!("content-location=http://elsewhere.test{other}")).await;
    assert!(stored(other).await, "another origin's URL is left alone");
    post(format!("location=http://{host}{other}")).await;
    assert!(!stored(other).await, "same-origin Location invalidated");
    get(&proxy, path).await;
    post(format!("content-location={path}")).await;
    assert!(!stored(path).await, "relative Content-Location invalidated");
    // A failed unsafe request changes nothing.
    get(&proxy, path).await;
    assert!(stored(path).await);
    app.set_failing(true);
    let resp = client().post(proxy.url(path)).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    app.set_failing(false);
    assert!(stored(path).await);
}

#[tokio::test]
async fn cdn_cache_control_replaces_cache_control_when_valid() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    // RFC 9213 §2.1: a valid CDN-Cache-Control is used instead of Cache-Control and Expires.
    let cases = [
        ("cdn-cache-control=max-age=600&cache-control=no-store", true),
        ("cdn-cache-control=max-age=600&expires=0", true),
        (
            "cdn-cache-control=no-store&cache-control=max-age=600",
            false,
        ),
        ("cdn-cache-control=private&cache-control=max-age=600", false),
        (
            "cdn-cache-control=max-age=0&cache-control=max-age=600",
            false,
        ),
        // Not a valid Structured Fields dictionary, or a lifetime that is not an integer:
        // ignored as a whole, so Cache-Control decides.
        (
            "cdn-cache-control=max-age=600,%20%26%26&cache-control=no-store",
            false,
        ),
        (
            "cdn-cache-control=max-age=%22600%22&cache-control=no-store",
            false,
        ),
        (
            "cdn-cache-control=max-age=%22600%22&cache-control=max-age=600",
            true,
        ),
    ];
    for (i, (query, want)) in cases.iter().enumerate() {
        let path = format!("/cdn/c{i}/with-headers?{query}");
        assert_eq!(reused(&proxy, &app, &path).await, *want, "{query}");
    }
    // Another route does not look at it.
    assert!(
        !reused(
            &proxy,
            &app,
            "/strict/cdn/with-headers?cdn-cache-control=max-age=600"
        )
        .await
    );
}

#[tokio::test]
async fn the_origin_may_give_its_own_stale_windows() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    // RFC 5861 §3: within stale-while-revalidate a stale entry is served while it is refreshed.
    let path = "/cdn/swr/with-headers?cache-control=max-age=1,%20stale-while-revalidate=600";
    get(&proxy, path).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&proxy, path).await.cache, "STALE");
    support::wait_for(
        "the background refresh",
        Duration::from_secs(10),
        || async { (app.hits("/cdn/swr/with-headers") == 2).then_some(()) },
    )
    .await;
    // §4: within stale-if-error a stale entry stands in for an upstream error.
    let path = "/cdn/sie/with-headers?cache-control=max-age=1,%20stale-if-error=600";
    get(&proxy, path).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.set_failing(true);
    let got = get(&proxy, path).await;
    assert_eq!((got.status, got.cache.as_str()), (200, "STALE"));
    // Without the directive an error is passed on (the route has no windows of its own).
    app.set_failing(false);
    let path = "/cdn/none/with-headers?cache-control=max-age=1";
    get(&proxy, path).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.set_failing(true);
    assert_eq!(get(&proxy, path).await.status, 503);
}

#[tokio::test]
async fn heuristic_freshness_covers_the_heuristically_cacheable_statuses() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let lm = date(-86400);
    // RFC 9111 §4.2.2 / RFC 9110 §15.1: these may be stored with heuristic freshness.
    for status in [404, 405, 410, 414, 501] {
        let path = format!("/rfc/h{status}/with-headers?status={status}&last-modified={lm}");
        assert!(reused(&proxy, &app, &path).await, "{status}");
    }
    for status in [403, 500, 502, 503, 599] {
        let path = format!("/rfc/h{status}/with-headers?status={status}&last-modified={lm}");
        assert!(!reused(&proxy, &app, &path).await, "{status}");
    }
    // `public` makes any status heuristically cacheable (RFC 9111 §3).
    let path =
        format!("/rfc/public/with-headers?status=599&cache-control=public&last-modified={lm}");
    assert!(reused(&proxy, &app, &path).await);
}

#[tokio::test]
async fn responses_vary_on_the_request_headers_they_name() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let path = "/rfc/vary/with-headers?cache-control=max-age=600&vary=Accept-Language,%20X-Foo";
    let send = |lang: Option<&'static str>, foo: &'static [&'static str]| {
        let url = proxy.url(path);
        async move {
            let mut req = client().get(url);
            if let Some(lang) = lang {
                req = req.header("accept-language", lang);
            }
            for f in foo {
                req = req.header("x-foo", *f);
            }
            let resp = req.send().await.unwrap();
            resp.headers()["x-cache-status"]
                .to_str()
                .unwrap()
                .to_string()
        }
    };
    // RFC 9111 §4.1: reused only for a request whose Vary-named headers match.
    assert_eq!(send(Some("de"), &["a,b"]).await, "MISS");
    assert_eq!(send(Some("de"), &["a,b"]).await, "HIT");
    // Whitespace after commas and splitting into lines do not change the value.
    assert_eq!(send(Some("de"), &["a, b"]).await, "HIT");
    assert_eq!(send(Some("de"), &["a", "b"]).await, "HIT");
    assert_eq!(send(Some("fr"), &["a,b"]).await, "MISS");
    // An absent header is not an empty one.
    assert_eq!(send(None, &["a,b"]).await, "MISS");
    assert_eq!(send(None, &["a,b"]).await, "HIT");
    assert_eq!(send(Some(""), &["a,b"]).await, "MISS");
    // Vary: * never matches: not stored.
    let star = "/rfc/star/with-headers?cache-control=max-age=600&vary=*";
    assert!(!reused(&proxy, &app, star).await);
}

#[tokio::test]
async fn dates_are_parsed_leniently_only_where_unambiguous() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    // Names in another case, and a weekday that disagrees with the date, are still the date.
    for (i, fresh) in [
        "THU,%2018%20AUG%202050%2002:01:18%20gMT",
        "Mon%20Aug%2018%2002:01:18%202050",
    ]
    .iter()
    .enumerate()
    {
        let path = format!("/rfc/lenient-{i}/with-headers?expires={fresh}");
        assert!(reused(&proxy, &app, &path).await, "{fresh}");
    }
    // Another zone, a missing comma or a two-digit year in IMF form: invalid, so stale.
    for (i, bad) in [
        "Thu,%2018%20Aug%202050%2002:01:18%20UTC",
        "Thu%2018%20Aug%202050%2002:01:18%20GMT",
        "Thu,%2018%20Aug%2050%2002:01:18%20GMT",
    ]
    .iter()
    .enumerate()
    {
        let path = format!("/rfc/strict-{i}/with-headers?expires={bad}");
        assert!(!reused(&proxy, &app, &path).await, "{bad}");
    }
}

#[tokio::test]
async fn ranges_are_answered_from_a_complete_stored_response() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let path = "/rfc/range/with-headers?cache-control=max-age=600";
    let full = client().get(proxy.url(path)).send().await.unwrap();
    let full = full.bytes().await.unwrap();
    let len = full.len();
    let ranged = |range: String| {
        let url = proxy.url(path);
        async move {
            let resp = client()
                .get(url)
                .header("range", range)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let content_range = resp
                .headers()
                .get("content-range")
                .map(|v| v.to_str().unwrap().to_string());
            (status, content_range, resp.bytes().await.unwrap())
        }
    };
    // RFC 9110 §14.1.2: first-last, first- and -suffix forms.
    let (status, cr, body) = ranged("bytes=0-9".into()).await;
    assert_eq!(
        (status, cr.as_deref()),
        (206, Some(&*format!("bytes 0-9/{len}")))
    );
    assert_eq!(body, full.slice(0..10));
    let (status, _, body) = ranged("bytes=5-".into()).await;
    assert_eq!((status, body), (206, full.slice(5..)));
    let (status, cr, body) = ranged("bytes=-5".into()).await;
    assert_eq!(cr, Some(format!("bytes {}-{}/{len}", len - 5, len - 1)));
    assert_eq!((status, body), (206, full.slice(len - 5..)));
    // §15.5.17: nothing of it is there.
    let (status, cr, _) = ranged(format!("bytes={}-", len + 10)).await;
    assert_eq!((status, cr), (416, Some(format!("bytes */{len}"))));
    // Several ranges may be answered with the whole response.
    let (status, _, body) = ranged("bytes=0-1,4-5".into()).await;
    assert_eq!((status, body), (200, full));
    assert_eq!(app.hits("/rfc/range/with-headers"), 1, "all from the cache");
}

#[tokio::test]
async fn no_cache_responses_are_stored_and_revalidated_on_every_use() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    // RFC 9111 §5.2.2.4: stored, but never used without a successful revalidation.
    let first = get(&proxy, "/etag/nc?no-cache").await;
    assert_eq!((first.status, first.cache.as_str()), (200, "MISS"));
    for round in 2..=3 {
        let again = get(&proxy, "/etag/nc?no-cache").await;
        assert_eq!(
            (again.status, again.cache.as_str()),
            (200, "REVALIDATED"),
            "{}",
            again.cache_status
        );
        assert_eq!(
            app.hits("/etag/nc"),
            round,
            "one conditional request per use"
        );
    }
    // Without a validator there is nothing to revalidate with: not stored.
    assert!(!reused(&proxy, &app, "/rfc/nc/with-headers?cache-control=no-cache").await);
}

/// GETs `path` with `Accept-Language: lang`: the cache status and the Accept-Language the app
/// saw when it made the answer (its echo).
async fn get_lang(proxy: &Proxy, path: &str, lang: &str) -> (String, String) {
    let resp = client()
        .get(proxy.url(path))
        .header("accept-language", lang)
        .send()
        .await
        .unwrap();
    let status = resp.headers()["x-cache-status"]
        .to_str()
        .unwrap()
        .to_string();
    let echo: serde_json::Value = resp.json().await.unwrap();
    let made_for = echo["headers"]["accept-language"]
        .as_str()
        .unwrap()
        .to_string();
    (status, made_for)
}

/// GETs `path` with a request `Cache-Control`; the status and `x-cache-status`.
async fn get_cc(proxy: &Proxy, path: &str, cc: &str) -> (u16, String) {
    let resp = client()
        .get(proxy.url(path))
        .header("cache-control", cc)
        .send()
        .await
        .unwrap();
    let cache = resp
        .headers()
        .get("x-cache-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (resp.status().as_u16(), cache)
}

#[tokio::test]
async fn request_directives_narrow_or_widen_what_is_reused_where_honoured() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    // Stored 100 s old with 3500 s of freshness left (the origin's `Age`, so no clock games).
    let path = "/client/aged/with-headers?cache-control=max-age=3600&age=100";
    let upstream = || app.hits("/client/aged/with-headers");
    assert!(reused(&proxy, &app, path).await);
    // §5.2.1.1 max-age: older than the client accepts: fetched again (and stored anew).
    assert_eq!(get_cc(&proxy, path, "max-age=1000").await.1, "HIT");
    assert_ne!(get_cc(&proxy, path, "max-age=50").await.1, "HIT");
    assert_eq!(upstream(), 2);
    // §5.2.1.3 min-fresh: less freshness left than asked for: fetched again.
    assert_eq!(get_cc(&proxy, path, "min-fresh=60").await.1, "HIT");
    assert_ne!(get_cc(&proxy, path, "min-fresh=3550").await.1, "HIT");
    assert_eq!(upstream(), 3);

    // §5.2.1.7 only-if-cached: a stored response answers; nothing stored is 504, and the
    // upstream is never asked.
    assert_eq!(
        get_cc(&proxy, path, "only-if-cached").await,
        (200, "HIT".into())
    );
    let absent = "/client/absent/with-headers?cache-control=max-age=3600";
    assert_eq!(get_cc(&proxy, absent, "only-if-cached").await.0, 504);
    assert_eq!(app.hits("/client/absent/with-headers"), 0);

    // §5.2.1.2 max-stale: a stale response is accepted within the client's bound, unless the
    // origin forbids serving it stale.
    // A `Date` in the future: no apparent age, so one second of freshness whatever the clock's
    // fraction; one GET stores each.
    let stale = format!(
        "/client/stale/with-headers?cache-control=max-age=1&date={}",
        date(30)
    );
    let strict = format!(
        "/client/strict/with-headers?cache-control=max-age=1,%20must-revalidate&date={}",
        date(30)
    );
    let (stale, strict) = (stale.as_str(), strict.as_str());
    for p in [stale, strict] {
        assert_eq!(get_cc(&proxy, p, "max-age=9999").await.0, 200);
    }
    // Waiting only makes the entries older; nothing here depends on how much longer it takes.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get_cc(&proxy, stale, "max-stale=3600").await.1, "HIT");
    assert_eq!(get_cc(&proxy, stale, "max-stale").await.1, "HIT");
    assert_eq!(app.hits("/client/stale/with-headers"), 1);
    assert_ne!(get_cc(&proxy, strict, "max-stale").await.1, "HIT");
    assert_eq!(app.hits("/client/strict/with-headers"), 2);
    // A client max-age without max-stale wants no stale answer (§5.2.1.1).
    assert_ne!(get_cc(&proxy, stale, "max-age=3600").await.1, "HIT");
    assert_eq!(app.hits("/client/stale/with-headers"), 2);
    // only-if-cached with nothing usable (stale, no max-stale): 504, upstream not asked.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get_cc(&proxy, stale, "only-if-cached").await.0, 504);
    assert_eq!(app.hits("/client/stale/with-headers"), 2);
    // Nor when the request would otherwise bypass the cache or refetch.
    for cc in ["only-if-cached, no-store", "only-if-cached"] {
        let resp = client()
            .get(proxy.url(absent))
            .header("cache-control", cc)
            .header("authorization", "Bearer x")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 504, "{cc}");
    }
    assert_eq!(app.hits("/client/absent/with-headers"), 0);

    // Where not honoured (the default), the client's max-age=0 cannot force a refetch of a
    // shared entry; only-if-cached still never reaches the upstream.
    let shared = "/strict/shared/with-headers?cache-control=max-age=3600";
    assert!(reused(&proxy, &app, shared).await);
    assert_eq!(get_cc(&proxy, shared, "max-age=0").await.1, "HIT");
    assert_eq!(get_cc(&proxy, shared, "min-fresh=99999").await.1, "HIT");
    assert_eq!(app.hits("/strict/shared/with-headers"), 1);
    let missing = "/strict/missing/with-headers?cache-control=max-age=3600";
    assert_eq!(get_cc(&proxy, missing, "only-if-cached").await.0, 504);
    assert_eq!(app.hits("/strict/missing/with-headers"), 0);
}

#[tokio::test]
async fn several_variants_of_a_url_are_stored_up_to_the_routes_bound() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let path = "/variants/v/with-headers?cache-control=max-age=600&vary=Accept-Language";
    // The cache status, after checking that the answer is the variant of this request's own
    // Accept-Language (as the app saw it when it made the variant).
    let send = |lang: &'static str| {
        let proxy = &proxy;
        async move {
            let (status, made_for) = get_lang(proxy, path, lang).await;
            let set = |l: &str| {
                let mut v: Vec<String> = l
                    .split(',')
                    .map(|m| m.replace(' ', "").to_ascii_lowercase())
                    .collect();
                v.sort();
                v
            };
            assert_eq!(
                set(&made_for),
                set(lang),
                "{lang}: another variant's answer"
            );
            status
        }
    };
    let upstream = || app.hits("/variants/v/with-headers");
    // RFC 9111 §4.1: each variant is stored; a later one does not replace an earlier one.
    assert_eq!(send("de").await, "MISS");
    assert_eq!(send("fr").await, "MISS");
    assert_eq!(send("de").await, "HIT");
    assert_eq!(send("fr").await, "HIT");
    assert_eq!(upstream(), 2);
    // Accept-Language is a set of ranges: case, spaces and order do not make a new variant.
    assert_eq!(send("DE").await, "HIT");
    assert_eq!(send("en;q=0.5,fr").await, "MISS");
    assert_eq!(upstream(), 3);
    assert_eq!(send("FR , en; q=0.5").await, "HIT");
    // At most `max_variants` (2) per URL stay reachable: the oldest, `de`, is gone, and
    // storing it again drops the then oldest, `fr`.
    assert_eq!(send("fr").await, "HIT");
    assert_eq!(send("de").await, "MISS");
    assert_eq!(upstream(), 4);
    assert_eq!(send("de").await, "HIT");
    assert_eq!(send("en;q=0.5,fr").await, "HIT");
    assert_eq!(send("fr").await, "MISS");
    assert_eq!(upstream(), 5);
    // An unsafe request to the URL invalidates every variant (§4.4).
    let status = client()
        .post(proxy.url(path))
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
    assert_eq!(send("fr").await, "MISS");
    assert_eq!(send("de").await, "MISS");
    assert_eq!(send("de").await, "HIT");
}

#[tokio::test]
async fn the_origins_date_reaches_the_client_on_a_miss_and_a_hit() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    // RFC 9110 §6.6.1: a proxy forwards the origin's Date; a cache serves the stored one.
    let sent = date(-30);
    let path = format!("/rfc/dated/with-headers?cache-control=max-age=600&date={sent}");
    let mut dates = Vec::new();
    for expected in ["MISS", "HIT"] {
        let resp = client().get(proxy.url(&path)).send().await.unwrap();
        assert_eq!(resp.headers()["x-cache-status"], expected);
        let all: Vec<String> = resp
            .headers()
            .get_all("date")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        dates.push(all);
    }
    let want = vec![sent.replace("%20", " ")];
    assert_eq!(dates, [want.clone(), want]);
    // Answers without a Date of their own (outrider's errors) still get one.
    let resp = client()
        .get(proxy.url("/client/nothing/with-headers"))
        .header("cache-control", "only-if-cached")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    let own = resp.headers()["date"].to_str().unwrap();
    assert!(httpdate::parse_http_date(own).is_ok(), "{own}");
}

#[tokio::test]
async fn a_background_refresh_keeps_its_variant_to_itself() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let path = "/swr-variants/v/with-headers?vary=Accept-Language";
    let send = |lang: &'static str| get_lang(&proxy, path, lang);
    assert_eq!(send("fr").await.0, "MISS");
    assert_eq!(send("de").await.0, "MISS");
    // Stale: `de` is answered at once and refreshed in the background, with de's headers.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(send("de").await, ("STALE".to_string(), "de".to_string()));
    support::wait_for(
        "the background refresh",
        Duration::from_secs(20),
        || async { (app.hits("/swr-variants/v/with-headers") >= 3).then_some(()) },
    )
    .await;
    // The refreshed entry is de's variant only, and fr's is still found: each language gets
    // its own answer, never the other's.
    for _ in 0..3 {
        for lang in ["fr", "de"] {
            let (_, made_for) = send(lang).await;
            assert_eq!(made_for, lang);
        }
    }
}
