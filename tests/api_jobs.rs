//! Fine-tuning over HTTP: a job from upload to served model, its errors, cancellation, live
//! events, and what a restart keeps.

mod common;

use std::io::Write;

use common::{dataset_zip, picture};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use cnnserve::engine::{Engine, EngineConfig};
use cnnserve::jobs::{JobConfig, JobManager};
use cnnserve::metrics::Metrics;
use cnnserve::server::{self, AppState, ServerConfig};
use cnnserve::train::DatasetLimits;

struct App {
    router: Router,
    jobs: JobManager,
    engine: Engine,
}

/// A server over `dir`, as `cnnserve serve` builds it; `start` runs the training threads.
fn app(dir: &std::path::Path, max_dataset_bytes: u64, start: bool) -> App {
    let engine = Engine::new(
        EngineConfig::on(candle_core::Device::Cpu),
        Arc::new(Metrics::new()),
    );
    let report = engine.reload(dir);
    assert!(report.failed.is_empty(), "{report:?}");
    let jobs = JobManager::open(
        JobConfig {
            dataset_limits: DatasetLimits::default(),
            database_url: common::job_database(dir),
            replica: "api-jobs-test".into(),
            ..JobConfig::new(dir)
        },
        engine.clone(),
    )
    .unwrap();
    jobs.check_pretrained().unwrap();
    jobs.sync_models().unwrap();
    if start {
        jobs.start().unwrap();
    }
    let state = AppState::new(
        engine.clone(),
        ServerConfig {
            weights_dir: dir.to_path_buf(),
            payload_limit: 1 << 24,
            device_name: "cpu".into(),
            max_dataset_bytes,
        },
        Some("googlenet".into()),
    )
    .with_jobs(jobs.clone());
    App {
        router: server::router(state),
        jobs,
        engine,
    }
}

const BOUNDARY: &str = "cnnserve-jobs-boundary";

/// Form fields, the zip (if any), and a word the error must contain.
type Case<'a> = (Vec<(&'a str, &'a str)>, Option<&'a [u8]>, &'a str);

fn finetune(fields: &[(&str, &str)], dataset: Option<&[u8]>) -> Request<Body> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    if let Some(bytes) = dataset {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"dataset\"; filename=\"d.zip\"\r\n\
                 Content-Type: application/zip\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    Request::post("/finetune")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(Body::from(body))
        .unwrap()
}

async fn send(
    router: &Router,
    request: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let response = router.clone().oneshot(request).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, headers, json)
}

async fn get(router: &Router, uri: &str) -> (StatusCode, Value) {
    let (s, _, j) = send(router, Request::get(uri).body(Body::empty()).unwrap()).await;
    (s, j)
}

async fn delete(router: &Router, uri: &str) -> (StatusCode, Value) {
    let (s, _, j) = send(router, Request::delete(uri).body(Body::empty()).unwrap()).await;
    (s, j)
}

async fn wait_for(router: &Router, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let (_, job) = get(router, &format!("/jobs/{id}")).await;
        if done(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "job never got there: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn finished(job: &Value) -> bool {
    matches!(
        job["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_runs_from_upload_to_a_served_model_with_live_events() {
    let dir = common::googlenet_dir();
    let app = app(dir.path(), 1 << 30, true);
    let zip = dataset_zip(5);
    let fields = [
        ("base_model", "googlenet"),
        ("name", "shapes"),
        ("epochs", "3"),
        ("batch_size", "4"),
        ("augment", "false"),
        ("learning_rate", "0.001"),
        ("seed", "3"),
    ];
    let (status, headers, body) = send(&app.router, finetune(&fields, Some(&zip))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["job_id"].as_str().unwrap().to_string();
    assert_eq!(body["status"], "queued");
    assert_eq!(headers["location"], format!("/jobs/{id}"));

    // The event stream, read to its end.
    let response = app
        .router
        .clone()
        .oneshot(
            Request::get(format!("/jobs/{id}/events"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut text = String::new();
    let read = tokio::time::timeout(Duration::from_secs(240), async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the stream did not end: {text}");
    assert!(text.contains("event: progress"), "{text}");
    assert_eq!(text.matches("event: epoch").count(), 3, "{text}");
    // Phases come in order (the stream may join after `reading` or `caching` began).
    let order = [
        "reading",
        "caching",
        "training",
        "evaluating",
        "saving",
        "done",
    ];
    let phases: Vec<usize> = text
        .split("\"phase\":\"")
        .skip(1)
        .map(|rest| {
            let phase = rest.split('"').next().unwrap();
            order.iter().position(|p| *p == phase).unwrap()
        })
        .collect();
    assert!(phases.windows(2).all(|w| w[0] <= w[1]), "{phases:?}");
    for phase in ["training", "evaluating", "saving"] {
        assert!(
            text.contains(&format!("\"phase\":\"{phase}\"")),
            "{phase}: {text}"
        );
    }
    let done = text
        .split("event: done\ndata: ")
        .nth(1)
        .expect("a done event");
    let done: Value = serde_json::from_str(done.lines().next().unwrap()).unwrap();
    assert_eq!(done["status"], "succeeded", "{done}");

    let (status, job) = get(&app.router, &format!("/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job, done);
    for field in ["created_at", "started_at", "finished_at"] {
        assert!(job[field].as_str().is_some(), "{field}: {job}");
    }
    assert_eq!(job["params"]["epochs"], 3);
    assert_eq!(job["params"]["augment"], false);
    assert_eq!(
        job["dataset"]["classes"],
        serde_json::json!(["blobs", "stripes"])
    );
    assert_eq!(job["dataset"]["counts"]["train"], serde_json::json!([4, 4]));
    assert_eq!(job["dataset"]["counts"]["valid"], serde_json::json!([1, 1]));
    assert_eq!(job["dataset"]["counts"]["test"], serde_json::json!([2, 2]));
    assert!(
        job["dataset"]["skipped"][0]["file"]
            .as_str()
            .unwrap()
            .contains("broken.png"),
        "{job}"
    );
    assert!(job["dataset"]["ignored"].as_u64().unwrap() >= 1);
    let progress = &job["progress"];
    assert_eq!(
        (progress["epoch"].as_u64(), progress["epochs"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(progress["step"], progress["steps"]);
    assert!(progress["images_per_s"].as_f64().unwrap() > 0.0);
    // A finished job's figures are final: the whole training's speed, nothing left to wait for.
    assert_eq!(progress["phase"], "done", "{progress}");
    assert_eq!(progress["eta_s"], 0.0, "{progress}");
    assert_eq!(progress["done"], progress["total"], "{progress}");
    assert_eq!(job["history"].as_array().unwrap().len(), 3);
    for key in ["train_loss", "train_acc", "valid_loss", "valid_acc"] {
        assert!(job["history"][0][key].is_number(), "{key}");
    }
    let result = &job["result"];
    assert_eq!(result["model"], "shapes");
    assert!((1..=3).contains(&result["best_epoch"].as_u64().unwrap()));
    assert_eq!(result["split"], "test");
    assert!(result["test_loss"].is_number() && result["test_acc"].is_number());
    let matrix = result["confusion_matrix"].as_array().unwrap();
    let total: u64 = matrix
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 4);
    assert_eq!(result["per_class"][0]["support"], 2);
    let examples = result["examples"].as_array().unwrap();
    assert!(!examples.is_empty());
    assert!(job["error"].is_null());

    // The gallery picture of example 0.
    let response = app
        .router
        .clone()
        .oneshot(
            Request::get(format!("/jobs/{id}/examples/0"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "image/png");
    let png = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(image::load_from_memory(&png).unwrap().width(), 128);
    let (s, _) = get(
        &app.router,
        &format!("/jobs/{id}/examples/{}", examples.len()),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The new model answers at once, with the data set's classes.
    let request = Request::post("/predict?model=shapes&top_k=0")
        .header("content-type", "image/png")
        .body(Body::from(picture(0, 77)))
        .unwrap();
    let (s, _, prediction) = send(&app.router, request).await;
    assert_eq!(s, StatusCode::OK, "{prediction}");
    let labels: Vec<&str> = prediction["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels.len(), 2);
    assert!(labels.contains(&"stripes") && labels.contains(&"blobs"));

    let (s, listing) = get(&app.router, "/jobs").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(listing["jobs"][0]["job_id"], id.as_str());

    let response = app
        .router
        .clone()
        .oneshot(
            Request::get("/models/shapes/download")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    assert_eq!(names, ["fc.bias", "fc.weight"]);
    let (s, meta) = get(&app.router, "/models/shapes/download?format=json").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(meta["classes"], serde_json::json!(["blobs", "stripes"]));
    assert_eq!(meta["base_model"], "googlenet");
    let (s, _) = get(&app.router, "/models/googlenet/download").await;
    assert_eq!(s, StatusCode::CONFLICT);

    let (_, metrics) = get(&app.router, "/metrics").await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains(r#"cnnserve_jobs{status="succeeded"} 1"#),
        "{metrics}"
    );
    // A finished job's stream answers `done` at once.
    let (_, _, replay) = send(
        &app.router,
        Request::get(format!("/jobs/{id}/events"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(
        replay.as_str().unwrap().starts_with("event: done"),
        "{replay}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_400_and_dataset_problems_422_all_at_once() {
    let dir = common::googlenet_dir();
    let app = app(dir.path(), 200_000, false);
    let zip = dataset_zip(3);
    let r = &app.router;
    let g = ("base_model", "googlenet");
    let cases: Vec<Case> = vec![
        (vec![g], Some(b"this is no zip".as_slice()), "not a zip"),
        (vec![g, ("epochs", "many")], Some(&zip), "epochs"),
        (vec![g, ("augment", "maybe")], Some(&zip), "augment"),
        (vec![g, ("train_layers", "all")], Some(&zip), "train_layers"),
        (vec![g, ("valid_ratio", "1.5")], Some(&zip), "valid_ratio"),
        (vec![g, ("epoch", "3")], Some(&zip), "unknown field"),
        (vec![("base_model", "resnet50")], Some(&zip), "resnet50"),
        (vec![g, ("name", "../evil")], Some(&zip), "model name"),
        (vec![g], None, "no `dataset`"),
    ];
    for (fields, dataset, needle) in cases {
        let (s, _, j) = send(r, finetune(&fields, dataset)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{needle}: {j}");
        assert_eq!(j["error_type"], "bad_request");
        assert!(
            j["error"].as_str().unwrap().contains(needle),
            "{needle}: {j}"
        );
    }
    let (s, _, j) = send(
        r,
        Request::post("/finetune")
            .header("content-type", "application/zip")
            .body(Body::from(zip.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{j}");

    // One class, and that class with a single image: both problems in one answer.
    let mut single = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    single
        .start_file("only/one.png", zip::write::SimpleFileOptions::default())
        .unwrap();
    single.write_all(&picture(0, 1)).unwrap();
    let single = single.finish().unwrap().into_inner();
    let (s, _, j) = send(r, finetune(&[("base_model", "googlenet")], Some(&single))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{j}");
    assert_eq!(j["error_type"], "invalid_dataset");
    assert_eq!(j["details"]["problems"].as_array().unwrap().len(), 2, "{j}");

    let (s, _, j) = send(
        r,
        finetune(
            &[("base_model", "googlenet"), ("train_layers", "classifier")],
            Some(&zip),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{j}");
    let (s, _, j) = send(
        r,
        finetune(
            &[("base_model", "googlenet"), ("name", "googlenet")],
            Some(&zip),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{j}");
    let big = vec![7u8; 300_000];
    let (s, _, j) = send(r, finetune(&[("base_model", "googlenet")], Some(&big))).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{j}");

    // Nothing was queued, and no upload was kept.
    let (_, listing) = get(r, "/jobs").await;
    assert_eq!(listing["jobs"].as_array().unwrap().len(), 0);
    assert_eq!(
        std::fs::read_dir(dir.path().join("jobs")).unwrap().count(),
        0
    );
    let (s, _) = get(r, "/jobs/nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_and_running_jobs_can_be_cancelled_and_finished_ones_purged() {
    let dir = common::googlenet_dir();
    let app = app(dir.path(), 1 << 30, true);
    let zip = dataset_zip(4);
    let slow = [
        ("base_model", "googlenet"),
        ("epochs", "500"),
        ("batch_size", "2"),
        ("augment", "true"),
    ];
    let (_, _, a) = send(&app.router, finetune(&slow, Some(&zip))).await;
    let (_, _, b) = send(&app.router, finetune(&slow, Some(&zip))).await;
    let (a, b) = (
        a["job_id"].as_str().unwrap().to_string(),
        b["job_id"].as_str().unwrap().to_string(),
    );
    wait_for(&app.router, &a, |j| {
        j["status"] == "running" && !j["progress"].is_null()
    })
    .await;

    let (s, job) = delete(&app.router, &format!("/jobs/{b}")).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
    let (_, job) = get(&app.router, &format!("/jobs/{b}")).await;
    assert_eq!(
        job["status"], "cancelled",
        "a queued job is cancelled at once"
    );

    let (s, _) = delete(&app.router, &format!("/jobs/{a}?purge=true")).await;
    assert_eq!(s, StatusCode::CONFLICT, "a running job is not purged");
    let (s, _) = delete(&app.router, &format!("/jobs/{a}")).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let job = wait_for(&app.router, &a, finished).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(job["result"].is_null());
    let (s, j) = delete(&app.router, &format!("/jobs/{a}")).await;
    assert_eq!(s, StatusCode::CONFLICT, "{j}");

    let (s, _) = delete(&app.router, &format!("/jobs/{a}?purge=true")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = get(&app.router, &format!("/jobs/{a}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(
        !dir.path().join("jobs").join(&a).exists(),
        "uploaded data removed"
    );
    assert!(
        dir.path().join("jobs").join(&b).exists(),
        "other jobs untouched"
    );
    assert!(app.engine.get("googlenet").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_keeps_finished_jobs_runs_queued_ones_and_fails_interrupted_ones() {
    let dir = common::googlenet_dir();
    let zip = dataset_zip(4);
    let quick = [
        ("base_model", "googlenet"),
        ("epochs", "2"),
        ("batch_size", "4"),
        ("augment", "false"),
    ];

    // First life: one job succeeds; another is cut off by a shutdown while it runs.
    let first = app(dir.path(), 1 << 30, true);
    let (_, _, done) = send(
        &first.router,
        finetune(
            &[quick.as_slice(), &[("name", "kept")]].concat(),
            Some(&zip),
        ),
    )
    .await;
    let done = done["job_id"].as_str().unwrap().to_string();
    wait_for(&first.router, &done, finished).await;
    let slow = [
        ("base_model", "googlenet"),
        ("epochs", "500"),
        ("batch_size", "2"),
        ("augment", "true"),
    ];
    let (_, _, cut) = send(&first.router, finetune(&slow, Some(&zip))).await;
    let cut = cut["job_id"].as_str().unwrap().to_string();
    wait_for(&first.router, &cut, |j| j["status"] == "running").await;
    first.jobs.shutdown();
    assert!(first.jobs.wait_idle(Duration::from_secs(60)));
    let (_, job) = get(&first.router, &format!("/jobs/{cut}")).await;
    assert_eq!(job["status"], "failed");
    assert!(
        job["error"].as_str().unwrap().contains("shut down"),
        "{job}"
    );

    // Second life, no training threads: a job is queued, then the process "crashes" while a
    // job runs (its row still says running) and leaves a temporary file behind.
    let second = app(dir.path(), 1 << 30, false);
    let (_, _, queued) = send(
        &second.router,
        finetune(
            &[quick.as_slice(), &[("name", "later")]].concat(),
            Some(&zip),
        ),
    )
    .await;
    let queued = queued["job_id"].as_str().unwrap().to_string();
    let url = common::job_database(dir.path())
        .unwrap_or_else(|| format!("sqlite:{}", dir.path().join("jobs.sqlite").display()));
    let store = cnnserve::jobs::store::open(&url).unwrap();
    let mut crashed = store.get(&done).unwrap().unwrap();
    crashed.job_id = "crashed00001".into();
    crashed.name = "crashed".into();
    crashed.status = cnnserve::jobs::Status::Queued;
    crashed.finished_at = None;
    crashed.result = None;
    store.create(&crashed).unwrap();
    crashed.status = cnnserve::jobs::Status::Running;
    store.update(&crashed, None).unwrap();
    drop(store);
    std::fs::write(dir.path().join(".crashed.safetensors.tmp-1-0"), b"half").unwrap();
    // Two uploads whose job rows were never written (a crash between the two): one still for
    // two hours, one from a moment ago.
    let hours_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    for (id, when) in [("orphan00old1", Some(hours_ago)), ("orphan00new1", None)] {
        let folder = dir.path().join("jobs").join(id);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("dataset.zip"), &zip).unwrap();
        if let Some(when) = when {
            for path in [folder.join("dataset.zip"), folder] {
                std::fs::File::open(&path)
                    .unwrap()
                    .set_modified(when)
                    .unwrap();
            }
        }
    }
    drop(second);

    // Third life.
    let third = app(dir.path(), 1 << 30, true);
    assert!(
        third.engine.get("kept").is_some(),
        "the fine-tuned model is served after a restart"
    );
    let (_, job) = get(&third.router, &format!("/jobs/{done}")).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["result"]["model"], "kept");
    let (_, job) = get(&third.router, "/jobs/crashed00001").await;
    assert_eq!(job["status"], "failed");
    assert!(
        job["error"].as_str().unwrap().contains("interrupted"),
        "{job}"
    );
    assert!(
        !dir.path().join(".crashed.safetensors.tmp-1-0").exists(),
        "no half-written file"
    );
    assert!(
        !dir.path().join("jobs/orphan00old1").exists(),
        "an upload with no job, still for an hour, is removed"
    );
    // With replicas sharing the job store, a young upload may be another replica's in flight;
    // alone on SQLite, nobody else can be uploading.
    let shared = common::job_database(dir.path()).is_some();
    assert_eq!(
        dir.path().join("jobs/orphan00new1").exists(),
        shared,
        "a young upload with no job is kept only when replicas share the job store"
    );
    let job = wait_for(&third.router, &queued, finished).await;
    assert_eq!(job["status"], "succeeded", "the queued job ran: {job}");
    assert!(served(&third, "later").await);
    let (_, listing) = get(&third.router, "/jobs").await;
    let ids: Vec<&str> = listing["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(ids[0], queued.as_str(), "newest first");
}

/// Whether model `name` is served within a minute (a job is recorded succeeded a moment before
/// its model is in place and served).
async fn served(app: &App, name: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.engine.get(name).is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.engine.get(name).is_some()
}

/// A one-epoch job named `name`, held at `at` (it has got there when this returns).
async fn held_job(
    app: &App,
    at: cnnserve::jobs::Checkpoint,
    name: &str,
    zip: &[u8],
) -> (cnnserve::jobs::Hold, String) {
    let hold = app.jobs.hold(at);
    let fields = [("base_model", "googlenet"), ("name", name), ("epochs", "1")];
    let (s, _, job) = send(&app.router, finetune(&fields, Some(zip))).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
    let id = job["job_id"].as_str().unwrap().to_string();
    let reached = tokio::task::block_in_place(|| hold.wait_until_reached(Duration::from_secs(120)));
    assert!(reached, "the job never reached {at:?}");
    (hold, id)
}

/// Between a job's commit (succeeded, its model registered) and the move of its files into
/// place, neither a rescan (which unregisters models whose weights are gone) nor a purge of the
/// job (which deletes its folder in the model store) may lose the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_recorded_but_still_staged_survives_a_rescan_and_a_purge() {
    use cnnserve::jobs::Checkpoint;
    let dir = common::googlenet_dir();
    let app = app(dir.path(), 1 << 30, true);
    let url = common::job_database(dir.path())
        .unwrap_or_else(|| format!("sqlite:{}", dir.path().join("jobs.sqlite").display()));
    let registry = cnnserve::jobs::store::open(&url).unwrap();
    let zip = dataset_zip(4);
    for (name, action) in [("rescanned", "rescan"), ("purged", "purge")] {
        let (hold, id) = held_job(&app, Checkpoint::Recorded, name, &zip).await;
        let weights = dir.path().join(format!("{name}.safetensors"));
        assert!(!weights.exists(), "held before its files are moved");
        let request = Request::post(format!("/predict?model={name}"))
            .header("content-type", "image/png")
            .body(Body::from(picture(0, 77)))
            .unwrap();
        let (s, _, answer) = send(&app.router, request).await;
        assert_eq!(
            (s, answer["error_type"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("model_loading")),
            "recorded, not yet in place: {answer}"
        );
        let (s, job) = get(&app.router, &format!("/jobs/{id}")).await;
        assert_eq!(
            (s, job["status"].as_str()),
            (StatusCode::OK, Some("succeeded")),
            "{name}: {job}"
        );
        if action == "rescan" {
            let request = Request::post("/models/reload").body(Body::empty()).unwrap();
            let (s, _, report) = send(&app.router, request).await;
            assert_eq!(s, StatusCode::OK, "{report}");
            let registered = registry.models().unwrap();
            assert!(
                registered.iter().any(|m| m.name == name),
                "a rescan keeps a committed model registered: {registered:?}"
            );
        } else {
            let (s, answer) = delete(&app.router, &format!("/jobs/{id}?purge=true")).await;
            assert_eq!(s, StatusCode::OK, "{answer}");
        }
        drop(hold);
        assert!(served(&app, name).await, "{name} is served");
        assert!(weights.is_file(), "{name}'s weights are in place");
        assert!(dir.path().join(format!("{name}.json")).is_file());
    }
    // And after a restart, from the registry.
    app.jobs.shutdown();
    drop(app);
    let again = self::app(dir.path(), 1 << 30, false);
    for name in ["rescanned", "purged"] {
        assert!(
            again.engine.get(name).is_some(),
            "{name} served after a restart"
        );
    }
}

/// Cancel and finish cannot both win. Held just before its commit point, a finished training
/// is cancelled (202) and ends `cancelled` with no model; held just after it, the cancel is
/// answered 409 and the job ends `succeeded` with its model served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_either_stops_the_job_or_is_refused_never_both() {
    use cnnserve::jobs::Checkpoint;
    let dir = common::googlenet_dir();
    let app = app(dir.path(), 1 << 30, true);
    let zip = dataset_zip(4);
    for (at, name) in [
        (Checkpoint::BeforeCommit, "early"),
        (Checkpoint::AfterCommit, "late"),
        (Checkpoint::Recorded, "recorded"),
    ] {
        let (hold, id) = held_job(&app, at, name, &zip).await;
        let (s, answer) = delete(&app.router, &format!("/jobs/{id}")).await;
        drop(hold);
        let job = wait_for(&app.router, &id, finished).await;
        let model_file = dir.path().join(format!("{name}.safetensors"));
        match at {
            Checkpoint::BeforeCommit => {
                assert_eq!(s, StatusCode::ACCEPTED, "{answer}");
                assert_eq!(job["status"], "cancelled", "{job}");
                assert!(app.engine.get(name).is_none(), "nothing published");
                assert!(!model_file.exists(), "no model file");
            }
            Checkpoint::AfterCommit => {
                assert_eq!(s, StatusCode::CONFLICT, "{answer}");
                assert!(
                    answer["error"].as_str().unwrap().contains("too late"),
                    "{answer}"
                );
                assert_eq!(job["status"], "succeeded", "{job}");
                // Recorded before it is published: the model follows a moment later.
                assert!(served(&app, name).await, "published");
                assert!(model_file.exists());
            }
            Checkpoint::Recorded => {
                assert_eq!(s, StatusCode::CONFLICT, "{answer}");
                assert!(
                    answer["error"]
                        .as_str()
                        .unwrap()
                        .contains("already succeeded"),
                    "{answer}"
                );
                assert_eq!(job["status"], "succeeded", "{job}");
                assert!(served(&app, name).await, "published");
                assert!(model_file.exists());
            }
        }
    }
}

/// Concurrent uploads that ask for one model name: exactly one job is queued, the others get 409,
/// and no upload of a refused one is left on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_concurrent_uploads_with_one_name_exactly_one_is_accepted() {
    let dir = common::googlenet_dir();
    // Not started: the jobs stay queued, their names reserved.
    let app = app(dir.path(), 1 << 30, false);
    let zip = Arc::new(dataset_zip(4));
    let uploads: Vec<_> = (0..6)
        .map(|_| {
            let (router, zip) = (app.router.clone(), zip.clone());
            tokio::spawn(async move {
                let fields = [
                    ("base_model", "googlenet"),
                    ("name", "twin"),
                    ("epochs", "1"),
                ];
                let (s, _, j) = send(&router, finetune(&fields, Some(&zip))).await;
                (s, j)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for upload in uploads {
        answers.push(upload.await.unwrap());
    }
    let accepted = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::ACCEPTED)
        .count();
    let refused: Vec<_> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CONFLICT)
        .collect();
    assert_eq!((accepted, refused.len()), (1, 5), "{answers:?}");
    for (_, j) in refused {
        assert!(j["error"].as_str().unwrap().contains("twin"), "{j}");
    }
    let (_, jobs) = get(&app.router, "/jobs").await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1, "{jobs}");
    let uploads = std::fs::read_dir(dir.path().join("jobs")).unwrap().count();
    assert_eq!(uploads, 1, "only the accepted job keeps its upload");
}
