//! The demo page in a real browser: headless Chromium loads it from a running server, runs its
//! JavaScript against the API, and we read the resulting DOM.
//!
//! Needs Debian's `chromium` (`apt-get install chromium`; `.ci/run` installs it) or the binary
//! named by `CNNSERVE_CHROMIUM`. Without one the test fails and says so.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnnserve::engine::{Engine, EngineConfig};
use cnnserve::jobs::{JobConfig, JobManager, Status};
use cnnserve::metrics::Metrics;
use cnnserve::server::{self, AppState, ServerConfig};
use cnnserve::train::{self, DatasetLimits, Params};

fn chromium() -> String {
    let binary = std::env::var("CNNSERVE_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let found = Command::new(&binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{binary}` not found: install Debian's chromium (apt-get install chromium) or set \
         CNNSERVE_CHROMIUM to a Chromium binary"
    );
    binary
}

/// The page's DOM once its scripts have run (virtual time lets fetches and rendering finish).
fn rendered(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=10000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_lists_models_and_shows_a_finished_job_with_its_gallery() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        common::fixtures().join("googlenet/weights.safetensors"),
        dir.path().join("googlenet.safetensors"),
    )
    .unwrap();
    let engine = Engine::new(
        EngineConfig::on(candle_core::Device::Cpu),
        Arc::new(Metrics::new()),
    );
    engine.reload(dir.path());
    let jobs = JobManager::open(
        JobConfig {
            dir: dir.path().to_path_buf(),
            max_concurrent_jobs: 1,
            training_threads: 1,
            dataset_limits: DatasetLimits::default(),
        },
        engine.clone(),
    )
    .unwrap();
    jobs.start().unwrap();

    // A small cat/dog job, submitted the way POST /finetune does.
    let data = common::data_dir().join("catanddog");
    let mut dataset = train::dataset::load(&data, &DatasetLimits::default(), (256, 256)).unwrap();
    // Every 20th image keeps both classes and makes the job take a second.
    for split in [&mut dataset.train, &mut dataset.test] {
        let all = std::mem::take(split);
        *split = all.into_iter().step_by(20).collect();
    }
    let params = Params {
        epochs: 2,
        augment: false,
        ..Params::default()
    };
    let (id, _) = jobs.new_job_dir().unwrap();
    jobs.submit(
        id.clone(),
        "pets".into(),
        "googlenet".into(),
        params,
        dataset,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !jobs.get(&id).unwrap().status.is_finished() {
        assert!(Instant::now() < deadline, "the job did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(jobs.get(&id).unwrap().status, Status::Succeeded);

    let state = AppState::new(
        engine,
        ServerConfig {
            weights_dir: dir.path().to_path_buf(),
            payload_limit: 1 << 24,
            device_name: "cpu".into(),
            max_dataset_bytes: 1 << 30,
        },
        Some("googlenet".into()),
    )
    .with_jobs(jobs);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(listener, state, async {
        let _ = stopped.await;
    }));

    let home = tokio::task::spawn_blocking(move || rendered(&format!("http://{addr}/")))
        .await
        .unwrap();
    assert!(home.contains("2 model(s) ready"), "{home}");
    assert!(
        home.contains(r#"<option value="googlenet""#) && home.contains(r#"<option value="pets""#)
    );
    assert!(
        home.contains(&format!("#job={id}")),
        "the job is listed: {home}"
    );

    let job_id = id.clone();
    let job =
        tokio::task::spawn_blocking(move || rendered(&format!("http://{addr}/#job={job_id}")))
            .await
            .unwrap();
    assert!(job.contains("Model “pets” is live"), "{job}");
    assert!(
        job.contains(&format!("/jobs/{id}/examples/0")),
        "the gallery: {job}"
    );
    assert_eq!(
        job.matches("<tr><td>").count(),
        2,
        "one history row per epoch: {job}"
    );

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swagger_ui_shows_every_route_of_the_openapi_document() {
    let engine = Engine::new(
        EngineConfig::on(candle_core::Device::Cpu),
        Arc::new(Metrics::new()),
    );
    let state = AppState::new(
        engine,
        ServerConfig {
            weights_dir: std::env::temp_dir(),
            payload_limit: 1 << 20,
            device_name: "cpu".into(),
            max_dataset_bytes: 1 << 20,
        },
        None,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(listener, state, async {
        let _ = stopped.await;
    }));
    let doc = tokio::task::spawn_blocking(move || {
        ureq::get(&format!("http://{addr}/openapi.json"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    })
    .await
    .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let docs = tokio::task::spawn_blocking(move || rendered(&format!("http://{addr}/docs/")))
        .await
        .unwrap();
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    assert!(paths.len() > 15, "{paths:?}");
    for path in paths {
        assert!(
            docs.contains(&format!(r#"data-path="{path}""#)),
            "{path} is not shown by Swagger UI"
        );
    }
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
