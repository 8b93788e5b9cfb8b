//! The Open Inference Protocol (KServe v2) over HTTP (`oneshot` on the router) and gRPC (a tonic
//! client against a served port): metadata, readiness, JSON and binary inference with both
//! inputs, errors, the API key, overload, metrics, and the `--grpc-addr` flag of the binary.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use base64::Engine as _;
use candle_core::Device;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use cnnserve::engine::{Engine, EngineConfig};
use cnnserve::metrics::Metrics;
use cnnserve::models::Arch;
use cnnserve::server::auth::{Access, ApiKey};
use cnnserve::server::grpc::proto;
use cnnserve::server::{self, AppState, ServerConfig};
use proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};

const KEY: &str = "open-sesame";

struct App {
    router: Router,
    state: AppState,
    _dir: tempfile::TempDir,
}

/// A server over a weights dir holding the fixture GoogLeNet as `googlenet.safetensors`.
fn app_with(config: EngineConfig, access: Access) -> App {
    let dir = common::googlenet_dir();
    let engine = Engine::new(config, Arc::new(Metrics::new()));
    let report = engine.reload(dir.path());
    assert_eq!(report.loaded, vec!["googlenet"], "{report:?}");
    let state = AppState::new(
        engine,
        ServerConfig {
            weights_dir: dir.path().to_path_buf(),
            payload_limit: 40_000_000,
            device_name: "cpu".into(),
            max_dataset_bytes: 1 << 30,
        },
        Some("googlenet".into()),
    )
    .with_access(access);
    App {
        router: server::router(state.clone()),
        state,
        _dir: dir,
    }
}

fn app() -> App {
    app_with(EngineConfig::on(Device::Cpu), Access::default())
}

/// The fixture's PyTorch inputs and logits at one size: ([N, 3, S, S] flat, shape, [N, 1000] flat).
fn reference(size: usize) -> (Vec<f32>, Vec<i64>, Vec<f32>) {
    let refs = candle_core::safetensors::load(
        common::fixtures().join("googlenet/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let inputs = &refs[&format!("inputs_{size}x{size}")];
    let logits = &refs[&format!("logits_{size}x{size}")];
    let shape = inputs.dims().iter().map(|&d| d as i64).collect();
    (
        inputs.flatten_all().unwrap().to_vec1().unwrap(),
        shape,
        logits.flatten_all().unwrap().to_vec1().unwrap(),
    )
}

fn photo(name: &str) -> Vec<u8> {
    std::fs::read(common::fixtures().join("preprocess").join(name)).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn le_f32(bytes: &[u8]) -> Vec<f32> {
    assert_eq!(bytes.len() % 4, 0);
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// BYTES elements in their binary form: each after its 4-byte little-endian length.
fn length_prefixed(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in elements {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
    }
    out
}

fn json_values(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    json: Value,
    /// The binary part, after `Inference-Header-Content-Length` bytes of JSON.
    binary: Vec<u8>,
}

async fn send(router: &Router, request: Request<Body>) -> Answer {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json_len = headers
        .get("inference-header-content-length")
        .map(|v| v.to_str().unwrap().parse::<usize>().unwrap())
        .unwrap_or(body.len());
    let json = serde_json::from_slice(&body[..json_len])
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Answer {
        status,
        headers,
        json,
        binary: body[json_len..].to_vec(),
    }
}

async fn get(router: &Router, uri: &str) -> Answer {
    send(router, Request::get(uri).body(Body::empty()).unwrap()).await
}

fn infer_json(uri: &str, body: &Value) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

/// A binary-data request: the JSON, then `binary`, with the JSON's length in the header.
fn infer_binary(uri: &str, body: &Value, binary: &[u8]) -> Request<Body> {
    let json = serde_json::to_vec(body).unwrap();
    let length = json.len();
    let mut bytes = json;
    bytes.extend_from_slice(binary);
    Request::post(uri)
        .header("content-type", "application/octet-stream")
        .header("inference-header-content-length", length)
        .body(Body::from(bytes))
        .unwrap()
}

/// `/predict`'s probabilities for one image, by class index (top_k=0 gives all).
async fn predict_probabilities(router: &Router, image: Vec<u8>) -> Vec<f32> {
    let answer = send(
        router,
        Request::post("/predict?top_k=0")
            .header("content-type", "image/jpeg")
            .body(Body::from(image))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    let predictions = answer.json["predictions"].as_array().unwrap();
    let mut by_index = vec![f32::NAN; predictions.len()];
    for p in predictions {
        by_index[p["index"].as_u64().unwrap() as usize] = p["probability"].as_f64().unwrap() as f32;
    }
    by_index
}

fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = row.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

#[tokio::test]
async fn metadata_health_and_readiness() {
    let app = app();
    let r = &app.router;
    let a = get(r, "/v2").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json["name"], "cnnserve");
    assert_eq!(a.json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(a.json["extensions"], json!(["binary_tensor_data"]));
    let a = get(r, "/v2/health/live").await;
    assert_eq!(
        (a.status, &a.json),
        (StatusCode::OK, &json!({"live": true}))
    );
    let a = get(r, "/v2/health/ready").await;
    assert_eq!(
        (a.status, &a.json),
        (StatusCode::OK, &json!({"ready": true}))
    );

    let expected = json!({
        "name": "googlenet",
        "versions": ["1"],
        "platform": "cnnserve_candle",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, -1, -1]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 1000]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]},
        ],
    });
    for uri in ["/v2/models/googlenet", "/v2/models/googlenet/versions/1"] {
        let a = get(r, uri).await;
        assert_eq!((a.status, &a.json), (StatusCode::OK, &expected), "{uri}");
    }
    for uri in [
        "/v2/models/googlenet/ready",
        "/v2/models/googlenet/versions/1/ready",
    ] {
        let a = get(r, uri).await;
        let ready = json!({"name": "googlenet", "ready": true});
        assert_eq!((a.status, &a.json), (StatusCode::OK, &ready), "{uri}");
    }
    for uri in [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/googlenet/versions/2",
        "/v2/models/googlenet/versions/2/ready",
    ] {
        let a = get(r, uri).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(a.json["error_type"], "not_found", "{uri}");
        assert!(a.json["error"].as_str().unwrap().len() > 10, "{uri}");
    }
    let a = get(r, "/v2/models/googlenet/versions/2").await;
    assert!(
        a.json["error"]
            .as_str()
            .unwrap()
            .contains("only version is 1"),
        "{}",
        a.json
    );

    // A model still loading: not ready, and neither is the server (it waits for every model).
    app.state
        .engine
        .expect([("vgg11_bn".to_string(), Some(Arch::Vgg11Bn))]);
    let a = get(r, "/v2/models/vgg11_bn/ready").await;
    assert_eq!(
        (a.status, &a.json),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"name": "vgg11_bn", "ready": false})
        )
    );
    let a = get(r, "/v2/health/ready").await;
    assert_eq!(
        (a.status, &a.json),
        (StatusCode::SERVICE_UNAVAILABLE, &json!({"ready": false}))
    );
    let a = get(r, "/v2/models/vgg11_bn").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.json["error_type"], "model_loading");
    let a = get(r, "/v2/health/live").await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_tensor_gives_pytorchs_logits_and_their_softmax() {
    let app = app();
    let (inputs, shape, logits) = reference(224);
    let request = json!({
        "id": "req-1",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": inputs}],
    });
    let a = send(
        &app.router,
        infer_json("/v2/models/googlenet/infer", &request),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json);
    assert_eq!(a.headers["content-type"], "application/json");
    assert!(a.headers.get("inference-header-content-length").is_none());
    assert!(a.headers.contains_key("x-inference-time"));
    assert_eq!(a.json["model_name"], "googlenet");
    assert_eq!(a.json["model_version"], "1");
    assert_eq!(a.json["id"], "req-1");
    let outputs = a.json["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 2, "both outputs by default");
    assert_eq!(outputs[0]["name"], "logits");
    assert_eq!(outputs[1]["name"], "probabilities");
    for o in outputs {
        assert_eq!(o["datatype"], "FP32");
        assert_eq!(o["shape"], json!([2, 1000]));
    }
    let got = json_values(&outputs[0]["data"]);
    let diff = max_diff(&got, &logits);
    assert!(diff < 1e-3, "logits differ from PyTorch's by {diff}");
    let probabilities = json_values(&outputs[1]["data"]);
    for (row, p) in got.chunks(1000).zip(probabilities.chunks(1000)) {
        assert!(max_diff(&softmax(row), p) < 1e-6);
    }

    // Nested data, one output asked for, through the version's path.
    let nested: Vec<Vec<Vec<Vec<f32>>>> = inputs
        .chunks(3 * 224 * 224)
        .map(|image| {
            image
                .chunks(224 * 224)
                .map(|plane| plane.chunks(224).map(<[f32]>::to_vec).collect())
                .collect()
        })
        .collect();
    let request = json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": nested}],
        "outputs": [{"name": "probabilities"}],
    });
    let a = send(
        &app.router,
        infer_json("/v2/models/googlenet/versions/1/infer", &request),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json);
    assert!(a.json.get("id").is_none());
    let outputs = a.json["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0]["name"], "probabilities");
    assert_eq!(json_values(&outputs[0]["data"]), probabilities);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_data_in_and_out_as_tritons_clients_send_it() {
    let app = app();
    let (inputs, shape, logits) = reference(256);
    let raw = le_bytes(&inputs);
    // Triton's default: binary input, no outputs named, `binary_data_output`.
    let request = json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": shape,
                    "parameters": {"binary_data_size": raw.len()}}],
        "parameters": {"binary_data_output": true},
    });
    let a = send(
        &app.router,
        infer_binary("/v2/models/googlenet/infer", &request, &raw),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json);
    assert_eq!(a.headers["content-type"], "application/octet-stream");
    let outputs = a.json["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 2);
    for o in outputs {
        assert_eq!(o["parameters"]["binary_data_size"], 2 * 1000 * 4, "{o}");
        assert!(o.get("data").is_none());
    }
    assert_eq!(a.binary.len(), 2 * 2 * 1000 * 4);
    let (got_logits, got_probabilities) = a.binary.split_at(2 * 1000 * 4);
    let got_logits = le_f32(got_logits);
    let diff = max_diff(&got_logits, &logits);
    assert!(diff < 1e-3, "logits differ from PyTorch's by {diff}");
    let got_probabilities = le_f32(got_probabilities);
    for (row, p) in got_logits.chunks(1000).zip(got_probabilities.chunks(1000)) {
        assert!(max_diff(&softmax(row), p) < 1e-6);
    }

    // Each output as it asks: probabilities in binary, logits in JSON despite the default.
    let request = json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": shape,
                    "parameters": {"binary_data_size": raw.len()}}],
        "outputs": [
            {"name": "probabilities", "parameters": {"binary_data": true}},
            {"name": "logits", "parameters": {"binary_data": false}},
        ],
        "parameters": {"binary_data_output": true},
    });
    let a = send(
        &app.router,
        infer_binary("/v2/models/googlenet/infer", &request, &raw),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json);
    let outputs = a.json["outputs"].as_array().unwrap();
    assert_eq!(outputs[0]["name"], "probabilities");
    assert_eq!(outputs[0]["parameters"]["binary_data_size"], 8000);
    assert_eq!(outputs[1]["name"], "logits");
    assert_eq!(json_values(&outputs[1]["data"]), got_logits);
    assert_eq!(le_f32(&a.binary), got_probabilities);

    // Binary input, JSON answer (no binary output asked for): no header, plain JSON.
    let request = json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": shape,
                    "parameters": {"binary_data_size": raw.len()}}],
        "outputs": [{"name": "logits"}],
    });
    let a = send(
        &app.router,
        infer_binary("/v2/models/googlenet/infer", &request, &raw),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json);
    assert!(a.headers.get("inference-header-content-length").is_none());
    assert_eq!(json_values(&a.json["outputs"][0]["data"]), got_logits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_classified_exactly_as_predict_does() {
    let app = app();
    let photos = [photo("img0.jpg"), photo("img1.jpg")];
    let expected = [
        predict_probabilities(&app.router, photos[0].clone()).await,
        predict_probabilities(&app.router, photos[1].clone()).await,
    ];
    let b64 = |p: &[u8]| base64::engine::general_purpose::STANDARD.encode(p);

    // One image, base64 in JSON: the same batch of one as /predict's, so the same numbers.
    let request = json!({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(&photos[0])]}],
        "outputs": [{"name": "probabilities"}],
    });
    let a = send(
        &app.router,
        infer_json("/v2/models/googlenet/infer", &request),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json);
    assert_eq!(a.json["outputs"][0]["shape"], json!([1, 1000]));
    assert_eq!(json_values(&a.json["outputs"][0]["data"]), expected[0]);

    // One image as binary data.
    let raw = length_prefixed(&photos[..1]);
    let request = json!({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                    "parameters": {"binary_data_size": raw.len()}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}],
    });
    let a = send(
        &app.router,
        infer_binary("/v2/models/googlenet/infer", &request, &raw),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json);
    assert_eq!(le_f32(&a.binary), expected[0]);

    // Two images ([N, 1] too), in one request: each row is its image's (batched with the other,
    // so equal within float rounding).
    let raw = length_prefixed(&photos);
    for request in [
        infer_binary(
            "/v2/models/googlenet/infer",
            &json!({
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1],
                            "parameters": {"binary_data_size": raw.len()}}],
                "outputs": [{"name": "probabilities"}],
            }),
            &raw,
        ),
        infer_json(
            "/v2/models/googlenet/infer",
            &json!({
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                            "data": [b64(&photos[0]), b64(&photos[1])]}],
                "outputs": [{"name": "probabilities"}],
            }),
        ),
    ] {
        let a = send(&app.router, request).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.json);
        assert_eq!(a.json["outputs"][0]["shape"], json!([2, 1000]));
        let got = json_values(&a.json["outputs"][0]["data"]);
        for (row, want) in got.chunks(1000).zip(&expected) {
            assert!(max_diff(row, want) < 1e-5);
        }
    }
}

/// Every malformed request is a 4xx with the protocol's `error` (a sentence) and our
/// `error_type`; none is a 500, and the server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_told_what_is_wrong() {
    let app = app_with(
        EngineConfig {
            max_pixels: 100 * 100,
            ..EngineConfig::on(Device::Cpu)
        },
        Access::default(),
    );
    let uri = "/v2/models/googlenet/infer";
    let small: Vec<f32> = vec![0.25; 3 * 32 * 32];
    let tensor = |shape: Value, data: Value| json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": data}]});
    let good = tensor(json!([1, 3, 32, 32]), json!(small));
    let raw = le_bytes(&small);
    let binary_input = |size: usize| {
        json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                           "parameters": {"binary_data_size": size}}]})
    };
    let with_outputs = |outputs: Value| {
        let mut body = good.clone();
        body["outputs"] = outputs;
        body
    };
    let raw_request = |headers: &[(&str, &str)], body: &[u8]| {
        let mut r = Request::post(uri);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(Body::from(body.to_vec())).unwrap()
    };
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            raw_request(&[], b"{not json"),
            StatusCode::BAD_REQUEST,
            "not an inference request",
        ),
        (raw_request(&[], b"{}"), StatusCode::BAD_REQUEST, "inputs"),
        (
            infer_json(uri, &json!({"inputs": []})),
            StatusCode::BAD_REQUEST,
            "no inputs",
        ),
        (
            infer_json(
                uri,
                &json!({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [1]}]}),
            ),
            StatusCode::BAD_REQUEST,
            "no input `pixels`",
        ),
        (
            infer_json(uri, &tensor(json!([1, 3, 32]), json!(small))),
            StatusCode::BAD_REQUEST,
            "[N, 3, H, W]",
        ),
        (
            infer_json(uri, &tensor(json!([1, 4, 32, 24]), json!(small))),
            StatusCode::BAD_REQUEST,
            "[N, 3, H, W]",
        ),
        (
            infer_json(uri, &tensor(json!([1, 3, 32, 33]), json!(small))),
            StatusCode::BAD_REQUEST,
            "3072 elements, but its shape [1, 3, 32, 33] holds 3168",
        ),
        (
            infer_json(uri, &tensor(json!([1, 3, 16, 16]), json!(vec![0.0; 768]))),
            StatusCode::BAD_REQUEST,
            "at least 32x32",
        ),
        (
            infer_json(
                uri,
                &json!({"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, 3, 32, 32], "data": small}]}),
            ),
            StatusCode::BAD_REQUEST,
            "FP32, not INT64",
        ),
        (
            infer_json(
                uri,
                &json!({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}),
            ),
            StatusCode::BAD_REQUEST,
            "BYTES",
        ),
        (
            infer_json(
                uri,
                &json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}),
            ),
            StatusCode::BAD_REQUEST,
            "not base64",
        ),
        (
            infer_json(
                uri,
                &json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}]}),
            ),
            StatusCode::BAD_REQUEST,
            "image 0",
        ),
        (
            infer_json(
                uri,
                &json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32]}]}),
            ),
            StatusCode::BAD_REQUEST,
            "neither `data` nor parameters.binary_data_size",
        ),
        (
            infer_json(uri, &with_outputs(json!([{"name": "softmax"}]))),
            StatusCode::BAD_REQUEST,
            "no output `softmax`",
        ),
        (
            infer_json(
                uri,
                &with_outputs(json!([{"name": "logits", "parameters": {"classification": 3}}])),
            ),
            StatusCode::BAD_REQUEST,
            "classification",
        ),
        (
            infer_json(
                uri,
                &with_outputs(json!([{"name": "logits", "parameters": {"binary_data": "yes"}}])),
            ),
            StatusCode::BAD_REQUEST,
            "binary_data of `logits` must be true or false",
        ),
        (
            infer_binary(uri, &binary_input(raw.len() - 4), &raw),
            StatusCode::BAD_REQUEST,
            "4 bytes of binary data that no input",
        ),
        (
            infer_binary(uri, &binary_input(raw.len() + 4), &raw),
            StatusCode::BAD_REQUEST,
            "only 12288 bytes of binary data are left",
        ),
        (
            infer_binary(uri, &binary_input(raw.len() - 4), &raw[..raw.len() - 4]),
            StatusCode::BAD_REQUEST,
            "12284 bytes of binary data, but FP32 [1, 3, 32, 32] takes 12288",
        ),
        (
            infer_json(uri, &binary_input(raw.len())),
            StatusCode::BAD_REQUEST,
            "no Inference-Header-Content-Length header",
        ),
        (
            raw_request(&[("inference-header-content-length", "999999")], b"{}"),
            StatusCode::BAD_REQUEST,
            "whole body is 2 bytes",
        ),
        (
            raw_request(&[("inference-header-content-length", "ten")], b"{}"),
            StatusCode::BAD_REQUEST,
            "length in bytes, not `ten`",
        ),
        (
            raw_request(&[("content-encoding", "gzip")], b"{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "uncompressed",
        ),
        (
            infer_json("/v2/models/nope/infer", &good),
            StatusCode::NOT_FOUND,
            "unknown model `nope`",
        ),
        (
            infer_json("/v2/models/googlenet/versions/7/infer", &good),
            StatusCode::NOT_FOUND,
            "no version `7`",
        ),
        (
            infer_json(
                uri,
                &tensor(json!([1, 3, 101, 101]), json!(vec![0.0; 3 * 101 * 101])),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "--max-pixels",
        ),
    ];
    let count = cases.len();
    for (request, status, needle) in cases {
        let what = format!("{needle:?}");
        let a = send(&app.router, request).await;
        assert_eq!(a.status, status, "{what}: {}", a.json);
        assert_eq!(a.headers["content-type"], "application/json", "{what}");
        let error = a.json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {}", a.json));
        assert!(error.contains(needle), "{what}: {error}");
        assert!(a.json["error_type"].is_string(), "{what}: {}", a.json);
    }
    let a = send(&app.router, infer_json(uri, &good)).await;
    assert_eq!(a.status, StatusCode::OK, "still serving: {}", a.json);
    let a = get(&app.router, "/metrics").await;
    let text = a.json.as_str().unwrap();
    assert!(
        text.contains(r#"cnnserve_requests_total{model="googlenet",status="400",protocol="v2"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"cnnserve_requests_total{model="googlenet",status="200",protocol="v2"} 1"#),
        "{text}"
    );
    assert!(count >= 25);
}

#[tokio::test]
async fn the_api_key_guards_v2_but_not_its_health_probes() {
    let app = app_with(
        EngineConfig::on(Device::Cpu),
        Access {
            api_key: Some(ApiKey::new(KEY).unwrap()),
            cors_allow_origins: Vec::new(),
        },
    );
    let request = |method: Method, uri: &str, key: Option<&str>| {
        let mut r = Request::builder().method(method).uri(uri);
        if let Some(key) = key {
            r = r.header("authorization", format!("Bearer {key}"));
        }
        r.body(Body::empty()).unwrap()
    };
    for uri in ["/v2/health/live", "/v2/health/ready"] {
        let a = send(&app.router, request(Method::GET, uri, None)).await;
        assert_eq!(a.status, StatusCode::OK, "{uri}");
    }
    for (method, uri) in [
        (Method::GET, "/v2"),
        (Method::GET, "/v2/models/googlenet"),
        (Method::GET, "/v2/models/googlenet/ready"),
        (Method::POST, "/v2/models/googlenet/infer"),
    ] {
        for key in [None, Some("wrong")] {
            let a = send(&app.router, request(method.clone(), uri, key)).await;
            assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{uri} {key:?}");
            assert_eq!(a.json["error_type"], "unauthorized");
        }
        let a = send(&app.router, request(method.clone(), uri, Some(KEY))).await;
        assert_ne!(a.status, StatusCode::UNAUTHORIZED, "{uri}");
        // The empty infer body gets past the key to a 400 of its own.
        assert!(
            a.status == StatusCode::OK || a.status == StatusCode::BAD_REQUEST,
            "{uri}: {}",
            a.json
        );
    }
}

/// Pages of an allowed origin may send and read the binary-data extension's header.
#[tokio::test]
async fn cors_lets_pages_use_binary_data() {
    let origin = "https://app.example.com";
    let app = app_with(
        EngineConfig::on(Device::Cpu),
        Access {
            api_key: None,
            cors_allow_origins: vec![axum::http::HeaderValue::from_static(origin)],
        },
    );
    let preflight = Request::builder()
        .method(Method::OPTIONS)
        .uri("/v2/models/googlenet/infer")
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "inference-header-content-length",
        )
        .body(Body::empty())
        .unwrap();
    let a = send(&app.router, preflight).await;
    assert!(a.status.is_success(), "{}", a.status);
    let allowed = a.headers["access-control-allow-headers"].to_str().unwrap();
    assert!(
        allowed.contains("inference-header-content-length"),
        "{allowed}"
    );
    let small = vec![0.5f32; 3 * 32 * 32];
    let raw = le_bytes(&small);
    let body = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                  "parameters": {"binary_data_size": raw.len()}}],
                      "parameters": {"binary_data_output": true}});
    let mut request = infer_binary("/v2/models/googlenet/infer", &body, &raw);
    request
        .headers_mut()
        .insert("origin", axum::http::HeaderValue::from_static(origin));
    let a = send(&app.router, request).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json);
    let exposed = a.headers["access-control-expose-headers"].to_str().unwrap();
    assert!(
        exposed.contains("inference-header-content-length"),
        "{exposed}"
    );
}

/// A gRPC server on a free port over `state`; stops when the sender is dropped or sent to.
async fn grpc_server(
    state: AppState,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::grpc::serve(listener, state, async {
        let _ = stopped.await;
    }));
    (addr, stop, server)
}

fn tensor_input(shape: Vec<i64>, fp32: Option<Vec<f32>>) -> InferInputTensor {
    InferInputTensor {
        name: "input".into(),
        datatype: "FP32".into(),
        shape,
        parameters: Default::default(),
        contents: fp32.map(|fp32_contents| proto::InferTensorContents {
            fp32_contents,
            ..Default::default()
        }),
    }
}

fn image_input(n: i64, bytes: Option<Vec<Vec<u8>>>) -> InferInputTensor {
    InferInputTensor {
        name: "image".into(),
        datatype: "BYTES".into(),
        shape: vec![n],
        parameters: Default::default(),
        contents: bytes.map(|bytes_contents| proto::InferTensorContents {
            bytes_contents,
            ..Default::default()
        }),
    }
}

fn infer_request(
    inputs: Vec<InferInputTensor>,
    raw: Vec<Vec<u8>>,
    outputs: &[&str],
) -> proto::ModelInferRequest {
    proto::ModelInferRequest {
        model_name: "googlenet".into(),
        id: "grpc-1".into(),
        inputs,
        raw_input_contents: raw,
        outputs: outputs
            .iter()
            .map(|name| InferRequestedOutputTensor {
                name: name.to_string(),
                parameters: Default::default(),
            })
            .collect(),
        ..Default::default()
    }
}

/// The answer's outputs by name, from `raw_output_contents`.
fn raw_outputs(response: &proto::ModelInferResponse) -> Vec<(String, Vec<i64>, Vec<f32>)> {
    assert_eq!(response.outputs.len(), response.raw_output_contents.len());
    response
        .outputs
        .iter()
        .zip(&response.raw_output_contents)
        .map(|(o, raw)| {
            assert_eq!(o.datatype, "FP32");
            assert!(o.contents.is_none());
            (o.name.clone(), o.shape.clone(), le_f32(raw))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_serves_the_protocol_with_raw_and_typed_contents() {
    let app = app();
    let (addr, stop, server) = grpc_server(app.state.clone()).await;
    let mut client = GrpcInferenceServiceClient::connect(addr.clone())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);

    let live = client
        .server_live(proto::ServerLiveRequest {})
        .await
        .unwrap();
    assert!(live.into_inner().live);
    let ready = client
        .server_ready(proto::ServerReadyRequest {})
        .await
        .unwrap();
    assert!(ready.into_inner().ready);
    let ready = client
        .model_ready(proto::ModelReadyRequest {
            name: "googlenet".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert!(ready.into_inner().ready);
    let meta = client
        .server_metadata(proto::ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "cnnserve");
    let meta = client
        .model_metadata(proto::ModelMetadataRequest {
            name: "googlenet".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.platform, "cnnserve_candle");
    assert_eq!(meta.versions, vec!["1"]);
    let tensors: Vec<(&str, &str, &[i64])> = meta
        .inputs
        .iter()
        .chain(&meta.outputs)
        .map(|t| (t.name.as_str(), t.datatype.as_str(), t.shape.as_slice()))
        .collect();
    assert_eq!(
        tensors,
        vec![
            ("input", "FP32", &[-1, 3, -1, -1][..]),
            ("image", "BYTES", &[-1][..]),
            ("logits", "FP32", &[-1, 1000][..]),
            ("probabilities", "FP32", &[-1, 1000][..]),
        ]
    );

    // FP32 `input`, raw and typed: PyTorch's logits.
    let (inputs, shape, logits) = reference(224);
    for request in [
        infer_request(
            vec![tensor_input(shape.clone(), None)],
            vec![le_bytes(&inputs)],
            &[],
        ),
        infer_request(
            vec![tensor_input(shape.clone(), Some(inputs.clone()))],
            vec![],
            &["logits"],
        ),
    ] {
        let response = client.model_infer(request).await.unwrap().into_inner();
        assert_eq!(response.model_name, "googlenet");
        assert_eq!(response.model_version, "1");
        assert_eq!(response.id, "grpc-1");
        let outputs = raw_outputs(&response);
        assert_eq!(outputs[0].0, "logits");
        assert_eq!(outputs[0].1, vec![2, 1000]);
        let diff = max_diff(&outputs[0].2, &logits);
        assert!(diff < 1e-3, "logits differ from PyTorch's by {diff}");
        if outputs.len() == 2 {
            assert_eq!(outputs[1].0, "probabilities");
            for (row, p) in outputs[0].2.chunks(1000).zip(outputs[1].2.chunks(1000)) {
                assert!(max_diff(&softmax(row), p) < 1e-6);
            }
        }
    }

    // BYTES `image`, raw (length-prefixed) and typed: /predict's probabilities.
    let jpeg = photo("img0.jpg");
    let expected = predict_probabilities(&app.router, jpeg.clone()).await;
    for request in [
        infer_request(
            vec![image_input(1, None)],
            vec![length_prefixed(std::slice::from_ref(&jpeg))],
            &["probabilities"],
        ),
        infer_request(
            vec![image_input(1, Some(vec![jpeg.clone()]))],
            vec![],
            &["probabilities"],
        ),
    ] {
        let response = client.model_infer(request).await.unwrap().into_inner();
        let outputs = raw_outputs(&response);
        assert_eq!(outputs.len(), 1);
        assert_eq!(outputs[0].0, "probabilities");
        assert_eq!(outputs[0].1, vec![1, 1000]);
        assert_eq!(outputs[0].2, expected);
    }

    // Errors: the code closest to HTTP's status, with the sentence.
    let small = vec![0.5f32; 3 * 32 * 32];
    let bad: Vec<(proto::ModelInferRequest, tonic::Code, &str)> = vec![
        (
            infer_request(
                vec![tensor_input(vec![1, 3, 32], Some(small.clone()))],
                vec![],
                &[],
            ),
            tonic::Code::InvalidArgument,
            "[N, 3, H, W]",
        ),
        (
            infer_request(
                vec![tensor_input(vec![1, 3, 32, 32], None)],
                vec![vec![0; 12]],
                &[],
            ),
            tonic::Code::InvalidArgument,
            "12 bytes of binary data",
        ),
        (
            infer_request(
                vec![tensor_input(vec![1, 3, 32, 32], None)],
                vec![vec![], vec![]],
                &[],
            ),
            tonic::Code::InvalidArgument,
            "raw_input_contents has 2 entries for 1 inputs",
        ),
        (
            infer_request(
                vec![tensor_input(vec![1, 3, 32, 32], Some(small.clone()))],
                vec![le_bytes(&small)],
                &[],
            ),
            tonic::Code::InvalidArgument,
            "both in contents and in raw_input_contents",
        ),
        (
            infer_request(
                vec![image_input(1, Some(vec![b"not an image".to_vec()]))],
                vec![],
                &[],
            ),
            tonic::Code::InvalidArgument,
            "image 0",
        ),
        (
            infer_request(vec![image_input(1, None)], vec![vec![200, 0, 0, 0, 1]], &[]),
            tonic::Code::InvalidArgument,
            "says it has 200 bytes",
        ),
        (
            infer_request(
                vec![InferInputTensor {
                    contents: Some(proto::InferTensorContents {
                        int_contents: vec![1; 3072],
                        ..Default::default()
                    }),
                    ..tensor_input(vec![1, 3, 32, 32], None)
                }],
                vec![],
                &[],
            ),
            tonic::Code::InvalidArgument,
            "contents.int_contents",
        ),
        (
            infer_request(
                vec![tensor_input(vec![1, 3, 32, 32], Some(small.clone()))],
                vec![],
                &["scores"],
            ),
            tonic::Code::InvalidArgument,
            "no output `scores`",
        ),
        (
            infer_request(vec![], vec![], &[]),
            tonic::Code::InvalidArgument,
            "no inputs",
        ),
        (
            proto::ModelInferRequest {
                model_name: "nope".into(),
                ..infer_request(
                    vec![tensor_input(vec![1, 3, 32, 32], Some(small.clone()))],
                    vec![],
                    &[],
                )
            },
            tonic::Code::NotFound,
            "unknown model `nope`",
        ),
    ];
    for (request, code, needle) in bad {
        let status = client.model_infer(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{needle}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{needle}: {}",
            status.message()
        );
    }
    let status = client
        .model_metadata(proto::ModelMetadataRequest {
            name: "googlenet".into(),
            version: "3".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);

    // Triton's RPCs beyond the protocol: UNIMPLEMENTED, with a sentence.
    let channel = tonic::transport::Channel::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            tonic::Request::new(proto::ServerLiveRequest {}),
            axum::http::uri::PathAndQuery::from_static(
                "/inference.GRPCInferenceService/RepositoryIndex",
            ),
            tonic_prost::ProstCodec::<proto::ServerLiveRequest, proto::ServerLiveResponse>::default(
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert!(
        status.message().contains("RepositoryIndex is not served"),
        "{}",
        status.message()
    );

    let a = get(&app.router, "/metrics").await;
    let text = a.json.as_str().unwrap();
    assert!(
        text.contains(
            r#"cnnserve_requests_total{model="googlenet",status="200",protocol="grpc"} 4"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"cnnserve_requests_total{model="googlenet",status="400",protocol="grpc"}"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"cnnserve_requests_total{model="googlenet",status="200",protocol="rest"} 1"#
        ),
        "{text}"
    );

    drop(client);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the gRPC server stops on its signal")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_asks_for_the_key_except_on_its_probes() {
    let app = app_with(
        EngineConfig::on(Device::Cpu),
        Access {
            api_key: Some(ApiKey::new(KEY).unwrap()),
            cors_allow_origins: Vec::new(),
        },
    );
    let (addr, _stop, _server) = grpc_server(app.state.clone()).await;
    let mut client = GrpcInferenceServiceClient::connect(addr).await.unwrap();
    assert!(
        client
            .server_live(proto::ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        client
            .server_ready(proto::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let with_key = |key: Option<&str>| {
        let mut request = tonic::Request::new(proto::ModelMetadataRequest {
            name: "googlenet".into(),
            version: String::new(),
        });
        if let Some(key) = key {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        request
    };
    for (key, needle) in [(None, "needs an API key"), (Some("wrong"), "wrong")] {
        let status = client.model_metadata(with_key(key)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{key:?}");
        assert!(status.message().contains(needle), "{}", status.message());
    }
    let status = client
        .model_infer(infer_request(vec![], vec![], &[]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let meta = client.model_metadata(with_key(Some(KEY))).await.unwrap();
    assert_eq!(meta.into_inner().name, "googlenet");
}

/// Over the limit of requests in flight, both protocols answer as `/predict` does: HTTP 429
/// `overloaded`, gRPC RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_429_over_http_and_resource_exhausted_over_grpc() {
    let app = app_with(
        EngineConfig {
            max_concurrent_requests: 1,
            ..EngineConfig::on(Device::Cpu)
        },
        Access::default(),
    );
    let hold = app.state.engine.hold("googlenet").unwrap();
    let small = vec![0.5f32; 3 * 32 * 32];
    let request = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": small}]});
    let router = app.router.clone();
    let body = request.clone();
    let first = tokio::spawn(async move {
        send(&router, infer_json("/v2/models/googlenet/infer", &body))
            .await
            .status
    });
    // Wait until the first one holds the only permit: its image is queued.
    let mut queued = false;
    for _ in 0..1000 {
        let text = get(&app.router, "/metrics").await.json;
        if text
            .as_str()
            .unwrap()
            .lines()
            .any(|l| l == r#"cnnserve_queue_depth{model="googlenet"} 1"#)
        {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(queued, "the first request never queued");
    let a = send(
        &app.router,
        infer_json("/v2/models/googlenet/infer", &request),
    )
    .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.json);
    assert_eq!(a.json["error_type"], "overloaded");
    let (addr, _stop, _server) = grpc_server(app.state.clone()).await;
    let mut client = GrpcInferenceServiceClient::connect(addr).await.unwrap();
    let status = client
        .model_infer(infer_request(
            vec![tensor_input(vec![1, 3, 32, 32], Some(small))],
            vec![],
            &[],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("too many requests"),
        "{}",
        status.message()
    );
    drop(hold);
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    let text = get(&app.router, "/metrics").await.json;
    let text = text.as_str().unwrap();
    for line in [
        r#"cnnserve_requests_total{model="googlenet",status="429",protocol="v2"} 1"#,
        r#"cnnserve_requests_total{model="googlenet",status="429",protocol="grpc"} 1"#,
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
}

/// The binary: `--grpc-addr` serves gRPC beside HTTP, both stop on SIGTERM; empty turns it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_grpc_on_grpc_addr_and_stops_it_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let dir = common::googlenet_dir();
    let start = |grpc_addr: &str| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cnnserve"))
            .args(["serve", "--offline", "--json-logs", "--addr", "127.0.0.1:0"])
            .args(["--default-model", "googlenet", "--weights-dir"])
            .arg(dir.path())
            .env("CNNSERVE_GRPC_ADDR", grpc_addr)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        // Read to the end, so that the server never writes into a closed pipe.
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if v["fields"]["message"] == "listening" {
                    let _ = tx.send(v["fields"].clone());
                }
            }
        });
        let listening = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a `listening` line");
        (child, listening)
    };

    let (mut child, fields) = start("");
    assert_eq!(fields["grpc_addr"], "off", "{fields}");
    unsafe_kill(&child, libc::SIGTERM);
    assert!(child.wait().unwrap().success());

    let (mut child, fields) = start("127.0.0.1:0");
    let grpc = format!("http://{}", fields["grpc_addr"].as_str().unwrap());
    let mut client = GrpcInferenceServiceClient::connect(grpc.clone())
        .await
        .unwrap();
    let mut ready = false;
    for _ in 0..600 {
        if client
            .server_ready(proto::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "the server never became ready");
    let small = vec![0.5f32; 3 * 32 * 32];
    let response = client
        .model_infer(infer_request(
            vec![tensor_input(vec![1, 3, 32, 32], None)],
            vec![le_bytes(&small)],
            &["probabilities"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.outputs[0].shape, vec![1, 1000]);
    drop(client);
    unsafe_kill(&child, libc::SIGTERM);
    let stopped = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        None
    })
    .await
    .unwrap();
    assert!(
        stopped.expect("stopped within 10 s of SIGTERM").success(),
        "exit status"
    );
    assert!(
        GrpcInferenceServiceClient::connect(grpc).await.is_err(),
        "the gRPC port is closed"
    );
}

fn unsafe_kill(child: &std::process::Child, signal: i32) {
    // SAFETY: a plain kill(2) of our own child.
    let rc = unsafe { libc::kill(child.id() as i32, signal) };
    assert_eq!(rc, 0);
}
