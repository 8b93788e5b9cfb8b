//! The two seams that let replicas share state, each tested once against both implementations:
//! the job store (SQLite, PostgreSQL) and the model store (a folder, an S3-protocol server).
//!
//! PostgreSQL and the S3 server are real ones that `scripts/test.sh` starts
//! (`CNNSERVE_TEST_POSTGRES`, `CNNSERVE_TEST_S3`); without them these tests fail and say so.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use cnnserve::jobs::model_store::{self, ModelStore};
use cnnserve::jobs::store::{self, CancelOutcome, Cursor, JobStore, ModelRecord, StoreError};
use cnnserve::jobs::{Job, Status};

fn job(id: &str, name: &str) -> Job {
    serde_json::from_value(serde_json::json!({
        "job_id": id, "status": "queued", "created_at": chrono::Utc::now(),
        "started_at": null, "finished_at": null, "base_model": "googlenet", "name": name,
        "params": cnnserve::train::Params::default(),
        "dataset": {"classes": ["a", "b"], "counts": {"train": [1, 1], "valid": [1, 0], "test": [0, 0]},
                    "skipped": [], "ignored": 0},
        "progress": null, "history": [], "result": null, "error": null
    }))
    .unwrap()
}

/// The base models a replica in these tests has loaded: the one every test job is on.
fn ids(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn bases() -> Vec<String> {
    ids(&["googlenet"])
}

fn meta(name: &str) -> cnnserve::weights::finetuned::FineTunedMeta {
    serde_json::from_value(serde_json::json!({
        "format": "cnnserve-finetuned/1", "name": name, "arch": "googlenet",
        "base_model": "googlenet", "base_sha256": "ab", "train_layers": "head",
        "classes": ["a", "b"],
        "transform": "resize256x256",
        "created_at": chrono::Utc::now(),
    }))
    .unwrap()
}

/// Two handles on one database, as two replicas have.
struct Pair {
    a: Arc<dyn JobStore>,
    b: Arc<dyn JobStore>,
    _dir: tempfile::TempDir,
}

fn sqlite() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("jobs.sqlite").display());
    Pair {
        a: store::open(&url).unwrap(),
        b: store::open(&url).unwrap(),
        _dir: dir,
    }
}

fn postgres() -> Pair {
    let url = common::fresh_postgres();
    Pair {
        a: store::open(&url).unwrap(),
        // Migrations run once: the second open finds them applied.
        b: store::open(&url).unwrap(),
        _dir: tempfile::tempdir().unwrap(),
    }
}

fn names_are_reserved_by_unfinished_jobs_and_models(p: Pair) {
    p.a.create(&job("j1", "pets")).unwrap();
    assert!(matches!(p.b.create(&job("j2", "pets")), Err(StoreError::NameTaken(n)) if n == "pets"));
    let record = ModelRecord {
        name: "cats".into(),
        job_id: None,
        meta: meta("cats"),
    };
    assert!(p.a.register(&record).unwrap());
    assert!(!p.b.register(&record).unwrap(), "registered once");
    assert!(matches!(
        p.b.create(&job("j3", "cats")),
        Err(StoreError::NameTaken(_))
    ));
    assert_eq!(p.b.models().unwrap(), vec![record]);
    assert!(p.b.unregister("cats").unwrap());
    p.b.create(&job("j3", "cats")).unwrap();
    // A finished job frees its name.
    let CancelOutcome::Cancelled(cancelled) = p.b.cancel("j1").unwrap() else {
        panic!("a queued job is cancelled at once")
    };
    assert_eq!(cancelled.status, Status::Cancelled);
    p.a.create(&job("j4", "pets")).unwrap();
}

fn each_queued_job_is_claimed_by_exactly_one_replica(p: Pair) {
    for i in 0..6 {
        p.a.create(&job(&format!("c{i}"), &format!("n{i}")))
            .unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let claimed: Vec<(String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let store = if t % 2 == 0 { &p.a } else { &p.b };
                s.spawn(move || {
                    let owner = format!("replica-{t}");
                    let mut mine = Vec::new();
                    while let Some(job) = store
                        .claim(&owner, &bases(), Duration::from_secs(30))
                        .unwrap()
                    {
                        assert_eq!(job.status, Status::Running);
                        assert!(job.started_at.is_some());
                        mine.push((job.job_id, owner.clone()));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let ids: HashSet<&str> = claimed.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(claimed.len(), 6, "{claimed:?}");
    assert_eq!(ids.len(), 6, "a job was claimed twice: {claimed:?}");
    assert!(p
        .b
        .claim("late", &bases(), Duration::from_secs(30))
        .unwrap()
        .is_none());
    // The oldest job goes first.
    let c = sqlite_or_pg_order(&p, "c0");
    assert_eq!(c.status, Status::Running);
}

fn a_replica_claims_only_jobs_on_the_base_models_it_has(p: Pair) {
    let mut vgg = job("v1", "on-vgg");
    vgg.base_model = "vgg11_bn".into();
    p.a.create(&vgg).unwrap();
    std::thread::sleep(Duration::from_millis(2));
    p.a.create(&job("g1", "on-googlenet")).unwrap();
    let got =
        p.b.claim("googlenet-only", &bases(), Duration::from_secs(30))
            .unwrap();
    assert_eq!(
        got.map(|j| j.job_id).as_deref(),
        Some("g1"),
        "the older vgg job is left"
    );
    assert!(p
        .b
        .claim("googlenet-only", &bases(), Duration::from_secs(30))
        .unwrap()
        .is_none());
    let got =
        p.a.claim("has-vgg", &ids(&["vgg11_bn"]), Duration::from_secs(30))
            .unwrap();
    assert_eq!(got.map(|j| j.job_id).as_deref(), Some("v1"));
    let mut counts = p.b.counts().unwrap();
    counts.sort();
    assert_eq!(counts, vec![("running".to_string(), 2)]);
}

fn sqlite_or_pg_order(p: &Pair, id: &str) -> Job {
    p.a.get(id).unwrap().unwrap()
}

fn a_lease_that_is_not_renewed_runs_out_and_the_job_fails(p: Pair) {
    p.a.create(&job("l1", "one")).unwrap();
    std::thread::sleep(Duration::from_millis(2));
    p.a.create(&job("l2", "two")).unwrap();
    std::thread::sleep(Duration::from_millis(2));
    p.a.create(&job("l3", "three")).unwrap();
    let lease = Duration::from_millis(600);
    let first = p.a.claim("alive", &bases(), lease).unwrap().unwrap();
    let second = p.a.claim("dead", &bases(), lease).unwrap().unwrap();
    // Held by the live replica, but no thread of it works on this one any more.
    let given_up = p.a.claim("alive", &bases(), lease).unwrap().unwrap();
    assert_eq!(
        [
            first.job_id.as_str(),
            second.job_id.as_str(),
            given_up.job_id.as_str()
        ],
        ["l1", "l2", "l3"]
    );
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(250));
        // Another replica's job is not renewed by naming it.
        let held = p.a.renew("alive", &ids(&["l1", "l2"]), lease).unwrap();
        assert_eq!(held, vec![("l1".to_string(), false)]);
    }
    let mut expired = p.b.expire().unwrap();
    expired.sort_by(|a, b| a.job_id.cmp(&b.job_id));
    assert_eq!(
        expired
            .iter()
            .map(|j| j.job_id.as_str())
            .collect::<Vec<_>>(),
        ["l2", "l3"],
        "{expired:?}"
    );
    assert_eq!(expired[0].status, Status::Failed);
    assert!(expired[0]
        .error
        .as_deref()
        .unwrap()
        .contains("lease ran out"));
    // The dead replica's late writes are refused; the live one's go through.
    assert!(matches!(
        p.a.update(&second, Some("dead")),
        Err(StoreError::LeaseLost(_))
    ));
    assert_eq!(p.b.get("l2").unwrap().unwrap().status, Status::Failed);
    p.a.update(&first, Some("alive")).unwrap();
    assert!(matches!(
        p.a.update(&first, Some("dead")),
        Err(StoreError::LeaseLost(_))
    ));
}

fn a_restart_fails_only_the_jobs_of_its_own_replica(p: Pair) {
    p.a.create(&job("r1", "one")).unwrap();
    p.a.create(&job("r2", "two")).unwrap();
    p.a.claim("me", &bases(), Duration::from_secs(30))
        .unwrap()
        .unwrap();
    p.a.claim("other", &bases(), Duration::from_secs(30))
        .unwrap()
        .unwrap();
    let failed =
        p.b.fail_running(Some("me"), "interrupted: restarted")
            .unwrap();
    assert_eq!(
        failed.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(),
        ["r1"]
    );
    assert_eq!(p.a.get("r2").unwrap().unwrap().status, Status::Running);
}

fn a_cancel_reaches_the_owner_unless_the_job_is_publishing(p: Pair) {
    p.a.create(&job("x1", "one")).unwrap();
    p.a.create(&job("x2", "two")).unwrap();
    p.a.claim("w", &bases(), Duration::from_secs(30))
        .unwrap()
        .unwrap();
    p.a.claim("w", &bases(), Duration::from_secs(30))
        .unwrap()
        .unwrap();
    // x1: cancelled from another replica before its commit point.
    assert!(matches!(
        p.b.cancel("x1").unwrap(),
        CancelOutcome::Requested(_)
    ));
    let mut held =
        p.a.renew("w", &ids(&["x1", "x2"]), Duration::from_secs(30))
            .unwrap();
    held.sort();
    assert_eq!(
        held,
        vec![("x1".to_string(), true), ("x2".to_string(), false)]
    );
    assert!(
        !p.a.start_publishing("x1", "w").unwrap(),
        "a cancelled job does not commit"
    );
    // x2: past its commit point first, then the cancel is too late.
    assert!(p.a.start_publishing("x2", "w").unwrap());
    assert!(matches!(
        p.b.cancel("x2").unwrap(),
        CancelOutcome::TooLate(_)
    ));
    assert!(matches!(
        p.b.cancel("nope").unwrap(),
        CancelOutcome::NotFound
    ));
}

fn finishing_a_job_registers_its_model_in_the_same_transaction(p: Pair) {
    p.a.create(&job("f1", "pets")).unwrap();
    let (cursor, _) = p.b.changes(&Cursor::default()).unwrap();
    let mut running =
        p.a.claim("w", &bases(), Duration::from_secs(30))
            .unwrap()
            .unwrap();
    let (after_claim, changed) = p.b.changes(&cursor).unwrap();
    assert!(after_claim.version > cursor.version);
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].status, Status::Running);
    let (_, again) = p.b.changes(&after_claim).unwrap();
    assert!(again.is_empty(), "each write is told once: {again:?}");
    running.status = Status::Succeeded;
    let record = ModelRecord {
        name: "pets".into(),
        job_id: Some("f1".into()),
        meta: meta("pets"),
    };
    assert!(matches!(
        p.b.finish(&running, "not-the-owner", Some(&record)),
        Err(StoreError::LeaseLost(_))
    ));
    assert!(
        p.b.models().unwrap().is_empty(),
        "nothing registered by a refused finish"
    );
    // A head registered under the name meanwhile (found in the model store): the finish is
    // refused whole, and the job still runs.
    let squatter = ModelRecord {
        job_id: None,
        ..record.clone()
    };
    assert!(p.a.register(&squatter).unwrap());
    assert!(matches!(
        p.b.finish(&running, "w", Some(&record)),
        Err(StoreError::NameTaken(n)) if n == "pets"
    ));
    assert_eq!(p.a.get("f1").unwrap().unwrap().status, Status::Running);
    assert!(p.a.unregister("pets").unwrap());
    p.b.finish(&running, "w", Some(&record)).unwrap();
    assert_eq!(p.a.models().unwrap(), vec![record]);
    assert_eq!(p.a.get("f1").unwrap().unwrap().status, Status::Succeeded);
    assert!(
        p.a.renew("w", &ids(&["f1"]), Duration::from_secs(30))
            .unwrap()
            .is_empty(),
        "released"
    );
    // Finished jobs can be forgotten; unfinished ones cannot.
    p.a.create(&job("f2", "other")).unwrap();
    assert!(!p.b.delete("f2").unwrap());
    assert!(p.b.delete("f1").unwrap());
    assert!(p.a.get("f1").unwrap().is_none());
    assert_eq!(p.a.all().unwrap().len(), 1);
}

fn pretrained_digests_must_agree(p: Pair) {
    assert_eq!(p.a.check_pretrained("googlenet", "aaa").unwrap(), None);
    assert_eq!(p.b.check_pretrained("googlenet", "aaa").unwrap(), None);
    assert_eq!(
        p.b.check_pretrained("googlenet", "bbb").unwrap(),
        Some("aaa".to_string())
    );
}

macro_rules! both_databases {
    ($($test:ident),* $(,)?) => {
        mod sqlite_store {
            $(#[test] fn $test() { super::$test(super::sqlite()) })*
        }
        mod postgres_store {
            $(#[test] fn $test() { super::$test(super::postgres()) })*
        }
    };
}

both_databases!(
    names_are_reserved_by_unfinished_jobs_and_models,
    each_queued_job_is_claimed_by_exactly_one_replica,
    a_replica_claims_only_jobs_on_the_base_models_it_has,
    a_lease_that_is_not_renewed_runs_out_and_the_job_fails,
    a_restart_fails_only_the_jobs_of_its_own_replica,
    a_cancel_reaches_the_owner_unless_the_job_is_publishing,
    finishing_a_job_registers_its_model_in_the_same_transaction,
    pretrained_digests_must_agree,
);

/// On PostgreSQL a row's version is taken when it is written and seen when its transaction
/// commits, so a write holding an earlier version can commit after a later one was read: the
/// follower is still told it, once.
#[test]
fn a_follower_is_told_a_write_that_commits_after_a_later_one() {
    let url = common::fresh_postgres();
    let (writer, follower) = (store::open(&url).unwrap(), store::open(&url).unwrap());
    writer.create(&job("slow", "one")).unwrap();
    writer.create(&job("fast", "two")).unwrap();
    let (cursor, _) = follower.changes(&Cursor::default()).unwrap();

    // The store's own write of a job, held open between taking its version and committing.
    let (written_tx, written) = std::sync::mpsc::channel();
    let (commit_tx, commit) = std::sync::mpsc::channel::<()>();
    let config: tokio_postgres::Config = url.parse().unwrap();
    let held = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (mut client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            let tx = client.transaction().await.unwrap();
            let mut slow = job("slow", "one");
            slow.status = Status::Cancelled;
            tx.execute(
                "UPDATE jobs SET status = $2, job = $3, version = nextval('job_versions'),
                     writer = pg_current_xact_id() WHERE id = $1",
                &[&"slow", &"cancelled", &tokio_postgres::types::Json(&slow)],
            )
            .await
            .unwrap();
            written_tx.send(()).unwrap();
            commit.recv().unwrap();
            tx.commit().await.unwrap();
        })
    });
    written.recv().unwrap();
    let mut fast = job("fast", "two");
    fast.status = Status::Cancelled;
    writer.update(&fast, None).unwrap();
    let (after_fast, told) = follower.changes(&cursor).unwrap();
    assert_eq!(
        told.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(),
        ["fast"]
    );
    commit_tx.send(()).unwrap();
    held.join().unwrap();
    let (after_slow, told) = follower.changes(&after_fast).unwrap();
    assert_eq!(
        told.iter()
            .map(|j| (j.job_id.as_str(), j.status))
            .collect::<Vec<_>>(),
        [("slow", Status::Cancelled)],
        "the write that committed last, with the earlier version"
    );
    let (_, told) = follower.changes(&after_slow).unwrap();
    assert!(told.is_empty(), "told once: {told:?}");
}

/// PostgreSQL tells the other replicas of a commit (LISTEN/NOTIFY) rather than leaving them to
/// their next poll: a new version of a job, or a change to the registry.
#[test]
fn a_replica_is_woken_by_another_replicas_commit() {
    let url = common::fresh_postgres();
    let (writer, follower) = (store::open(&url).unwrap(), store::open(&url).unwrap());
    let (told, wakes) = std::sync::mpsc::channel();
    let told = std::sync::Mutex::new(told);
    follower
        .subscribe(Arc::new(move || {
            let _ = told.lock().unwrap().send(());
        }))
        .unwrap();
    let woken = |what: &str| {
        wakes
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("not woken by {what}"));
        while wakes.try_recv().is_ok() {}
    };
    writer.create(&job("n1", "notified")).unwrap();
    woken("a new job");
    let running = writer
        .claim("w", &bases(), Duration::from_secs(30))
        .unwrap()
        .unwrap();
    woken("a claim");
    // A heartbeat gives no job a new version: nobody is woken for it.
    writer
        .renew("w", &ids(&["n1"]), Duration::from_secs(30))
        .unwrap();
    assert!(
        wakes.recv_timeout(Duration::from_millis(300)).is_err(),
        "woken by a heartbeat"
    );
    writer.update(&running, Some("w")).unwrap();
    woken("a progress write");
    let record = ModelRecord {
        name: "registered".into(),
        job_id: None,
        meta: meta("registered"),
    };
    assert!(writer.register(&record).unwrap());
    woken("a model registered");
}

#[test]
fn a_database_url_that_is_neither_is_refused_with_a_sentence() {
    let error = store::open("mysql://localhost/db")
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("postgres://"), "{error}");
}

// The model store.

fn objects_are_written_read_listed_moved_and_deleted(store: Arc<dyn ModelStore>) {
    assert_eq!(store.get("pets.json").unwrap(), None);
    assert!(!store.exists("pets.json").unwrap());
    store.put("pets.json", b"{}").unwrap();
    store
        .put("jobs/a1/model/pets.safetensors", b"weights")
        .unwrap();
    store.put("jobs/a1/examples/0.png", b"png").unwrap();
    store.put("jobs/b2/dataset.zip", b"zip").unwrap();
    assert_eq!(store.get("pets.json").unwrap().as_deref(), Some(&b"{}"[..]));
    // When a folder was last written: now, give or take the clocks; nothing there, none.
    let written = store.last_modified("jobs/b2").unwrap().expect("written");
    let off = match written.elapsed() {
        Ok(ago) => ago,
        Err(ahead) => ahead.duration(),
    };
    assert!(
        off < Duration::from_secs(300),
        "last written {off:?} from now"
    );
    assert!(
        store.last_modified("jobs/a1").unwrap().unwrap()
            <= store.last_modified("jobs").unwrap().unwrap()
    );
    assert_eq!(store.last_modified("jobs/none").unwrap(), None);
    assert_eq!(store.list("").unwrap(), ["pets.json"], "top level only");
    assert_eq!(store.folders("jobs").unwrap(), ["a1", "b2"]);
    assert_eq!(
        store.list("jobs/a1/model").unwrap(),
        ["jobs/a1/model/pets.safetensors"]
    );

    store
        .rename("jobs/a1/model/pets.safetensors", "pets.safetensors")
        .unwrap();
    assert_eq!(store.list("").unwrap(), ["pets.json", "pets.safetensors"]);
    assert!(store.list("jobs/a1/model").unwrap().is_empty());
    // Moving what was moved already is not an error (recovery repeats moves).
    store
        .rename("jobs/a1/model/pets.safetensors", "pets.safetensors")
        .unwrap();
    assert_eq!(
        store.get("pets.safetensors").unwrap().as_deref(),
        Some(&b"weights"[..])
    );

    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("big.zip");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&local, &big).unwrap();
    store.put_file("jobs/c3/dataset.zip", &local).unwrap();
    let back = dir.path().join("back.zip");
    assert!(store.fetch("jobs/c3/dataset.zip", &back).unwrap());
    assert_eq!(std::fs::read(&back).unwrap(), big);
    assert!(!store.fetch("jobs/c3/none.zip", &back).unwrap());

    store.delete_prefix("jobs/a1").unwrap();
    assert_eq!(store.folders("jobs").unwrap(), ["b2", "c3"]);
    store.delete("pets.json").unwrap();
    store.delete("pets.json").unwrap();
    assert_eq!(store.list("").unwrap(), ["pets.safetensors"]);
}

#[test]
fn folder_model_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = model_store::open(&dir.path().to_string_lossy()).unwrap();
    objects_are_written_read_listed_moved_and_deleted(store.clone());
    // A write in progress (a temporary beside the target) is not an object.
    std::fs::write(dir.path().join(".x.json.tmp-1-0"), b"half").unwrap();
    assert_eq!(store.list("").unwrap(), ["pets.safetensors"]);
}

#[test]
fn s3_model_store() {
    let store = model_store::open(&common::fresh_s3_store()).unwrap();
    objects_are_written_read_listed_moved_and_deleted(store);
}

#[test]
fn a_model_store_that_is_neither_is_refused_with_a_sentence() {
    let error = model_store::open("gs://bucket/x")
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("s3://"), "{error}");
}
