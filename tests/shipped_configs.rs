//! Every outrider config shipped in the repository passes `outrider check`: the embedded
//! default and the commented examples in `config/`, the docker-compose demo's config, the
//! Kubernetes ConfigMap source, and any other outrider config under `examples/` or `k8s/`.
//! A deliberately broken copy must fail with a positioned error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_outrider");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn check(path: &Path, redis_url: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("check").arg("--config").arg(path);
    match redis_url {
        Some(url) => cmd.env("REDIS_URL", url),
        None => cmd.env_remove("REDIS_URL"),
    };
    cmd.output()
        .unwrap_or_else(|e| panic!("running {BIN} check: {e}"))
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

/// An outrider config is a YAML mapping with top-level `routes` and `upstreams`
/// (docker-compose files, Kubernetes manifests, Prometheus and collector configs are not).
fn is_outrider_config(path: &Path) -> bool {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text) {
        Ok(serde_yaml_ng::Value::Mapping(m)) => {
            m.contains_key("routes") && m.contains_key("upstreams")
        }
        _ => false,
    }
}

fn shipped_configs() -> Vec<PathBuf> {
    let root = root();
    // Everything in config/ is an outrider config, including config/examples/.
    let mut configs = Vec::new();
    yaml_files(&root.join("config"), &mut configs);
    let mut elsewhere = Vec::new();
    yaml_files(&root.join("examples"), &mut elsewhere);
    yaml_files(&root.join("k8s"), &mut elsewhere);
    configs.extend(elsewhere.into_iter().filter(|p| is_outrider_config(p)));
    configs.sort();
    configs.dedup();

    // The ones the deployment docs point at must be among them, whatever the scan finds.
    for required in [
        "config/outrider.yaml",
        "examples/docker-compose/outrider/outrider.yaml",
        "k8s/outrider.yaml",
    ] {
        let p = root.join(required);
        assert!(
            configs.contains(&p),
            "{required} is missing or not recognised as an outrider config"
        );
    }
    configs
}

#[test]
fn every_shipped_config_passes_check() {
    let configs = shipped_configs();
    let mut failures = Vec::new();
    for path in &configs {
        // Without REDIS_URL (in-memory only) and with it set as in docker-compose / k8s.
        for redis in [None, Some("redis://redis:6379")] {
            let out = check(path, redis);
            if !out.status.success() {
                failures.push(format!(
                    "{} (REDIS_URL={}): exit {:?}\n{}{}",
                    path.display(),
                    redis.unwrap_or("<unset>"),
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} shipped configs fail `outrider check`:\n{}",
        failures.len(),
        configs.len(),
        failures.join("\n")
    );
    eprintln!("checked {} shipped configs", configs.len());
}

/// Breaks a copy of a shipped config at a known line; `check` must fail and point at it.
fn assert_broken_copy_fails(source: &str, needle: &str, replacement: &str) {
    let original = std::fs::read_to_string(root().join(source)).expect("read config");
    let line = original
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{source} has no line containing {needle:?}"))
        + 1;
    let broken = original.replacen(needle, replacement, 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, broken).expect("write broken copy");

    let out = check(&path, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "`outrider check` accepted a broken copy of {source} ({needle:?} -> {replacement:?}):\n{stdout}{stderr}"
    );
    let position = format!("broken.yaml:{line}:");
    assert!(
        stderr.contains(&position) || stdout.contains(&position),
        "the error for a broken {source} should point at {position}COL, got:\n{stdout}{stderr}"
    );
}

#[test]
fn broken_copies_fail_check_with_a_position() {
    // An unknown key (a typo) is rejected, not ignored.
    assert_broken_copy_fails(
        "k8s/outrider.yaml",
        "  default_ttl: 60s",
        "  default_tll: 60s",
    );
    // A value that is not a duration.
    assert_broken_copy_fails(
        "examples/docker-compose/outrider/outrider.yaml",
        "ttl: 30s",
        "ttl: thirty seconds",
    );
    // A route pointing at an upstream that does not exist.
    assert_broken_copy_fails("k8s/outrider.yaml", "upstream: app", "upstream: ap");
}
