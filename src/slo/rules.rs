//! `outrider slo-rules`: Prometheus recording rules and multi-window, multi-burn-rate alerts
//! (the SRE workbook's, as Sloth and Pyrra generate them) for every declared objective, from
//! the same counters outrider exports, so Prometheus computes exactly the SLIs `/slo` shows.

use serde_json::{json, Value};

use super::config::percentile;
use super::window::{AlertState, ALERTS, WINDOWS};
use crate::config::schema::Config;

/// Output shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A Prometheus rule file (`rule_files:`).
    Prometheus,
    /// A prometheus-operator `PrometheusRule` manifest.
    Kubernetes,
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{0}")]
    Objective(String),
    #[error("cannot write YAML: {0}")]
    Yaml(String),
}

struct Declared {
    route: String,
    id: String,
    target: f64,
    window: String,
}

fn declared(config: &Config) -> Result<Vec<Declared>, RulesError> {
    let mut out = Vec::new();
    for route in &config.routes {
        let Some(slo) = &route.slo else {
            continue;
        };
        let window = prometheus_duration(slo.window.get().as_secs());
        for key in slo.latency.keys() {
            out.push(Declared {
                route: route.name.clone(),
                id: format!("latency_{key}"),
                target: percentile(key).map_err(RulesError::Objective)?,
                window: window.clone(),
            });
        }
        if let Some(availability) = slo.availability {
            out.push(Declared {
                route: route.name.clone(),
                id: "availability".into(),
                target: availability.0,
                window: window.clone(),
            });
        }
    }
    Ok(out)
}

/// Seconds as a Prometheus duration (`30d`, `6h`, `5m`).
fn prometheus_duration(secs: u64) -> String {
    match secs {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A number without float noise (`0.001`, not `0.0010000000000000009`).
fn clean(value: f64) -> String {
    let rounded = (value * 1e9).round() / 1e9;
    format!("{rounded}")
}

fn selector(d: &Declared) -> String {
    format!("route=\"{}\",objective=\"{}\"", d.route, d.id)
}

fn ratio_record(window: &str) -> String {
    format!("outrider:slo_error_ratio:rate{window}")
}

/// The rule groups for every objective of `config`.
pub fn groups(config: &Config) -> Result<Value, RulesError> {
    let objectives = declared(config)?;
    let mut recording = Vec::new();
    let mut alerts = Vec::new();
    for d in &objectives {
        let sel = selector(d);
        let mut windows: Vec<String> = WINDOWS.iter().map(|(w, _)| w.to_string()).collect();
        if !windows.contains(&d.window) {
            windows.push(d.window.clone());
        }
        for w in &windows {
            recording.push(json!({
                "record": ratio_record(w),
                "expr": format!(
                    "1 - (sum(rate(outrider_slo_good_events_total{{{sel}}}[{w}])) / sum(rate(outrider_slo_events_total{{{sel}}}[{w}])))"
                ),
                "labels": { "route": d.route, "objective": d.id },
            }));
        }
        let budget = 1.0 - d.target;
        recording.push(json!({
            "record": "outrider:slo_error_budget_remaining",
            "expr": format!(
                "1 - ({}{{{sel}}} / {})",
                ratio_record(&d.window),
                clean(budget)
            ),
            "labels": { "route": d.route, "objective": d.id },
        }));
        for state in [AlertState::Page, AlertState::Ticket] {
            let pairs: Vec<String> = ALERTS
                .iter()
                .filter(|(_, _, _, s)| *s == state)
                .map(|(long, short, rate, _)| {
                    let limit = clean(rate * budget);
                    format!(
                        "({}{{{sel}}} > {limit} and {}{{{sel}}} > {limit})",
                        ratio_record(long),
                        ratio_record(short)
                    )
                })
                .collect();
            let rates: Vec<String> = ALERTS
                .iter()
                .filter(|(_, _, _, s)| *s == state)
                .map(|(long, short, rate, _)| format!("{rate}x over {long} and {short}"))
                .collect();
            let name = match state {
                AlertState::Page => "OutriderSLOBurnRatePage",
                _ => "OutriderSLOBurnRateTicket",
            };
            alerts.push(json!({
                "alert": name,
                "expr": pairs.join(" or "),
                "labels": { "severity": state.as_str(), "route": d.route, "objective": d.id },
                "annotations": {
                    "summary": format!("route {}: {} is burning its error budget too fast", d.route, d.id),
                    "description": format!(
                        "Target {} over {}; fires when the error ratio exceeds {}.",
                        clean(d.target),
                        d.window,
                        rates.join(", or ")
                    ),
                },
            }));
        }
    }
    Ok(json!([
        { "name": "outrider-slo-recording", "rules": recording },
        { "name": "outrider-slo-alerts", "rules": alerts },
    ]))
}

/// The rules as YAML in the chosen format.
pub fn render(config: &Config, format: Format) -> Result<String, RulesError> {
    let groups = groups(config)?;
    let document = match format {
        Format::Prometheus => json!({ "groups": groups }),
        Format::Kubernetes => json!({
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {
                "name": "outrider-slo",
                "labels": { "app.kubernetes.io/name": "outrider", "app.kubernetes.io/component": "slo" },
            },
            "spec": { "groups": groups },
        }),
    };
    let text = serde_yaml_ng::to_string(&document).map_err(|e| RulesError::Yaml(e.to_string()))?;
    Ok(format!(
        "# Generated by `outrider slo-rules`; regenerate after editing the objectives.\n{text}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_numbers_print_as_prometheus_wants() {
        assert_eq!(prometheus_duration(30 * 86_400), "30d");
        assert_eq!(prometheus_duration(6 * 3600), "6h");
        assert_eq!(prometheus_duration(300), "5m");
        assert_eq!(clean(1.0 - 0.999), "0.001");
        assert_eq!(clean(14.4 * (1.0 - 0.999)), "0.0144");
    }
}
