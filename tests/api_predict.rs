//! The inference server over HTTP: router tests through `oneshot`, and one real server on a port.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use candle_core::{Device, Tensor};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use cnnserve::engine::{self, Classifier, Engine, EngineConfig};
use cnnserve::metrics::Metrics;
use cnnserve::models::Arch;
use cnnserve::preprocess::{self, Transform};
use cnnserve::server::{self, AppState, ServerConfig};

struct App {
    router: Router,
    state: AppState,
    dir: tempfile::TempDir,
}

/// A server over a weights dir holding the fixture GoogLeNet as `googlenet.safetensors`.
fn app_with(config: EngineConfig, payload_limit: usize) -> App {
    let dir = common::googlenet_dir();
    let engine = Engine::new(config, Arc::new(Metrics::new()));
    let report = engine.reload(dir.path());
    assert_eq!(report.loaded, vec!["googlenet"], "{report:?}");
    let state = AppState::new(
        engine,
        ServerConfig {
            weights_dir: dir.path().to_path_buf(),
            payload_limit,
            device_name: "cpu".into(),
            max_dataset_bytes: 1 << 30,
        },
        Some("googlenet".into()),
    );
    App {
        router: server::router(state.clone()),
        state,
        dir,
    }
}

fn app() -> App {
    app_with(EngineConfig::on(Device::Cpu), 20_000_000)
}

fn image(name: &str) -> Vec<u8> {
    std::fs::read(common::fixtures().join("preprocess").join(name)).unwrap()
}

fn raw(uri: &str, content_type: &str, body: Vec<u8>) -> Request<Body> {
    Request::post(uri)
        .header("content-type", content_type)
        .body(Body::from(body))
        .unwrap()
}

const BOUNDARY: &str = "cnnserve-test-boundary";

fn multipart(uri: &str, parts: &[(&str, &[u8])]) -> Request<Body> {
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"x.jpg\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    raw(
        uri,
        &format!("multipart/form-data; boundary={BOUNDARY}"),
        body,
    )
}

async fn send(
    router: &Router,
    request: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, headers, json)
}

async fn get(router: &Router, uri: &str) -> (StatusCode, Value) {
    let (status, _, json) = send(router, Request::get(uri).body(Body::empty()).unwrap()).await;
    (status, json)
}

/// What cnnserve's own preprocessing and forward pass give for an image, outside the server.
fn direct_probabilities(classifier: &Classifier, bytes: &[u8]) -> Vec<f32> {
    let image = preprocess::decode_rgb(bytes, preprocess::DEFAULT_MAX_PIXELS).unwrap();
    let xs = classifier
        .transform
        .apply(&image, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = classifier.logits(&xs).unwrap();
    cnnserve::models::layers::softmax(&logits)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_error(status: StatusCode, json: &Value, expected: StatusCode, error_type: &str) {
    assert_eq!(status, expected, "{json}");
    assert_eq!(json["error_type"], error_type, "{json}");
    assert!(
        json["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{json}"
    );
}

#[tokio::test]
async fn predict_answers_the_same_probabilities_as_forward_on_our_preprocessing() {
    let app = app();
    let classifier = app.state.engine.get("googlenet").unwrap();
    for name in ["img0.jpg", "img2.jpg", "img3.jpg"] {
        let bytes = image(name);
        let (status, headers, json) = send(
            &app.router,
            raw("/predict?top_k=0", "image/jpeg", bytes.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{json}");
        for header in [
            "x-queue-time",
            "x-inference-time",
            "x-total-time",
            "x-request-id",
        ] {
            assert!(headers.contains_key(header), "{header} missing");
        }
        assert_eq!(json["model"], "googlenet");
        let predictions = json["predictions"].as_array().unwrap();
        assert_eq!(predictions.len(), 1000);
        let expected = direct_probabilities(&classifier, &bytes);
        let mut previous = f64::INFINITY;
        let mut sum = 0.0;
        for p in predictions {
            let index = p["index"].as_u64().unwrap() as usize;
            let probability = p["probability"].as_f64().unwrap();
            assert!(probability <= previous, "not sorted");
            previous = probability;
            sum += probability;
            assert!(
                (probability - f64::from(expected[index])).abs() < 1e-5,
                "{name} class {index}"
            );
            assert_eq!(p["label"], classifier.labels[index]);
        }
        assert!(
            (sum - 1.0).abs() < 1e-3,
            "softmax over all classes sums to {sum}"
        );
    }
}

#[tokio::test]
async fn top_k_defaults_to_five_and_named_model_route_works() {
    let app = app();
    let (status, _, json) =
        send(&app.router, raw("/predict", "image/png", image("img1.jpg"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["predictions"].as_array().unwrap().len(), 5);
    let (status, _, json) = send(
        &app.router,
        raw(
            "/models/googlenet/predict?top_k=2",
            "application/octet-stream",
            image("img1.jpg"),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["predictions"].as_array().unwrap().len(), 2);
    let (status, _, json) = send(
        &app.router,
        raw("/predict?top_k=5000", "image/jpeg", image("img1.jpg")),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["predictions"].as_array().unwrap().len(), 1000);
}

#[tokio::test]
async fn several_multipart_images_answer_results_in_order() {
    let app = app();
    let (a, b) = (image("img0.jpg"), image("img4.jpg"));
    let (status, _, json) = send(
        &app.router,
        multipart(
            "/predict?top_k=1",
            &[("image", &a), ("note", b"ignored"), ("image", &b)],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    let classifier = app.state.engine.get("googlenet").unwrap();
    for (result, bytes) in results.iter().zip([&a, &b]) {
        let expected = direct_probabilities(&classifier, bytes);
        let top = &result["predictions"][0];
        let index = top["index"].as_u64().unwrap() as usize;
        let best = expected
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .unwrap()
            .0;
        assert_eq!(index, best);
    }
    // One image in a multipart body answers the single shape.
    let (status, _, json) = send(&app.router, multipart("/predict", &[("image", &a)])).await;
    assert_eq!(status, StatusCode::OK);
    assert!(json["predictions"].is_array() && json.get("results").is_none());
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_the_server_keeps_serving() {
    let app = app_with(
        EngineConfig {
            max_pixels: 100_000,
            ..EngineConfig::on(Device::Cpu)
        },
        200_000,
    );
    let jpeg = image("img0.jpg"); // 500x375 = 187,500 px, 19 KB
    let small = image("img2.jpg"); // 157x200 BMP, ~94 KB
    let r = &app.router;

    let (s, _, j) = send(r, raw("/predict", "image/jpeg", vec![])).await;
    assert_error(s, &j, StatusCode::BAD_REQUEST, "bad_request");
    let (s, _, j) = send(r, multipart("/predict", &[("file", &small)])).await;
    assert_error(s, &j, StatusCode::BAD_REQUEST, "bad_request");
    let (s, _, j) = send(
        r,
        raw(
            "/predict",
            "multipart/form-data; boundary=zzz",
            b"--zzz\r\nnot a part".to_vec(),
        ),
    )
    .await;
    assert_error(s, &j, StatusCode::BAD_REQUEST, "bad_request");
    let (s, _, j) = send(
        r,
        raw("/predict", "multipart/form-data", b"no boundary".to_vec()),
    )
    .await;
    assert_error(s, &j, StatusCode::BAD_REQUEST, "bad_request");
    let (s, _, j) = send(r, raw("/predict?top_k=many", "image/jpeg", small.clone())).await;
    assert_error(s, &j, StatusCode::BAD_REQUEST, "bad_request");

    let (s, _, j) = send(r, raw("/predict", "text/plain", b"hello".to_vec())).await;
    assert_error(
        s,
        &j,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let (s, _, j) = send(
        r,
        raw(
            "/predict",
            "image/jpeg",
            b"just some text, not an image".to_vec(),
        ),
    )
    .await;
    assert_error(s, &j, StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_image");
    let (s, _, j) = send(
        r,
        raw("/predict", "image/jpeg", small[..small.len() / 2].to_vec()),
    )
    .await;
    assert_error(s, &j, StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_image");
    assert!(j["error"].as_str().unwrap().contains("image 0"), "{j}");

    let (s, _, j) = send(r, raw("/predict", "image/jpeg", vec![0xff; 300_000])).await;
    assert_error(s, &j, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    let big_part = vec![0xffu8; 300_000];
    let (s, _, j) = send(r, multipart("/predict", &[("image", &big_part)])).await;
    assert_error(s, &j, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

    let (s, _, j) = send(r, raw("/predict", "image/jpeg", jpeg)).await;
    assert_error(s, &j, StatusCode::UNPROCESSABLE_ENTITY, "too_many_pixels");

    let (s, _, j) = send(
        r,
        raw("/predict?model=resnet50", "image/jpeg", small.clone()),
    )
    .await;
    assert_error(s, &j, StatusCode::NOT_FOUND, "not_found");
    assert!(
        j["error"].as_str().unwrap().contains("googlenet"),
        "lists known models: {j}"
    );

    let (s, _) = get(r, "/no/such/route").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, _, j) = send(r, raw("/predict", "image/bmp", small)).await;
    assert_eq!(s, StatusCode::OK, "still serving: {j}");
    let (_, metrics) = get(r, "/metrics").await;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics.contains(
            r#"cnnserve_requests_total{model="googlenet",status="415",protocol="rest"} 3"#
        ),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"cnnserve_requests_total{model="unknown",status="404",protocol="rest"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn health_is_503_until_a_model_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(EngineConfig::on(Device::Cpu), Arc::new(Metrics::new()));
    let state = AppState::new(
        engine.clone(),
        ServerConfig {
            weights_dir: dir.path().to_path_buf(),
            payload_limit: 1 << 20,
            device_name: "cpu".into(),
            max_dataset_bytes: 1 << 30,
        },
        Some("googlenet".into()),
    );
    let router = server::router(state);
    let (s, j) = get(&router, "/health").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{j}");
    let (s, _) = get(&router, "/ping").await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, j) = send(&router, raw("/predict", "image/jpeg", image("img1.jpg"))).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{j}");

    std::os::unix::fs::symlink(
        common::fixtures().join("googlenet/weights.safetensors"),
        dir.path().join("googlenet-1378be20.pth.safetensors"),
    )
    .unwrap();
    // A file whose name is no architecture is skipped, and says why.
    let (s, j) = send(
        &router,
        Request::post("/models/reload").body(Body::empty()).unwrap(),
    )
    .await
    .pipe(|(s, _, j)| (s, j));
    assert_eq!(s, StatusCode::OK);
    assert_eq!(j["skipped"].as_array().unwrap().len(), 1, "{j}");
    std::fs::rename(
        dir.path().join("googlenet-1378be20.pth.safetensors"),
        dir.path().join("googlenet.safetensors"),
    )
    .unwrap();
    let (_, _, j) = send(
        &router,
        Request::post("/models/reload").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(j["loaded"], serde_json::json!(["googlenet"]), "{j}");
    let (s, j) = get(&router, "/health").await;
    assert_eq!(s, StatusCode::OK, "{j}");
}

trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl<T> Pipe for T {}

#[tokio::test]
async fn models_info_and_metrics_describe_the_registry() {
    let app = app();
    let (s, j) = get(&app.router, "/models").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(j["default_model"], "googlenet");
    let m = &j["models"][0];
    assert_eq!(m["name"], "googlenet");
    assert_eq!(m["architecture"], "googlenet");
    assert_eq!(m["kind"], "pretrained");
    assert_eq!(m["preprocessing"], "imagenet");
    assert_eq!(m["num_classes"], 1000);
    let sha =
        engine::classifier::sha256_file(&common::fixtures().join("googlenet/weights.safetensors"))
            .unwrap();
    assert_eq!(m["sha256"], sha);
    assert!(m["loaded_at"].as_str().unwrap().contains('T'));

    let (s, j) = get(&app.router, "/models/googlenet").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(j["classes"][281]["label"], "tabby");
    assert_eq!(j["classes"].as_array().unwrap().len(), 1000);
    let (s, j) = get(&app.router, "/models/vgg99").await;
    assert_error(s, &j, StatusCode::NOT_FOUND, "not_found");

    let (s, _, j) = send(
        &app.router,
        Request::delete("/models/googlenet")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_error(s, &j, StatusCode::CONFLICT, "conflict");

    let (s, j) = get(&app.router, "/info").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(j["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(j["device"], "cpu");
    assert_eq!(j["limits"]["max_batch_size"], 16);
    assert_eq!(j["models"], serde_json::json!(["googlenet"]));
}

/// A two-class head on the fixture GoogLeNet, written as the trainer writes one.
fn write_fine_tuned(dir: &Path, name: &str, base: &Classifier) {
    let dev = Device::Cpu;
    let mut tensors = std::collections::HashMap::new();
    tensors.insert(
        "fc.weight".to_string(),
        Tensor::randn(0f32, 0.05, (2, 1024), &dev).unwrap(),
    );
    tensors.insert(
        "fc.bias".to_string(),
        Tensor::new(&[0.1f32, -0.1], &dev).unwrap(),
    );
    cnnserve::weights::save_safetensors(&tensors, &dir.join(format!("{name}.safetensors")))
        .unwrap();
    let meta = engine::FineTunedMeta {
        format: engine::FineTunedMeta::FORMAT.into(),
        name: name.into(),
        arch: Arch::Googlenet,
        base_model: base.name.clone(),
        base_sha256: base.sha256.clone(),
        // As heads from before the tensors' digest was recorded.
        base_tensors_sha256: None,
        train_layers: cnnserve::models::TrainLayers::Head,
        classes: vec!["Cat".into(), "Dog".into()],
        transform: Transform::Resize256x256,
        created_at: chrono::Utc::now(),
        params: Value::Null,
        metrics: Value::Null,
    };
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_vec(&meta).unwrap(),
    )
    .unwrap();
}

#[tokio::test]
async fn a_fine_tuned_model_is_served_with_its_classes_and_can_be_deleted() {
    let app = app();
    let base = app.state.engine.get("googlenet").unwrap();
    write_fine_tuned(app.dir.path(), "pets", &base);
    let (_, _, report) = send(
        &app.router,
        Request::post("/models/reload").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(report["loaded"], serde_json::json!(["pets"]), "{report}");
    assert_eq!(
        report["unchanged"],
        serde_json::json!(["googlenet"]),
        "{report}"
    );

    let pets = app.state.engine.get("pets").unwrap();
    assert!(
        Arc::ptr_eq(pets.network(), base.network()),
        "backbone shared, not copied"
    );
    let bytes = image("img3.jpg");
    let (s, _, j) = send(
        &app.router,
        raw("/predict?model=pets", "image/jpeg", bytes.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{j}");
    let predictions = j["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 2);
    let expected = direct_probabilities(&pets, &bytes);
    for p in predictions {
        let i = p["index"].as_u64().unwrap() as usize;
        assert_eq!(p["label"], ["Cat", "Dog"][i]);
        assert!((p["probability"].as_f64().unwrap() - f64::from(expected[i])).abs() < 1e-5);
    }
    let (_, j) = get(&app.router, "/models/pets").await;
    assert_eq!(j["kind"], "fine_tuned");
    assert_eq!(j["preprocessing"], "resize256x256");
    assert_eq!(j["base_model"], "googlenet");

    let (s, _, j) = send(
        &app.router,
        Request::delete("/models/pets").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{j}");
    assert!(!app.dir.path().join("pets.safetensors").exists());
    assert!(!app.dir.path().join("pets.json").exists());
    let (s, _, _) = send(&app.router, raw("/predict?model=pets", "image/jpeg", bytes)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(app.state.engine.get("googlenet").is_some());
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn images_waiting_for_a_busy_worker_run_as_one_batch() {
    let app = app_with(
        EngineConfig {
            max_batch_size: 8,
            max_batch_delay: Duration::ZERO,
            ..EngineConfig::on(Device::Cpu)
        },
        1 << 24,
    );
    // The worker is busy (held) while six requests arrive; then all six are waiting.
    let hold = app.state.engine.hold("googlenet").unwrap();
    let requests: Vec<_> = (0..6)
        .map(|i| {
            let router = app.router.clone();
            let bytes = image(["img0.jpg", "img1.jpg", "img4.jpg"][i % 3]);
            tokio::spawn(async move { send(&router, raw("/predict", "image/jpeg", bytes)).await.0 })
        })
        .collect();
    wait_for_queue_depth(&app.router, 6).await;
    drop(hold);
    for status in futures_util::future::join_all(requests).await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    let (_, text) = get(&app.router, "/metrics").await;
    let text = text.as_str().unwrap();
    let batches = metric(text, r#"cnnserve_batch_size_count{model="googlenet"}"#);
    let images = metric(text, r#"cnnserve_batch_size_sum{model="googlenet"}"#);
    assert_eq!(images, 6.0);
    assert_eq!(batches, 1.0, "6 waiting images ran in {batches} batches");
    assert_eq!(
        metric(text, r#"cnnserve_queue_depth{model="googlenet"}"#),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lone_request_does_not_wait_for_the_batch_delay() {
    let app = app_with(
        EngineConfig {
            max_batch_delay: Duration::from_secs(120),
            ..EngineConfig::on(Device::Cpu)
        },
        1 << 24,
    );
    let answered = tokio::time::timeout(
        Duration::from_secs(60),
        send(
            &app.router,
            raw("/predict", "image/jpeg", image("img1.jpg")),
        ),
    )
    .await
    .expect("a lone request waited for the 120 s batch delay");
    let (status, headers, _) = answered;
    assert_eq!(status, StatusCode::OK);
    let queued: f64 = headers["x-queue-time"].to_str().unwrap().parse().unwrap();
    assert!(queued < 60_000.0, "queued {queued} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_over_the_concurrency_limit_is_answered_429_at_once() {
    let app = app_with(
        EngineConfig {
            max_concurrent_requests: 1,
            ..EngineConfig::on(Device::Cpu)
        },
        1 << 24,
    );
    let hold = app.state.engine.hold("googlenet").unwrap();
    let router = app.router.clone();
    let first = tokio::spawn(async move {
        send(&router, raw("/predict", "image/jpeg", image("img1.jpg")))
            .await
            .0
    });
    // The first image sits in the queue, holding the only permit.
    wait_for_queued(&app.router).await;
    let (s, _, j) = send(
        &app.router,
        raw("/predict", "image/jpeg", image("img1.jpg")),
    )
    .await;
    assert_error(s, &j, StatusCode::TOO_MANY_REQUESTS, "overloaded");
    drop(hold);
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    let (s, _, _) = send(
        &app.router,
        raw("/predict", "image/jpeg", image("img1.jpg")),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "the permit came back");
}

/// The real thing: a listener on a random port, a blocking HTTP client, a model swapped under
/// load without a failed request, and a graceful shutdown that lets the last request finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_server_swaps_a_model_under_load_and_shuts_down_gracefully() {
    let app = app_with(
        EngineConfig {
            max_batch_delay: Duration::from_millis(20),
            ..EngineConfig::on(Device::Cpu)
        },
        1 << 24,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(listener, app.state.clone(), async {
        let _ = stopped.await;
    }));

    let url = format!("http://{addr}/predict?top_k=1");
    let clients: Vec<_> = (0..3)
        .map(|c| {
            let url = url.clone();
            tokio::task::spawn_blocking(move || {
                let bytes = image(["img0.jpg", "img1.jpg", "img4.jpg"][c]);
                (0..6)
                    .map(|_| {
                        let response = ureq::post(&url)
                            .header("content-type", "image/jpeg")
                            .send(&bytes[..]);
                        match response {
                            Ok(r) => r.status().as_u16(),
                            Err(ureq::Error::StatusCode(code)) => code,
                            Err(e) => panic!("{e}"),
                        }
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    // Swap the model several times while the clients run.
    let weights = common::fixtures().join("googlenet/weights.safetensors");
    let engine = app.state.engine.clone();
    let swaps = tokio::task::spawn_blocking(move || {
        let mut loaded_at = Vec::new();
        for _ in 0..3 {
            let c = Classifier::pretrained(
                "googlenet",
                Arch::Googlenet,
                &weights,
                &Device::Cpu,
                candle_core::DType::F32,
            )
            .unwrap();
            loaded_at.push(engine.insert(c).loaded_at);
        }
        loaded_at
    });
    for client in clients {
        assert_eq!(client.await.unwrap(), vec![200; 6]);
    }
    let loaded_at = swaps.await.unwrap();
    assert_eq!(
        app.state.engine.get("googlenet").unwrap().loaded_at,
        loaded_at[2]
    );

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

async fn wait_for_queued(router: &Router) {
    wait_for_queue_depth(router, 1).await
}

async fn wait_for_queue_depth(router: &Router, depth: usize) {
    let line = format!(r#"cnnserve_queue_depth{{model="googlenet"}} {depth}"#);
    for _ in 0..1000 {
        let (_, text) = get(router, "/metrics").await;
        if text.as_str().unwrap().lines().any(|l| l == line) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the queue never held {depth} images");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_lets_a_request_in_flight_finish() {
    let app = app_with(EngineConfig::on(Device::Cpu), 1 << 24);
    let hold = app.state.engine.hold("googlenet").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(listener, app.state.clone(), async {
        let _ = stopped.await;
    }));
    let in_flight = tokio::task::spawn_blocking(move || {
        ureq::post(&format!("http://{addr}/predict"))
            .header("content-type", "image/jpeg")
            .send(&image("img1.jpg")[..])
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    });
    wait_for_queued(&app.router).await;
    stop.send(()).unwrap();
    // Shutdown has begun with the request still waiting for its forward pass.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(hold);
    assert_eq!(in_flight.await.unwrap(), 200);
    server.await.unwrap().unwrap();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn the_demo_page_and_its_assets_are_served() {
    let app = app();
    let response = app
        .router
        .clone()
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(html.contains(r#"<script src="/static/app.js">"#) && html.contains("finetune-form"));
    for (path, kind, needle) in [
        ("/static/app.js", "text/javascript", "/predict?"),
        ("/static/style.css", "text/css", "#predict"),
    ] {
        let response = app
            .router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind),
            "{path}"
        );
        let text = response.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&text).contains(needle), "{path}");
    }
}

#[tokio::test]
async fn the_openapi_document_describes_every_endpoint() {
    let app = app();
    let (status, doc) = get(&app.router, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/predict", "post"),
        ("/models/{name}/predict", "post"),
        ("/models", "get"),
        ("/models/{name}", "get"),
        ("/models/{name}", "delete"),
        ("/models/reload", "post"),
        ("/models/{name}/download", "get"),
        ("/finetune", "post"),
        ("/jobs", "get"),
        ("/jobs/{id}", "get"),
        ("/jobs/{id}", "delete"),
        ("/jobs/{id}/events", "get"),
        ("/jobs/{id}/examples/{n}", "get"),
        ("/health", "get"),
        ("/ping", "get"),
        ("/info", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    let schemas = &doc["components"]["schemas"];
    let job = &schemas["Job"]["properties"];
    for field in [
        "job_id", "status", "params", "dataset", "progress", "history", "result", "error",
    ] {
        assert!(job.get(field).is_some(), "Job.{field} missing: {job}");
    }
    assert!(schemas["ErrorBody"]["properties"]
        .get("error_type")
        .is_some());
    assert!(schemas["Single"]["properties"].get("predictions").is_some());
}

/// Readiness while models load (issue: "readiness lies while models load"): the default model is
/// never replaced by another, requests for a model still loading get 503 `model_loading` with
/// `Retry-After`, and `/health` turns 200 only once everything settled and the default is ready.
#[tokio::test]
async fn readiness_waits_for_every_model_and_the_default_is_never_replaced() {
    let app = app();
    // vgg11_bn (the configured default) was found and is still loading; googlenet answers.
    let engine = app.state.engine.clone();
    engine.expect([("vgg11_bn".to_string(), Some(Arch::Vgg11Bn))]);
    let state = AppState::new(
        engine.clone(),
        ServerConfig {
            weights_dir: app.dir.path().to_path_buf(),
            payload_limit: 20_000_000,
            device_name: "cpu".into(),
            max_dataset_bytes: 1 << 30,
        },
        Some("vgg11_bn".into()),
    );
    let router = server::router(state);

    let (s, j) = get(&router, "/health").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{j}");
    assert_eq!(j["status"], "loading");
    assert_eq!(j["default_model"], "vgg11_bn");
    assert_eq!(
        j["models"],
        serde_json::json!([{"name": "googlenet", "state": "ready"}, {"name": "vgg11_bn", "state": "loading"}])
    );
    let (_, j) = get(&router, "/models").await;
    assert_eq!(
        j["default_model"], "vgg11_bn",
        "never replaced by googlenet"
    );
    assert_eq!(j["models"][0]["state"], "ready");
    assert_eq!(j["models"][0]["name"], "googlenet");
    assert_eq!(j["models"][1]["state"], "loading");
    assert_eq!(j["models"][1]["architecture"], "vgg11_bn");
    for uri in [
        "/predict",
        "/predict?model=vgg11_bn",
        "/models/vgg11_bn/predict",
    ] {
        let (s, headers, j) = send(&router, raw(uri, "image/jpeg", image("img1.jpg"))).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {j}");
        assert_eq!(j["error_type"], "model_loading", "{uri}: {j}");
        assert_eq!(headers["retry-after"], "5", "{uri}");
    }
    let (s, j) = get(&router, "/models/vgg11_bn").await;
    assert_eq!(
        (s, &j["error_type"]),
        (StatusCode::SERVICE_UNAVAILABLE, &"model_loading".into())
    );
    let (s, _, j) = send(
        &router,
        raw("/predict?model=googlenet", "image/jpeg", image("img1.jpg")),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{j}");

    // Its load fails: settled, but the default is not ready.
    engine.mark_failed(
        "vgg11_bn",
        Some(Arch::Vgg11Bn),
        "the file is truncated".into(),
    );
    let (s, j) = get(&router, "/health").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{j}");
    assert_eq!(j["status"], "unavailable");
    assert_eq!(j["models"][1]["state"], "failed");
    assert_eq!(j["models"][1]["error"], "the file is truncated");
    let (_, j) = get(&router, "/models").await;
    assert_eq!(j["models"][1]["state"], "failed");
    assert_eq!(j["models"][1]["error"], "the file is truncated");
    let (s, _, j) = send(&router, raw("/predict", "image/jpeg", image("img1.jpg"))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{j}");
    assert_eq!(j["error_type"], "model_unavailable");
    assert!(j["error"].as_str().unwrap().contains("truncated"), "{j}");

    // Everything settled and the default ready: 200. (The app's own state has googlenet as its
    // default; the failed vgg11_bn is reported, not waited for.)
    let (s, j) = get(&app.router, "/health").await;
    assert_eq!(s, StatusCode::OK, "{j}");
    assert_eq!(j["status"], "ok");
}

/// Every route, asked with a method it does not take and with parameters its extractors reject,
/// answers JSON `{"error", "error_type"}` with a 4xx (axum's own rejections included).
#[tokio::test]
async fn every_route_answers_wrong_methods_and_bad_parameters_in_json() {
    let app = app();
    let (_, doc) = get(&app.router, "/openapi.json").await;
    let mut routes: Vec<(String, Vec<String>)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(path, item)| {
            (
                path.clone(),
                item.as_object().unwrap().keys().cloned().collect(),
            )
        })
        .collect();
    for path in ["/", "/static/app.js", "/static/style.css", "/openapi.json"] {
        routes.push((path.to_string(), vec!["get".to_string()]));
    }
    assert!(routes.len() >= 19, "{routes:?}");
    let concrete = |path: &str| {
        path.replace("{name}", "googlenet")
            .replace("{id}", "0123456789ab")
            .replace("{n}", "0")
            .replace("{version}", "1")
    };
    let mut checked = 0;
    for (path, methods) in &routes {
        for method in ["get", "post", "delete", "put", "patch"] {
            if methods.iter().any(|m| m == method) {
                continue;
            }
            let request = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(concrete(path))
                .body(Body::empty())
                .unwrap();
            let (s, headers, j) = send(&app.router, request).await;
            assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}: {j}");
            assert_eq!(
                j["error_type"], "method_not_allowed",
                "{method} {path}: {j}"
            );
            assert!(j["error"].as_str().unwrap().contains("not allowed"), "{j}");
            assert!(headers.contains_key("allow"), "{method} {path}");
            checked += 1;
        }
    }
    assert!(checked >= 60, "{checked} wrong methods tried");

    let bad = [
        Request::get("/jobs/0123456789ab/examples/abc"),
        Request::get("/models/googlenet/download?format=json&format=json"),
        Request::get("/models/googlenet/download?format=xml"),
        Request::post("/predict?top_k=many").header("content-type", "image/jpeg"),
        Request::post("/predict?top_k=-1").header("content-type", "image/jpeg"),
        Request::delete("/jobs/0123456789ab?purge=maybe"),
        Request::post("/finetune").header("content-type", "text/plain"),
        Request::post("/finetune").header("content-type", "multipart/form-data"),
        Request::get("/no/such/path"),
    ];
    for request in bad {
        let request = request.body(Body::from(image("img1.jpg"))).unwrap();
        let what = format!("{} {}", request.method(), request.uri());
        let (s, headers, j) = send(&app.router, request).await;
        assert!(
            s.is_client_error() || s == StatusCode::SERVICE_UNAVAILABLE,
            "{what}: {s} {j}"
        );
        assert_eq!(headers["content-type"], "application/json", "{what}");
        assert!(
            j["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {j}"
        );
        assert!(j["error_type"].as_str().is_some(), "{what}: {j}");
    }
}

/// A request whose client has gone while it waited is dropped before its forward pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_whose_client_left_costs_no_forward_pass() {
    let app = app();
    let hold = app.state.engine.hold("googlenet").unwrap();
    let router = app.router.clone();
    let gone = tokio::spawn(async move {
        send(&router, raw("/predict", "image/jpeg", image("img1.jpg"))).await
    });
    wait_for_queue_depth(&app.router, 1).await;
    gone.abort();
    let _ = gone.await;
    drop(hold);
    // The next request runs alone: the one that left never reached the network.
    let (s, _, j) = send(
        &app.router,
        raw("/predict", "image/jpeg", image("img0.jpg")),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{j}");
    let (_, text) = get(&app.router, "/metrics").await;
    let text = text.as_str().unwrap();
    assert_eq!(
        metric(text, r#"cnnserve_batch_size_count{model="googlenet"}"#),
        1.0
    );
    assert_eq!(
        metric(text, r#"cnnserve_batch_size_sum{model="googlenet"}"#),
        1.0
    );
}

/// Pixels in flight are bounded (`--max-inflight-pixels`): over the budget a request is answered
/// 429 at admission, read from its header, before anything is decoded; one request alone fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pixels_in_flight_are_bounded_with_429_at_admission() {
    let photo = 500 * 375; // img0.jpg
    let app = app_with(
        EngineConfig {
            max_pixels: photo,
            pixel_budget: photo + photo / 2,
            ..EngineConfig::on(Device::Cpu)
        },
        1 << 24,
    );
    let hold = app.state.engine.hold("googlenet").unwrap();
    let router = app.router.clone();
    let first = tokio::spawn(async move {
        send(&router, raw("/predict", "image/jpeg", image("img0.jpg")))
            .await
            .0
    });
    wait_for_queue_depth(&app.router, 1).await;
    let (s, headers, j) = send(
        &app.router,
        raw("/predict", "image/jpeg", image("img0.jpg")),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{j}");
    assert_eq!(j["error_type"], "overloaded");
    assert!(
        j["error"]
            .as_str()
            .unwrap()
            .contains("--max-inflight-pixels"),
        "{j}"
    );
    assert!(headers.contains_key("retry-after"));
    drop(hold);
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    let (s, _, j) = send(
        &app.router,
        raw("/predict", "image/jpeg", image("img0.jpg")),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "the budget is given back: {j}");
}
