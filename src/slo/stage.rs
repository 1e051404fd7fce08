//! The `slo` stage: counts every finished request against the route's objectives, and when
//! asked, rate-limits, bounds the request's time and admits it through the route's limiter.
//! It runs after the cache, so hits are never queued, limited or shed.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_http::ResponseHeader;

use super::config::{percentile, LimitKey, SloConfig};
use super::limit::{Limiter, LimiterSpec, Permit, Rejection};
use super::rate::{RateDecision, RateLimiter};
use super::{decisions, Kind, Objective, SloRegistry};
use crate::pipeline::registry::{BuildCx, FieldProblem, RouteFeature, ValidateCx};
use crate::pipeline::{
    state_mut, state_ref, Answer, Completion, RequestCx, Slot, Stage, StageError, Verdict,
};

impl RouteFeature for SloConfig {
    fn validate(&self, at: &str, cx: &ValidateCx<'_>, out: &mut Vec<FieldProblem>) {
        for key in self.latency.keys() {
            if let Err(message) = percentile(key) {
                out.push(FieldProblem::new(format!("{at}.latency.{key}"), message));
            }
        }
        for (key, threshold) in &self.latency {
            if threshold.get().is_zero() {
                out.push(FieldProblem::new(
                    format!("{at}.latency.{key}"),
                    "a latency threshold must be greater than zero",
                ));
            }
        }
        let window = self.window.get();
        if window < Duration::from_secs(3600) || window > Duration::from_secs(90 * 86_400) {
            out.push(FieldProblem::new(
                format!("{at}.window"),
                "the SLO window must be between 1h and 90d",
            ));
        }
        if let Some(enforce) = &self.enforce {
            if enforce.max_concurrency == Some(0) {
                out.push(FieldProblem::new(
                    format!("{at}.enforce.max_concurrency"),
                    "must be at least 1",
                ));
            }
            if enforce.adaptive && self.latency.is_empty() {
                out.push(FieldProblem::new(
                    format!("{at}.enforce.adaptive"),
                    "an adaptive limit needs a latency objective to aim for (slo.latency)",
                ));
            }
            if enforce.priority > 9 {
                out.push(FieldProblem::new(
                    format!("{at}.enforce.priority"),
                    "priority goes from 0 (shed first) to 9 (shed last)",
                ));
            }
            if enforce.deadline.is_some_and(|d| d.get().is_zero()) {
                out.push(FieldProblem::new(
                    format!("{at}.enforce.deadline"),
                    "must be greater than zero",
                ));
            }
            if !enforce.adaptive && enforce.max_concurrency.is_none() && enforce.deadline.is_none()
            {
                out.push(FieldProblem::new(
                    format!("{at}.enforce"),
                    "enforce needs at least one of deadline, max_concurrency or adaptive: true",
                ));
            }
        }
        if let Some(rate) = &self.rate_limit {
            if let Err(message) = rate.key() {
                out.push(FieldProblem::new(format!("{at}.rate_limit.by"), message));
            }
            if rate.burst == Some(0) {
                out.push(FieldProblem::new(
                    format!("{at}.rate_limit.burst"),
                    "must be at least 1",
                ));
            }
        }
        let _ = cx;
    }

    fn build(&self, cx: &BuildCx<'_>) -> Result<Arc<dyn Stage>, String> {
        let registry = cx.services.slo.clone();
        let route = cx.route_name;
        let window = self.window.get();
        let mut objectives = Vec::new();
        for (key, threshold) in &self.latency {
            let target = percentile(key)?;
            objectives.push(registry.objective(
                route,
                &format!("latency_{key}"),
                Kind::Latency {
                    threshold: threshold.get(),
                },
                target,
                window,
            ));
        }
        if let Some(availability) = self.availability {
            objectives.push(registry.objective(
                route,
                "availability",
                Kind::Availability,
                availability.0,
                window,
            ));
        }
        let enforce = self.enforce.as_ref();
        let limiter = enforce
            .filter(|e| e.adaptive || e.max_concurrency.is_some())
            .map(|e| {
                let tightest = self.latency.values().map(|t| t.get()).min();
                registry.limiter(
                    route,
                    LimiterSpec {
                        max: e.max_concurrency.unwrap_or(DEFAULT_ADAPTIVE_CEILING),
                        adaptive: e.adaptive,
                        target: tightest.map(|t| adaptive_target(t, e.queue_timeout.get())),
                        queue_size: e.queue_size,
                    },
                )
            });
        let rate = match &self.rate_limit {
            Some(rate) => {
                let shared = rate.shared.then(|| cx.services.store.clone());
                Some((
                    Arc::new(RateLimiter::new(
                        rate.rate.per_second(),
                        rate.burst(),
                        shared,
                        route,
                    )),
                    rate.key()?,
                ))
            }
            None => None,
        };
        let upstream = cx
            .config
            .routes
            .iter()
            .find(|r| r.name == route)
            .and_then(|r| r.upstream.clone())
            .unwrap_or_default();
        let priority = enforce.map(|e| (e.priority, registry.priority_waits(&upstream)));
        Ok(Arc::new(SloStage {
            route: route.to_string(),
            priority,
            registry,
            objectives,
            limiter,
            queue_timeout: enforce.map(|e| e.queue_timeout.get()).unwrap_or_default(),
            deadline: enforce.and_then(|e| e.deadline.map(|d| d.get())),
            rate,
        }))
    }
}

/// The adaptive limit's ceiling when `max_concurrency` is not given.
pub const DEFAULT_ADAPTIVE_CEILING: u32 = 200;

pub struct SloStage {
    route: String,
    /// This route's priority and the waiting counts of its upstream.
    priority: Option<(u8, Arc<super::PriorityWaits>)>,
    registry: Arc<SloRegistry>,
    objectives: Vec<Arc<Objective>>,
    limiter: Option<Arc<Limiter>>,
    queue_timeout: Duration,
    deadline: Option<Duration>,
    rate: Option<(Arc<RateLimiter>, LimitKey)>,
}

impl std::fmt::Debug for SloStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SloStage")
            .field("route", &self.route)
            .field("objectives", &self.objectives.len())
            .finish()
    }
}

/// The stage's part of one request.
#[derive(Default)]
struct SloState {
    permit: Option<Permit>,
    /// Tokens left in the caller's bucket, for the `RateLimit` header.
    rate_remaining: Option<u32>,
}

/// A JSON error outrider gives itself.
fn json_answer(
    status: u16,
    code: &str,
    message: &str,
    headers: &[(&str, String)],
) -> Option<Answer> {
    let body = serde_json::json!({ "error": code, "message": message });
    Answer::json_value(status, &body, "no-store", headers)
}

/// Whole seconds to wait, never 0 (a `Retry-After: 0` invites an immediate retry storm).
fn retry_seconds(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

impl SloStage {
    fn limit_key(&self, key: &LimitKey, cx: &RequestCx<'_>) -> String {
        match key {
            LimitKey::ClientIp => cx
                .client_ip
                .map(|ip| ip.to_string())
                .unwrap_or_else(|| "unknown".into()),
            LimitKey::Header(name) => cx
                .req
                .headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default(),
            LimitKey::Route => String::new(),
        }
    }

    fn policy_header(&self, limiter: &RateLimiter) -> String {
        format!(
            "\"default\";q={};w={}",
            limiter.burst,
            retry_seconds(Duration::from_secs_f64(
                f64::from(limiter.burst) / limiter.rate.max(1e-9)
            ))
        )
    }
}

#[async_trait]
impl Stage for SloStage {
    fn name(&self) -> &'static str {
        "slo"
    }

    async fn on_request(&self, cx: &mut RequestCx<'_>) -> Result<Verdict, StageError> {
        let mut state = SloState::default();
        if let Some((limiter, key)) = &self.rate {
            let key = self.limit_key(key, cx);
            match limiter.take(&key).await {
                RateDecision::Allowed { remaining } => state.rate_remaining = Some(remaining),
                RateDecision::Limited { retry_after } => {
                    self.registry.decision(&self.route, decisions::LIMITED);
                    let seconds = retry_seconds(retry_after);
                    let answer = json_answer(
                        429,
                        "rate_limited",
                        &format!(
                            "rate limit of route {} exceeded; retry in {seconds}s",
                            self.route
                        ),
                        &[
                            ("retry-after", seconds.to_string()),
                            ("ratelimit-policy", self.policy_header(limiter)),
                            ("ratelimit", format!("\"default\";r=0;t={seconds}")),
                        ],
                    );
                    return match answer {
                        Some(answer) => Ok(Verdict::Answer(answer)),
                        None => Err(StageError {
                            status: 429,
                            code: "rate_limited",
                            message: "rate limit exceeded".into(),
                        }),
                    };
                }
            }
        }
        if let Some(deadline) = self.deadline {
            cx.set_deadline(deadline);
        }
        if let Some(limiter) = &self.limiter {
            let deadline_left = self.deadline.map(|d| d.saturating_sub(cx.elapsed()));
            if deadline_left.is_some_and(|left| left.is_zero()) {
                self.registry
                    .decision(&self.route, decisions::DEADLINE_EXCEEDED);
                self.registry.admission_waited(
                    &self.route,
                    decisions::DEADLINE_EXCEEDED,
                    Duration::ZERO,
                );
                return Err(StageError {
                    status: 504,
                    code: "deadline_exceeded",
                    message: format!("route {} could not answer within its deadline", self.route),
                });
            }
            let mut wait = match deadline_left {
                Some(left) => self.queue_timeout.min(left),
                None => self.queue_timeout,
            };
            // Lower priorities are shed first: no queueing while a higher-priority request on
            // the same upstream waits for a slot.
            if let Some((priority, waits)) = &self.priority {
                if waits.higher_waiting(*priority) {
                    wait = Duration::ZERO;
                }
            }
            let note_wait = || {
                self.priority
                    .as_ref()
                    .map(|(priority, waits)| waits.wait(*priority))
            };
            let asked = std::time::Instant::now();
            let outcome = limiter.acquire_noting(wait, note_wait).await;
            let waited = asked.elapsed();
            match outcome {
                Ok((permit, queued)) => {
                    if queued {
                        self.registry.decision(&self.route, decisions::QUEUED);
                    }
                    self.registry.decision(&self.route, decisions::ADMITTED);
                    self.registry
                        .admission_waited(&self.route, decisions::ADMITTED, waited);
                    state.permit = Some(permit);
                }
                Err(rejection) => {
                    let deadline_hit =
                        matches!(rejection, Rejection::Timeout | Rejection::WouldTimeOut)
                            && deadline_left.is_some_and(|left| left <= self.queue_timeout);
                    if deadline_hit {
                        self.registry
                            .decision(&self.route, decisions::DEADLINE_EXCEEDED);
                        self.registry.admission_waited(
                            &self.route,
                            decisions::DEADLINE_EXCEEDED,
                            waited,
                        );
                        return Err(StageError {
                            status: 504,
                            code: "deadline_exceeded",
                            message: format!(
                                "route {} could not answer within its deadline",
                                self.route
                            ),
                        });
                    }
                    self.registry.decision(&self.route, decisions::SHED);
                    self.registry
                        .admission_waited(&self.route, decisions::SHED, waited);
                    let answer = json_answer(
                        503,
                        "overloaded",
                        &format!(
                            "route {} is at its concurrency limit; retry shortly",
                            self.route
                        ),
                        &[("retry-after", "1".into())],
                    );
                    *cx.slot = Some(Box::new(state));
                    return match answer {
                        Some(answer) => Ok(Verdict::Shed(answer)),
                        None => Err(StageError {
                            status: 503,
                            code: "overloaded",
                            message: "overloaded".into(),
                        }),
                    };
                }
            }
        }
        *cx.slot = Some(Box::new(state));
        Ok(Verdict::Continue)
    }

    fn on_upstream_response(
        &self,
        slot: &mut Slot,
        _resp: &ResponseHeader,
    ) -> crate::pipeline::ResponseVerdict {
        if let Some(permit) = state_mut::<SloState>(slot).and_then(|s| s.permit.as_mut()) {
            let latency = permit.held();
            permit.observe(latency);
        }
        crate::pipeline::ResponseVerdict::Forward
    }

    fn on_response(&self, slot: &Slot, resp: &mut ResponseHeader) {
        let (Some(state), Some((limiter, _))) = (state_ref::<SloState>(slot), &self.rate) else {
            return;
        };
        if let Some(remaining) = state.rate_remaining {
            // `t`: seconds until the bucket is full again.
            let missing = f64::from(limiter.burst.saturating_sub(remaining));
            let full_in = retry_seconds(Duration::from_secs_f64(missing / limiter.rate.max(1e-9)));
            let _ = resp.insert_header("ratelimit-policy", self.policy_header(limiter));
            let _ = resp.insert_header(
                "ratelimit",
                format!("\"default\";r={remaining};t={full_in}"),
            );
        }
    }

    fn on_upstream_failure(
        &self,
        slot: &mut Slot,
        failure: &crate::pipeline::UpstreamFailure,
    ) -> Option<Answer> {
        if failure.kind == "deadline" {
            self.registry
                .decision(&self.route, decisions::DEADLINE_EXCEEDED);
        }
        // A timeout is the overload signal the adaptive limit must hear.
        if matches!(failure.kind, "deadline" | "timeout" | "connect_timeout") {
            if let Some(permit) = state_mut::<SloState>(slot).and_then(|s| s.permit.as_mut()) {
                permit.dropped();
            }
        }
        None
    }

    fn on_complete(&self, slot: &mut Slot, done: &Completion<'_>) {
        // The slot is given back now, not when the request's context is dropped.
        if let Some(state) = state_mut::<SloState>(slot) {
            state.permit.take();
        }
        // Background work is not a client's request.
        if done.background {
            return;
        }
        // A client that gave up (499) got no answer: it is not an availability event, but a
        // wait past the latency threshold is still a bad latency event.
        let abandoned = done.status == 0 || done.status == 499;
        for objective in &self.objectives {
            let good = match objective.kind {
                Kind::Latency { threshold } => done.duration <= threshold,
                Kind::Availability if abandoned => continue,
                // An upstream failure after the response header went out shows as a 2xx here,
                // but the client got a broken response.
                Kind::Availability => done.status < 500 && !done.upstream_failed,
            };
            if abandoned && good {
                continue;
            }
            self.registry.record(objective, good);
        }
    }
}

/// The upstream latency the adaptive limit aims for: an admitted request may first have waited
/// up to `queue_timeout` for its slot, so the upstream must answer that much inside the
/// objective for the whole request to meet it (but the aim never drops below half of it).
fn adaptive_target(objective: Duration, queue_timeout: Duration) -> Duration {
    objective.saturating_sub(queue_timeout).max(objective / 2)
}

#[cfg(test)]
mod tests {
    use super::adaptive_target;
    use std::time::Duration;

    #[test]
    fn the_adaptive_aim_leaves_room_for_the_queue_wait() {
        let ms = Duration::from_millis;
        assert_eq!(adaptive_target(ms(60), ms(20)), ms(40));
        assert_eq!(adaptive_target(ms(60), ms(50)), ms(30), "never below half");
        assert_eq!(adaptive_target(ms(60), Duration::ZERO), ms(60));
    }
}
