//! `POST /predict` and `POST /models/{name}/predict`.

use std::time::Instant;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::engine::{self, Prediction};
use crate::metrics::{Metrics, RequestLabels};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PredictQuery {
    /// Model name; the server's default model when absent.
    pub model: Option<String>,
    /// How many classes to return; 0 (or more than there are) returns all. Default 5.
    pub top_k: Option<usize>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Predictions {
    predictions: Vec<Prediction>,
}

/// One image's answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Single {
    model: String,
    predictions: Vec<Prediction>,
}

/// The answer to several `image` parts, in their order.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Several {
    model: String,
    results: Vec<Predictions>,
}

const DEFAULT_TOP_K: usize = 5;

/// Classify the image(s) in the body: raw bytes, or multipart `image` file fields.
#[utoipa::path(
    post,
    path = "/predict",
    tag = "predict",
    params(PredictQuery),
    request_body(content_type = "application/octet-stream", description = "The image bytes (any image/* type), or multipart/form-data with one or more `image` file fields"),
    responses(
        (status = 200, description = "Softmax probabilities, most probable first; `results` for several images", body = Single),
        (status = 400, description = "No image, malformed multipart or query", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body over --payload-limit", body = ErrorBody),
        (status = 415, description = "Not an image, or an undecodable one", body = ErrorBody),
        (status = 422, description = "Too many pixels", body = ErrorBody),
        (status = 429, description = "Too many requests in flight", body = ErrorBody),
    )
)]
pub async fn predict(
    State(state): State<AppState>,
    query: Result<Query<PredictQuery>, QueryRejection>,
    request: Request,
) -> Response {
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    let model = query.model.clone().or_else(|| state.default_model());
    run(state, model, query.top_k, request).await
}

/// Same as `/predict`, with the model in the path.
#[utoipa::path(
    post,
    path = "/models/{name}/predict",
    tag = "predict",
    params(("name" = String, Path, description = "Model name"), ("top_k" = Option<usize>, Query, description = "Classes to return (default 5; 0 = all)")),
    request_body(content_type = "application/octet-stream", description = "As for /predict"),
    responses(
        (status = 200, body = Single),
        (status = 404, body = ErrorBody),
    )
)]
pub async fn predict_named(
    State(state): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<PredictQuery>, QueryRejection>,
    request: Request,
) -> Response {
    let top_k = match query {
        Ok(Query(q)) => q.top_k,
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    run(state, Some(name), top_k, request).await
}

async fn run(
    state: AppState,
    model: Option<String>,
    top_k: Option<usize>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let model_label = model_label(&state, model.as_deref());
    let response = match answer(
        &state,
        model,
        top_k.unwrap_or(DEFAULT_TOP_K),
        request,
        started,
    )
    .await
    {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    record(
        &state,
        model_label,
        response.status().as_u16(),
        "rest",
        started,
    );
    response
}

/// The model label of a prediction request's metrics: known model names only, since labels a
/// request could choose would let clients grow `/metrics` without end.
pub(super) fn model_label(state: &AppState, model: Option<&str>) -> String {
    match model {
        Some(name) if state.engine.get(name).is_some() => name.to_string(),
        _ => "unknown".to_string(),
    }
}

/// Counts a prediction request, whichever protocol it came by, and its whole time.
pub(super) fn record(
    state: &AppState,
    model: String,
    status: u16,
    protocol: &'static str,
    started: Instant,
) {
    let metrics = state.engine.metrics();
    metrics
        .total_seconds
        .get_or_create(&Metrics::model(&model))
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels {
            model,
            status,
            protocol,
        })
        .inc();
}

async fn answer(
    state: &AppState,
    model: Option<String>,
    top_k: usize,
    request: Request,
    started: Instant,
) -> Result<Response, ApiError> {
    let model = model.ok_or_else(|| {
        ApiError::not_found("no model is loaded yet; see GET /models and GET /health")
    })?;
    if state.engine.get(&model).is_none() {
        return Err(super::models::unknown(state, &model));
    }
    let (images, several) = read_images(state, request).await?;
    let predicted = state.engine.predict(&model, images).await?;
    let labels = &predicted.classifier.labels;
    let mut results: Vec<Vec<Prediction>> = predicted
        .probabilities
        .iter()
        .map(|p| engine::top_k(p, labels, top_k))
        .collect();
    let body = if several {
        Json(Several {
            model: predicted.classifier.name.clone(),
            results: results
                .into_iter()
                .map(|predictions| Predictions { predictions })
                .collect(),
        })
        .into_response()
    } else {
        Json(Single {
            model: predicted.classifier.name.clone(),
            predictions: results.remove(0),
        })
        .into_response()
    };
    let mut response = body;
    let headers = response.headers_mut();
    timing_header(headers, "x-queue-time", predicted.queue_time.as_secs_f64());
    timing_header(
        headers,
        "x-inference-time",
        predicted.inference_time.as_secs_f64(),
    );
    timing_header(headers, "x-total-time", started.elapsed().as_secs_f64());
    Ok(response)
}

/// Milliseconds, as text-embeddings-inference and TorchServe report them.
pub(super) fn timing_header(headers: &mut HeaderMap, name: &'static str, seconds: f64) {
    if let Ok(value) = HeaderValue::from_str(&format!("{:.3}", seconds * 1e3)) {
        headers.insert(name, value);
    }
}

/// The request's images, and whether it was a multipart upload with more than one.
async fn read_images(state: &AppState, request: Request) -> Result<(Vec<Bytes>, bool), ApiError> {
    let limit = state.config.payload_limit;
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.to_ascii_lowercase());
    match content_type.as_deref() {
        Some(ct) if ct.starts_with("multipart/form-data") => {
            let mut multipart = Multipart::from_request(request, state).await.map_err(|e| {
                ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
            })?;
            let mut images = Vec::new();
            loop {
                let field = match multipart.next_field().await {
                    Ok(Some(field)) => field,
                    Ok(None) => break,
                    Err(e) => {
                        return Err(ApiError::from_body_rejection(
                            e.status(),
                            e.body_text(),
                            limit,
                        ))
                    }
                };
                if field.name() != Some("image") {
                    continue;
                }
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| ApiError::from_body_rejection(e.status(), e.body_text(), limit))?;
                images.push(bytes);
            }
            if images.is_empty() {
                return Err(ApiError::bad_request(
                    "multipart body has no `image` field: send the image as a file field named `image`",
                ));
            }
            let several = images.len() > 1;
            Ok((images, several))
        }
        // curl's --data-binary says form-urlencoded unless told otherwise: the bytes decide.
        None => raw_body(request, limit).await,
        Some(ct)
            if ct.starts_with("image/")
                || ct.starts_with("application/octet-stream")
                || ct.starts_with("application/x-www-form-urlencoded") =>
        {
            raw_body(request, limit).await
        }
        Some(other) => Err(ApiError::unsupported_media_type(format!(
            "content type `{other}` is not an image: send the raw image bytes (image/* or \
             application/octet-stream) or multipart/form-data with `image` file fields"
        ))),
    }
}

async fn raw_body(request: Request, limit: usize) -> Result<(Vec<Bytes>, bool), ApiError> {
    let bytes = Bytes::from_request(request, &())
        .await
        .map_err(|e| ApiError::from_body_rejection(e.status(), e.body_text(), limit))?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request("empty body: no image was sent"));
    }
    Ok((vec![bytes], false))
}
