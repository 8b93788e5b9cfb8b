//! Liveness, readiness, build and limits information, and Prometheus metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::AppState;

/// Readiness: 503 until at least one model can answer.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "`{\"status\": \"ok\", \"models\": [...]}`"), (status = 503, description = "No model loaded yet")))]
pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let models = state.engine.model_names();
    if models.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "loading", "models": models })),
        )
    } else {
        (
            StatusCode::OK,
            Json(json!({ "status": "ok", "models": models })),
        )
    }
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
