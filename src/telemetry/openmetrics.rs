//! The OpenMetrics text exposition (what Prometheus asks for with
//! `Accept: application/openmetrics-text`), which unlike the classic format carries exemplars:
//! the latency histogram's buckets point at a recent trace that fell in them.

use std::fmt::Write as _;

use prometheus::proto::{LabelPair, MetricFamily, MetricType};

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A sampled observation linked to its trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Exemplar {
    pub trace_id: String,
    pub value: f64,
    /// Seconds since the Unix epoch.
    pub timestamp: f64,
}

/// Finds the exemplar of a histogram bucket: `(family, labels, bucket_index)`.
pub type ExemplarLookup<'a> = &'a dyn Fn(&str, &[LabelPair], usize) -> Option<Exemplar>;

/// Whether a scrape's `Accept` header asks for OpenMetrics.
pub fn wanted(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// Encodes `families`; `exemplar(family, labels, bucket_index)` supplies the exemplar of a
/// histogram bucket, if any (index `buckets.len()` is `+Inf`).
pub fn encode(families: &[MetricFamily], exemplar: ExemplarLookup<'_>) -> String {
    let mut out = String::with_capacity(16 * 1024);
    for family in families {
        let name = family.name();
        let kind = family.get_field_type();
        // A counter family is named without `_total`; its sample carries the suffix.
        let (family_name, sample_suffix) = match kind {
            MetricType::COUNTER => (name.strip_suffix("_total").unwrap_or(name), "_total"),
            _ => (name, ""),
        };
        let type_name = match kind {
            MetricType::COUNTER => "counter",
            MetricType::GAUGE => "gauge",
            MetricType::HISTOGRAM => "histogram",
            MetricType::SUMMARY => "summary",
            MetricType::UNTYPED => "unknown",
        };
        let _ = writeln!(out, "# TYPE {family_name} {type_name}");
        if !family.help().is_empty() {
            let _ = writeln!(out, "# HELP {family_name} {}", escape(family.help(), false));
        }
        for metric in family.get_metric() {
            let labels = metric.get_label();
            match kind {
                MetricType::COUNTER => {
                    let sample = format!("{family_name}{sample_suffix}");
                    line(
                        &mut out,
                        &sample,
                        labels,
                        None,
                        metric.get_counter().get_value(),
                    );
                }
                MetricType::GAUGE => {
                    line(
                        &mut out,
                        family_name,
                        labels,
                        None,
                        metric.get_gauge().get_value(),
                    );
                }
                // The prometheus crate registers no untyped metrics.
                MetricType::UNTYPED => {}
                MetricType::HISTOGRAM => {
                    let h = metric.get_histogram();
                    let bucket_name = format!("{family_name}_bucket");
                    let mut inf_seen = false;
                    for (i, bucket) in h.get_bucket().iter().enumerate() {
                        let bound = bucket.upper_bound();
                        inf_seen |= bound.is_infinite() && bound > 0.0;
                        let le = number(bound);
                        line(
                            &mut out,
                            &bucket_name,
                            labels,
                            Some(&le),
                            bucket.cumulative_count() as f64,
                        );
                        end_with_exemplar(&mut out, exemplar(name, labels, i));
                    }
                    if !inf_seen {
                        line(
                            &mut out,
                            &bucket_name,
                            labels,
                            Some("+Inf"),
                            h.get_sample_count() as f64,
                        );
                        let i = h.get_bucket().len();
                        end_with_exemplar(&mut out, exemplar(name, labels, i));
                    }
                    line(
                        &mut out,
                        &format!("{family_name}_sum"),
                        labels,
                        None,
                        h.get_sample_sum(),
                    );
                    line(
                        &mut out,
                        &format!("{family_name}_count"),
                        labels,
                        None,
                        h.get_sample_count() as f64,
                    );
                }
                MetricType::SUMMARY => {
                    let s = metric.get_summary();
                    for q in s.get_quantile() {
                        let quantile = number(q.quantile());
                        let mut text = String::new();
                        labels_text(&mut text, labels, Some(("quantile", &quantile)));
                        let _ = writeln!(out, "{family_name}{text} {}", number(q.value()));
                    }
                    line(
                        &mut out,
                        &format!("{family_name}_sum"),
                        labels,
                        None,
                        s.sample_sum(),
                    );
                    line(
                        &mut out,
                        &format!("{family_name}_count"),
                        labels,
                        None,
                        s.sample_count() as f64,
                    );
                }
            }
        }
    }
    out.push_str("# EOF\n");
    out
}

/// Writes `name{labels} value` and a newline.
fn line(out: &mut String, name: &str, labels: &[LabelPair], le: Option<&str>, value: f64) {
    let mut text = String::new();
    labels_text(&mut text, labels, le.map(|le| ("le", le)));
    let _ = writeln!(out, "{name}{text} {}", number(value));
}

/// Puts ` # {trace_id="…"} value timestamp` before the newline `line` wrote.
fn end_with_exemplar(out: &mut String, exemplar: Option<Exemplar>) {
    let Some(exemplar) = exemplar else {
        return;
    };
    out.pop();
    let _ = writeln!(
        out,
        " # {{trace_id=\"{}\"}} {} {:.3}",
        escape(&exemplar.trace_id, true),
        number(exemplar.value),
        exemplar.timestamp
    );
}

fn labels_text(out: &mut String, labels: &[LabelPair], extra: Option<(&str, &str)>) {
    if labels.is_empty() && extra.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    let pairs = labels.iter().map(|l| (l.name(), l.value())).chain(extra);
    for (name, value) in pairs {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{name}=\"{}\"", escape(value, true));
    }
    out.push('}');
}

/// Numbers as OpenMetrics writes them: `+Inf`, `-Inf`, `NaN`, else a float with a dot.
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_string()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        format!("{value:?}")
    }
}

fn escape(text: &str, quote: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{HistogramOpts, HistogramVec, IntCounter, Registry};

    #[test]
    fn counters_histograms_and_exemplars() {
        let registry = Registry::new();
        let counter = IntCounter::new("x_requests_total", "Requests \"served\"\nhere").unwrap();
        let hist = HistogramVec::new(
            HistogramOpts::new("x_seconds", "Latency").buckets(vec![0.1, 1.0]),
            &["route"],
        )
        .unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        registry.register(Box::new(hist.clone())).unwrap();
        counter.inc_by(3);
        hist.with_label_values(&["a"]).observe(0.5);
        let text = encode(&registry.gather(), &|family, labels, i| {
            (family == "x_seconds" && labels[0].value() == "a" && i == 1).then(|| Exemplar {
                trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
                value: 0.5,
                timestamp: 1_700_000_000.25,
            })
        });
        let expected = "# TYPE x_requests counter\n\
# HELP x_requests Requests \"served\"\\nhere\n\
x_requests_total 3.0\n\
# TYPE x_seconds histogram\n\
# HELP x_seconds Latency\n\
x_seconds_bucket{route=\"a\",le=\"0.1\"} 0.0\n\
x_seconds_bucket{route=\"a\",le=\"1.0\"} 1.0 # {trace_id=\"0af7651916cd43dd8448eb211c80319c\"} 0.5 1700000000.250\n\
x_seconds_bucket{route=\"a\",le=\"+Inf\"} 1.0\n\
x_seconds_sum{route=\"a\"} 0.5\n\
x_seconds_count{route=\"a\"} 1.0\n\
# EOF\n";
        assert_eq!(text, expected);
    }
}
