//! The Open Inference Protocol (KServe "v2") over gRPC (`--grpc-addr`): the protocol's
//! `inference.GRPCInferenceService` (`proto/grpc_predict_v2.proto`), served by tonic over h2c.
//! The protocol's logic is [`super::v2`]'s, shared with HTTP; this module reads and writes its
//! protobuf form.
//!
//! - ModelInfer takes FP32 `input` in `raw_input_contents` or `contents.fp32_contents` and BYTES
//!   `image` in `raw_input_contents` (each element after its 4-byte little-endian length) or
//!   `contents.bytes_contents`; it answers the outputs in `raw_output_contents`, as Triton does.
//! - With an API key, every RPC but ServerLive and ServerReady needs the metadata
//!   `authorization: Bearer <key>` (UNAUTHENTICATED otherwise).
//! - Triton's RPCs beyond the protocol (model repository, statistics, trace, logging, shared
//!   memory, configuration, streaming) answer UNIMPLEMENTED, saying what is served.
//! - Errors carry the sentence HTTP would answer; their codes: 400 → INVALID_ARGUMENT, 404 →
//!   NOT_FOUND, 429 → RESOURCE_EXHAUSTED, 503 → UNAVAILABLE (see [`status`]).

use std::collections::HashMap;
use std::future::Future;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::http::{self, header, StatusCode};
use bytes::Bytes;
use futures_util::future::{ready, Either, Ready};
use tonic::{Code, Request, Response, Status};

use super::auth::ApiKey;
use super::error::ApiError;
use super::v2::{self, Data, InputTensor};
use super::AppState;

/// The code generated from `proto/grpc_predict_v2.proto` (client included, for tests and tools).
#[allow(clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use proto::model_infer_response::InferOutputTensor;
use proto::model_metadata_response::TensorMetadata;
use proto::{
    infer_parameter, InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
    ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse,
    ServerReadyRequest, ServerReadyResponse,
};

/// The path prefix of the service's methods.
const SERVICE: &str = "/inference.GRPCInferenceService/";
/// The methods served.
const METHODS: [&str; 6] = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
];
/// The methods anyone may call, key or not: what probes call.
const OPEN: [&str; 2] = ["ServerLive", "ServerReady"];

/// Serves the protocol on `listener` until `shutdown` resolves, then lets calls in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let key = state.access.api_key.clone();
    let limit = state.config.payload_limit;
    let service = GrpcInferenceServiceServer::new(Inference { state })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    tonic::transport::Server::builder()
        .layer(tower::layer::layer_fn(move |inner| Gate {
            inner,
            key: key.clone(),
        }))
        .add_service(service)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await
}

/// An error answer as gRPC tells it: the same sentence, the code closest to the HTTP status.
/// Our own failures (500) say only that, as over HTTP; the details go to the log.
pub fn status(e: ApiError) -> Status {
    let code = match e.status {
        StatusCode::BAD_REQUEST
        | StatusCode::PAYLOAD_TOO_LARGE
        | StatusCode::UNSUPPORTED_MEDIA_TYPE
        | StatusCode::UNPROCESSABLE_ENTITY => Code::InvalidArgument,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::CONFLICT => Code::FailedPrecondition,
        StatusCode::TOO_MANY_REQUESTS => Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        StatusCode::INTERNAL_SERVER_ERROR => {
            tracing::error!(error = %e.message, "gRPC request failed");
            return Status::internal("internal server error; see the server log");
        }
        _ => Code::Unknown,
    };
    let mut status = Status::new(code, e.message);
    if let Some(seconds) = e.retry_after {
        status.metadata_mut().insert("retry-after", seconds.into());
    }
    status
}

/// The service's methods over the server's state.
struct Inference {
    state: AppState,
}

fn version(version: &str) -> Option<&str> {
    Some(version).filter(|v| !v.is_empty())
}

#[tonic::async_trait]
impl GrpcInferenceService for Inference {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        let ready = super::health::is_ready(&self.state);
        Ok(Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let ready = v2::model_ready(&self.state, &request.name, version(&request.version))
            .map_err(status)?;
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        let meta = v2::server_metadata(&[]);
        Ok(Response::new(ServerMetadataResponse {
            name: meta.name.to_string(),
            version: meta.version.to_string(),
            extensions: meta.extensions.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let meta = v2::model_metadata(&self.state, &request.name, version(&request.version))
            .map_err(status)?;
        let tensors = |tensors: Vec<v2::TensorMetadata>| {
            tensors
                .into_iter()
                .map(|t| TensorMetadata {
                    name: t.name.to_string(),
                    datatype: t.datatype.to_string(),
                    shape: t.shape,
                })
                .collect()
        };
        Ok(Response::new(ModelMetadataResponse {
            name: meta.name,
            versions: meta.versions.iter().map(|v| v.to_string()).collect(),
            platform: meta.platform.to_string(),
            inputs: tensors(meta.inputs),
            outputs: tensors(meta.outputs),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let label = super::predict::model_label(&self.state, Some(&request.model_name));
        let answer = infer(&self.state, request).await;
        let code = match &answer {
            Ok(_) => StatusCode::OK,
            Err(e) => e.status,
        };
        super::predict::record(&self.state, label, code.as_u16(), "grpc", started);
        answer.map(Response::new).map_err(status)
    }
}

async fn infer(
    state: &AppState,
    request: ModelInferRequest,
) -> Result<ModelInferResponse, ApiError> {
    let raw = request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(ApiError::bad_request(format!(
            "raw_input_contents has {} entries for {} inputs: send one per input, in the order \
             of `inputs`",
            raw.len(),
            request.inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let typed = contents(input.contents);
        let data = match raw.next() {
            Some(bytes) => {
                if !matches!(typed, Data::Empty) {
                    return Err(ApiError::bad_request(format!(
                        "input `{}` has values both in contents and in raw_input_contents: send \
                         them in one of them",
                        input.name
                    )));
                }
                Data::Raw(Bytes::from(bytes))
            }
            None => typed,
        };
        inputs.push(InputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            data,
        });
    }
    let mut names = Vec::with_capacity(request.outputs.len());
    for output in &request.outputs {
        let classes = match output.parameters.get("classification") {
            Some(InferParameter {
                parameter_choice: Some(infer_parameter::ParameterChoice::Int64Param(n)),
            }) => *n,
            Some(_) => 1,
            None => 0,
        };
        if classes > 0 {
            return Err(ApiError::bad_request(format!(
                "output `{}` asks for classification, which cnnserve does not offer: ask for \
                 `probabilities`",
                output.name
            )));
        }
        names.push(output.name.clone());
    }
    let answer = v2::infer(
        state,
        &request.model_name,
        version(&request.model_version),
        inputs,
        &names,
    )
    .await?;
    let raw_output_contents = answer.outputs.iter().map(v2::Output::raw).collect();
    let outputs = answer
        .outputs
        .into_iter()
        .map(|o| InferOutputTensor {
            name: o.name.to_string(),
            datatype: "FP32".to_string(),
            shape: o.shape.to_vec(),
            parameters: HashMap::new(),
            contents: None,
        })
        .collect();
    Ok(ModelInferResponse {
        model_name: answer.model,
        model_version: v2::VERSION.to_string(),
        id: request.id,
        parameters: HashMap::new(),
        outputs,
        raw_output_contents,
    })
}

/// An input's typed contents: FP32 and BYTES values as such, any other field named (refused).
fn contents(contents: Option<InferTensorContents>) -> Data {
    let Some(c) = contents else {
        return Data::Empty;
    };
    let others = [
        ("bool_contents", c.bool_contents.is_empty()),
        ("int_contents", c.int_contents.is_empty()),
        ("int64_contents", c.int64_contents.is_empty()),
        ("uint_contents", c.uint_contents.is_empty()),
        ("uint64_contents", c.uint64_contents.is_empty()),
        ("fp64_contents", c.fp64_contents.is_empty()),
    ];
    if let Some((field, _)) = others.iter().find(|(_, empty)| !empty) {
        return Data::Other(field);
    }
    match (c.fp32_contents.is_empty(), c.bytes_contents.is_empty()) {
        (true, true) => Data::Empty,
        (false, true) => Data::Fp32(c.fp32_contents),
        (true, false) => Data::Bytes(c.bytes_contents.into_iter().map(Bytes::from).collect()),
        (false, false) => Data::Other("fp32_contents and bytes_contents"),
    }
}

/// In front of the service: the API key, and a sentence for the methods not served.
#[derive(Clone)]
struct Gate<S> {
    inner: S,
    key: Option<ApiKey>,
}

impl<S, B> tower::Service<http::Request<B>> for Gate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match refusal(
            request.uri().path(),
            request.headers().get(header::AUTHORIZATION),
            self.key.as_ref(),
        ) {
            None => Either::Left(self.inner.call(request)),
            Some(status) => Either::Right(ready(Ok(status.into_http()))),
        }
    }
}

/// Why a call is not served: no key or a wrong one, or a method cnnserve does not have.
fn refusal(
    path: &str,
    authorization: Option<&http::HeaderValue>,
    key: Option<&ApiKey>,
) -> Option<Status> {
    let method = path.strip_prefix(SERVICE);
    if method.is_some_and(|m| OPEN.contains(&m)) {
        return None;
    }
    if let Some(key) = key {
        match authorization {
            Some(value) if key.matches_bearer(value) => {}
            Some(_) => {
                return Some(Status::unauthenticated(
                    "the API key is wrong: send the metadata `authorization: Bearer <key>` with \
                     the server's key",
                ))
            }
            None => {
                return Some(Status::unauthenticated(
                    "this server needs an API key: send the metadata `authorization: Bearer <key>`",
                ))
            }
        }
    }
    match method {
        Some(m) if METHODS.contains(&m) => None,
        Some(m) => Some(Status::unimplemented(format!(
            "{m} is not served: cnnserve serves the Open Inference Protocol's ServerLive, \
             ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer; Triton's \
             other RPCs (model repository, statistics, trace, logging, shared memory, model \
             configuration, streaming) are not"
        ))),
        None => Some(Status::unimplemented(format!(
            "there is no gRPC method {path} here: cnnserve serves inference.GRPCInferenceService"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_sentence_and_get_the_nearest_code() {
        for (http, code) in [
            (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            (StatusCode::UNPROCESSABLE_ENTITY, Code::InvalidArgument),
            (StatusCode::NOT_FOUND, Code::NotFound),
            (StatusCode::TOO_MANY_REQUESTS, Code::ResourceExhausted),
            (StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable),
        ] {
            let s = status(ApiError::new(http, "x", "what went wrong"));
            assert_eq!((s.code(), s.message()), (code, "what went wrong"));
        }
        let s = status(ApiError::internal("a secret detail"));
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("secret"));
        let s = status(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "x", "later").retry_after(1));
        assert_eq!(s.metadata().get("retry-after").unwrap(), "1");
    }

    #[test]
    fn probes_pass_without_the_key_and_nothing_else_does() {
        let key = ApiKey::new("sesame").unwrap();
        let good = http::HeaderValue::from_static("Bearer sesame");
        let bad = http::HeaderValue::from_static("Bearer nope");
        let path = |m: &str| format!("{SERVICE}{m}");
        for m in OPEN {
            assert!(refusal(&path(m), None, Some(&key)).is_none(), "{m}");
        }
        for m in [
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
        ] {
            let s = refusal(&path(m), None, Some(&key)).unwrap();
            assert_eq!(s.code(), Code::Unauthenticated, "{m}");
            let s = refusal(&path(m), Some(&bad), Some(&key)).unwrap();
            assert_eq!(s.code(), Code::Unauthenticated, "{m}");
            assert!(s.message().contains("wrong"), "{}", s.message());
            assert!(refusal(&path(m), Some(&good), Some(&key)).is_none(), "{m}");
            assert!(refusal(&path(m), None, None).is_none(), "{m}");
        }
        let s = refusal(&path("RepositoryIndex"), None, None).unwrap();
        assert_eq!(s.code(), Code::Unimplemented);
        assert!(s.message().contains("RepositoryIndex is not served"));
        let s = refusal(&path("RepositoryIndex"), None, Some(&key)).unwrap();
        assert_eq!(s.code(), Code::Unauthenticated);
        let s = refusal("/grpc.health.v1.Health/Check", None, None).unwrap();
        assert_eq!(s.code(), Code::Unimplemented);
    }
}
