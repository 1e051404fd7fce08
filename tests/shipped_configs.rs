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
    // The docker-compose demo reads its admin token from here, as docker-compose.yml passes it.
    cmd.env("OUTRIDER_ADMIN_TOKEN", "shipped-configs-test-token");
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

/// `outrider schema` as JSON, from the binary users run.
fn schema() -> serde_json::Value {
    let out = Command::new(BIN).arg("schema").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn yaml_as_json(text: &str) -> serde_json::Value {
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).unwrap();
    serde_json::to_value(yaml).unwrap()
}

#[test]
fn every_shipped_config_validates_against_the_schema() {
    let schema = schema();
    assert_eq!(schema["title"], "outrider configuration");
    let validator = jsonschema::validator_for(&schema).unwrap();
    let configs = shipped_configs();
    assert!(configs.len() >= 3, "{configs:?}");
    for path in configs {
        let doc = yaml_as_json(&std::fs::read_to_string(&path).unwrap());
        let errors: Vec<String> = validator
            .iter_errors(&doc)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
    }
    // The embedded default is what `outrider run` uses with no file.
    let embedded =
        yaml_as_json(&std::fs::read_to_string(root().join("config/outrider.yaml")).unwrap());
    assert!(validator.is_valid(&embedded));
}

#[test]
fn the_schema_rejects_what_the_loader_rejects() {
    let validator = jsonschema::validator_for(&schema()).unwrap();
    let base = "upstreams:\n  app: { url: \"http://127.0.0.1:8000\" }\nroutes:\n  - name: all\n    match: { path_prefix: / }\n    upstream: app\n";
    assert!(validator.is_valid(&yaml_as_json(base)));
    for (mistake, text) in [
        ("unknown top-level key", format!("{base}lisen: 1\n")),
        ("unknown route key", format!("{base}    cahce: {{}}\n")),
        (
            "unknown cache key",
            format!("{base}    cache: {{ tll: 5m }}\n"),
        ),
        (
            "duration as a number",
            format!("{base}    cache: {{ ttl: 5 }}\n"),
        ),
        (
            "size with a bad unit",
            format!("{base}    max_body: 4 parsecs\n"),
        ),
        (
            "buffer_request not a bool",
            format!("{base}    buffer_request: yes please\n"),
        ),
    ] {
        assert!(!validator.is_valid(&yaml_as_json(&text)), "{mistake}");
    }
}

/// The schema editors and CI consume, pinned so a change to the config surface is reviewed.
#[test]
fn the_schema_is_pinned() {
    let text = serde_json::to_string_pretty(&schema()).unwrap();
    insta::assert_snapshot!(text);
}
