//! The one place errors become HTTP: every status code cnnserve answers with is chosen here.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::engine::EngineError;
use crate::jobs::JobError;
use crate::preprocess::ImageError;
use crate::train::{DatasetError, TrainError};

/// An error answer: `{"error": "...", "error_type": "..."}` with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error_type: &'static str,
    pub message: String,
    /// Structured detail for the client, e.g. every problem of a data set.
    pub details: Option<serde_json::Value>,
    /// Seconds for a `Retry-After` header (a state that passes, such as a model still loading).
    pub retry_after: Option<u64>,
}

/// The JSON of every error answer (documentation of [`Body`]).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// A stable name for the kind of error: `bad_request`, `not_found`, `overloaded`, …
    pub error_type: String,
    /// More detail where there is some, e.g. `{"problems": [...]}` for a data set.
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    error_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error_type,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn unprocessable(error_type: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, error_type, message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than the {limit}-byte limit (--payload-limit)"),
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            message.to_string(),
        )
    }

    /// A body-reading failure from axum: over the limit, or a broken upload.
    pub fn from_body_rejection(status: StatusCode, detail: String, limit: usize) -> Self {
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Self::payload_too_large(limit)
        } else {
            Self::bad_request(format!("could not read the request body: {detail}"))
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::UnknownModel { .. } => Self::not_found(message),
            EngineError::PixelBudget { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message).retry_after(1)
            }
            EngineError::Overloaded { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message)
            }
            EngineError::NoImage | EngineError::BadTensor(_) => Self::bad_request(message),
            EngineError::TensorTooLarge { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "too_many_pixels", message)
            }
            EngineError::Image { source, .. } => match source {
                ImageError::TooManyPixels { .. } => {
                    Self::new(StatusCode::UNPROCESSABLE_ENTITY, "too_many_pixels", message)
                }
                _ => Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_image", message),
            },
            EngineError::NotDeletable(_) => Self::new(StatusCode::CONFLICT, "conflict", message),
            EngineError::OutOfMemory(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "device_out_of_memory",
                message,
            )
            .retry_after(1),
            EngineError::Loading(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "model_loading", message).retry_after(5)
            }
            EngineError::LoadFailed { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "model_unavailable",
                message,
            ),
            EngineError::WorkerFailed(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "model_unavailable",
                message,
            )
            .retry_after(1),
            EngineError::Weights(_) | EngineError::Inference(_) => Self::internal(message),
        }
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        let message = e.to_string();
        match e {
            JobError::NotFound(_) => Self::not_found(message),
            JobError::Conflict(_) => Self::conflict(message),
            JobError::Model(e) => e.into(),
            JobError::Store(_)
            | JobError::ModelStore(_)
            | JobError::Io(_)
            | JobError::Config(_) => Self::internal(message),
        }
    }
}

impl From<DatasetError> for ApiError {
    fn from(e: DatasetError) -> Self {
        let message = e.to_string();
        match e {
            DatasetError::NotAZip(_) | DatasetError::Unsafe { .. } => Self::bad_request(message),
            DatasetError::TooLarge(_) => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
            }
            DatasetError::Invalid(problems) => Self::unprocessable("invalid_dataset", message)
                .with_details(serde_json::json!({ "problems": problems })),
            DatasetError::Io { .. } => Self::internal(message),
        }
    }
}

impl From<TrainError> for ApiError {
    fn from(e: TrainError) -> Self {
        let message = e.to_string();
        match e {
            TrainError::InvalidParams(problems) => {
                Self::bad_request(message).with_details(serde_json::json!({ "problems": problems }))
            }
            TrainError::Unsupported { .. } => Self::unprocessable("unsupported", message),
            TrainError::Dataset(d) => d.into(),
            _ => Self::internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            // Details of our own failures go to the log, not to the client. (A 503 is a state
            // the client can act on, and says which.)
            tracing::error!(error = %self.message, "request failed");
            let body = Body {
                error: "internal server error; see the server log",
                error_type: self.error_type,
                details: None,
            };
            return (self.status, Json(body)).into_response();
        }
        let body = Body {
            error: &self.message,
            error_type: self.error_type,
            details: self.details.as_ref(),
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// The one fallback for the errors axum answers by itself: rejections of the path, query, JSON and
/// multipart extractors (plain text) and 405 (an empty body). They leave as JSON
/// `{"error", "error_type"}` with their status, like every other error; a 405 names the methods
/// the path takes.
pub async fn json_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::header::{ALLOW, CONTENT_TYPE};
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let allow = parts
        .headers
        .get(ALLOW)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let message = match (status, &allow) {
        (StatusCode::METHOD_NOT_ALLOWED, Some(allow)) => {
            format!("{method} is not allowed on {path}; it takes {allow}")
        }
        _ if !text.is_empty() => text,
        _ => format!(
            "{} ({method} {path})",
            status.canonical_reason().unwrap_or("error").to_lowercase()
        ),
    };
    let error_type = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        StatusCode::TOO_MANY_REQUESTS => "overloaded",
        s if s.is_server_error() => "internal",
        _ => "error",
    };
    let mut response = ApiError::new(status, error_type, message).into_response();
    if let Some(allow) = parts.headers.get(ALLOW) {
        response.headers_mut().insert(ALLOW, allow.clone());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_out_of_memory_passes_with_503_other_forward_failures_are_500() {
        // cudarc's wording of a failed allocation.
        let oom = ApiError::from(EngineError::from_forward(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ));
        assert_eq!(oom.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(oom.error_type, "device_out_of_memory");
        assert!(oom.message.contains("retry"), "{}", oom.message);
        let response = oom.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = futures_util::FutureExt::now_or_never(axum::body::to_bytes(
            response.into_body(),
            usize::MAX,
        ))
        .expect("a buffered body")
        .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error_type"], "device_out_of_memory");
        assert!(
            body["error"].as_str().unwrap().contains("out of memory"),
            "{body}"
        );
        let other = ApiError::from(EngineError::from_forward("shape mismatch".into()));
        assert_eq!(other.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
