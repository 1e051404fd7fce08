//! Scale-out end to end: outrider replicas sharing a real 3-master Redis Cluster, purges that
//! reach every replica over pub/sub, and Redis over TLS with a CA the test generates.

#![allow(clippy::disallowed_types)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{
    client, free_port, metric_value, redis_cli as cli, wait_for, wait_redis_port as wait_tcp,
    Backend, Proxy,
};

/// A port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let p = free_port();
        if p < 55_000 && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

/// Three masters, no replicas, on loopback; every process is killed on drop.
struct Cluster {
    nodes: Vec<(u16, Option<Child>)>,
    /// redis-cli's TLS arguments when the cluster speaks only TLS (clients and bus).
    tls: Vec<String>,
    /// Nodes stopped with SIGSTOP: they would never answer redis-cli.
    frozen: Vec<usize>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(None)
    }

    /// With a PKI: TLS only, on the client ports and the cluster bus, client certificates required.
    fn start_with(pki: Option<&Pki>) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls: Vec<String> = pki.map(Pki::cli_args).unwrap_or_default();
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let port = cluster_port();
            let mut server = Command::new("redis-server");
            match pki {
                Some(pki) => {
                    server
                        .args(["--port", "0", "--tls-port", &port.to_string()])
                        .args(["--tls-cluster", "yes", "--tls-auth-clients", "yes"])
                        .arg("--tls-cert-file")
                        .arg(pki.path("server.pem"))
                        .arg("--tls-key-file")
                        .arg(pki.path("server-key.pem"))
                        .arg("--tls-ca-cert-file")
                        .arg(pki.path("ca.pem"));
                }
                None => {
                    server.args(["--port", &port.to_string()]);
                }
            }
            let child = server
                .args(["--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(dir.path().join(format!("nodes-{port}.conf")))
                // A dead master is noticed quickly, and the others keep serving their slots.
                .args(["--cluster-node-timeout", "2000"])
                .args(["--cluster-require-full-coverage", "no"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed");
            nodes.push((port, Some(child)));
        }
        for (port, _) in &nodes {
            wait_tcp(*port);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .args(&tls)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for (port, _) in &nodes {
            while !tls_cli(*port, &tls, &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Cluster {
            nodes,
            tls,
            frozen: Vec::new(),
            _dir: dir,
        }
    }

    /// YAML list of seed nodes.
    fn seeds(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|(p, _)| {
                let scheme = if self.tls.is_empty() {
                    "redis"
                } else {
                    "rediss"
                };
                format!("\"{scheme}://127.0.0.1:{p}\"")
            })
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// Like [`Cluster::seeds`], with node `last` at the end of the list (a replica subscribes
    /// on the first seed that works).
    fn seeds_last(&self, last: usize) -> String {
        let mut order: Vec<usize> = (0..self.nodes.len()).filter(|&i| i != last).collect();
        order.push(last);
        let scheme = if self.tls.is_empty() {
            "redis"
        } else {
            "rediss"
        };
        let urls: Vec<String> = order
            .iter()
            .map(|&i| format!("\"{scheme}://127.0.0.1:{}\"", self.nodes[i].0))
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// The index of the master that owns `key`'s slot, from `CLUSTER NODES`.
    fn owner_of(&self, key: &str) -> usize {
        let port = self.nodes[0].0;
        let slot: u16 = tls_cli(port, &self.tls, &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT");
        for line in tls_cli(port, &self.tls, &["CLUSTER", "NODES"]).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") {
                continue;
            }
            let owns = fields[8..].iter().any(|range| {
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                matches!((first.parse::<u16>(), last.parse::<u16>()), (Ok(f), Ok(l)) if f <= slot && slot <= l)
            });
            let node_port = fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| p.parse::<u16>().ok());
            if owns {
                if let Some(i) = self.nodes.iter().position(|(p, _)| Some(*p) == node_port) {
                    return i;
                }
            }
        }
        panic!("no master owns slot {slot} of {key}");
    }

    /// Keys under `prefix` on each live node.
    fn keys_per_node(&self, prefix: &str) -> Vec<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, (_, c))| c.is_some() && !self.frozen.contains(i))
            .map(|(_, node)| node)
            .map(|(p, _)| {
                tls_cli(
                    *p,
                    &self.tls,
                    &["--scan", "--pattern", &format!("{prefix}*")],
                )
                .lines()
                .filter(|l| !l.is_empty())
                .count()
            })
            .collect()
    }

    /// Stops node `i` without closing its sockets (SIGSTOP): a hung or black-holed master, whose
    /// commands time out instead of failing at once.
    fn freeze(&mut self, i: usize) {
        let pid = self.nodes[i].1.as_ref().expect("node running").id();
        let status = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .expect("kill -STOP");
        assert!(status.success());
        self.frozen.push(i);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].1.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// redis-cli against one node, over TLS when `tls` has arguments.
fn tls_cli(port: u16, tls: &[String], args: &[&str]) -> String {
    if tls.is_empty() {
        return cli(port, args);
    }
    let out = Command::new("redis-cli")
        .args(tls)
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// The Redis timeout is generous: on a loaded machine a GET may be slow, and a timeout would turn
/// an expected HIT into a MISS. Nothing here waits for it: a killed node refuses connections at
/// once, so its failures are immediate.
fn config(app: &str, redis: &str, memory: &str) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{app}", timeout: 5s }}
cache:
  memory: {{ max_size: {memory} }}
  redis: {{ {redis}, timeout: 2s }}
routes:
  - name: items
    match: {{ path_prefix: /echo/items, methods: [GET, HEAD, PUT] }}
    upstream: app
    cache: {{ ttl: 5m }}
  - name: rest
    match: {{ path_prefix: / }}
    upstream: app
"#
    )
}

async fn get(proxy: &Proxy, path: &str) -> (u16, String) {
    // Replicas behind one Service are reached under one Host (part of the cache key).
    let resp = client()
        .get(proxy.url(path))
        .header("host", "api.internal")
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let cache = resp
        .headers()
        .get("x-cache-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, cache)
}

/// `POST /cache/purge` of every `/echo/items/` entry; the report.
async fn purge_items(proxy: &Proxy) -> serde_json::Value {
    let purge = client()
        .post(proxy.admin("/cache/purge"))
        .json(&serde_json::json!({ "path_prefix": "/echo/items/" }))
        .send()
        .await
        .unwrap();
    assert_eq!(purge.status(), 200);
    purge.json().await.unwrap()
}

async fn wait_redis_up(proxy: &Proxy) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.admin_json("/ready").await["checks"]["redis"]["status"] != "up" {
        assert!(
            Instant::now() < deadline,
            "redis not up; log:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn wait_subscribed(proxy: &Proxy) {
    support::metric_eventually(proxy, "outrider_cache_invalidation_subscribed", &[], 1.0).await;
}

async fn applied(proxy: &Proxy) -> f64 {
    metric_value(
        &proxy.metrics().await,
        "outrider_cache_invalidations_total",
        &["result=\"applied\""],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_shares_entries_and_purges_reach_the_other_replica() {
    let cluster = Cluster::start();
    let app = Backend::start("app").await;
    let redis = format!("cluster_nodes: {}", cluster.seeds());
    let a = Proxy::start(&config(&app.url(), &redis, "64MiB")).await;
    let b = Proxy::start(&config(&app.url(), &redis, "64MiB")).await;
    wait_redis_up(&a).await;
    wait_redis_up(&b).await;
    let paths: Vec<String> = (0..12).map(|i| format!("/echo/items/k{i}")).collect();
    for p in &paths {
        assert_eq!(get(&a, p).await, (200, "MISS".into()), "{p} on A");
    }
    // Writes to Redis are in the background: wait until all 12 are in the cluster.
    let spread = wait_for(
        "entries in the cluster",
        Duration::from_secs(10),
        || async {
            let per_node = cluster.keys_per_node("outrider:");
            (per_node.iter().sum::<usize>() == paths.len()).then_some(per_node)
        },
    )
    .await;
    assert!(
        spread.iter().filter(|n| **n > 0).count() >= 2,
        "keys spread over the masters: {spread:?}"
    );
    for p in &paths {
        assert_eq!(get(&b, p).await, (200, "HIT".into()), "{p} on B from L2");
        assert_eq!(app.hits(p), 1);
    }

    // Purge on A: every master is scanned, and B's L1 copies go too.
    wait_subscribed(&b).await;
    let before = applied(&b).await;
    let report = purge_items(&a).await;
    assert_eq!(report["purged"]["l2"], 12, "{report}");
    assert_eq!(report["purged"]["broadcast"], true, "{report}");
    assert_eq!(cluster.keys_per_node("outrider:").iter().sum::<usize>(), 0);
    wait_for("B applies the purge", Duration::from_secs(5), || async {
        (applied(&b).await > before).then_some(())
    })
    .await;
    // The L1 walk follows the message on a blocking thread: wait for its result.
    support::metric_eventually(&b, "outrider_cache_l1_entries", &[], 0.0).await;
    for p in &paths {
        assert_eq!(
            get(&b, p).await,
            (200, "MISS".into()),
            "{p} on B after purge"
        );
    }
    let m = b.metrics().await;
    assert_eq!(
        metric_value(&m, "outrider_cache_invalidation_lag_seconds_count", &[]),
        Some(1.0)
    );
    // A skipped its own message: it purged locally already.
    assert_eq!(applied(&a).await, 0.0);
    let ready = a.admin_json("/ready").await;
    assert_eq!(
        ready["checks"]["redis"]["invalidation"], "subscribed",
        "{ready}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_cluster_node_under_load_fails_no_request() {
    let mut cluster = Cluster::start();
    let app = Backend::start("app").await;
    let redis = format!("cluster_nodes: {}", cluster.seeds());
    // L1 off: every hit comes from the cluster, so the dead node is on the path.
    let proxy = Arc::new(Proxy::start(&config(&app.url(), &redis, "0")).await);
    wait_redis_up(&proxy).await;
    let paths: Vec<String> = (0..20).map(|i| format!("/echo/items/load{i}")).collect();
    for p in &paths {
        assert_eq!(get(&proxy, p).await.0, 200);
    }
    wait_for(
        "entries in the cluster",
        Duration::from_secs(10),
        || async {
            (cluster.keys_per_node("outrider:").iter().sum::<usize>() == paths.len()).then_some(())
        },
    )
    .await;

    let failed = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let total = 500;
    let mut workers = Vec::new();
    for w in 0..10 {
        let (proxy, paths) = (proxy.clone(), paths.clone());
        let (failed, sent) = (failed.clone(), sent.clone());
        workers.push(tokio::spawn(async move {
            for i in 0..total / 10 {
                let p = &paths[(w * 7 + i) % paths.len()];
                let resp = client()
                    .get(proxy.url(p))
                    .header("host", "api.internal")
                    .send()
                    .await;
                let ok = matches!(resp, Ok(r) if r.status() == 200);
                if !ok {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    wait_for("a fifth of the load", Duration::from_secs(30), || async {
        (sent.load(Ordering::SeqCst) >= total / 5).then_some(())
    })
    .await;
    cluster.kill(1);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(sent.load(Ordering::SeqCst), total);
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no request may fail");
    // The dead master's breaker is open, by name; the other masters still serve their keys
    // from L2 (L1 is off): a full round over the keys hits exactly the ones that survive.
    let dead = format!("127.0.0.1:{}", cluster.nodes[1].0);
    let ready = proxy.admin_json("/ready").await;
    let reason = ready["checks"]["redis"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains(&dead), "{ready}");
    let surviving = cluster.keys_per_node("outrider:").iter().sum::<usize>();
    assert!(surviving > 0 && surviving < paths.len(), "{surviving}");
    let l2_hits = |m: &str| {
        metric_value(
            m,
            "outrider_cache_requests_total",
            &["route=\"items\"", "tier=\"l2\"", "outcome=\"hit\""],
        )
        .unwrap_or(0.0)
    };
    wait_for(
        "the surviving keys hit L2",
        Duration::from_secs(30),
        || async {
            let before = l2_hits(&proxy.metrics().await);
            for p in &paths {
                assert_eq!(get(&proxy, p).await.0, 200);
            }
            let round = l2_hits(&proxy.metrics().await) - before;
            (round as usize == surviving).then_some(())
        },
    )
    .await;
}

/// A dead master, the very one that owns the purge channel's slot: a purge still clears the
/// other masters, says which one failed, and still reaches the other replica (any node forwards a
/// PUBLISH to the whole cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_with_a_killed_master_clears_the_others_and_still_reaches_replicas() {
    purge_with_a_dead_master(Outage::Killed).await;
}

/// The same with a hung master (its connections stay open, its commands time out): the cluster
/// client cannot tell it is gone, so the broadcast must be retried on another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_with_a_hung_master_clears_the_others_and_still_reaches_replicas() {
    purge_with_a_dead_master(Outage::Hung).await;
}

enum Outage {
    Killed,
    Hung,
}

async fn purge_with_a_dead_master(outage: Outage) {
    let mut cluster = Cluster::start();
    let dead = cluster.owner_of("outrider:invalidate");
    let app = Backend::start("app").await;
    let a = Proxy::start(&config(
        &app.url(),
        &format!("cluster_nodes: {}", cluster.seeds()),
        "64MiB",
    ))
    .await;
    // B subscribes on a seed that stays up: its subscription must not be what is tested (a
    // resubscribing replica clears its whole L1).
    let b = Proxy::start(&config(
        &app.url(),
        &format!("cluster_nodes: {}", cluster.seeds_last(dead)),
        "64MiB",
    ))
    .await;
    for p in [&a, &b] {
        wait_redis_up(p).await;
        wait_subscribed(p).await;
    }
    let paths: Vec<String> = (0..12).map(|i| format!("/echo/items/p{i}")).collect();
    let keep = "/echo/items/keep";
    for p in paths.iter().map(String::as_str).chain([keep]) {
        assert_eq!(get(&a, p).await, (200, "MISS".into()), "{p} on A");
    }
    let purged_prefix = "outrider:v1:items:/echo/items/p";
    let per_node = wait_for(
        "entries in the cluster",
        Duration::from_secs(10),
        || async {
            let all = cluster.keys_per_node("outrider:").iter().sum::<usize>();
            (all == paths.len() + 1).then(|| cluster.keys_per_node(purged_prefix))
        },
    )
    .await;
    let on_survivors: usize = (0..3).filter(|&i| i != dead).map(|i| per_node[i]).sum();
    assert!(
        on_survivors > 0 && per_node[dead] > 0,
        "keys on the dead master and on others: {per_node:?}"
    );
    for p in paths.iter().map(String::as_str).chain([keep]) {
        assert_eq!(get(&b, p).await, (200, "HIT".into()), "{p} on B from L2");
    }

    match outage {
        Outage::Killed => cluster.kill(dead),
        Outage::Hung => cluster.freeze(dead),
    }
    let before = applied(&b).await;
    let purge = client()
        .post(a.admin("/cache/purge"))
        .json(&serde_json::json!({ "path_prefix": "/echo/items/p" }))
        .send()
        .await
        .unwrap();
    assert_eq!(purge.status(), 200);
    let report: serde_json::Value = purge.json().await.unwrap();
    let dead_addr = format!("127.0.0.1:{}", cluster.nodes[dead].0);
    assert_eq!(
        report["purged"]["l2_failed_nodes"],
        serde_json::json!([dead_addr]),
        "{report}"
    );
    assert_eq!(report["purged"]["l2"], on_survivors, "{report}");
    let error = report["purged"]["l2_error"].as_str().unwrap_or_default();
    assert!(error.contains("1 of 3 masters"), "{report}");
    assert_eq!(report["purged"]["broadcast"], true, "{report}");
    assert!(a.log().contains(&dead_addr), "the log names the master");
    assert_eq!(
        cluster.keys_per_node(purged_prefix).iter().sum::<usize>(),
        0,
        "the surviving masters are purged"
    );

    // B heard it although the channel's master is dead, and applied the scope, not a restart.
    wait_for("B applies the purge", Duration::from_secs(10), || async {
        (applied(&b).await > before).then_some(())
    })
    .await;
    // The L1 walk follows the message on a blocking thread: wait for its result.
    support::metric_eventually(&b, "outrider_cache_l1_entries", &[], 1.0).await;
    for p in &paths {
        assert_eq!(get(&b, p).await.1, "MISS", "{p} on B after the purge");
    }
    assert_eq!(get(&b, keep).await, (200, "HIT".into()), "B kept the rest");
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: a leaf named like its issuer looks self-signed to OpenSSL.
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "outrider test CA");
        let ca_key = KeyPair::generate().unwrap();
        write("ca.pem", ca_params.self_signed(&ca_key).unwrap().pem());
        let issuer = Issuer::new(ca_params, ca_key);
        for (name, sans) in [
            ("server", vec!["127.0.0.1", "localhost"]),
            ("client", vec!["outrider"]),
        ] {
            let mut params =
                CertificateParams::new(sans.into_iter().map(String::from).collect::<Vec<_>>())
                    .unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            write(
                &format!("{name}.pem"),
                params.signed_by(&key, &issuer).unwrap().pem(),
            );
            write(&format!("{name}-key.pem"), key.serialize_pem());
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// redis-cli's arguments to speak TLS with the client certificate.
    fn cli_args(&self) -> Vec<String> {
        let path = |n: &str| self.path(n).display().to_string();
        vec![
            "--tls".into(),
            "--cacert".into(),
            path("ca.pem"),
            "--cert".into(),
            path("client.pem"),
            "--key".into(),
            path("client-key.pem"),
        ]
    }
}

/// redis-server with TLS only, requiring client certificates from the PKI's CA.
struct TlsRedis {
    port: u16,
    child: Child,
}

impl TlsRedis {
    fn start(pki: &Pki, dir: &Path) -> TlsRedis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--tls-cert-file")
            .arg(pki.path("server.pem"))
            .arg("--tls-key-file")
            .arg(pki.path("server-key.pem"))
            .arg("--tls-ca-cert-file")
            .arg(pki.path("ca.pem"))
            .args(["--tls-auth-clients", "yes"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (with TLS)");
        wait_tcp(port);
        TlsRedis { port, child }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_redis(port: u16, pki: &Pki, ca: &Path) -> String {
    format!(
        r#"url: "rediss://127.0.0.1:{port}", tls: {{ ca_file: "{}", cert_file: "{}", key_file: "{}" }}"#,
        ca.display(),
        pki.path("client.pem").display(),
        pki.path("client-key.pem").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_redis_with_private_ca_is_shared_and_a_wrong_ca_degrades() {
    let pki = Pki::new();
    let other = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let server = TlsRedis::start(&pki, data.path());
    let app = Backend::start("app").await;
    let good = tls_redis(server.port, &pki, &pki.path("ca.pem"));
    let a = Proxy::start(&config(&app.url(), &good, "64MiB")).await;
    let b = Proxy::start(&config(&app.url(), &good, "64MiB")).await;
    wait_redis_up(&a).await;
    wait_redis_up(&b).await;
    assert_eq!(get(&a, "/echo/items/tls").await, (200, "MISS".into()));
    // The write to Redis is in the background: wait until the entry is there (a failed SET
    // would be timed too, so the duration count does not say it was stored).
    let cli_tls = pki.cli_args();
    wait_for("A's write to Redis", Duration::from_secs(10), || async {
        let keys = tls_cli(
            server.port,
            &cli_tls,
            &["--scan", "--pattern", "outrider:*"],
        );
        (keys.lines().filter(|l| !l.is_empty()).count() == 1).then_some(())
    })
    .await;
    assert_eq!(get(&b, "/echo/items/tls").await, (200, "HIT".into()));
    assert_eq!(app.hits("/echo/items/tls"), 1);

    // A CA that did not sign the server's certificate: startup warns, the cache degrades,
    // requests are served by the upstream.
    let wrong = Proxy::start_with_unusable_redis(&config(
        &app.url(),
        &tls_redis(server.port, &pki, &other.path("ca.pem")),
        "64MiB",
    ))
    .await;
    for _ in 0..3 {
        assert_eq!(get(&wrong, "/echo/items/wrong-ca").await.0, 200);
    }
    let ready = wrong.admin_json("/ready").await;
    assert_eq!(ready["checks"]["redis"]["status"], "degraded", "{ready}");
    // "degraded" holds from the start ("connecting"); the reason says why only once the TLS
    // handshake has failed.
    wait_for(
        "/ready to name the TLS failure",
        Duration::from_secs(10),
        || async {
            let ready = wrong.admin_json("/ready").await;
            let reason = ready["checks"]["redis"]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            reason.contains("TLS handshake failed").then_some(())
        },
    )
    .await;
    wait_for("a clear TLS warning", Duration::from_secs(10), || async {
        wrong
            .log()
            .contains("check cache.redis.tls.ca_file")
            .then_some(())
    })
    .await;
    assert!(app.hits("/echo/items/wrong-ca") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_without_the_channel_still_clear_redis_and_a_resubscribed_replica_starts_over() {
    let redis = support::Redis::start();
    let app = Backend::start("app").await;
    let url = format!("url: \"{}\"", redis.url());
    let a = Proxy::start(&config(&app.url(), &url, "64MiB")).await;
    let b = Proxy::start(&config(&app.url(), &url, "64MiB")).await;
    for p in [&a, &b] {
        wait_redis_up(p).await;
        wait_subscribed(p).await;
    }
    assert_eq!(get(&a, "/echo/items/p").await, (200, "MISS".into()));
    wait_for("A's write", Duration::from_secs(10), || async {
        (!redis
            .cli(&["--scan", "--pattern", "outrider:*"])
            .trim()
            .is_empty())
        .then_some(())
    })
    .await;
    assert_eq!(get(&b, "/echo/items/p").await, (200, "HIT".into()));

    // Take pub/sub away (ACL: no channels; the subscribers are disconnected); keys still work.
    redis.cli(&["ACL", "SETUSER", "default", "resetchannels"]);
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    support::metric_eventually(&b, "outrider_cache_invalidation_subscribed", &[], 0.0).await;
    let ready = b.admin_json("/ready").await;
    assert_eq!(ready["checks"]["redis"]["invalidation"], "down", "{ready}");
    let report = purge_items(&a).await;
    assert_eq!(report["purged"]["l2"], 1, "{report}");
    assert_eq!(report["purged"]["l1"], 1, "{report}");
    assert_eq!(report["purged"]["broadcast"], false, "{report}");
    assert_eq!(
        metric_value(
            &a.metrics().await,
            "outrider_cache_invalidations_total",
            &["result=\"publish_failed\""]
        ),
        Some(1.0)
    );
    // B's L1 copy outlives the purge while it cannot hear it (documented).
    assert_eq!(get(&b, "/echo/items/p").await, (200, "HIT".into()));

    // Back: B resubscribes and starts its L1 over, so the purge is not missed for long.
    redis.cli(&["ACL", "SETUSER", "default", "allchannels"]);
    wait_subscribed(&b).await;
    support::metric_eventually(&b, "outrider_cache_l1_entries", &[], 0.0).await;
    assert_eq!(get(&b, "/echo/items/p").await, (200, "MISS".into()));
}

/// A Redis Cluster that speaks only TLS (`rediss://` seeds, client certificates required, the
/// bus over TLS too) is shared by two replicas like a plain one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_is_shared_by_replicas() {
    let pki = Pki::new();
    let cluster = Cluster::start_with(Some(&pki));
    let app = Backend::start("app").await;
    let redis = format!(
        r#"cluster_nodes: {}, tls: {{ ca_file: "{}", cert_file: "{}", key_file: "{}" }}"#,
        cluster.seeds(),
        pki.path("ca.pem").display(),
        pki.path("client.pem").display(),
        pki.path("client-key.pem").display()
    );
    let a = Proxy::start(&config(&app.url(), &redis, "64MiB")).await;
    let b = Proxy::start(&config(&app.url(), &redis, "64MiB")).await;
    wait_redis_up(&a).await;
    wait_redis_up(&b).await;
    let paths: Vec<String> = (0..6).map(|i| format!("/echo/items/tls-{i}")).collect();
    for path in &paths {
        assert_eq!(get(&a, path).await, (200, "MISS".into()));
    }
    // A's writes are in the background: wait until every key is in the cluster.
    wait_for(
        "A's writes to the cluster",
        Duration::from_secs(15),
        || async {
            let stored: usize = cluster.keys_per_node("outrider:").iter().sum();
            (stored >= paths.len()).then_some(())
        },
    )
    .await;
    assert!(
        cluster
            .keys_per_node("outrider:")
            .iter()
            .filter(|&&n| n > 0)
            .count()
            >= 2,
        "the keys spread over several masters"
    );
    for path in &paths {
        assert_eq!(get(&b, path).await, (200, "HIT".into()), "{path}");
        assert_eq!(app.hits(path), 1);
    }
    // A successful PUT through A invalidates the URL (RFC 9111 §4.4) in Redis and, through the
    // purge channel, in B's L1 too.
    let changed = &paths[0];
    let put = client()
        .put(a.url(changed))
        .header("host", "api.internal")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    wait_for("B to drop its copy", Duration::from_secs(10), || async {
        (get(&b, changed).await == (200, "MISS".into())).then_some(())
    })
    .await;
    assert_eq!(get(&b, &paths[1]).await, (200, "HIT".into()), "others stay");
}
