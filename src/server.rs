//! Assembles a running outrider from a config: the Pingora proxy service, the admin service,
//! the reload triggers (file watch, SIGHUP) and graceful shutdown.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora_core::services::listening::Service;
use tokio::signal::unix::{signal, SignalKind};

use crate::admin::{self, AdminExtension, AdminState};
use crate::config::{self, ActiveConfig, Config, ConfigError, LiveConfig, ReloadOutcome};
use crate::limits::{ConnectionLimits, LimitMetrics, RequestBoundary};
use crate::pipeline::registry::Services;
use crate::proxy::{Lifecycle, Outrider};
use crate::store::{CacheError, CacheSettings, RedisEndpoint, RedisTls, Store};
use crate::telemetry::trace::{TraceError, Tracing};
use crate::telemetry::{logging, metrics::MetricsError, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Metrics(#[from] MetricsError),
    #[error("cannot start the background runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot listen for admin on {addr}: {source}")]
    AdminListen {
        addr: String,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Compile(String),
    #[error("cannot set up the cache: {0}")]
    Cache(#[from] CacheError),
    #[error("{0}")]
    Tracing(#[from] TraceError),
}

/// Cache settings are read once at start; changes are reported as needing a restart.
fn cache_settings(config: &Config) -> CacheSettings {
    let redis = &config.cache.redis;
    CacheSettings {
        memory_max_bytes: config.cache.memory.max_size.0,
        redis: RedisEndpoint {
            url: (!redis.url.trim().is_empty()).then(|| redis.url.clone()),
            cluster_nodes: redis.cluster_nodes.clone(),
            tls: redis.tls.as_ref().map(|t| RedisTls {
                ca_file: t.ca_file.as_ref().map(PathBuf::from),
                cert_file: t.cert_file.as_ref().map(PathBuf::from),
                key_file: t.key_file.as_ref().map(PathBuf::from),
            }),
        },
        redis_key_prefix: redis.key_prefix.clone(),
        redis_timeout: redis.timeout.get(),
        max_entry_size: config.cache.max_entry_size.0 as usize,
        max_inflight_bytes: usize::try_from(config.cache.max_inflight_bytes.0)
            .unwrap_or(usize::MAX),
    }
}

/// How messages name the config: its path, or the embedded default.
fn source_name(path: &Option<PathBuf>) -> String {
    match path {
        Some(path) => path.display().to_string(),
        None => EMBEDDED_NAME.to_string(),
    }
}

const EMBEDDED_NAME: &str = "<embedded config/outrider.yaml>";

/// Loads the config from `path`, or the embedded default when `path` is `None`.
pub fn load(path: Option<&std::path::Path>) -> Result<(Config, String), ConfigError> {
    match path {
        Some(path) => config::load_file(path),
        None => {
            let text = config::EMBEDDED_DEFAULT.to_string();
            let config = config::parse_str(&text, EMBEDDED_NAME)?;
            Ok((config, text))
        }
    }
}

/// Compiles a loaded config against an in-memory store, as `run` would at start.
pub fn compile_check(config: &Config) -> Result<(), String> {
    let services = Services::in_memory().map_err(|e| e.to_string())?;
    // `admin.token_file` names a file of the running environment (a Secret mount); `check` does
    // not read it, `run` does (at start and on reload).
    ActiveConfig::compile(config.clone(), 1, &services, None)?;
    check_models(config)
}

/// Loads every model of `models:` as `run` would, so a missing, unloadable or mismatched model
/// file fails the check rather than leaving the started proxy unready.
fn check_models(config: &Config) -> Result<(), String> {
    use crate::inference::model::{read_model_file, LoadedModel};
    let problems: Vec<String> = config
        .models
        .iter()
        .filter_map(|(name, model)| {
            read_model_file(std::path::Path::new(&model.path))
                .and_then(|bytes| LoadedModel::load(name, &bytes, model))
                .err()
                .map(|reason| format!("models.{name}: {}: {reason}", model.path))
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// Runs the proxy until SIGTERM/SIGINT and a drain; returns when the process should exit 0.
pub fn run(path: Option<PathBuf>) -> Result<(), StartError> {
    let (config, text) = load(path.as_deref())?;
    let admin_token = config::load::resolve_admin_token(&config, &text, &source_name(&path))?;
    logging::init(config.telemetry.access_log);
    // Latency SLO thresholds become duration buckets (read at start; see docs/slo.md).
    let thresholds: Vec<f64> = config
        .routes
        .iter()
        .filter_map(|r| r.slo.as_ref())
        .flat_map(|slo| slo.latency.values().map(|t| t.get().as_secs_f64()))
        .collect();
    let metrics = Arc::new(Metrics::with_thresholds(&thresholds)?);
    let tracing = Arc::new(Tracing::start(&config.telemetry, &metrics.registry)?);
    let threads = match config.threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    let listen = config.listen.clone();
    let admin_listen = config.admin.listen.clone();
    let settings = cache_settings(&config);
    // Admin, reload triggers and other background work run on their own small runtime so they
    // stay responsive when the proxy workers are saturated.
    let background = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("outrider-bg")
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let store = {
        // The Redis connection task needs a runtime; it lives on the background one.
        let _guard = background.enter();
        Store::new(settings, &metrics.registry)?
    };
    let slo = crate::slo::SloRegistry::new(&metrics.registry)
        .map_err(|e| StartError::Metrics(MetricsError::from(e)))?;
    let services = Arc::new(Services::new(
        store.clone(),
        metrics.registry.clone(),
        slo.clone(),
    ));
    let models = crate::inference::registry(&services).map_err(StartError::Compile)?;
    let active =
        ActiveConfig::compile(config, 1, &services, admin_token).map_err(StartError::Compile)?;
    let live = LiveConfig::new(active, path.clone(), text, services);
    metrics.config_generation.set(1);
    install_reload_hook(&live, &metrics);
    let lifecycle = Arc::new(Lifecycle::default());
    let extensions: Vec<Arc<dyn AdminExtension>> = vec![
        Arc::new(admin::cache::CacheAdmin::new(store.clone())),
        Arc::new(crate::slo::admin::SloAdmin::new(slo.clone())),
        Arc::new(crate::inference::ModelsAdmin::new(models)),
    ];
    let admin_listener = background
        .block_on(tokio::net::TcpListener::bind(&admin_listen))
        .map_err(|source| StartError::AdminListen {
            addr: admin_listen.clone(),
            source,
        })?;
    let traffic: std::net::SocketAddr = listen
        .parse()
        .map_err(|e| StartError::Compile(format!("listen {listen:?}: {e}")))?;
    let admin_state = Arc::new(AdminState::new(
        live.clone(),
        metrics.clone(),
        lifecycle.clone(),
        extensions,
        traffic,
    ));
    background.spawn(admin::watch_traffic_listener(admin_state.clone()));
    background.spawn(admin::serve(admin_listener, admin_state));
    {
        let _guard = background.enter();
        if let Err(e) = config::live::spawn_watcher(live.clone()) {
            tracing::warn!(error = %e, "config file watching is unavailable; SIGHUP and POST /reload still work");
        }
    }
    background.spawn(reload_on_sighup(live.clone()));

    let mut conf = ServerConf {
        threads,
        // Pingora would sleep this long after SIGTERM before stopping its runtimes. The drain
        // watcher always exits first (as soon as idle, at the latest after the grace period
        // read from the live config at signal time), so this is only a far backstop.
        grace_period_seconds: Some(24 * 3600),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    conf.upstream_keepalive_pool_size = 256;
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let proxy = Outrider::new(
        live.clone(),
        metrics.clone(),
        lifecycle.clone(),
        tracing.clone(),
    );
    let limit_metrics = Arc::new(LimitMetrics::new(&metrics.registry).map_err(MetricsError::from)?);
    // Connection limits wrap Pingora's proxy app; the proxy itself knows nothing of them.
    let app = ConnectionLimits::new(
        RequestBoundary::new(pingora_proxy::http_proxy(&server.configuration, proxy)),
        live.clone(),
        limit_metrics,
    );
    let mut service = Service::new("outrider".to_string(), app);
    service.add_tcp(&listen);
    server.add_service(service);
    tracing::info!(
        listen = %listen,
        admin = %admin_listen,
        threads,
        config = %path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "embedded default".into()),
        version = env!("CARGO_PKG_VERSION"),
        "outrider started"
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainOnSignal {
            lifecycle,
            metrics,
            live,
            store,
            tracing: tracing.clone(),
        }),
    });
    tracing.flush(Duration::from_secs(2));
    tracing::info!("outrider stopped");
    logging::flush();
    drop(background);
    Ok(())
}

fn install_reload_hook(live: &Arc<LiveConfig>, metrics: &Arc<Metrics>) {
    let metrics = metrics.clone();
    live.set_outcome_hook(Box::new(move |trigger, outcome| {
        // The periodic safety poll finds nothing most of the time; that is not a reload attempt.
        if trigger == "poll" && matches!(outcome, ReloadOutcome::Unchanged { .. }) {
            return;
        }
        metrics
            .config_reloads
            .with_label_values(&[outcome.label()])
            .inc();
        match outcome {
            ReloadOutcome::Applied {
                generation,
                restart_needed,
            } => {
                metrics.config_generation.set(*generation as i64);
                tracing::info!(trigger, generation, "config reloaded");
                if !restart_needed.is_empty() {
                    tracing::warn!(
                        trigger,
                        settings = ?restart_needed,
                        "changed settings take effect only after a restart; the running values stay"
                    );
                }
            }
            ReloadOutcome::Unchanged { generation } => {
                tracing::info!(trigger, generation, "config unchanged")
            }
            ReloadOutcome::Rejected(e) => {
                for line in e.lines() {
                    tracing::error!(trigger, problem = %line, "config rejected; the previous config keeps serving");
                }
            }
        }
    }));
}

async fn reload_on_sighup(live: Arc<LiveConfig>) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            return;
        }
    };
    while hup.recv().await.is_some() {
        let live = live.clone();
        let _ = tokio::task::spawn_blocking(move || live.reload("sighup")).await;
    }
}

/// SIGTERM, SIGINT and SIGQUIT all mean "drain and exit": stop accepting, let in-flight requests
/// finish (bounded by `shutdown.grace_period`), then exit 0 as soon as nothing is in flight.
struct DrainOnSignal {
    lifecycle: Arc<Lifecycle>,
    metrics: Arc<Metrics>,
    live: Arc<LiveConfig>,
    store: Arc<Store>,
    tracing: Arc<Tracing>,
}

/// How long the proxy must stay idle before exiting, to catch a request whose connection was
/// accepted just before the listener closed.
const IDLE_CONFIRM: Duration = Duration::from_millis(100);

#[async_trait]
impl ShutdownSignalWatch for DrainOnSignal {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers; use SIGKILL to stop");
            return std::future::pending().await;
        };
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = quit.recv() => "SIGQUIT",
        };
        let shutdown = self.live.snapshot().config.shutdown.clone();
        let grace = shutdown.grace_period.get();
        let ready_delay = shutdown.ready_delay.get().min(grace);
        tracing::info!(signal = which, in_flight = self.metrics.in_flight.get(), grace = ?grace, ready_delay = ?ready_delay, "draining");
        // From here /ready is 503 and every response says `Connection: close`.
        self.lifecycle.draining.store(true, Ordering::SeqCst);
        if !ready_delay.is_zero() {
            // Keep accepting until endpoints have had time to drop this replica.
            tokio::time::sleep(ready_delay).await;
            tracing::info!("ready delay over; closing the listener");
        }
        let metrics = self.metrics.clone();
        let store = self.store.clone();
        let tracing = self.tracing.clone();
        let remaining = grace.saturating_sub(ready_delay);
        std::thread::spawn(move || exit_when_idle(metrics, store, tracing, remaining));
        ShutdownSignal::GracefulTerminate
    }
}

/// Exits once no request (client or background) is in flight and no Redis write is queued, or
/// when the grace period is over: queued writes are finished, not dropped.
fn exit_when_idle(
    metrics: Arc<Metrics>,
    store: Arc<Store>,
    tracing: Arc<Tracing>,
    grace: Duration,
) {
    let started = Instant::now();
    // Queued spans go out within the grace period (at most half of it, so requests keep most).
    let flush_within = |started: Instant| {
        grace
            .saturating_sub(started.elapsed())
            .min(grace / 2)
            .max(Duration::from_millis(100))
    };
    let mut idle_since: Option<Instant> = None;
    while started.elapsed() < grace {
        if metrics.in_flight.get() <= 0 && store.pending_writes() == 0 {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= IDLE_CONFIRM {
                tracing.flush(flush_within(started));
                tracing::info!(after = ?started.elapsed(), "drained; exiting");
                logging::flush();
                std::process::exit(0);
            }
        } else {
            idle_since = None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::warn!(
        in_flight = metrics.in_flight.get(),
        pending_writes = store.pending_writes(),
        "grace period over; exiting with work in flight"
    );
    tracing.flush(Duration::from_millis(500));
    logging::flush();
    std::process::exit(0);
}
