//! The OpenAPI description of the HTTP API, generated from the handlers' annotations.

use axum::Json;
use utoipa::OpenApi;

use super::{error, health, jobs, models, predict};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "cnnserve",
        description = "Serve torchvision image classifiers and fine-tune them on your own photos."
    ),
    paths(
        predict::predict,
        predict::predict_named,
        models::list,
        models::get,
        models::delete,
        models::reload,
        jobs::download,
        jobs::submit,
        jobs::list,
        jobs::get,
        jobs::delete,
        jobs::events,
        jobs::example,
        health::health,
        health::ping,
        health::info,
        health::metrics,
    ),
    components(schemas(error::ErrorBody, predict::Several, predict::Predictions))
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "This document")))]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
