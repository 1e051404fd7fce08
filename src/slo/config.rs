//! The `slo:` route section: objectives, enforcement and rate limits.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::units::HumanDuration;

/// A route's service level objectives and how they are enforced.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SloConfig {
    /// Latency objectives: `p95: 80ms` means "at least 95 % of requests complete within 80 ms".
    /// Keys are `p` and a percentile (`p50`, `p90`, `p99`, `p99.9`).
    #[serde(default)]
    pub latency: BTreeMap<String, HumanDuration>,
    /// Share of requests that must not fail (`99.9%`): 5xx answers (outrider's own upstream
    /// errors and shed requests included) are bad, 4xx are good.
    #[serde(default)]
    pub availability: Option<Percent>,
    /// The SLO window the error budget is counted over.
    #[serde(default = "default_window")]
    pub window: HumanDuration,
    /// Admission control (off unless given).
    #[serde(default)]
    pub enforce: Option<EnforceConfig>,
    /// A token bucket per client (off unless given).
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
}

fn default_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(30 * 86_400))
}

/// Keeps admitted traffic inside the objectives when the upstream is overloaded.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnforceConfig {
    /// A request not answered within this time (queueing included) gets 504 `deadline_exceeded`.
    #[serde(default)]
    pub deadline: Option<HumanDuration>,
    /// Requests sent upstream at once for this route; more wait in a queue.
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    /// Adapt the concurrency limit to keep latency inside the route's latency objectives
    /// (gradient controller); `max_concurrency` is then its ceiling.
    #[serde(default)]
    pub adaptive: bool,
    /// Longest wait in the queue before a request is shed with 503 `overloaded`.
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout: HumanDuration,
    /// Requests that may wait in the queue at once; beyond it they are shed at once.
    #[serde(default = "default_queue_size")]
    pub queue_size: u32,
    /// 0 (shed first) to 9 (shed last) among routes sharing an upstream.
    #[serde(default = "default_priority")]
    pub priority: u8,
}

fn default_queue_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(50))
}

fn default_queue_size() -> u32 {
    128
}

fn default_priority() -> u8 {
    5
}

/// A token bucket: `rate` tokens per unit, holding at most `burst`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained rate, e.g. `100/s`, `600/m`, `10000/h`.
    pub rate: Rate,
    /// Requests allowed at once after a quiet period (default: one second of `rate`, at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Whose budget a request spends: `client_ip` (default), `header:<name>` (an API key or
    /// tenant header; requests without it share one bucket), or `route` (one bucket).
    #[serde(default = "default_by")]
    pub by: String,
    /// Count in Redis so every replica shares the budget (falls back to local counting while
    /// Redis is unavailable).
    #[serde(default)]
    pub shared: bool,
}

fn default_by() -> String {
    "client_ip".to_string()
}

/// What a rate limit is keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    ClientIp,
    Header(http::HeaderName),
    Route,
}

impl RateLimitConfig {
    pub fn key(&self) -> Result<LimitKey, String> {
        match self.by.trim() {
            "client_ip" => Ok(LimitKey::ClientIp),
            "route" => Ok(LimitKey::Route),
            other => match other.strip_prefix("header:") {
                Some(name) => http::HeaderName::from_bytes(name.trim().as_bytes())
                    .map(LimitKey::Header)
                    .map_err(|_| format!("{name:?} is not a header name")),
                None => Err(format!(
                    "{other:?}: write client_ip, route or header:<name>"
                )),
            },
        }
    }

    pub fn burst(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| self.rate.per_second().ceil() as u32)
            .max(1)
    }
}

/// `N/s`, `N/m` or `N/h`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub count: f64,
    pub per: Duration,
}

impl Rate {
    pub fn per_second(&self) -> f64 {
        self.count / self.per.as_secs_f64()
    }

    fn parse(text: &str) -> Result<Rate, String> {
        let (count, unit) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("invalid rate {text:?} (write e.g. 100/s, 600/m, 10000/h)"))?;
        let count: f64 = count
            .trim()
            .parse()
            .ok()
            .filter(|c: &f64| c.is_finite() && *c > 0.0)
            .ok_or_else(|| format!("invalid rate {text:?}: the count must be a positive number"))?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => return Err(format!("invalid rate unit {other:?} (s, m or h)")),
        };
        Ok(Rate { count, per })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let text = String::deserialize(de)?;
        Rate::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let unit = match self.per.as_secs() {
            60 => "m",
            3600 => "h",
            _ => "s",
        };
        ser.serialize_str(&format!("{}/{unit}", self.count))
    }
}

impl schemars::JsonSchema for Rate {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Rate".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A rate: a count per second, minute or hour, e.g. 100/s, 600/m.",
            "pattern": "^\\s*[0-9]+(\\.[0-9]+)?\\s*/\\s*(s|sec|second|m|min|minute|h|hour)\\s*$"
        })
    }
}

/// A share written as `99.9%` (or a fraction such as `0.999`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percent(pub f64);

impl Percent {
    fn parse(text: &str) -> Result<Percent, String> {
        let text = text.trim();
        let (number, scale) = match text.strip_suffix('%') {
            Some(n) => (n.trim(), 100.0),
            None => (text, 1.0),
        };
        let value: f64 = number
            .parse()
            .map_err(|_| format!("invalid share {text:?} (write e.g. 99.9%)"))?;
        // Rounded so `99.9%` is exactly 0.999, not 0.9990000000000001.
        let fraction = (value / scale * 1e12).round() / 1e12;
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(format!(
                "{text:?} must be above 0% and below 100% (100% leaves no error budget)"
            ));
        }
        Ok(Percent(fraction))
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(f64),
        }
        let text = match Raw::deserialize(de)? {
            Raw::Text(t) => t,
            Raw::Number(n) => n.to_string(),
        };
        Percent::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(&format!("{}%", (self.0 * 1e6).round() / 1e4))
    }
}

impl schemars::JsonSchema for Percent {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Percent".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A share: a percentage such as 99.9% (or a fraction such as 0.999).",
            "anyOf": [
                { "type": "string", "pattern": "^\\s*[0-9]+(\\.[0-9]+)?\\s*%?\\s*$" },
                { "type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1 }
            ]
        })
    }
}

/// `p95` → 0.95, `p99.9` → 0.999.
pub fn percentile(key: &str) -> Result<f64, String> {
    let number = key
        .strip_prefix('p')
        .ok_or_else(|| format!("{key:?}: latency objectives are named p50, p95, p99, p99.9 …"))?;
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{key:?}: latency objectives are named p50, p95, p99, p99.9 …"))?;
    if !(value > 0.0 && value < 100.0) {
        return Err(format!("{key:?}: the percentile must be between 0 and 100"));
    }
    Ok((value / 100.0 * 1e12).round() / 1e12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_parse_and_bad_ones_explain_themselves() {
        assert_eq!(Percent::parse("99.9%").unwrap().0, 0.999);
        assert_eq!(Percent::parse("0.99").unwrap().0, 0.99);
        assert!(Percent::parse("100%")
            .unwrap_err()
            .contains("no error budget"));
        assert!(Percent::parse("lots").is_err());
        let rate = Rate::parse("600/m").unwrap();
        assert_eq!(rate.per_second(), 10.0);
        assert!(Rate::parse("10").is_err());
        assert!(Rate::parse("-1/s").is_err());
        assert!(Rate::parse("5/fortnight").is_err());
        assert_eq!(percentile("p99.9").unwrap(), 0.999);
        assert!(percentile("95").is_err());
        assert!(percentile("p100").is_err());
    }
}
