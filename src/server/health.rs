//! Liveness, readiness, build and limits information, and Prometheus metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::AppState;
use crate::engine::ModelState;

/// Readiness: 200 once every model found at start has settled (ready or failed) and the default
/// model is ready; else 503. Both answer `{"status", "default_model", "models": [{"name", "state",
/// "error"?}]}`.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "`{\"status\": \"ok\", \"default_model\": …, \"models\": [{\"name\", \"state\"}]}`"),
        (status = 503, description = "Models still loading, or the default model not ready: `status` is `loading` or `unavailable`")))]
pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let states = state.engine.states();
    let default = state.default_model();
    let (status, word) = readiness(&states, default.as_deref());
    let models: Vec<serde_json::Value> = states
        .iter()
        .map(|(name, s)| match s.error() {
            Some(error) => json!({ "name": name, "state": s.name(), "error": error }),
            None => json!({ "name": name, "state": s.name() }),
        })
        .collect();
    (
        status,
        Json(json!({ "status": word, "default_model": default, "models": models })),
    )
}

/// Whether the server is ready (every model found has settled and the default one is ready): 200
/// `ok`, or 503 `loading` / `unavailable`. `/health`, `/v2/health/ready` and gRPC's ServerReady
/// all answer this.
pub(super) fn readiness(
    states: &std::collections::BTreeMap<String, ModelState>,
    default: Option<&str>,
) -> (StatusCode, &'static str) {
    let loading = states.values().any(|s| *s == ModelState::Loading);
    let default_ready = default.is_some_and(|d| states.get(d) == Some(&ModelState::Ready));
    match (loading, default_ready) {
        (false, true) => (StatusCode::OK, "ok"),
        (true, _) => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
        (false, false) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    }
}

/// Whether `state`'s server is ready: see [`readiness`].
pub(super) fn is_ready(state: &AppState) -> bool {
    let default = state.default_model();
    readiness(&state.engine.states(), default.as_deref()).0 == StatusCode::OK
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/ping", tag = "operations", responses((status = 200, description = "`{\"status\": \"ok\"}`")))]
pub async fn ping() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Version, device, models and limits.
#[utoipa::path(get, path = "/info", tag = "operations", responses((status = 200, description = "Server information")))]
pub async fn info(State(state): State<AppState>) -> Json<serde_json::Value> {
    let engine = state.engine.config();
    Json(json!({
        "name": env!("CARGO_PKG_NAME"),
        "version": env!("CARGO_PKG_VERSION"),
        "device": state.config.device_name,
        "default_model": state.default_model(),
        "models": state.engine.model_names(),
        "weights_dir": state.config.weights_dir.display().to_string(),
        "role": state.role,
        "jobs": state.jobs.as_ref().map(|jobs| {
            let (database, model_store) = jobs.describe_stores();
            json!({ "replica": jobs.config().replica, "database": database, "model_store": model_store })
        }),
        "limits": {
            "max_batch_size": engine.max_batch_size,
            "max_batch_delay_ms": engine.max_batch_delay.as_millis() as u64,
            "max_concurrent_requests": engine.max_concurrent_requests,
            "payload_limit": state.config.payload_limit,
            "max_pixels": engine.max_pixels,
        },
    }))
}

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Metrics", content_type = "application/openmetrics-text")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.engine.metrics().encode(),
    )
}
