//! The `inference:` stage: answers a route's requests with a model of the registry (OIP v2 or
//! an app's JSON shape), through the prediction cache and the model's batcher; falls back to the
//! upstream when the model is missing or fails (`fallback: upstream`); in shadow mode lets the
//! upstream answer and compares its answer with the model's in the background.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use pingora_http::{RequestHeader, ResponseHeader};
use serde_json::{json, Value};

use super::config::{Fallback, InferenceConfig, Protocol};
use super::error::InferenceError;
use super::model::LoadedModel;
use super::protocol;
use super::registry::{ModelEntry, ModelRegistry};
use super::tensor::NamedTensor;
use crate::pipeline::{state_mut, Answer, Completion, RequestCx, Slot, Stage, StageError, Verdict};
use crate::store::{CacheKey, Store, StoredResponse};

/// Store namespace of cached predictions.
pub const NAMESPACE: &str = "inference";

/// Most bytes of an upstream answer kept for a shadow comparison.
const SHADOW_MAX_BODY: usize = 1024 * 1024;

/// Most mismatches logged per minute per route (the rest are only counted).
const MISMATCH_LOG_PER_MINUTE: u32 = 10;

#[derive(Debug)]
pub struct InferenceStage {
    route: String,
    config: InferenceConfig,
    fallback: Fallback,
    registry: Arc<ModelRegistry>,
    store: Arc<Store>,
    /// Start of the current minute and mismatches logged in it.
    logged: Arc<Mutex<(Instant, u32)>>,
}

/// What a shadowed request carries from `on_request` to `on_complete`.
struct Shadow {
    model: Arc<LoadedModel>,
    prediction: tokio::task::JoinHandle<Result<Vec<NamedTensor>, InferenceError>>,
    status: u16,
    body: Vec<u8>,
    truncated: bool,
}

impl InferenceStage {
    pub fn new(
        route: &str,
        config: InferenceConfig,
        has_upstream: bool,
        registry: Arc<ModelRegistry>,
        store: Arc<Store>,
    ) -> Self {
        InferenceStage {
            route: route.to_owned(),
            fallback: config.fallback_for(has_upstream),
            config,
            registry,
            store,
            logged: Arc::new(Mutex::new((Instant::now(), 0))),
        }
    }

    fn count(&self, model: &str, outcome: &str) {
        self.registry
            .metrics()
            .requests
            .with_label_values(&[model, outcome])
            .inc();
    }

    /// The answer for an error, or `Continue` when the upstream stands in.
    fn refuse(&self, model: &str, e: InferenceError) -> Verdict {
        if e.falls_back() && self.fallback == Fallback::Upstream {
            self.count(model, "fallback");
            // A missing model is already reported by its load; only failed runs are news.
            if matches!(e, InferenceError::Compute(_)) {
                tracing::warn!(route = %self.route, model, error = %e, "inference failed; the upstream answers");
            }
            return Verdict::Continue;
        }
        self.count(model, e.outcome());
        match e.answer(self.config.protocol, &self.config.json.error_code) {
            Some(answer) => Verdict::Answer(answer),
            None => Verdict::Continue,
        }
    }

    async fn on_json(&self, cx: &mut RequestCx<'_>, name: &str) -> Verdict {
        let entry = match self.registry.get(name) {
            Some(entry) => entry,
            None => return self.refuse(name, InferenceError::Unavailable(name.to_owned())),
        };
        let Some(model) = entry.current() else {
            return self.refuse(name, InferenceError::Unavailable(name.to_owned()));
        };
        let body = cx.body.cloned().unwrap_or_default();
        let inputs = match protocol::parse_json(&body, &self.config.json, &model) {
            Ok(inputs) => inputs,
            Err(e) => return self.refuse(name, e),
        };
        let deadline = deadline(cx);
        match predict(&entry, &model, &self.store, inputs, deadline).await {
            Ok((outputs, hit)) => {
                self.count(name, if hit { "cache_hit" } else { "ok" });
                let body = protocol::json_response(&self.config.json, &model, &outputs);
                answer_or_continue(200, &body, &model.version)
            }
            Err(e) => self.refuse(name, e),
        }
    }

    /// Starts the model on a copy of the request; the upstream answers the client.
    fn start_shadow(&self, cx: &mut RequestCx<'_>, name: &str) {
        let Some(entry) = self.registry.get(name) else {
            return;
        };
        let Some(model) = entry.current() else {
            return;
        };
        let body = cx.body.cloned().unwrap_or_default();
        // Input the model refuses is the app's to answer; nothing to compare.
        let Ok(inputs) = protocol::parse_json(&body, &self.config.json, &model) else {
            return;
        };
        let deadline = deadline(cx);
        let store = self.store.clone();
        let task_model = model.clone();
        let prediction = tokio::spawn(async move {
            predict(&entry, &task_model, &store, inputs, deadline)
                .await
                .map(|(outputs, _)| outputs)
        });
        *cx.slot = Some(Box::new(Shadow {
            model,
            prediction,
            status: 0,
            body: Vec::new(),
            truncated: false,
        }));
    }

    async fn on_oip(&self, cx: &mut RequestCx<'_>) -> Verdict {
        let path = cx.req.uri.path();
        let method = cx.req.method.as_str();
        let rest = path.strip_prefix("/v2").unwrap_or(path);
        let segments: Vec<&str> = rest.trim_matches('/').split('/').collect();
        let label = self.config.model.clone().unwrap_or_default();
        let result = match segments.as_slice() {
            ["health", "live"] => only_get(method).map(|_| (200, json!({ "live": true }))),
            ["health", "ready"] => only_get(method).map(|_| {
                let ready = match &self.config.model {
                    Some(name) => self
                        .registry
                        .get(name)
                        .is_some_and(|e| e.current().is_some()),
                    None => self.registry.all_ready(),
                };
                (if ready { 200 } else { 503 }, json!({ "ready": ready }))
            }),
            ["models", name] => only_get(method).and_then(|_| {
                let (_, model) = self.oip_model(name)?;
                Ok((200, protocol::oip_metadata(&model)))
            }),
            ["models", name, "ready"] => only_get(method).and_then(|_| {
                let entry = self.oip_entry(name)?;
                let ready = entry.current().is_some();
                Ok((
                    if ready { 200 } else { 503 },
                    json!({ "name": name, "ready": ready }),
                ))
            }),
            ["models", name, "infer"] => return self.oip_infer(cx, name, None).await,
            ["models", name, "versions", version, "infer"] => {
                return self.oip_infer(cx, name, Some(version)).await
            }
            _ => Err(InferenceError::NoEndpoint(path.to_owned())),
        };
        match result {
            Ok((status, body)) => answer_or_continue(status, &body, ""),
            Err(e) => self.refuse(&label, e),
        }
    }

    fn oip_entry(&self, name: &str) -> Result<Arc<ModelEntry>, InferenceError> {
        if self.config.model.as_deref().is_some_and(|m| m != name) {
            return Err(InferenceError::UnknownModel(name.to_owned()));
        }
        self.registry
            .get(name)
            .ok_or_else(|| InferenceError::UnknownModel(name.to_owned()))
    }

    fn oip_model(&self, name: &str) -> Result<(Arc<ModelEntry>, Arc<LoadedModel>), InferenceError> {
        let entry = self.oip_entry(name)?;
        let model = entry
            .current()
            .ok_or_else(|| InferenceError::Unavailable(name.to_owned()))?;
        Ok((entry, model))
    }

    async fn oip_infer(
        &self,
        cx: &mut RequestCx<'_>,
        name: &str,
        version: Option<&str>,
    ) -> Verdict {
        if cx.req.method.as_str() != "POST" {
            return self.refuse(name, InferenceError::Method(cx.req.method.to_string()));
        }
        let (entry, model) = match self.oip_model(name) {
            Ok(found) => found,
            Err(e) => return self.refuse(name, e),
        };
        if version.is_some_and(|v| v != model.version) {
            return self.refuse(
                name,
                InferenceError::NoEndpoint(format!(
                    "model {name:?} serves version {}",
                    model.version
                )),
            );
        }
        let body = cx.body.cloned().unwrap_or_default();
        let request = match protocol::parse_oip(&body) {
            Ok(request) => request,
            Err(e) => return self.refuse(name, e),
        };
        let deadline = deadline(cx);
        let outputs = predict(&entry, &model, &self.store, request.inputs, deadline).await;
        let result = outputs.and_then(|(outputs, hit)| {
            protocol::oip_response(&model, request.id.as_ref(), &outputs, &request.outputs)
                .map(|body| (body, hit))
        });
        match result {
            Ok((body, hit)) => {
                self.count(name, if hit { "cache_hit" } else { "ok" });
                answer_or_continue(200, &body, &model.version)
            }
            Err(e) => self.refuse(name, e),
        }
    }

    /// Compares the upstream's answer with the model's, in the background.
    fn compare(&self, shadow: Shadow) {
        let Some(name) = self.config.model.clone() else {
            return;
        };
        let route = self.route.clone();
        let mapping = self.config.json.clone();
        let tolerance = self.config.tolerance;
        let metrics = self.registry.metrics().clone();
        let logged = self.logged.clone();
        tokio::spawn(async move {
            let result = match shadow.prediction.await {
                Ok(Ok(outputs)) => {
                    let ours = protocol::json_response(&mapping, &shadow.model, &outputs);
                    serde_json::from_slice::<Value>(&shadow.body)
                        .ok()
                        .map(|theirs| {
                            differences(&ours, &theirs, &mapping, &shadow.model, tolerance)
                        })
                }
                _ => None,
            };
            let label = match &result {
                Some(None) => "match",
                Some(Some(_)) => "mismatch",
                None => "error",
            };
            metrics
                .shadow
                .with_label_values(&[&route, &name, label])
                .inc();
            let get = |r: &str| metrics.shadow.with_label_values(&[&route, &name, r]).get();
            let (matched, mismatched) = (get("match"), get("mismatch"));
            if matched + mismatched > 0 {
                metrics
                    .shadow_ratio
                    .with_label_values(&[&route, &name])
                    .set(mismatched as f64 / (matched + mismatched) as f64);
            }
            if let Some(Some(diff)) = result {
                let mut logged = logged.lock();
                if logged.0.elapsed() >= Duration::from_secs(60) {
                    *logged = (Instant::now(), 0);
                }
                if logged.1 < MISMATCH_LOG_PER_MINUTE {
                    logged.1 += 1;
                    tracing::warn!(route = %route, model = %name, version = %shadow.model.version, difference = %diff, "shadow mismatch: the model and the upstream disagree");
                }
            }
        });
    }
}

/// The first difference beyond `tolerance` between our answer and the upstream's, as text.
fn differences(
    ours: &Value,
    theirs: &Value,
    mapping: &super::config::JsonMapping,
    model: &LoadedModel,
    tolerance: f64,
) -> Option<String> {
    for (field, _) in protocol::mapped_outputs(mapping, model) {
        let a = ours.get(field).and_then(protocol::numbers);
        let b = theirs.get(field).and_then(protocol::numbers);
        match (a, b) {
            (Some(a), Some(b)) if a.len() == b.len() => {
                if let Some((i, (x, y))) = a
                    .iter()
                    .zip(&b)
                    .enumerate()
                    .find(|(_, (x, y))| (*x - *y).abs() > tolerance)
                {
                    return Some(format!(
                        "{field}[{i}]: model {x}, upstream {y} (tolerance {tolerance})"
                    ));
                }
            }
            (a, b) => {
                return Some(format!(
                    "{field}: model has {} values, upstream {}",
                    a.map_or(0, |v| v.len()),
                    b.map_or_else(|| "none".to_owned(), |v| v.len().to_string())
                ))
            }
        }
    }
    None
}

fn only_get(method: &str) -> Result<(), InferenceError> {
    match method {
        "GET" | "HEAD" => Ok(()),
        other => Err(InferenceError::Method(other.to_owned())),
    }
}

/// When the model must have answered: the deadline an earlier stage set, else the route
/// upstream's timeout.
fn deadline(cx: &RequestCx<'_>) -> Instant {
    cx.arrived + cx.deadline().unwrap_or(cx.upstream_timeout)
}

fn answer_or_continue(status: u16, body: &Value, version: &str) -> Verdict {
    let headers = [("x-model-version", version.to_owned())];
    let headers: &[(&str, String)] = if version.is_empty() { &[] } else { &headers };
    match crate::pipeline::Answer::json_value(status, body, "no-store", headers) {
        Some(answer) => Verdict::Answer(answer),
        None => Verdict::Continue,
    }
}

/// The prediction cache key: model version and every input tensor (name, type, shape, values).
fn cache_key(model: &LoadedModel, inputs: &[NamedTensor]) -> CacheKey {
    let mut buf = Vec::new();
    for t in inputs {
        buf.extend_from_slice(t.name.as_bytes());
        buf.push(0);
        buf.extend_from_slice(t.data.dtype().oip().as_bytes());
        for d in &t.shape {
            buf.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        t.data.key_bytes(&mut buf);
    }
    CacheKey::from_parts(NAMESPACE, &model.name, &[model.version.as_bytes(), &buf])
}

/// Checks, looks up the cache, runs through the batcher and stores: the outputs and whether they
/// came from the cache.
async fn predict(
    entry: &ModelEntry,
    model: &Arc<LoadedModel>,
    store: &Store,
    inputs: Vec<NamedTensor>,
    deadline: Instant,
) -> Result<(Vec<NamedTensor>, bool), InferenceError> {
    let inputs = protocol::check_inputs(model, inputs)?;
    let ttl = entry.cache_ttl();
    let key = ttl.map(|_| cache_key(model, &inputs));
    if let Some(key) = &key {
        let cached = store.lookup(key).await.entry.and_then(|hit| {
            let list: Vec<Value> = serde_json::from_slice(&hit.body).ok()?;
            list.iter()
                .map(NamedTensor::from_json)
                .collect::<Option<Vec<_>>>()
        });
        let outcome = if cached.is_some() { "hit" } else { "miss" };
        entry
            .metrics()
            .cache
            .with_label_values(&[&model.name, outcome])
            .inc();
        if let Some(outputs) = cached {
            return Ok((outputs, true));
        }
    }
    let rx = entry.batcher().submit(model.clone(), inputs, deadline)?;
    let left = deadline.saturating_duration_since(Instant::now());
    let outputs = match tokio::time::timeout(left, rx).await {
        Err(_) => return Err(InferenceError::Deadline),
        Ok(Err(_)) => {
            return Err(InferenceError::Compute(
                "the compute thread went away".into(),
            ))
        }
        Ok(Ok(reply)) => reply?,
    };
    if let (Some(key), Some(ttl)) = (key, ttl) {
        let body: Vec<Value> = outputs.iter().map(NamedTensor::to_json).collect();
        let entry = StoredResponse {
            status: 200,
            headers: Vec::new(),
            body: Bytes::from(Value::Array(body).to_string()),
            stored_at: SystemTime::now(),
            ttl,
            retention: ttl,
            namespace: NAMESPACE.to_owned(),
            label: model.name.clone(),
        };
        store.store_now(&key, entry);
    }
    Ok((outputs, false))
}

#[async_trait]
impl Stage for InferenceStage {
    fn name(&self) -> &'static str {
        "inference"
    }

    fn wants_body(&self, req: &RequestHeader) -> bool {
        req.method == http::Method::POST
    }

    fn body_too_large(&self, _req: &RequestHeader, limit: usize) -> Option<Answer> {
        // In shadow mode the app answers, and so the proxy's own 413 stands.
        if self.config.shadow {
            return None;
        }
        let label = self.config.model.clone().unwrap_or_default();
        self.count(&label, "bad_input");
        InferenceError::BadInput(format!(
            "the request body is larger than max_body ({limit} bytes)"
        ))
        .answer(self.config.protocol, &self.config.json.error_code)
    }

    async fn on_request(&self, cx: &mut RequestCx<'_>) -> Result<Verdict, StageError> {
        let limit = self.config.max_body.0;
        let too_large = cx.body.is_some_and(|b| b.len() as u64 > limit);
        if too_large && !self.config.shadow {
            let label = self.config.model.clone().unwrap_or_default();
            let e = InferenceError::BadInput(format!(
                "the request body is larger than inference.max_body ({limit} bytes)"
            ));
            return Ok(self.refuse(&label, e));
        }
        match (self.config.protocol, self.config.model.clone()) {
            // The app answers what the model may not read.
            (Protocol::Json, Some(_)) if self.config.shadow && too_large => Ok(Verdict::Continue),
            (Protocol::Oip, _) => Ok(self.on_oip(cx).await),
            (Protocol::Json, Some(name)) if self.config.shadow => {
                self.start_shadow(cx, &name);
                Ok(Verdict::Continue)
            }
            (Protocol::Json, Some(name)) => Ok(self.on_json(cx, &name).await),
            // Refused by validation.
            (Protocol::Json, None) => Ok(Verdict::Continue),
        }
    }

    fn on_upstream_response(
        &self,
        slot: &mut Slot,
        resp: &ResponseHeader,
    ) -> crate::pipeline::ResponseVerdict {
        if let Some(shadow) = state_mut::<Shadow>(slot) {
            shadow.status = resp.status.as_u16();
        }
        crate::pipeline::ResponseVerdict::Forward
    }

    fn on_body_chunk(&self, slot: &mut Slot, chunk: Option<&Bytes>, _end_of_stream: bool) {
        if let (Some(shadow), Some(chunk)) = (state_mut::<Shadow>(slot), chunk) {
            if shadow.body.len() + chunk.len() > SHADOW_MAX_BODY {
                shadow.truncated = true;
            } else {
                shadow.body.extend_from_slice(chunk);
            }
        }
    }

    fn on_complete(&self, slot: &mut Slot, done: &Completion<'_>) {
        let Some(state) = slot.take() else {
            return;
        };
        let Ok(shadow) = state.downcast::<Shadow>() else {
            return;
        };
        // Only complete successful answers are comparable.
        if shadow.status == 200 && done.status == 200 && !shadow.truncated && !done.upstream_failed
        {
            self.compare(*shadow);
        } else {
            shadow.prediction.abort();
        }
    }
}
