//! The Open Inference Protocol (KServe "v2") over HTTP, on the API's own port: `/v2/...`, JSON and
//! the binary-data extension Triton's clients use by default. The protocol's logic is
//! [`super::v2`]'s; this module reads and writes its HTTP form.
//!
//! Binary data: with an `Inference-Header-Content-Length: <n>` header, the body is `n` bytes of
//! JSON followed by the binary values of the inputs whose `parameters.binary_data_size` says how
//! many bytes each takes, in the order of `inputs`. Outputs whose `parameters.binary_data` is true
//! (or all, with the request's `parameters.binary_data_output`) are answered the same way.

use std::time::Instant;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::error::{ApiError, ErrorBody};
use super::v2::{self, Data, InputTensor};
use super::AppState;

/// Where the JSON part of a body with binary data ends, in requests and responses.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The extensions `GET /v2` lists.
const EXTENSIONS: [&str; 1] = ["binary_tensor_data"];

/// The `/v2` routes; inference requests are limited to `payload_limit` bytes.
pub fn routes(payload_limit: usize) -> Router<AppState> {
    let limit = DefaultBodyLimit::max(payload_limit);
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_version_metadata),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_version_ready),
        )
        .route("/v2/models/{name}/infer", post(infer).layer(limit))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_version).layer(limit),
        )
}

/// Server metadata (Open Inference Protocol).
#[utoipa::path(get, path = "/v2", tag = "v2",
    responses((status = 200, description = "`{\"name\": \"cnnserve\", \"version\", \"extensions\": [\"binary_tensor_data\"]}`", body = v2::ServerMetadata)))]
pub async fn server_metadata() -> Json<v2::ServerMetadata> {
    Json(v2::server_metadata(&EXTENSIONS))
}

/// Liveness (Open Inference Protocol): the process answers.
#[utoipa::path(get, path = "/v2/health/live", tag = "v2",
    responses((status = 200, description = "`{\"live\": true}`")))]
pub async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

/// Readiness (Open Inference Protocol), as `/health` decides it: 200 once every model found has
/// settled and the default model is ready, else 503.
#[utoipa::path(get, path = "/v2/health/ready", tag = "v2",
    responses((status = 200, description = "`{\"ready\": true}`"), (status = 503, description = "`{\"ready\": false}`: models still loading, or the default model not ready")))]
pub async fn ready(State(state): State<AppState>) -> Response {
    readiness(super::health::is_ready(&state), None)
}

fn readiness(ready: bool, name: Option<&str>) -> Response {
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = match name {
        Some(name) => json!({ "name": name, "ready": ready }),
        None => json!({ "ready": ready }),
    };
    (status, Json(body)).into_response()
}

/// A model's metadata (Open Inference Protocol): inputs `input` (FP32 [-1, 3, -1, -1]) and
/// `image` (BYTES [-1]), outputs `logits` and `probabilities` (FP32 [-1, classes]).
#[utoipa::path(get, path = "/v2/models/{name}", tag = "v2",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, body = v2::ModelMetadata),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 503, description = "Model still loading, or its load failed", body = ErrorBody),
    ))]
pub async fn model_metadata(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<v2::ModelMetadata>, ApiError> {
    v2::model_metadata(&state, &name, None).map(Json)
}

/// A model version's metadata: every model has the one version `1`.
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}", tag = "v2",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "`1`")),
    responses(
        (status = 200, body = v2::ModelMetadata),
        (status = 404, description = "Unknown model or version", body = ErrorBody),
    ))]
pub async fn model_version_metadata(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<v2::ModelMetadata>, ApiError> {
    v2::model_metadata(&state, &name, Some(&version)).map(Json)
}

/// Whether a model is ready (Open Inference Protocol): 200, or 503 while it loads or after its
/// load failed.
#[utoipa::path(get, path = "/v2/models/{name}/ready", tag = "v2",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "`{\"name\", \"ready\": true}`"),
        (status = 503, description = "`{\"name\", \"ready\": false}`"),
        (status = 404, description = "Unknown model", body = ErrorBody),
    ))]
pub async fn model_ready(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match v2::model_ready(&state, &name, None) {
        Ok(ready) => readiness(ready, Some(&name)),
        Err(e) => e.into_response(),
    }
}

/// Whether a model version is ready.
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}/ready", tag = "v2",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "`1`")),
    responses(
        (status = 200, description = "`{\"name\", \"ready\": true}`"),
        (status = 503, description = "`{\"name\", \"ready\": false}`"),
        (status = 404, description = "Unknown model or version", body = ErrorBody),
    ))]
pub async fn model_version_ready(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    match v2::model_ready(&state, &name, Some(&version)) {
        Ok(ready) => readiness(ready, Some(&name)),
        Err(e) => e.into_response(),
    }
}

/// An inference request's JSON (Open Inference Protocol).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct InferRequest {
    /// Echoed in the answer.
    #[serde(default)]
    pub id: Option<String>,
    /// `binary_data_output`: answer every output as binary data.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Map<String, Value>>,
    /// One of `input` (FP32 [N, 3, H, W], normalized) and `image` (BYTES [N]: base64 strings in
    /// JSON, raw bytes as binary data).
    pub inputs: Vec<RequestInput>,
    /// The outputs to answer (`logits`, `probabilities`); all when absent.
    #[serde(default)]
    pub outputs: Vec<RequestOutput>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RequestInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    /// `binary_data_size`: the input's values are that many bytes of the binary part.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Map<String, Value>>,
    /// The values, flat or nested in row-major order: numbers for FP32, base64 strings for BYTES.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RequestOutput {
    pub name: String,
    /// `binary_data`: answer this output as binary data (or not, over `binary_data_output`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Map<String, Value>>,
}

/// An inference answer's JSON.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outputs: Vec<ResponseOutput>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ResponseOutput {
    pub name: &'static str,
    /// FP32.
    pub datatype: &'static str,
    /// [N, classes].
    pub shape: Vec<i64>,
    /// `binary_data_size` for an output answered as binary data.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
    /// The values, row-major, for an output answered in JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Vec<f32>>,
}

/// Inference (Open Inference Protocol), through the same engine as `/predict`.
#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "v2",
    params(("name" = String, Path, description = "Model name")),
    request_body(content = InferRequest, description = "JSON; or, with an `Inference-Header-Content-Length` header, that many bytes of JSON followed by the inputs' binary data (application/octet-stream)"),
    responses(
        (status = 200, description = "The outputs asked for; with `Inference-Header-Content-Length` when some are binary data", body = InferResponse),
        (status = 400, description = "Malformed request: JSON, shapes, datatypes, sizes, names", body = ErrorBody),
        (status = 404, description = "Unknown model or version", body = ErrorBody),
        (status = 413, description = "Body over --payload-limit", body = ErrorBody),
        (status = 422, description = "Too many pixels", body = ErrorBody),
        (status = 429, description = "Too many requests in flight", body = ErrorBody),
        (status = 503, description = "Model loading or unavailable", body = ErrorBody),
    ))]
pub async fn infer(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(state, name, None, headers, body).await
}

/// Inference with a model version: every model has the one version `1`.
#[utoipa::path(post, path = "/v2/models/{name}/versions/{version}/infer", tag = "v2",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "`1`")),
    request_body(content = InferRequest, description = "As for /v2/models/{name}/infer"),
    responses(
        (status = 200, body = InferResponse),
        (status = 404, description = "Unknown model or version", body = ErrorBody),
    ))]
pub async fn infer_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(state, name, Some(version), headers, body).await
}

async fn run(
    state: AppState,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let label = super::predict::model_label(&state, Some(&name));
    let response = match answer(&state, &name, version.as_deref(), &headers, body, started).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    super::predict::record(&state, label, response.status().as_u16(), "v2", started);
    response
}

async fn answer(
    state: &AppState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    started: Instant,
) -> Result<Response, ApiError> {
    let limit = state.config.payload_limit;
    let body = body.map_err(|e| ApiError::from_body_rejection(e.status(), e.body_text(), limit))?;
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING) {
        let encoding = String::from_utf8_lossy(encoding.as_bytes());
        if !encoding.trim().eq_ignore_ascii_case("identity") {
            return Err(ApiError::unsupported_media_type(format!(
                "Content-Encoding `{encoding}` is not supported: send the request uncompressed"
            )));
        }
    }
    let (json, mut binary) = split_body(headers, body)?;
    let request: InferRequest = serde_json::from_slice(&json).map_err(|e| {
        let hint = if binary.is_empty() && headers.get(HEADER_LENGTH).is_none() {
            " (a body with binary data says where its JSON ends with an \
             Inference-Header-Content-Length header)"
        } else {
            ""
        };
        ApiError::bad_request(format!(
            "the body is not an inference request's JSON: {e}{hint}"
        ))
    })?;
    let had_binary = headers.get(HEADER_LENGTH).is_some();
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let size = parameter(&input.parameters, "binary_data_size", &input.name, |v| {
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or("a byte count")
        })?;
        let data = match (size, input.data) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(format!(
                    "input `{}` has both `data` and parameters.binary_data_size: send its \
                     values in one of them",
                    input.name
                )))
            }
            (Some(size), None) => {
                if !had_binary {
                    return Err(ApiError::bad_request(format!(
                        "input `{}` says its values are {size} bytes of binary data, but the \
                         request has no Inference-Header-Content-Length header, so no binary part",
                        input.name
                    )));
                }
                if size > binary.len() {
                    return Err(ApiError::bad_request(format!(
                        "input `{}` says its values are {size} bytes of binary data, but only {} \
                         bytes of binary data are left for it",
                        input.name,
                        binary.len()
                    )));
                }
                Data::Raw(binary.split_to(size))
            }
            (None, Some(data)) => Data::Json(data),
            (None, None) => {
                return Err(ApiError::bad_request(format!(
                    "input `{}` has neither `data` nor parameters.binary_data_size: send its \
                     values in one of them",
                    input.name
                )))
            }
        };
        inputs.push(InputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(ApiError::bad_request(format!(
            "the body has {} bytes of binary data that no input's parameters.binary_data_size \
             accounts for",
            binary.len()
        )));
    }
    let all_binary = parameter(
        &request.parameters,
        "binary_data_output",
        "the request",
        |v| v.as_bool().ok_or("true or false"),
    )?
    .unwrap_or(false);
    let mut names = Vec::with_capacity(request.outputs.len());
    let mut binary_asked = Vec::with_capacity(request.outputs.len());
    for output in &request.outputs {
        let binary = parameter(&output.parameters, "binary_data", &output.name, |v| {
            v.as_bool().ok_or("true or false")
        })?;
        let classes = parameter(&output.parameters, "classification", &output.name, |v| {
            v.as_u64().ok_or("a number of classes")
        })?;
        if classes.is_some_and(|n| n > 0) {
            return Err(ApiError::bad_request(format!(
                "output `{}` asks for classification, which cnnserve does not offer: ask for \
                 `probabilities` (or POST /predict for the top classes with their labels)",
                output.name
            )));
        }
        names.push(output.name.clone());
        binary_asked.push(binary.unwrap_or(all_binary));
    }
    let answer = v2::infer(state, name, version, inputs, &names).await?;
    let mut blobs = Vec::new();
    let outputs = answer
        .outputs
        .iter()
        .enumerate()
        .map(|(i, output)| {
            let shape = output.shape.to_vec();
            if binary_asked.get(i).copied().unwrap_or(all_binary) {
                let raw = output.raw();
                let parameters = Some(json!({ "binary_data_size": raw.len() }));
                blobs.push(raw);
                ResponseOutput {
                    name: output.name,
                    datatype: "FP32",
                    shape,
                    parameters,
                    data: None,
                }
            } else {
                ResponseOutput {
                    name: output.name,
                    datatype: "FP32",
                    shape,
                    parameters: None,
                    data: Some(output.data.clone()),
                }
            }
        })
        .collect();
    let json = InferResponse {
        model_name: answer.model.clone(),
        model_version: v2::VERSION,
        id: request.id,
        outputs,
    };
    let mut response = if blobs.is_empty() {
        Json(json).into_response()
    } else {
        let mut body = serde_json::to_vec(&json).map_err(ApiError::internal)?;
        let json_length = body.len();
        for blob in blobs {
            body.extend_from_slice(&blob);
        }
        (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                ),
                (
                    header::HeaderName::from_static(HEADER_LENGTH),
                    HeaderValue::from(json_length),
                ),
            ],
            body,
        )
            .into_response()
    };
    let headers = response.headers_mut();
    use super::predict::timing_header;
    timing_header(headers, "x-queue-time", answer.queue_time.as_secs_f64());
    timing_header(
        headers,
        "x-inference-time",
        answer.inference_time.as_secs_f64(),
    );
    timing_header(headers, "x-total-time", started.elapsed().as_secs_f64());
    Ok(response)
}

/// The body's JSON part and its binary part (empty without `Inference-Header-Content-Length`).
fn split_body(headers: &HeaderMap, mut body: Bytes) -> Result<(Bytes, Bytes), ApiError> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok((body, Bytes::new()));
    };
    let length = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "the Inference-Header-Content-Length header must be the JSON part's length in \
                 bytes, not `{}`",
                String::from_utf8_lossy(value.as_bytes())
            ))
        })?;
    if length > body.len() {
        return Err(ApiError::bad_request(format!(
            "Inference-Header-Content-Length says the JSON part is {length} bytes, but the whole \
             body is {} bytes",
            body.len()
        )));
    }
    let json = body.split_to(length);
    Ok((json, body))
}

/// A parameter of an input, an output or the request (`whose`), read by `read` (which names what
/// it should be when it is not).
fn parameter<T>(
    parameters: &Option<Map<String, Value>>,
    key: &str,
    whose: &str,
    read: impl Fn(&Value) -> Result<T, &'static str>,
) -> Result<Option<T>, ApiError> {
    let Some(value) = parameters.as_ref().and_then(|p| p.get(key)) else {
        return Ok(None);
    };
    let whose = if whose == "the request" {
        whose.to_string()
    } else {
        format!("`{whose}`")
    };
    read(value).map(Some).map_err(|what| {
        ApiError::bad_request(format!(
            "parameter {key} of {whose} must be {what}, not {value}"
        ))
    })
}
