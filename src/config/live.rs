//! The live config handle: readers take a snapshot with one atomic load; reloads validate a new
//! file completely before swapping, so a bad edit never replaces a good config.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use parking_lot::Mutex;

use super::compile::ActiveConfig;
use super::load::{parse_str, resolve_admin_token, ConfigError};
use super::schema::Config;
use crate::pipeline::registry::Services;

/// What one reload attempt did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// The new config is serving. `restart_needed` names changed settings that only apply at start.
    Applied {
        generation: u64,
        restart_needed: Vec<&'static str>,
    },
    /// The file's content is the same as the serving config's.
    Unchanged { generation: u64 },
    /// The file is invalid; the previous config keeps serving.
    Rejected(ConfigError),
}

impl ReloadOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            ReloadOutcome::Applied { .. } => "applied",
            ReloadOutcome::Unchanged { .. } => "unchanged",
            ReloadOutcome::Rejected(_) => "rejected",
        }
    }
}

type OutcomeHook = Box<dyn Fn(&str, &ReloadOutcome) + Send + Sync>;

pub struct LiveConfig {
    current: ArcSwap<ActiveConfig>,
    /// None when running on the embedded default: nothing to watch or reload.
    path: Option<PathBuf>,
    /// Serializes reloads and remembers the last text seen, to skip no-op reloads.
    last_text: Mutex<String>,
    /// Digest of the files the serving config's capabilities read (see [`inputs_digest`]).
    last_inputs: Mutex<[u8; 32]>,
    /// The last file content that was rejected (with the digest of the other inputs then), so
    /// watch-driven retries do not re-log it.
    last_rejected: Mutex<Option<(String, [u8; 32])>>,
    reload_lock: Mutex<()>,
    on_outcome: Mutex<Option<OutcomeHook>>,
    /// What each new generation's stages are built with.
    services: Arc<Services>,
}

impl LiveConfig {
    pub fn new(
        active: ActiveConfig,
        path: Option<PathBuf>,
        text: String,
        services: Arc<Services>,
    ) -> Arc<Self> {
        let inputs = inputs_digest(&active.config);
        Arc::new(Self {
            current: ArcSwap::from_pointee(active),
            path,
            last_text: Mutex::new(text),
            last_inputs: Mutex::new(inputs),
            last_rejected: Mutex::new(None),
            reload_lock: Mutex::new(()),
            on_outcome: Mutex::new(None),
            services,
        })
    }

    /// Snapshot for one request: it keeps this config until it finishes, whatever reloads do.
    #[inline]
    pub fn snapshot(&self) -> Arc<ActiveConfig> {
        self.current.load_full()
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Called with the trigger (`file`, `sighup`, `admin`) and outcome of every reload.
    pub fn set_outcome_hook(&self, hook: OutcomeHook) {
        *self.on_outcome.lock() = Some(hook);
    }

    /// Re-reads the file and swaps it in if valid and different.
    pub fn reload(&self, trigger: &str) -> ReloadOutcome {
        // Watch-driven reloads skip a file already judged; explicit ones always re-evaluate.
        let automatic = matches!(trigger, "file" | "poll");
        // One reload at a time, hook included, so metrics and logs see outcomes in order.
        let _serial = self.reload_lock.lock();
        let outcome = self.reload_inner(automatic);
        if let Some(hook) = self.on_outcome.lock().as_ref() {
            hook(trigger, &outcome);
        }
        outcome
    }

    fn reload_inner(&self, automatic: bool) -> ReloadOutcome {
        let Some(path) = &self.path else {
            return ReloadOutcome::Unchanged {
                generation: self.current.load().generation,
            };
        };
        let mut last_text = self.last_text.lock();
        let text = match super::load::read_config_text(path) {
            Ok(text) => text,
            Err(source) => {
                return ReloadOutcome::Rejected(ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let mut last_rejected = self.last_rejected.lock();
        let mut last_inputs = self.last_inputs.lock();
        let serving_inputs = inputs_digest(&self.current.load().config);
        let seen = text == *last_text && serving_inputs == *last_inputs;
        let rejected = last_rejected
            .as_ref()
            .is_some_and(|(t, inputs)| *t == text && *inputs == serving_inputs);
        if automatic && (seen || rejected) {
            // Nothing new to say: the same good file, or the same bad file already reported.
            return ReloadOutcome::Unchanged {
                generation: self.current.load().generation,
            };
        }
        let file = path.display().to_string();
        // The admin token file is read on every reload that gets this far, so a rotated Secret
        // is picked up by an explicit reload even when the config file is unchanged.
        let parsed = parse_str(&text, &file)
            .and_then(|config| Ok((resolve_admin_token(&config, &text, &file)?, config)));
        let (admin_token, config) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                *last_rejected = Some((text, serving_inputs));
                return ReloadOutcome::Rejected(e);
            }
        };
        *last_rejected = None;
        let old = self.current.load_full();
        let inputs = inputs_digest(&config);
        if text == *last_text
            && *old.config == config
            && old.admin_token == admin_token
            && inputs == *last_inputs
        {
            return ReloadOutcome::Unchanged {
                generation: old.generation,
            };
        }
        let restart_needed = restart_only_changes(&old.config, &config);
        let generation = old.generation + 1;
        let active = match ActiveConfig::compile(config, generation, &self.services, admin_token) {
            Ok(active) => active,
            Err(message) => {
                return ReloadOutcome::Rejected(ConfigError::Invalid {
                    file,
                    problems: vec![super::load::Problem {
                        line: 1,
                        column: 1,
                        message,
                    }],
                })
            }
        };
        self.current.store(Arc::new(active));
        *last_text = text;
        *last_inputs = inputs;
        ReloadOutcome::Applied {
            generation,
            restart_needed,
        }
    }
}

/// A digest of the files the config's capabilities read besides the config (a GraphQL
/// manifest), so that editing one reloads like editing the config; the periodic poll notices.
fn inputs_digest(config: &Config) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for path in crate::pipeline::registry::watched_files(config) {
        hasher.update(&(path.len() as u64).to_le_bytes());
        hasher.update(path.as_bytes());
        match std::fs::read(&path) {
            Ok(bytes) => {
                hasher.update(&[1]);
                hasher.update(&(bytes.len() as u64).to_le_bytes());
                hasher.update(&bytes);
            }
            Err(_) => {
                hasher.update(&[0]);
            }
        }
    }
    *hasher.finalize().as_bytes()
}

/// Settings read only at start: a change is reported instead of silently ignored.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.listen != new.listen {
        changed.push("listen");
    }
    if old.threads != new.threads {
        changed.push("threads");
    }
    if old.admin.listen != new.admin.listen {
        changed.push("admin.listen");
    }
    if old.cache.memory != new.cache.memory {
        changed.push("cache.memory");
    }
    if old.cache.redis != new.cache.redis {
        changed.push("cache.redis");
    }
    if old.cache.max_entry_size != new.cache.max_entry_size {
        changed.push("cache.max_entry_size");
    }
    if old.cache.max_inflight_bytes != new.cache.max_inflight_bytes {
        changed.push("cache.max_inflight_bytes");
    }
    if old.limits.max_buffered_bodies != new.limits.max_buffered_bodies {
        changed.push("limits.max_buffered_bodies");
    }
    let format_changed =
        |f: super::schema::AccessLogFormat| f != super::schema::AccessLogFormat::Off;
    if old.telemetry.access_log != new.telemetry.access_log
        && format_changed(old.telemetry.access_log)
        && format_changed(new.telemetry.access_log)
    {
        changed.push("telemetry.access_log (json/text)");
    }
    if old.telemetry.service_name != new.telemetry.service_name {
        changed.push("telemetry.service_name");
    }
    let otlp_export = |t: &super::schema::TelemetryConfig| {
        let mut otlp = t.otlp.clone();
        otlp.sample_ratio = None;
        otlp
    };
    if otlp_export(&old.telemetry) != otlp_export(&new.telemetry) {
        changed.push("telemetry.otlp (all but sample_ratio)");
    }
    changed
}

/// How often the file is re-read even without a change event (events can be missed on some
/// mounts); cheap because an unchanged file is a string compare.
const POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Editors and kubelet produce bursts of events; wait for the burst to settle.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Watches the config file's directory (a ConfigMap swaps the `..data` symlink there rather than
/// writing the file) and reloads on change. Runs until the runtime stops.
pub fn spawn_watcher(live: Arc<LiveConfig>) -> Result<(), notify::Error> {
    let Some(path) = live.path().map(Path::to_path_buf) else {
        return Ok(());
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let file_name = path.file_name().map(|n| n.to_os_string());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only events about the config file itself or a ConfigMap's `..data`/`..<timestamp>`
        // entries matter; a busy directory (like /tmp) must not cause a re-read per event.
        // Access events (including our own reads of the file) must never trigger a reload.
        let relevant = event.is_ok_and(|event| {
            !matches!(event.kind, notify::EventKind::Access(_))
                && event.paths.iter().any(|p| {
                    p.file_name().is_some_and(|name| {
                        Some(name) == file_name.as_deref()
                            || name.to_string_lossy().starts_with("..")
                    })
                })
        });
        if relevant {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tokio::spawn(async move {
        // The watcher stops when dropped; this task owns it for the process lifetime.
        let _watcher = watcher;
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let trigger = tokio::select! {
                got = rx.recv() => {
                    if got.is_none() {
                        break;
                    }
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                    "file"
                }
                _ = poll.tick() => "poll",
            };
            let live = live.clone();
            // File reads and YAML parsing are blocking work; keep them off the async workers.
            let _ = tokio::task::spawn_blocking(move || live.reload(trigger)).await;
        }
    });
    Ok(())
}
