//! Three replicas as one service: two `api` and one `worker` release binaries on one PostgreSQL
//! database and one S3 bucket (both real, started by `scripts/test.sh`). A zip uploaded to the
//! first api replica trains on the worker, the model answers on both api replicas, a `kill -9`
//! of the worker mid-job fails that job within its lease, and a new worker takes the next job.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::binary::{serve_googlenet, Running};
use serde_json::Value;

/// Seconds a claim holds without a heartbeat: short, so that the dead worker's job fails soon.
const LEASE: u64 = 3;

fn start(role: &str, id: &str, dir: &Path, database: &str, store: &str) -> Running {
    let mut command = replica(role, id, dir, database, store);
    command.args(["--training-threads", "1"]);
    let replica = Running::start(command);
    assert_eq!(replica.listening["role"], role);
    replica
}

/// `cnnserve serve` as replica `id`, offline, without gRPC.
fn replica(role: &str, id: &str, dir: &Path, database: &str, store: &str) -> Command {
    let mut command = serve_googlenet(dir);
    command
        .args([
            "--role",
            role,
            "--replica-id",
            id,
            "--database-url",
            database,
        ])
        .args(["--model-store", store, "--job-lease", &LEASE.to_string()]);
    command
}

fn status(addr: &str, path: &str) -> u16 {
    match ureq::get(&format!("http://{addr}{path}")).call() {
        Ok(r) => r.status().as_u16(),
        Err(ureq::Error::StatusCode(code)) => code,
        Err(e) => panic!("{e}"),
    }
}

fn get_json(addr: &str, path: &str) -> Value {
    let text = ureq::get(&format!("http://{addr}{path}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .body_mut()
        .read_to_string()
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn finetune(addr: &str, fields: &[(&str, &str)]) -> String {
    submit(addr, fields).unwrap_or_else(|code| panic!("POST /finetune answered {code}"))
}

/// The new job's id, or the refusal's status code.
fn submit(addr: &str, fields: &[(&str, &str)]) -> Result<String, u16> {
    let boundary = "replica-test-boundary";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"dataset\"; filename=\"d.zip\"\r\n\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(&common::dataset_zip(4));
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let sent = ureq::post(&format!("http://{addr}/finetune"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .send(&body[..]);
    let text = match sent {
        Ok(mut response) => response.body_mut().read_to_string().unwrap(),
        Err(ureq::Error::StatusCode(code)) => return Err(code),
        Err(e) => panic!("POST /finetune: {e}"),
    };
    let answer: Value = serde_json::from_str(&text).unwrap();
    Ok(answer["job_id"].as_str().unwrap().to_string())
}

fn predict(addr: &str, model: &str) -> Value {
    let image = common::picture(0, 7);
    let text = ureq::post(&format!("http://{addr}/models/{model}/predict"))
        .header("content-type", "image/png")
        .send(&image[..])
        .unwrap_or_else(|e| panic!("predict on {addr}: {e}"))
        .body_mut()
        .read_to_string()
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The event names of a job's SSE stream, read to its end.
fn events(addr: &str, id: &str) -> Vec<String> {
    let mut response = ureq::get(&format!("http://{addr}/jobs/{id}/events"))
        .call()
        .unwrap();
    let mut text = String::new();
    response
        .body_mut()
        .as_reader()
        .read_to_string(&mut text)
        .unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("event: ").map(str::to_string))
        .collect()
}

#[test]
fn two_api_replicas_and_a_worker_behave_as_one_service() {
    let database = common::fresh_postgres();
    let store = common::fresh_s3_store();
    let dirs: Vec<_> = (0..4).map(|_| common::googlenet_dir()).collect();
    let api1 = start("api", "api-1", dirs[0].path(), &database, &store);
    let api2 = start("api", "api-2", dirs[1].path(), &database, &store);
    let mut worker = start("worker", "worker-1", dirs[2].path(), &database, &store);

    let info = get_json(&api1.addr, "/info");
    assert_eq!(info["role"], "api", "{info}");
    assert_eq!(info["jobs"]["replica"], "api-1", "{info}");
    assert!(info["jobs"]["database"]
        .as_str()
        .unwrap()
        .starts_with("postgres://127.0.0.1/"));
    assert_eq!(info["jobs"]["model_store"], store.as_str(), "{info}");
    // A worker answers health and metrics only.
    assert_eq!(status(&worker.addr, "/ping"), 200);
    assert_eq!(status(&worker.addr, "/metrics"), 200);
    assert_eq!(status(&worker.addr, "/models"), 404);

    // Uploaded to api-1; its events followed on api-2 while it trains on the worker.
    let id = finetune(
        &api1.addr,
        &[
            ("base_model", "googlenet"),
            ("name", "pets"),
            ("epochs", "10"),
            ("augment", "true"),
        ],
    );
    let heard = events(&api2.addr, &id);
    let job = get_json(&api2.addr, &format!("/jobs/{id}"));
    assert_eq!(heard.last().map(String::as_str), Some("done"), "{heard:?}");
    assert!(heard.iter().any(|e| e == "epoch"), "{heard:?} {job}");
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job, get_json(&api1.addr, &format!("/jobs/{id}")));

    // Served by both api replicas within 5 s of the job's end (as the worker recorded it),
    // without /models/reload, with the same answers.
    let ended: chrono::DateTime<chrono::Utc> =
        job["finished_at"].as_str().unwrap().parse().unwrap();
    for api in [&api1, &api2] {
        wait_for("the new model served", Duration::from_secs(5), || {
            status(&api.addr, "/models/pets") == 200
        });
        let took = (chrono::Utc::now() - ended).to_std().unwrap_or_default();
        eprintln!(
            "pets served on {} at most {took:?} after the job ended",
            api.addr
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
    assert_eq!(predict(&api1.addr, "pets"), predict(&api2.addr, "pets"));
    // The worker trained; the api replicas did not.
    let worker_logs = worker.logs();
    assert!(worker_logs.contains("training started"), "{worker_logs}");
    for api in [&api1, &api2] {
        assert!(!api.logs().contains("training started"));
    }
    // Names are reserved across replicas.
    let taken = submit(&api2.addr, &[("base_model", "googlenet"), ("name", "pets")]);
    assert_eq!(taken, Err(409));

    // A long job; the worker is killed (SIGKILL) while it trains.
    let long = finetune(
        &api2.addr,
        &[
            ("base_model", "googlenet"),
            ("name", "long"),
            ("epochs", "1000"),
            ("augment", "true"),
        ],
    );
    wait_for("the long job running", Duration::from_secs(60), || {
        get_json(&api1.addr, &format!("/jobs/{long}"))["status"] == "running"
    });
    worker.kill();
    let killed = Instant::now();
    wait_for(
        "the dead worker's job failed",
        Duration::from_secs(LEASE + 5),
        || get_json(&api1.addr, &format!("/jobs/{long}"))["status"] == "failed",
    );
    eprintln!("the job failed {:?} after the kill", killed.elapsed());
    let job = get_json(&api2.addr, &format!("/jobs/{long}"));
    assert!(
        job["error"].as_str().unwrap().contains("lease ran out"),
        "{job}"
    );

    // A new worker takes the next job.
    let _worker2 = start("worker", "worker-2", dirs[3].path(), &database, &store);
    let next = finetune(
        &api1.addr,
        &[
            ("base_model", "googlenet"),
            ("name", "next"),
            ("epochs", "1"),
        ],
    );
    wait_for("the next job succeeded", Duration::from_secs(120), || {
        get_json(&api2.addr, &format!("/jobs/{next}"))["status"] == "succeeded"
    });
    for api in [&api1, &api2] {
        wait_for("the next model served", Duration::from_secs(5), || {
            status(&api.addr, "/models/next") == 200
        });
    }

    // A cancel sent to an api replica stops the job on the worker.
    let stopped = finetune(
        &api2.addr,
        &[
            ("base_model", "googlenet"),
            ("name", "stopped"),
            ("epochs", "1000"),
            ("augment", "true"),
        ],
    );
    wait_for("the job to cancel running", Duration::from_secs(60), || {
        get_json(&api1.addr, &format!("/jobs/{stopped}"))["status"] == "running"
    });
    let cancel = ureq::delete(&format!("http://{}/jobs/{stopped}", api1.addr)).call();
    assert_eq!(cancel.unwrap().status().as_u16(), 202);
    let took = wait_for("the cancelled job stopped", Duration::from_secs(10), || {
        get_json(&api2.addr, &format!("/jobs/{stopped}"))["status"] == "cancelled"
    });
    eprintln!("the job stopped {took:?} after the cancel");

    // Deleted on one replica, gone from the other.
    let deleted = ureq::delete(&format!("http://{}/models/pets", api1.addr)).call();
    assert!(deleted.is_ok(), "{deleted:?}");
    wait_for("the deleted model gone", Duration::from_secs(5), || {
        status(&api2.addr, "/models/pets") == 404
    });
}

/// Heads trained on one replica run on the others' backbones: a replica whose pretrained weights
/// differ from the ones the database recorded does not serve that model, and says why.
#[test]
fn a_replica_with_other_pretrained_weights_does_not_serve_them() {
    let database = common::fresh_postgres();
    let store = common::fresh_s3_store();
    let same = common::googlenet_dir();
    let _first = start("api", "api-1", same.path(), &database, &store);
    let other = tempfile::tempdir().unwrap();
    let mut bytes =
        std::fs::read(common::fixtures().join("googlenet/weights.safetensors")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(other.path().join("googlenet.safetensors"), bytes).unwrap();
    std::fs::write(other.path().join("vgg11_bn.safetensors"), b"not weights").unwrap();

    let mut child = replica("api", "odd", other.path(), &database, &store)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
    let refused = lines
        .find(|l| l.contains("not the ones the other replicas use"))
        .expect("the replica says why it does not serve googlenet");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        refused.contains("give every replica the same weights files"),
        "{refused}"
    );
}

#[test]
fn split_roles_without_a_shared_database_are_refused_with_a_sentence() {
    let dir = common::googlenet_dir();
    for role in ["api", "worker"] {
        let out = serve_googlenet(dir.path())
            .args(["--role", role])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--database-url postgres://") && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}
