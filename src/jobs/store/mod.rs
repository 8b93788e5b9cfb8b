//! Where jobs and the model registry live: one [`JobStore`] interface, two implementations.
//!
//! - [`sqlite::SqliteStore`] (`sqlite:<path>`, the default: `jobs.sqlite` in the weights dir): one
//!   process, nothing to run beside it.
//! - [`postgres::PostgresStore`] (`postgres://…`): several replicas share it. A queued job is
//!   claimed by exactly one replica (`FOR UPDATE SKIP LOCKED`) with a lease that its heartbeat
//!   renews; a replica that stops renewing loses the job, which ends `failed`.
//!
//! Both hold the same tables (`migrations/`, applied at open): `jobs` (a row per job: its JSON,
//! status, owner and lease), `models` (the registry: a fine-tuned model exists when it has a row)
//! and `pretrained` (the digest every replica's pretrained weights must have). The same tests
//! (`tests/stores.rs`) run against both.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::{Job, Status};
use crate::weights::finetuned::FineTunedMeta;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("an unfinished job or a model is already called `{0}`")]
    NameTaken(String),
    #[error("job {0} is no longer this replica's: its lease ran out, or it was cancelled")]
    LeaseLost(String),
    #[error("job database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("job database: {0}")]
    Postgres(String),
    #[error("job database holds an unreadable job: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("{0}")]
    Config(String),
}

/// A fine-tuned model in the registry: its metadata, and the job that made it (whose staged files
/// are moved into place if a crash came between the commit and the move).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRecord {
    pub name: String,
    pub job_id: Option<String>,
    pub meta: FineTunedMeta,
}

/// What [`JobStore::subscribe`] calls.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// Where a follower's last look at the job table ended ([`JobStore::changes`]).
///
/// Versions are handed out when a row is written, not when its transaction commits: on
/// PostgreSQL a write that took version 100 can commit after one that took 101 was read. So the
/// cursor also keeps the oldest transaction still open at that look (`horizon`): rows written by
/// it or later are read again next time, less the versions already returned (`returned`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The highest version returned.
    pub version: i64,
    /// PostgreSQL: the oldest transaction id open at the last look.
    pub horizon: i64,
    /// PostgreSQL: versions returned whose writers are not older than `horizon`.
    pub returned: Vec<i64>,
}

/// What a cancel found.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// The job was queued and is now cancelled (the job as stored).
    Cancelled(Box<Job>),
    /// The job is running and its owner will stop it at its next step.
    Requested(Box<Job>),
    /// The job is past its commit point: it will succeed.
    TooLate(Box<Job>),
    /// Finished already.
    Finished(Box<Job>),
    NotFound,
}

/// Jobs and the model registry. Every method is one transaction; callers are threads that may
/// block (training threads, `spawn_blocking`).
pub trait JobStore: Send + Sync {
    /// `sqlite:/path` or `postgres://host/db`, without a password.
    fn describe(&self) -> String;
    /// Whether other processes may share this store (then a watcher follows their changes).
    fn is_shared(&self) -> bool;
    /// Calls `wake` after any process commits a change to a job's version or to the registry
    /// (from a background task, soon after the commit), so that a follower need not wait for its
    /// next poll. Best effort: polling stays the guarantee. A store nobody else writes does
    /// nothing.
    fn subscribe(&self, wake: Wake) -> Result<(), StoreError> {
        let _ = wake;
        Ok(())
    }

    /// Records a new queued job. [`StoreError::NameTaken`] when an unfinished job or a registered
    /// model has its name.
    fn create(&self, job: &Job) -> Result<(), StoreError>;
    /// Writes a job's JSON. With `owner`, only while the job is running and held by `owner`
    /// ([`StoreError::LeaseLost`] otherwise); finishing a job also releases it.
    fn update(&self, job: &Job, owner: Option<&str>) -> Result<(), StoreError>;
    fn get(&self, id: &str) -> Result<Option<Job>, StoreError>;
    /// Every job, oldest first.
    fn all(&self) -> Result<Vec<Job>, StoreError>;
    /// How many jobs there are in each status (statuses with none left out).
    fn counts(&self) -> Result<Vec<(String, i64)>, StoreError>;
    /// Jobs written since `since` (each write once), and the cursor to ask from next time.
    fn changes(&self, since: &Cursor) -> Result<(Cursor, Vec<Job>), StoreError>;
    /// Forgets a finished job; false when there is none (or it is not finished).
    fn delete(&self, id: &str) -> Result<bool, StoreError>;

    /// Claims the oldest queued job on one of `bases` (the base models `owner` has loaded) for
    /// `owner` until `lease` from now: it is returned running. Jobs on other bases wait for a
    /// replica that has theirs.
    fn claim(
        &self,
        owner: &str,
        bases: &[String],
        lease: Duration,
    ) -> Result<Option<Job>, StoreError>;
    /// Extends the leases of `jobs` while they run and `owner` holds them (the jobs its threads
    /// are working on: one they gave up on is left to run out); their ids, with whether a cancel
    /// was asked.
    fn renew(
        &self,
        owner: &str,
        jobs: &[String],
        lease: Duration,
    ) -> Result<Vec<(String, bool)>, StoreError>;
    /// Fails running jobs whose lease ran out (or that have none); the jobs as failed.
    fn expire(&self) -> Result<Vec<Job>, StoreError>;
    /// Fails running jobs of `owner` (every running job with `None`): at start, the jobs the
    /// previous life of this replica left running.
    fn fail_running(&self, owner: Option<&str>, reason: &str) -> Result<Vec<Job>, StoreError>;
    /// Cancels a queued job, or asks the owner of a running one to stop, unless it is publishing.
    fn cancel(&self, id: &str) -> Result<CancelOutcome, StoreError>;
    /// The commit point's first half: marks `owner`'s job as publishing unless a cancel was asked
    /// (false then).
    fn start_publishing(&self, id: &str, owner: &str) -> Result<bool, StoreError>;
    /// Records a finished job held by `owner` and, for a succeeded one, registers its model: one
    /// transaction, the commit point of a job.
    fn finish(&self, job: &Job, owner: &str, model: Option<&ModelRecord>)
        -> Result<(), StoreError>;

    /// The model registry.
    fn models(&self) -> Result<Vec<ModelRecord>, StoreError>;
    /// Registers a model found in the model store; false when the name is registered already.
    fn register(&self, model: &ModelRecord) -> Result<bool, StoreError>;
    /// Takes a model out of the registry; false when it was not in it.
    fn unregister(&self, name: &str) -> Result<bool, StoreError>;
    /// Records the digest of pretrained model `name`, or returns the one another replica recorded
    /// when it differs.
    fn check_pretrained(&self, name: &str, sha256: &str) -> Result<Option<String>, StoreError>;
}

/// Opens `url`: `sqlite:<path>` (or a bare path) or `postgres://…` / `postgresql://…`.
pub fn open(url: &str) -> Result<Arc<dyn JobStore>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(postgres::PostgresStore::connect(url)?));
    }
    let path = url.strip_prefix("sqlite:").unwrap_or(url);
    let path = path.strip_prefix("//").unwrap_or(path);
    if path.is_empty() || url.contains("://") && !url.starts_with("sqlite:") {
        return Err(StoreError::Config(format!(
            "`{url}` is not a database URL: use sqlite:<path> or postgres://user:password@host:port/database"
        )));
    }
    Ok(Arc::new(sqlite::SqliteStore::open(std::path::Path::new(
        path,
    ))?))
}

/// A job as it ends when nobody can finish it.
pub(crate) fn failed(mut job: Job, reason: &str) -> Job {
    job.status = Status::Failed;
    job.finished_at = Some(Utc::now());
    job.error = Some(reason.to_string());
    job.progress = job
        .progress
        .take()
        .map(|p| crate::train::fit::Progress { eta_s: 0.0, ..p });
    job
}

/// A queued job as a cancel leaves it.
pub(crate) fn cancelled(mut job: Job) -> Job {
    job.status = Status::Cancelled;
    job.finished_at = Some(Utc::now());
    job.error = Some("cancelled before it started".into());
    job
}

/// A queued job as a claim leaves it.
pub(crate) fn claimed(mut job: Job) -> Job {
    job.status = Status::Running;
    job.started_at = Some(Utc::now());
    job
}

/// What a lease that ran out says.
pub const LEASE_EXPIRED: &str =
    "interrupted: the replica running this job stopped (its lease ran out without a heartbeat)";

/// The migrations of one database, in order: `(version, sql)`.
pub(crate) type Migrations = &'static [(i64, &'static str)];
