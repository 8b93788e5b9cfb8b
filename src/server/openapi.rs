//! The OpenAPI description of the HTTP API, generated from the handlers' annotations.

use axum::Json;
use utoipa::OpenApi;

use super::{error, health, jobs, kserve, models, predict, v2};

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
        openapi,
        kserve::server_metadata,
        kserve::live,
        kserve::ready,
        kserve::model_metadata,
        kserve::model_version_metadata,
        kserve::model_ready,
        kserve::model_version_ready,
        kserve::infer,
        kserve::infer_version,
    ),
    components(schemas(
        error::ErrorBody,
        predict::Several,
        predict::Predictions,
        v2::TensorMetadata,
        kserve::RequestInput,
        kserve::RequestOutput,
        kserve::ResponseOutput
    )),
    modifiers(&ApiKeyScheme)
)]
pub struct ApiDoc;

/// The `--api-key` scheme, marked on every operation that needs the key when one is set (the
/// Authorize button of `/docs`).
struct ApiKeyScheme;

impl utoipa::Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Only when the server runs with --api-key or --api-key-file. Event streams, \
                         example pictures and downloads also take ?api_key=.",
                    ))
                    .build(),
            ),
        );
        for (path, item) in openapi.paths.paths.iter_mut() {
            for (method, operation) in [
                (axum::http::Method::GET, &mut item.get),
                (axum::http::Method::POST, &mut item.post),
                (axum::http::Method::DELETE, &mut item.delete),
                (axum::http::Method::PUT, &mut item.put),
            ] {
                if let Some(operation) = operation {
                    if !super::auth::is_open(&method, path) {
                        operation.security = Some(vec![SecurityRequirement::new(
                            "api_key",
                            Vec::<String>::new(),
                        )]);
                    }
                }
            }
        }
    }
}

/// `GET /openapi.json`.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "This document")))]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Swagger UI at `/docs`, its files inside the binary, reading `/openapi.json`.
pub fn swagger_ui<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    utoipa_swagger_ui::SwaggerUi::new("/docs")
        .config(utoipa_swagger_ui::Config::from("/openapi.json"))
        .into()
}
