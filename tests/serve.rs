//! `cnnserve serve` as a process: start-up checks, downloads of missing weights (and `cnnserve
//! fetch-weights`), signals.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;

fn cnnserve() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cnnserve"));
    // gRPC on a free port too: tests run side by side, and the default port is fixed.
    command
        .env("RUST_LOG", "info")
        .env("CNNSERVE_GRPC_ADDR", "127.0.0.1:0")
        .env_remove("RUST_BACKTRACE");
    command
}

/// A static file server on a random local port, standing in for download.pytorch.org.
async fn file_server(files: Vec<(String, Vec<u8>)>) -> String {
    let mut app = axum::Router::new();
    for (name, bytes) in files {
        app = app.route(
            &format!("/models/{name}"),
            axum::routing::get(move || async move { bytes }),
        );
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/models")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_checks_the_sha256_prefix_and_leaves_nothing_half_written() {
    let payload = b"pretend these are weights".to_vec();
    let digest = format!("{:x}", sha2::Sha256::digest(&payload));
    let base = file_server(vec![("good.pth".into(), payload.clone())]).await;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("good.pth");

    let (url, wrong) = (format!("{base}/good.pth"), "deadbeef".to_string());
    let t = target.clone();
    let err = tokio::task::spawn_blocking(move || {
        cnnserve::weights::fetch::download(&url, &wrong, &t, false)
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(err.to_string().contains("sha256"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing left behind"
    );

    let (url, prefix, t) = (
        format!("{base}/good.pth"),
        digest[..8].to_string(),
        target.clone(),
    );
    tokio::task::spawn_blocking(move || {
        cnnserve::weights::fetch::download(&url, &prefix, &t, false)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), payload);

    let (url, t) = (
        format!("{base}/missing.pth"),
        dir.path().join("missing.pth"),
    );
    let err = tokio::task::spawn_blocking(move || {
        cnnserve::weights::fetch::download(&url, "00", &t, false)
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    assert!(!dir.path().join("missing.pth").exists());
}

#[test]
fn torchvision_file_names_carry_their_architecture_and_hash() {
    use cnnserve::models::Arch;
    use cnnserve::weights::{fetch, pth};
    for arch in Arch::ALL {
        let file = fetch::torchvision_file(arch);
        assert_eq!(pth::model_name_from_file(Path::new(file)), arch.name());
        assert_eq!(fetch::hash_prefix(file).unwrap().len(), 8, "{file}");
    }
}

#[test]
fn offline_with_an_empty_weights_dir_exits_saying_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = cnnserve()
        .args(["--offline", "--addr", "127.0.0.1:0", "--weights-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nothing to serve"), "{stderr}");
    assert!(
        stderr.contains("vgg11_bn-6002323d.pth") && stderr.contains("without --offline"),
        "{stderr}"
    );
}

/// Reads the server's JSON logs: returns the address it listens on, and every line as it comes.
fn listening_addr(child: &mut Child) -> (String, std::sync::mpsc::Receiver<String>) {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v["fields"]["message"] == "listening" {
                return (v["fields"]["addr"].as_str().unwrap().to_string(), rx);
            }
        }
    }
    panic!("server never said it listens");
}

/// Collects log lines until one contains `needle` (or a minute passes).
fn logs_until(lines: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let done = line.contains(needle);
        seen.push(line);
        if done {
            break;
        }
    }
    seen.join("\n")
}

fn wait_until_healthy(addr: &str) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = match ureq::get(&format!("http://{addr}/health")).call() {
            Ok(r) => r.status().as_u16(),
            Err(ureq::Error::StatusCode(code)) => code,
            Err(e) => panic!("{e}"),
        };
        if status == 200 || Instant::now() > deadline {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `cnnserve serve` on `dir` with JSON logs, `extra` flags and `env`, once healthy.
fn start_server(
    dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Child, String, std::sync::mpsc::Receiver<String>) {
    let mut command = cnnserve();
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .args(["serve", "--offline", "--json-logs", "--addr", "127.0.0.1:0"])
        .args(extra)
        .args(["--default-model", "googlenet", "--weights-dir"])
        .arg(dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, lines) = listening_addr(&mut child);
    assert_eq!(wait_until_healthy(&addr), 200);
    (child, addr, lines)
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn serve_loads_the_weights_dir_answers_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        common::fixtures().join("googlenet/weights.pth"),
        dir.path().join("googlenet-1378be20.pth"),
    )
    .unwrap();
    let mut child = cnnserve()
        .args([
            "serve",
            "--offline",
            "--json-logs",
            "--addr",
            "127.0.0.1:0",
            "--weights-dir",
        ])
        .arg(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, logs) = listening_addr(&mut child);
    assert_eq!(wait_until_healthy(&addr), 200);
    let image = std::fs::read(common::fixtures().join("preprocess/img3.jpg")).unwrap();
    let body: serde_json::Value = ureq::post(&format!("http://{addr}/predict?top_k=1"))
        .header("content-type", "image/jpeg")
        .send(&image[..])
        .unwrap()
        .body_mut()
        .read_to_string()
        .map(|text| serde_json::from_str(&text).unwrap())
        .unwrap();
    assert_eq!(
        body["model"], "googlenet",
        "vgg11_bn is absent: the only model is the default"
    );
    // The containers' HEALTHCHECK: 0 while the server answers, 1 (one sentence) once it is gone.
    let healthcheck = |url: &str| {
        cnnserve()
            .args(["healthcheck", "--timeout", "2", "--url", url])
            .output()
            .unwrap()
    };
    let ping = format!("http://{addr}/ping");
    assert!(healthcheck(&ping).status.success());
    assert!(healthcheck(&format!("http://{addr}/health"))
        .status
        .success());
    sigterm(&child);
    let logs = logs_until(&logs, "shutting down");
    let status = child.wait().unwrap();
    let gone = healthcheck(&ping);
    assert_eq!(gone.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert!(status.success(), "{status:?}");
    assert!(logs.contains("shutting down"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_downloads_a_missing_default_model_and_refuses_a_corrupt_one() {
    // Our fixture is not torchvision's file, so its sha256 cannot match the name's hash:
    // the download must be refused and nothing kept.
    let weights = std::fs::read(common::fixtures().join("googlenet/weights.pth")).unwrap();
    let base = file_server(vec![("googlenet-1378be20.pth".into(), weights)]).await;
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_path_buf();
    let logs = tokio::task::spawn_blocking(move || {
        let mut child = cnnserve()
            .args([
                "--json-logs",
                "--addr",
                "127.0.0.1:0",
                "--default-model",
                "googlenet",
            ])
            .arg("--weights-url")
            .arg(&base)
            .arg("--weights-dir")
            .arg(&dir_path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (addr, lines) = listening_addr(&mut child);
        let logs = logs_until(&lines, "no model could be loaded");
        assert_eq!(
            wait_until_healthy_once(&addr),
            503,
            "no model could be loaded"
        );
        sigterm(&child);
        child.wait().unwrap();
        logs
    })
    .await
    .unwrap();
    assert!(logs.contains("downloading weights"), "{logs}");
    assert!(logs.contains("does not start with 1378be20"), "{logs}");
    // Only the job store is there: no weights, no temporary file.
    let mut kept: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("jobs"))
        .collect();
    kept.sort();
    assert!(kept.is_empty(), "no file kept: {kept:?}");
}

fn wait_until_healthy_once(addr: &str) -> u16 {
    match ureq::get(&format!("http://{addr}/health")).call() {
        Ok(r) => r.status().as_u16(),
        Err(ureq::Error::StatusCode(code)) => code,
        Err(e) => panic!("{e}"),
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn asking_for_cuda_in_a_cpu_build_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = cnnserve()
        .args([
            "--device",
            "cuda:0",
            "--offline",
            "--addr",
            "127.0.0.1:0",
            "--weights-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--features cuda") && stderr.contains("--device cpu"),
        "{stderr}"
    );
    let bad = cnnserve().args(["--device", "tpu"]).output().unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown device"));
}

#[test]
fn a_dtype_the_device_cannot_run_stops_the_start_with_a_sentence() {
    let dir = tempfile::tempdir().unwrap();
    // `serve --dtype <dtype>` on an empty weights dir, with CNNSERVE_CPU_ISA capped at `isa`.
    let start = |dtype: &str, isa: Option<&str>| {
        let mut command = cnnserve();
        if let Some(isa) = isa {
            command.env("CNNSERVE_CPU_ISA", isa);
        }
        let out = command
            .args([
                "--dtype",
                dtype,
                "--offline",
                "--addr",
                "127.0.0.1:0",
                "--weights-dir",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = start("f16", None);
    assert!(
        stderr.contains("--dtype f16 is not available on the CPU")
            && stderr.contains("--dtype f32"),
        "{stderr}"
    );
    assert!(!stderr.contains("stack backtrace"), "{stderr}");
    // bf16 needs AVX512_BF16: refused wherever the instruction set is capped below AVX-512.
    let stderr = start("bf16", Some("avx2"));
    assert!(
        stderr.contains("--dtype bf16 on the CPU needs AVX-512 with the BF16 extension"),
        "{stderr}"
    );
    let bad = cnnserve().args(["--dtype", "f64"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("invalid value 'f64'") && stderr.contains("f32"),
        "{stderr}"
    );
}

fn get_json(url: &str) -> serde_json::Value {
    let text = ureq::get(url)
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Kills the server (SIGKILL, no chance to clean up) while a job trains, starts it again, and
/// finds the job failed with the reason and no half-written file.
#[test]
fn a_job_cut_off_by_a_kill_shows_failed_after_a_restart() {
    let dir = common::googlenet_dir();
    let start = || start_server(dir.path(), &[], &[]);

    let (mut first, addr, _lines) = start();
    let fields = [
        ("base_model", "googlenet"),
        ("epochs", "500"),
        ("batch_size", "2"),
        ("augment", "true"),
    ];
    let accepted: serde_json::Value = post_finetune(&addr, &fields)
        .unwrap()
        .body_mut()
        .read_to_string()
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap();
    let id = accepted["job_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let job = get_json(&format!("http://{addr}/jobs/{id}"));
        if job["status"] == "running" && !job["progress"].is_null() {
            break;
        }
        assert!(Instant::now() < deadline, "the job never ran: {job}");
        std::thread::sleep(Duration::from_millis(50));
    }
    first.kill().unwrap();
    first.wait().unwrap();

    let (second, addr, _lines) = start();
    let job = get_json(&format!("http://{addr}/jobs/{id}"));
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("interrupted"),
        "{job}"
    );
    assert!(job["finished_at"].is_string());
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.contains(".tmp-") || n.ends_with(".safetensors") && n != "googlenet.safetensors"
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let models = get_json(&format!("http://{addr}/models"));
    assert_eq!(models["models"].as_array().unwrap().len(), 1, "{models}");
    sigterm(&second);
    let mut second = second;
    assert!(second.wait().unwrap().success());
}

/// `POST /finetune` of a small generated data set with `fields`.
fn post_finetune(
    addr: &str,
    fields: &[(&str, &str)],
) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
    let boundary = "kill-test-boundary";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"dataset\"; filename=\"d.zip\"\r\n\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(&common::dataset_zip(4));
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    ureq::post(&format!("http://{addr}/finetune"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .send(&body[..])
}

/// A finished job has one commit point. The release binary is killed (SIGKILL, through the
/// `CNNSERVE_CRASH_AT` test aid) at each step of taking an upload and of publishing a model; after
/// a restart there is either a failed job (or none) and no model file, or a succeeded job whose
/// model is served, and nothing left over in the weights dir or the jobs folder.
#[test]
fn a_kill_at_any_step_of_publishing_leaves_a_consistent_state() {
    for step in ["upload", "staged", "committed", "renamed", "published"] {
        let dir = common::googlenet_dir();
        let (mut first, addr, _lines) =
            start_server(dir.path(), &[], &[("CNNSERVE_CRASH_AT", step)]);
        let fields = [
            ("base_model", "googlenet"),
            ("name", "pets"),
            ("epochs", "1"),
        ];
        // The upload step dies before answering; the others answer 202 and die later.
        let _ = post_finetune(&addr, &fields);
        let deadline = Instant::now() + Duration::from_secs(120);
        let killed = loop {
            if let Some(status) = first.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{step}: the server was never killed"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!killed.success(), "{step}: {killed:?}");

        let (second, addr, _lines) = start_server(dir.path(), &[], &[]);
        let jobs = get_json(&format!("http://{addr}/jobs"));
        let jobs = jobs["jobs"].as_array().unwrap().clone();
        let model_files = ["pets.safetensors", "pets.json"].map(|f| dir.path().join(f).exists());
        let served = ureq::get(&format!("http://{addr}/models/pets"))
            .call()
            .is_ok();
        match step {
            "upload" => assert!(jobs.is_empty(), "{step}: {jobs:?}"),
            "staged" => {
                assert_eq!(jobs.len(), 1, "{step}");
                assert_eq!(jobs[0]["status"], "failed", "{step}: {}", jobs[0]);
            }
            _ => {
                assert_eq!(jobs.len(), 1, "{step}");
                assert_eq!(jobs[0]["status"], "succeeded", "{step}: {}", jobs[0]);
            }
        }
        let succeeded = jobs.iter().any(|j| j["status"] == "succeeded");
        assert_eq!(model_files, [succeeded; 2], "{step}: model files");
        assert_eq!(served, succeeded, "{step}: model served");
        // Nothing left over: no temporaries, no staged model, no upload without a job.
        let in_dir: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(in_dir.is_empty(), "{step}: {in_dir:?}");
        for entry in std::fs::read_dir(dir.path().join("jobs")).unwrap() {
            let entry = entry.unwrap();
            let id = entry.file_name().to_string_lossy().into_owned();
            assert!(
                jobs.iter().any(|j| j["job_id"] == id.as_str()),
                "{step}: upload {id} kept"
            );
            assert!(
                !entry.path().join("model").exists(),
                "{step}: staged model kept"
            );
        }
        sigterm(&second);
        let mut second = second;
        assert!(second.wait().unwrap().success());
    }
}

/// A forward pass that panics (the `CNNSERVE_CRASH_AT=panic-forward` test aid, once) fails its
/// request with 503 `model_unavailable`; the worker goes on and the next request is answered; the
/// panic is one log line, no backtrace, also with `RUST_BACKTRACE=1`.
#[test]
fn a_worker_that_panics_answers_503_and_goes_on() {
    let dir = common::googlenet_dir();
    let env = [
        ("CNNSERVE_CRASH_AT", "panic-forward"),
        ("RUST_BACKTRACE", "1"),
    ];
    let (mut child, addr, lines) = start_server(dir.path(), &[], &env);
    let photo = std::fs::read(common::fixtures().join("preprocess/img1.jpg")).unwrap();
    let predict = || ureq::post(&format!("http://{addr}/predict")).send(&photo[..]);
    match predict() {
        Err(ureq::Error::StatusCode(503)) => {}
        other => panic!("expected 503, got {other:?}"),
    }
    let mut answer = ureq::post(&format!("http://{addr}/predict"))
        .config()
        .http_status_as_error(false)
        .build()
        .send(&photo[..])
        .unwrap();
    assert_eq!(answer.status(), 200, "the worker went on");
    let body = answer.body_mut().read_to_string().unwrap();
    assert!(body.contains("predictions"), "{body}");
    let metrics = ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        metrics.contains("cnnserve_worker_panics_total{model=\"googlenet\"} 1"),
        "{metrics}"
    );
    sigterm(&child);
    assert!(child.wait().unwrap().success());
    let logs: Vec<String> = lines.try_iter().collect();
    let panic_lines: Vec<&String> = logs.iter().filter(|l| l.contains("panic")).collect();
    assert!(!panic_lines.is_empty(), "the panic is logged");
    for line in &logs {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "a JSON log line: {line}"
        );
        assert!(!line.contains("stack backtrace"), "{line}");
    }
}

/// Stalled clients are cut (`--header-timeout`, `--body-timeout`: seconds without a byte); an
/// upload that keeps sending, however slowly, is not.
#[test]
fn stalled_clients_are_cut_and_slow_uploads_are_not() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let dir = common::googlenet_dir();
    let flags = ["--header-timeout", "1", "--body-timeout", "1"];
    let (mut child, addr, _lines) = start_server(dir.path(), &flags, &[]);
    // Reads until the server closes; how long that took.
    let closed_after = |stream: &mut TcpStream| {
        let started = Instant::now();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        (
            started.elapsed(),
            String::from_utf8_lossy(&answer).into_owned(),
        )
    };

    // Headers that never end.
    let mut stalled = TcpStream::connect(&addr).unwrap();
    stalled
        .write_all(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let (took, _) = closed_after(&mut stalled);
    assert!(
        took < Duration::from_secs(10),
        "headers: closed after {took:?}"
    );

    // A body that stops halfway.
    let photo = std::fs::read(common::fixtures().join("preprocess/img1.jpg")).unwrap();
    let mut stalled = TcpStream::connect(&addr).unwrap();
    write!(
        stalled,
        "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
        photo.len()
    )
    .unwrap();
    stalled.write_all(&photo[..photo.len() / 2]).unwrap();
    let (took, answer) = closed_after(&mut stalled);
    assert!(
        took < Duration::from_secs(10),
        "body: closed after {took:?}"
    );
    assert!(!answer.contains(" 200 "), "{answer}");

    // A body that keeps coming, in pieces 0.4 s apart, for longer than the timeout in all.
    let mut slow = TcpStream::connect(&addr).unwrap();
    write!(
        slow,
        "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        photo.len()
    )
    .unwrap();
    for piece in photo.chunks(photo.len().div_ceil(6)) {
        std::thread::sleep(Duration::from_millis(400));
        slow.write_all(piece).unwrap();
    }
    let (_, answer) = closed_after(&mut slow);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    sigterm(&child);
    assert!(child.wait().unwrap().success());
}

/// A server that promises `promised` bytes and closes the connection after `sent`.
async fn cut_off_server(promised: usize, sent: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {promised}\r\n\r\n");
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&vec![7u8; sent]).await;
            let _ = stream.shutdown().await;
        }
    });
    format!("http://{addr}/models")
}

/// Names of the files in `dir` (hidden ones included).
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The googlenet fixture as a mirror would name it: `googlenet-<its sha256 prefix>.pth`.
fn googlenet_pth_as_published() -> (String, Vec<u8>, String) {
    let bytes = std::fs::read(common::fixtures().join("googlenet/weights.pth")).unwrap();
    let sha = format!("{:x}", sha2::Sha256::digest(&bytes));
    (format!("googlenet-{}.pth", &sha[..8]), bytes, sha)
}

fn fetch_weights(dir: &Path, args: &[&str]) -> std::process::Output {
    cnnserve()
        .arg("fetch-weights")
        .args(args)
        .arg("--weights-dir")
        .arg(dir)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_weights_converts_a_checked_download_and_refuses_bad_ones() {
    let (name, bytes, sha) = googlenet_pth_as_published();
    let base = file_server(vec![
        (name.clone(), bytes.clone()),
        ("googlenet-1378be20.pth".into(), bytes),
    ])
    .await;
    let cut = cut_off_server(1 << 20, 1000).await;
    tokio::task::spawn_blocking(move || {
        // Wrong hash: torchvision's name on a file that is not torchvision's.
        let dir = tempfile::tempdir().unwrap();
        let out = fetch_weights(dir.path(), &["googlenet", "--url", &base]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("does not start with 1378be20"), "{stderr}");
        assert!(!stderr.contains("stack backtrace"), "{stderr}");
        assert_eq!(files_in(dir.path()), Vec::<String>::new(), "nothing kept");

        // 404.
        let out = fetch_weights(dir.path(), &["vgg11_bn", "--weights-url", &base]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("404"), "{stderr}");
        assert_eq!(files_in(dir.path()), Vec::<String>::new(), "nothing kept");

        // Cut off after 1000 of 1 MiB.
        let out = fetch_weights(
            dir.path(),
            &[
                "googlenet",
                "--url",
                &format!("{cut}/googlenet-00000000.pth"),
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        let error = stderr.lines().find(|l| l.starts_with("error: ")).unwrap();
        assert!(
            error.starts_with("error: cannot fetch googlenet"),
            "{stderr}"
        );
        assert!(
            error.contains("the connection ended after 1000 of 1048576 bytes"),
            "{error}"
        );
        assert!(
            error.contains("googlenet.safetensors") && !error.contains(".download-"),
            "{error}"
        );
        assert_eq!(files_in(dir.path()), Vec::<String>::new(), "nothing kept");

        // A name without a hash cannot be checked.
        let out = fetch_weights(
            dir.path(),
            &["googlenet", "--url", &format!("{base}/googlenet.pth")],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no sha256 prefix"), "{stderr}");

        // One file for two architectures.
        let out = fetch_weights(dir.path(), &["all", "--url", &format!("{base}/{name}")]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("is one file"));

        // Success: the mirror's file, checked, converted, alone in the dir.
        let out = fetch_weights(
            dir.path(),
            &["googlenet", "--url", &format!("{base}/{name}")],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("googlenet: wrote"), "{stdout}");
        assert_eq!(files_in(dir.path()), ["googlenet.safetensors"]);
        let converted = dir.path().join("googlenet.safetensors");
        assert_eq!(
            cnnserve::weights::sniff(&converted).unwrap(),
            cnnserve::weights::FileFormat::Safetensors
        );
        assert_eq!(cnnserve::weights::source_sha256(&converted), Some(sha));

        // Once there, it is not fetched again.
        let out = fetch_weights(
            dir.path(),
            &["googlenet", "--url", "http://127.0.0.1:9/none"],
        );
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("already there"));
    })
    .await
    .unwrap();
}

/// A two-class GoogLeNet head whose metadata names its base by `base_sha256` and, when given,
/// by the tensors' digest.
fn write_head(
    dir: &Path,
    name: &str,
    base_sha256: &str,
    tensors_sha256: Option<&str>,
) -> std::path::PathBuf {
    use candle_core::{Device, Tensor};
    let mut tensors = std::collections::HashMap::new();
    tensors.insert(
        "fc.weight".to_string(),
        Tensor::randn(0f32, 0.05, (2, 1024), &Device::Cpu).unwrap(),
    );
    tensors.insert(
        "fc.bias".to_string(),
        Tensor::new(&[0.1f32, -0.1], &Device::Cpu).unwrap(),
    );
    let file = dir.join(format!("{name}.safetensors"));
    cnnserve::weights::save_safetensors(&tensors, &file).unwrap();
    let mut meta = serde_json::json!({
        "format": "cnnserve-finetuned/1",
        "name": name,
        "arch": "googlenet",
        "base_model": "googlenet",
        "base_sha256": base_sha256,
        "train_layers": "head",
        "classes": ["Cat", "Dog"],
        "transform": "resize256x256",
        "created_at": "2026-01-01T00:00:00Z",
    });
    if let Some(digest) = tensors_sha256 {
        meta["base_tensors_sha256"] = digest.into();
    }
    std::fs::write(dir.join(format!("{name}.json")), meta.to_string()).unwrap();
    file
}

fn open(file: &Path) -> Result<cnnserve::engine::Classifier, String> {
    cnnserve::engine::classifier::open(
        file,
        None,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .map_err(|e| e.to_string())
}

#[test]
fn heads_find_their_base_after_it_is_converted_to_safetensors() {
    use cnnserve::models::Arch;
    let fixtures = common::fixtures();
    let pth = fixtures.join("googlenet/weights.pth");
    let (_, from_pth) = cnnserve::weights::load_network_with_identity(
        Arch::Googlenet,
        &pth,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let (_, from_st) = cnnserve::weights::load_network_with_identity(
        Arch::Googlenet,
        &fixtures.join("googlenet/weights.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_ne!(from_pth.file_sha256, from_st.file_sha256);
    assert_eq!(
        from_pth.tensors_sha256().unwrap(),
        from_st.tensors_sha256().unwrap(),
        "same tensors, same identity"
    );

    // Heads trained on the .pth: an old one (file sha256 only) and a new one (tensors too).
    let before = tempfile::tempdir().unwrap();
    std::fs::copy(&pth, before.path().join("googlenet.pth")).unwrap();
    let old = write_head(before.path(), "old", &from_pth.file_sha256, None);
    let new = write_head(
        before.path(),
        "new",
        &from_pth.file_sha256,
        Some(from_pth.tensors_sha256().unwrap()),
    );
    let stranger = write_head(
        before.path(),
        "stranger",
        &"ab".repeat(32),
        Some(&"cd".repeat(32)),
    );
    assert!(open(&old).is_ok());
    assert!(open(&new).is_ok());
    let err = open(&stranger).unwrap_err();
    assert!(err.contains("is not in"), "{err}");

    // The base converted as fetch-weights does, the .pth gone: both heads still load.
    let after = tempfile::tempdir().unwrap();
    let metadata = [(
        cnnserve::weights::SOURCE_SHA256.to_string(),
        from_pth.file_sha256.clone(),
    )]
    .into_iter()
    .collect();
    cnnserve::weights::convert_to_safetensors(
        &pth,
        &after.path().join("googlenet.safetensors"),
        metadata,
    )
    .unwrap();
    for head in ["old", "new"] {
        for ext in ["safetensors", "json"] {
            let file = format!("{head}.{ext}");
            std::fs::copy(before.path().join(&file), after.path().join(&file)).unwrap();
        }
        let c = open(&after.path().join(format!("{head}.safetensors")))
            .unwrap_or_else(|e| panic!("{head}: {e}"));
        assert_eq!(c.labels, ["Cat", "Dog"]);
    }
    // A converted file whose provenance was not recorded is still found by its tensors.
    let bare = tempfile::tempdir().unwrap();
    cnnserve::weights::convert_to_safetensors(
        &pth,
        &bare.path().join("googlenet.safetensors"),
        Default::default(),
    )
    .unwrap();
    for ext in ["safetensors", "json"] {
        let file = format!("new.{ext}");
        std::fs::copy(before.path().join(&file), bare.path().join(&file)).unwrap();
    }
    assert!(open(&bare.path().join("new.safetensors")).is_ok());
}
