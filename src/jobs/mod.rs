//! Fine-tuning jobs: a queue, training threads, and the stores that outlive the process.
//!
//! [`JobManager`] is a cheap `Clone` handle over three things: a [`store::JobStore`] (jobs and the
//! model registry: SQLite by default, PostgreSQL for replicas), a [`model_store::ModelStore`]
//! (heads, uploads and gallery pictures: a folder by default, S3 for replicas), and this
//! process's share of the work: the jobs it runs, as fresh as their last step.
//!
//! A job is queued in the store; a training thread of any replica that trains claims it with a
//! lease its heartbeat renews. Every change of a running job goes through one place
//! ([`JobManager::update`]), which writes memory, the store and the event stream together. A
//! finished job's commit point is one transaction: the job recorded as succeeded and its model
//! registered. Other replicas follow the store (a watcher polls what changed): they serve a
//! new model within a second or two, fail jobs whose lease ran out, and relay job events.

pub mod model_store;
mod runtime;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::engine::{Classifier, Engine, ModelKind};
use crate::metrics::{JobLabels, Metrics};
use crate::train::dataset::Skipped;
use crate::train::fit::{EpochMetrics, Evaluation, Example, Phase, Progress};
use crate::train::{self, Dataset, DatasetLimits, Event, Params, TrainError};
use crate::weights::finetuned::FineTunedMeta;
use model_store::{ModelStore, ModelStoreError};
use store::{CancelOutcome, Cursor, JobStore, ModelRecord, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Queued,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }
}

/// Images per class (aligned with `classes`) in each split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Counts {
    pub train: Vec<usize>,
    pub valid: Vec<usize>,
    pub test: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DatasetSummary {
    pub classes: Vec<String>,
    pub counts: Counts,
    pub skipped: Vec<Skipped>,
    /// Files that were not images at all (`__MACOSX/`, `.DS_Store`, text…).
    pub ignored: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobResult {
    pub model: String,
    pub best_epoch: usize,
    /// `split` (`test`, or `validation` without a test split), `test_loss`, `test_acc`,
    /// `confusion_matrix`, `per_class` and `examples`; example picture `n` is at
    /// `GET /jobs/{id}/examples/{n}`.
    #[serde(flatten)]
    pub evaluation: Evaluation,
}

/// Everything there is to know about a job; this is also its JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    pub job_id: String,
    pub status: Status,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub base_model: String,
    pub name: String,
    pub params: Params,
    pub dataset: DatasetSummary,
    pub progress: Option<Progress>,
    pub history: Vec<EpochMetrics>,
    pub result: Option<JobResult>,
    pub error: Option<String>,
}

/// What subscribers hear, for every job.
#[derive(Debug, Clone)]
pub enum JobEvent {
    Progress {
        job_id: String,
        progress: Progress,
    },
    Epoch {
        job_id: String,
        metrics: EpochMetrics,
    },
    Done {
        job: Box<Job>,
    },
    /// The server is stopping: every event stream ends.
    Shutdown,
}

impl JobEvent {
    pub fn job_id(&self) -> Option<&str> {
        match self {
            JobEvent::Progress { job_id, .. } | JobEvent::Epoch { job_id, .. } => Some(job_id),
            JobEvent::Done { job } => Some(&job.job_id),
            JobEvent::Shutdown => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("no job `{0}`")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    ModelStore(#[from] ModelStoreError),
    #[error(transparent)]
    Model(#[from] crate::engine::EngineError),
    #[error("job files: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// What a replica does: `all` (serve and train; one process), `api` (serve and queue jobs,
/// never train) or `worker` (train; answer only health and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    All,
    Api,
    Worker,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::All, Role::Api, Role::Worker];

    pub fn name(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Api => "api",
            Role::Worker => "worker",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown role `{s}` (known: all, api, worker)"))
    }
}

#[derive(Debug, Clone)]
pub struct JobConfig {
    /// The weights dir: pretrained weights, and by default the job database (`jobs.sqlite`) and
    /// the model store. Uploads are staged in `jobs/` here before they go to the model store.
    pub dir: PathBuf,
    pub max_concurrent_jobs: usize,
    /// Threads one training may use; the rest stay free for inference.
    pub training_threads: usize,
    pub dataset_limits: DatasetLimits,
    /// `sqlite:<path>` or `postgres://…`; `None`: `jobs.sqlite` in `dir`.
    pub database_url: Option<String>,
    /// A folder or `s3://bucket/prefix`; `None`: `dir`.
    pub model_store: Option<String>,
    /// Whether this process trains (roles `all` and `worker`); otherwise it only queues.
    pub train: bool,
    /// Whether this process serves fine-tuned models (roles `all` and `api`).
    pub serve: bool,
    /// This replica's name in the store's claims: unique among live replicas.
    pub replica: String,
    /// How long a claim holds without a heartbeat.
    pub lease: Duration,
}

impl JobConfig {
    /// One process, everything in `dir`: the defaults of `cnnserve serve`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_concurrent_jobs: 1,
            training_threads: 1,
            dataset_limits: DatasetLimits::default(),
            database_url: None,
            model_store: None,
            train: true,
            serve: true,
            replica: format!(
                "replica-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            lease: DEFAULT_LEASE,
        }
    }
}

pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// The size the recipe resizes to before anything else.
pub const IMAGE_SIZE: (u32, u32) = (256, 256);
const EXAMPLE_THUMBNAIL: u32 = 128;
/// Progress is kept in memory at every step but written to the store at most this often.
const PROGRESS_WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// How often a shared store is polled for other replicas' changes.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// An upload in the model store with no job that has been still this long was cut off by a crash
/// between its upload and its job's row; younger ones may be another replica's upload in flight.
const ORPHAN_AGE: Duration = Duration::from_secs(3600);
/// The longest a follower holds back a finished job's `done` for its model to be served here.
const DONE_WAIT: Duration = Duration::from_secs(30);
/// How often a running server looks for such uploads (besides at start).
const ORPHAN_SWEEP_INTERVAL: Duration = Duration::from_secs(15 * 60);
/// Where heads fetched from an object store are kept, inside the weights dir.
const MODEL_CACHE: &str = ".model-cache";

struct State {
    /// Jobs this process runs, as fresh as their last step.
    running: HashMap<String, Job>,
    /// Validated data sets of jobs submitted here, so that a job this process claims is not
    /// decoded twice.
    datasets: HashMap<String, Dataset>,
    cancel: HashMap<String, Arc<AtomicBool>>,
    /// Running jobs past their commit point: trained, not cancelled, now saving and publishing.
    publishing: HashSet<String>,
    /// Training threads inside a claim: a job they claim is running in the store before it is
    /// in `cancel`, so [`JobManager::wait_idle`] waits for them too.
    claiming: usize,
    shutting_down: bool,
}

/// Where a job can be held by [`JobManager::hold`] (a test aid): just before its commit point
/// (where a cancel still wins), just after it (where a cancel is too late), or once its outcome
/// is recorded and its model registered but still staged (not moved into place yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    BeforeCommit,
    AfterCommit,
    Recorded,
}

#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    held: Option<Checkpoint>,
    /// Jobs waiting at the held checkpoint.
    waiting: usize,
}

/// Keeps jobs waiting at a [`Checkpoint`] until dropped.
pub struct Hold(Arc<Shared>);

impl Hold {
    /// Blocks until a job waits at the held checkpoint; false after `timeout` without one.
    pub fn wait_until_reached(&self, timeout: Duration) -> bool {
        let gate = &self.0.gate;
        let state = gate.state.lock().expect("gate lock");
        let (state, _) = gate
            .changed
            .wait_timeout_while(state, timeout, |s| s.waiting == 0)
            .expect("gate lock");
        state.waiting > 0
    }
}

impl Drop for Hold {
    /// Lets the held jobs go on, and waits (a little) until they have left the checkpoint, so
    /// that a next hold does not catch them again.
    fn drop(&mut self) {
        let gate = &self.0.gate;
        let mut state = gate.state.lock().expect("gate lock");
        state.held = None;
        gate.changed.notify_all();
        let _ = gate
            .changed
            .wait_timeout_while(state, Duration::from_secs(10), |s| s.waiting > 0)
            .expect("gate lock");
    }
}

struct Shared {
    config: JobConfig,
    engine: Engine,
    metrics: Arc<Metrics>,
    store: Arc<dyn JobStore>,
    models: Arc<dyn ModelStore>,
    state: Mutex<State>,
    wake: Condvar,
    events: broadcast::Sender<JobEvent>,
    pool: rayon::ThreadPool,
    gate: Gate,
    /// Stops the watcher and heartbeat thread (and wakes it).
    stopped: (Mutex<bool>, Condvar),
    /// Set when the job store tells of another process's change (or at shutdown): wakes the
    /// watcher before its next poll.
    changed: Arc<(Mutex<bool>, Condvar)>,
    /// Registered heads whose load failed, by name and the registration's time: not fetched again
    /// on every poll.
    unloadable: Mutex<HashMap<String, DateTime<Utc>>>,
}

#[derive(Clone)]
pub struct JobManager {
    shared: Arc<Shared>,
}

fn dataset_key(id: &str) -> String {
    format!("jobs/{id}/dataset.zip")
}

fn staged_key(id: &str, file: &str) -> String {
    format!("jobs/{id}/model/{file}")
}

fn example_key(id: &str, n: usize) -> String {
    format!("jobs/{id}/examples/{n}.png")
}

impl JobManager {
    /// Opens the stores: jobs this replica left running are marked failed (every running job,
    /// with SQLite: one process owns it), staged files are settled, and fine-tuned heads found in
    /// the model store but not registered are registered. Nothing runs before
    /// [`JobManager::start`] (the server calls it once the models are loaded, so that queued jobs
    /// find their base).
    pub fn open(config: JobConfig, engine: Engine) -> Result<Self, JobError> {
        std::fs::create_dir_all(config.dir.join("jobs"))?;
        let url = config
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", config.dir.join("jobs.sqlite").display()));
        let store = store::open(&url)?;
        let models = match &config.model_store {
            Some(location) => model_store::open(location)?,
            None => model_store::open(&config.dir.to_string_lossy())?,
        };
        let one_process = config.train && config.serve;
        if !store.is_shared() && !one_process {
            return Err(JobError::Config(format!(
                "a replica that only serves or only trains needs a database other replicas \
                 share: --database-url postgres://… (not {})",
                store.describe()
            )));
        }
        let reason = "interrupted: the server stopped while this job was running";
        let owner = store.is_shared().then_some(config.replica.as_str());
        for job in store.fail_running(owner, reason)? {
            tracing::info!(job = %job.job_id, "marked failed: it was running when this replica stopped");
        }
        for job in store.expire()? {
            tracing::info!(job = %job.job_id, "marked failed: its replica stopped renewing its lease");
        }
        remove_temporaries(&config.dir);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.training_threads.max(1))
            .thread_name(|i| format!("train-{i}"))
            .build()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let (events, _) = broadcast::channel(1024);
        let metrics = engine.metrics().clone();
        let manager = Self {
            shared: Arc::new(Shared {
                config,
                engine,
                metrics,
                store,
                models,
                state: Mutex::new(State {
                    running: HashMap::new(),
                    datasets: HashMap::new(),
                    cancel: HashMap::new(),
                    publishing: HashSet::new(),
                    claiming: 0,
                    shutting_down: false,
                }),
                wake: Condvar::new(),
                events,
                pool,
                gate: Gate::default(),
                stopped: (Mutex::new(false), Condvar::new()),
                changed: Arc::new((Mutex::new(false), Condvar::new())),
                unloadable: Mutex::new(HashMap::new()),
            }),
        };
        manager.recover()?;
        manager.update_gauges();
        Ok(manager)
    }

    /// Starts the training threads (when this replica trains), the heartbeat that renews leases
    /// and fails expired ones, and the watcher that follows other replicas' changes.
    pub fn start(&self) -> Result<(), JobError> {
        if self.shared.config.train {
            for i in 0..self.shared.config.max_concurrent_jobs.max(1) {
                let worker = self.clone();
                std::thread::Builder::new()
                    .name(format!("jobs-{i}"))
                    .spawn(move || worker.work())?;
            }
        }
        let heart = self.clone();
        std::thread::Builder::new()
            .name("jobs-heartbeat".into())
            .spawn(move || heart.heartbeat())?;
        let watcher = self.clone();
        std::thread::Builder::new()
            .name("jobs-watch".into())
            .spawn(move || watcher.watch())?;
        Ok(())
    }

    /// A fresh job id and the local folder its upload is staged in.
    pub fn new_job_dir(&self) -> Result<(String, PathBuf), JobError> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let dir = self.job_dir(&id);
        std::fs::create_dir_all(&dir)?;
        Ok((id, dir))
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.shared.config.dir.join("jobs").join(id)
    }

    /// Where the uploaded data set of a job is staged on this machine.
    pub fn dataset_path(&self, id: &str) -> PathBuf {
        self.job_dir(id).join("dataset.zip")
    }

    pub fn config(&self) -> &JobConfig {
        &self.shared.config
    }

    /// The job database and the model store, as `/info` shows them.
    pub fn describe_stores(&self) -> (String, String) {
        (self.shared.store.describe(), self.shared.models.describe())
    }

    /// True when a model of this name exists or a job that has not finished will write one.
    pub fn name_taken(&self, name: &str) -> bool {
        self.shared.engine.get(name).is_some()
            || self.list().is_ok_and(|jobs| {
                jobs.iter()
                    .any(|j| j.name == name && !j.status.is_finished())
            })
            || self
                .shared
                .store
                .models()
                .is_ok_and(|models| models.iter().any(|m| m.name == name))
    }

    /// Queues a job whose data set was validated already (and is staged at
    /// [`JobManager::dataset_path`]): the upload goes to the model store, then the job to the
    /// job store, whose unique index on unfinished jobs' names decides between uploads racing
    /// for one name, on any replica.
    pub fn submit(
        &self,
        id: String,
        name: String,
        base_model: String,
        params: Params,
        dataset: Dataset,
    ) -> Result<Job, JobError> {
        let counts = train::fit::split_counts(&dataset, &params);
        let job = Job {
            job_id: id.clone(),
            status: Status::Queued,
            created_at: Utc::now(),
            started_at: None,
            finished_at: None,
            base_model,
            name,
            params,
            dataset: DatasetSummary {
                classes: dataset.classes.clone(),
                counts: Counts {
                    train: counts.train,
                    valid: counts.valid,
                    test: counts.test,
                },
                skipped: dataset.skipped.clone(),
                ignored: dataset.ignored,
            },
            progress: None,
            history: Vec::new(),
            result: None,
            error: None,
        };
        if self.shared.engine.get(&job.name).is_some() {
            return Err(JobError::Conflict(name_taken_message(&job.name)));
        }
        let local = self.dataset_path(&id);
        self.shared.models.put_file(&dataset_key(&id), &local)?;
        if self.shared.config.train {
            // Kept for this process's training threads, should they claim it.
            let mut state = self.shared.state.lock().expect("job state lock");
            state.datasets.insert(id.clone(), dataset);
        }
        match self.shared.store.create(&job) {
            Ok(()) => {}
            Err(e) => {
                self.shared
                    .state
                    .lock()
                    .expect("job state lock")
                    .datasets
                    .remove(&id);
                let _ = self.shared.models.delete_prefix(&format!("jobs/{id}"));
                return Err(match e {
                    StoreError::NameTaken(_) => JobError::Conflict(name_taken_message(&job.name)),
                    other => other.into(),
                });
            }
        }
        if self.shared.models.local_path(&dataset_key(&id)).as_deref() != Some(local.as_path()) {
            // The store has it; this machine's copy was only staging.
            let _ = std::fs::remove_dir_all(self.job_dir(&id));
        }
        self.shared.wake.notify_one();
        self.update_gauges();
        Ok(job)
    }

    /// A job as this replica knows it best: its own running jobs from memory (fresher than the
    /// store between writes), others from the store.
    pub fn get(&self, id: &str) -> Result<Option<Job>, JobError> {
        if let Some(job) = self.running(id) {
            return Ok(Some(job));
        }
        Ok(self.shared.store.get(id)?)
    }

    fn running(&self, id: &str) -> Option<Job> {
        let state = self.shared.state.lock().expect("job state lock");
        state.running.get(id).cloned()
    }

    /// Every job, newest first.
    pub fn list(&self) -> Result<Vec<Job>, JobError> {
        let mut jobs = self.shared.store.all()?;
        {
            let state = self.shared.state.lock().expect("job state lock");
            for job in &mut jobs {
                if let Some(fresh) = state.running.get(&job.job_id) {
                    *job = fresh.clone();
                }
            }
        }
        jobs.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then(b.job_id.cmp(&a.job_id))
        });
        Ok(jobs)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.shared.events.subscribe()
    }

    /// Cancels a queued job at once, a running one at its next training step (on whichever
    /// replica runs it: at once here, within a heartbeat elsewhere).
    pub fn cancel(&self, id: &str) -> Result<Job, JobError> {
        match self.shared.store.cancel(id)? {
            CancelOutcome::NotFound => Err(JobError::NotFound(id.to_string())),
            CancelOutcome::Cancelled(job) => {
                self.shared
                    .state
                    .lock()
                    .expect("job state lock")
                    .datasets
                    .remove(id);
                self.update_gauges();
                let _ = self.shared.events.send(JobEvent::Done { job: job.clone() });
                Ok(*job)
            }
            CancelOutcome::Requested(job) => {
                let state = self.shared.state.lock().expect("job state lock");
                if let Some(flag) = state.cancel.get(id) {
                    flag.store(true, Ordering::Relaxed);
                }
                Ok(state.running.get(id).cloned().unwrap_or(*job))
            }
            CancelOutcome::TooLate(_) => Err(JobError::Conflict(format!(
                "job {id} has finished training and is saving its model: too late to cancel"
            ))),
            CancelOutcome::Finished(job) => Err(JobError::Conflict(format!(
                "job {id} already {}: nothing to cancel",
                job.status.as_str()
            ))),
        }
    }

    /// Forgets a finished job and deletes its uploaded data and pictures (not its model).
    pub fn purge(&self, id: &str) -> Result<Job, JobError> {
        let job = self
            .get(id)?
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        if !job.status.is_finished() || !self.shared.store.delete(id)? {
            return Err(JobError::Conflict(format!(
                "job {id} is {}: cancel it first",
                job.status.as_str()
            )));
        }
        let models = self.shared.models.as_ref();
        if job.status == Status::Succeeded && !models.list(&format!("jobs/{id}/model"))?.is_empty()
        {
            // Committed but not moved yet (its replica is publishing it, or stopped before it
            // could): the model is the job's outcome, and outlives it.
            move_staged(models, id, &job.name)?;
        }
        models.delete_prefix(&format!("jobs/{id}"))?;
        let dir = self.job_dir(id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        self.update_gauges();
        Ok(job)
    }

    /// The thumbnail (PNG) of example `n` of a succeeded job.
    pub fn example(&self, id: &str, n: usize) -> Result<Option<Vec<u8>>, JobError> {
        // Only ids we issued become keys: a crafted one (`..`) must not reach other objects.
        if self.get(id)?.is_none() {
            return Ok(None);
        }
        Ok(self.shared.models.get(&example_key(id, n))?)
    }

    /// Deletes a fine-tuned model on every replica: its weights, its metadata, then its
    /// registration (the commit point: a crash before it leaves a registered model without
    /// weights, which the next start unregisters).
    pub fn delete_model(&self, name: &str) -> Result<Arc<Classifier>, JobError> {
        let engine = &self.shared.engine;
        let classifier = engine
            .get(name)
            .ok_or_else(|| JobError::NotFound(format!("no model `{name}`")))?;
        if classifier.kind != ModelKind::FineTuned {
            return Err(JobError::Model(crate::engine::EngineError::NotDeletable(
                name.to_string(),
            )));
        }
        engine.remove(name);
        let models = &self.shared.models;
        models.delete(&format!("{name}.safetensors"))?;
        models.delete(&format!("{name}.json"))?;
        self.shared.store.unregister(name)?;
        let _ = std::fs::remove_file(self.cache_path(name));
        Ok(classifier)
    }

    /// Stops for good: queued jobs stay queued (they run at the next start, or on another
    /// replica); a running one is stopped and marked failed, so that nothing is left half done.
    pub fn shutdown(&self) {
        let mut state = self.shared.state.lock().expect("job state lock");
        state.shutting_down = true;
        for flag in state.cancel.values() {
            flag.store(true, Ordering::Relaxed);
        }
        drop(state);
        self.shared.wake.notify_all();
        *self.shared.stopped.0.lock().expect("stop lock") = true;
        self.shared.stopped.1.notify_all();
        *self.shared.changed.0.lock().expect("change lock") = true;
        self.shared.changed.1.notify_all();
        let _ = self.shared.events.send(JobEvent::Shutdown);
    }

    /// Blocks until no job is running (after [`JobManager::shutdown`], until the running one
    /// has recorded that it stopped).
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let running = {
                let state = self.shared.state.lock().expect("job state lock");
                !state.cancel.is_empty() || state.claiming > 0
            };
            if !running {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn update_gauges(&self) {
        let counts = match self.shared.store.counts() {
            Ok(counts) => counts,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count jobs");
                return;
            }
        };
        for status in Status::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| s == status.as_str())
                .map_or(0, |(_, n)| *n);
            self.shared
                .metrics
                .jobs
                .get_or_create(&JobLabels {
                    status: status.as_str().to_string(),
                })
                .set(n);
        }
    }

    /// A training thread: claims queued jobs one at a time until shutdown.
    fn work(&self) {
        loop {
            {
                let mut state = self.shared.state.lock().expect("job state lock");
                if state.shutting_down {
                    return;
                }
                state.claiming += 1;
            }
            // Only jobs this replica can train: their base model is loaded here.
            let bases = self.shared.engine.pretrained_names();
            let claimed = self.shared.store.claim(
                &self.shared.config.replica,
                &bases,
                self.shared.config.lease,
            );
            let mut state = self.shared.state.lock().expect("job state lock");
            state.claiming -= 1;
            let job = match claimed {
                Ok(Some(job)) => job,
                Ok(None) => {
                    // Woken by a submit here at once; jobs queued elsewhere are seen on the
                    // next poll.
                    if state.shutting_down {
                        return;
                    }
                    let _ = self.shared.wake.wait_timeout(state, WATCH_INTERVAL);
                    continue;
                }
                Err(e) => {
                    drop(state);
                    tracing::warn!(error = %e, "cannot claim a job");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            let id = job.job_id.clone();
            let (dataset, cancel) = {
                // The same lock as the claim's count: a job is in `claiming` or in `cancel`.
                let flag = Arc::new(AtomicBool::new(state.shutting_down));
                state.cancel.insert(id.clone(), flag.clone());
                state.running.insert(id.clone(), job.clone());
                let dataset = state.datasets.remove(&id);
                drop(state);
                (dataset, flag)
            };
            if let Err(e) = self.run(job, dataset, &cancel) {
                tracing::error!(job = %id, error = %e, "could not record the job's state");
                self.give_up(&id, &e);
            }
            if self.shared.models.local_path(&dataset_key(&id)) != Some(self.dataset_path(&id)) {
                // This machine's copies of the upload and pictures: the store has them.
                let _ = std::fs::remove_dir_all(self.job_dir(&id));
            }
            let mut state = self.shared.state.lock().expect("job state lock");
            state.cancel.remove(&id);
            state.publishing.remove(&id);
            state.running.remove(&id);
        }
    }

    /// After a job's run could not record its state (the database or the model store failed
    /// under it): the job is recorded failed if it still runs here; else, its lease no longer
    /// renewed, another heartbeat fails it.
    fn give_up(&self, id: &str, error: &JobError) {
        let job = self
            .shared
            .state
            .lock()
            .expect("job state lock")
            .running
            .remove(id);
        let Some(job) = job else {
            // Past the commit point: its outcome is recorded; the next start publishes its model.
            return;
        };
        self.remove_staged(id);
        let job = store::failed(
            job,
            &format!("failed: its state could not be recorded ({error})"),
        );
        match self
            .shared
            .store
            .finish(&job, &self.shared.config.replica, None)
        {
            Ok(()) => {
                let _ = self
                    .shared
                    .events
                    .send(JobEvent::Done { job: Box::new(job) });
            }
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "the job is left to its lease, which runs out")
            }
        }
        self.update_gauges();
    }

    /// Holds every job that reaches `at` until the guard is dropped. A test aid, for seeing a
    /// cancel meet a finishing job on either side of its commit point without relying on timing.
    pub fn hold(&self, at: Checkpoint) -> Hold {
        self.shared.gate.state.lock().expect("gate lock").held = Some(at);
        Hold(self.shared.clone())
    }

    fn checkpoint(&self, at: Checkpoint) {
        let gate = &self.shared.gate;
        let mut state = gate.state.lock().expect("gate lock");
        if state.held != Some(at) {
            return;
        }
        state.waiting += 1;
        gate.changed.notify_all();
        while state.held == Some(at) {
            state = gate.changed.wait(state).expect("gate lock");
        }
        state.waiting -= 1;
        gate.changed.notify_all();
    }

    /// The commit point's first half: from here the job's model is saved and published, and a
    /// cancel is answered 409; before it, a cancel stops the job with nothing published. Decided
    /// by the store, so that a cancel sent to another replica meets the same rule.
    fn commit(&self, id: &str, cancel: &AtomicBool) -> Result<(), TrainError> {
        self.checkpoint(Checkpoint::BeforeCommit);
        {
            let mut state = self.shared.state.lock().expect("job state lock");
            if cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let publishing = self
                .shared
                .store
                .start_publishing(id, &self.shared.config.replica)
                .map_err(|e| TrainError::Io(std::io::Error::other(e.to_string())))?;
            if !publishing {
                return Err(TrainError::Cancelled);
            }
            state.publishing.insert(id.to_string());
        }
        self.checkpoint(Checkpoint::AfterCommit);
        Ok(())
    }

    fn run(
        &self,
        mut job: Job,
        dataset: Option<Dataset>,
        cancel: &AtomicBool,
    ) -> Result<(), JobError> {
        let id = job.job_id.clone();
        let reading = Progress::phase(Phase::Reading, job.params.epochs);
        self.set_progress(&mut job, reading, true)?;
        self.update_gauges();
        tracing::info!(job = %id, name = %job.name, base = %job.base_model, replica = %self.shared.config.replica, "training started");

        let outcome = self.train(&mut job, dataset, cancel);
        job.finished_at = Some(Utc::now());
        let mut staged = None;
        match outcome {
            Ok((result, classifier)) => {
                job.status = Status::Succeeded;
                job.result = Some(result);
                job.progress = job.progress.take().map(|p| p.moved_to(Phase::Done));
                staged = Some(classifier);
            }
            Err(TrainError::Cancelled) => {
                let shutting_down = self
                    .shared
                    .state
                    .lock()
                    .expect("job state lock")
                    .shutting_down;
                if shutting_down {
                    job.status = Status::Failed;
                    job.error =
                        Some("interrupted: the server shut down while this job was running".into());
                } else {
                    job.status = Status::Cancelled;
                    job.error = Some("cancelled while running".into());
                }
            }
            Err(e) => {
                job.status = Status::Failed;
                job.error = Some(e.to_string());
            }
        }
        tracing::info!(job = %id, status = job.status.as_str(), error = ?job.error, "training finished");
        if job.status != Status::Succeeded {
            self.remove_staged(&id);
            // Final figures: where it stopped, nothing left to wait for.
            job.progress = job.progress.take().map(|p| Progress { eta_s: 0.0, ..p });
        }
        self.finish(job, staged)
    }

    fn remove_staged(&self, id: &str) {
        let _ = std::fs::remove_dir_all(self.staging_dir(id));
        let _ = self
            .shared
            .models
            .delete_prefix(&format!("jobs/{id}/model"));
    }

    /// Records a finished job, publishes its model, and tells subscribers. The store's
    /// transaction (the job recorded, its model registered) is the commit point: a crash before
    /// it leaves a failed job and no model (the staged files are removed at the next start), a
    /// crash after it a succeeded job whose staged files the next start moves into place.
    fn finish(&self, job: Job, staged: Option<Classifier>) -> Result<(), JobError> {
        let record = staged
            .as_ref()
            .and_then(|c| c.meta.clone())
            .map(|meta| ModelRecord {
                name: meta.name.clone(),
                job_id: Some(job.job_id.clone()),
                meta,
            });
        let owner = &self.shared.config.replica;
        match self.shared.store.finish(&job, owner, record.as_ref()) {
            Ok(()) => {}
            Err(StoreError::LeaseLost(_)) => {
                // Another replica failed it when our lease ran out: its outcome is recorded.
                tracing::warn!(job = %job.job_id, "the job's lease ran out before it finished: its result is dropped");
                self.remove_staged(&job.job_id);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        // Recorded: from now on the store's copy is the job's, for every reader.
        self.shared
            .state
            .lock()
            .expect("job state lock")
            .running
            .remove(&job.job_id);
        if let Some(classifier) = staged {
            let (name, arch) = (classifier.name.clone(), classifier.arch);
            if self.shared.config.serve {
                // Recorded succeeded: until it is in place, requests for it hear "loading".
                self.shared.engine.expect([(name.clone(), Some(arch))]);
            }
            crate::crash::point("committed");
            self.checkpoint(Checkpoint::Recorded);
            if let Err(e) = self.publish(&job.job_id, classifier) {
                if self.shared.config.serve && self.shared.engine.get(&name).is_none() {
                    self.shared.engine.mark_failed(
                        &name,
                        Some(arch),
                        format!("its files could not be put in place: {e}"),
                    );
                }
                return Err(e);
            }
        }
        self.update_gauges();
        let _ = self
            .shared
            .events
            .send(JobEvent::Done { job: Box::new(job) });
        Ok(())
    }

    fn train(
        &self,
        job: &mut Job,
        dataset: Option<Dataset>,
        cancel: &AtomicBool,
    ) -> Result<(JobResult, Classifier), TrainError> {
        let id = job.job_id.clone();
        let dataset = match dataset {
            Some(d) => d,
            None => {
                let local = self.dataset_path(&id);
                std::fs::create_dir_all(self.job_dir(&id))?;
                let found = self
                    .shared
                    .models
                    .fetch(&dataset_key(&id), &local)
                    .map_err(std::io::Error::from)?;
                if !found {
                    return Err(TrainError::Io(std::io::Error::other(format!(
                        "the upload of job {id} is not in the model store"
                    ))));
                }
                train::dataset::load(&local, &self.shared.config.dataset_limits, IMAGE_SIZE)?
            }
        };
        let base = self
            .shared
            .engine
            .get(&job.base_model)
            .filter(|c| c.kind == ModelKind::Pretrained)
            .ok_or_else(|| {
                TrainError::InvalidParams(vec![format!(
                    "base model `{}` is not loaded",
                    job.base_model
                )])
            })?;
        let mut last_write = Instant::now();
        let mut write_error = None;
        let params = job.params.clone();
        let trained = {
            let mut on_event = |event: Event| {
                let message = match event {
                    Event::Progress(progress) => JobEvent::Progress {
                        job_id: id.clone(),
                        progress,
                    },
                    Event::Epoch(metrics) => JobEvent::Epoch {
                        job_id: id.clone(),
                        metrics,
                    },
                };
                // Epochs and phase changes are written at once, steps at most once a second.
                let milestone = match &message {
                    JobEvent::Progress { progress, .. } => progress.done == 0,
                    _ => true,
                };
                let persist = milestone || last_write.elapsed() >= PROGRESS_WRITE_INTERVAL;
                if persist {
                    last_write = Instant::now();
                }
                if let Err(e) = self.update(job, message, persist) {
                    // A lost lease ends the job: another replica has failed it.
                    cancel.store(true, Ordering::Relaxed);
                    write_error.get_or_insert(e);
                }
            };
            let network = base.network().clone();
            let arch = base.arch;
            self.shared
                .pool
                .install(|| train::fit(&network, arch, &dataset, &params, &mut on_event, cancel))
        };
        if let Some(e) = write_error {
            return Err(TrainError::Io(std::io::Error::other(e.to_string())));
        }
        let trained = trained?;
        self.commit(&id, cancel)?;
        let saving = trained.progress.moved_to(Phase::Saving);
        self.set_progress(job, saving, true)
            .map_err(|e| TrainError::Io(std::io::Error::other(e.to_string())))?;
        // Staged in the job's folder and loaded from there (a model that does not load is a
        // failed job); moved into place only once the job is recorded as succeeded.
        let staging = self.staging_dir(&id);
        std::fs::create_dir_all(&staging)?;
        let saved = train::output::save(
            &trained,
            &job.name,
            &base.name,
            base.identity.as_ref().ok_or_else(|| {
                TrainError::Io(std::io::Error::other("the base is not a pretrained model"))
            })?,
            &job.params,
            &staging,
        )?;
        let models = &self.shared.models;
        for file in [&saved.weights, &saved.metadata] {
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            models
                .put_file(&staged_key(&id, &name), file)
                .map_err(std::io::Error::from)?;
        }
        let classifier = Classifier::fine_tuned(saved.meta, &saved.weights, &base)?;
        if let Err(err) = self.write_thumbnails(&id, &trained.evaluation.examples, &dataset) {
            tracing::warn!(job = %id, error = %err, "could not write example thumbnails");
        }
        crate::crash::point("staged");
        Ok((
            JobResult {
                model: job.name.clone(),
                best_epoch: trained.best_epoch,
                evaluation: trained.evaluation,
            },
            classifier,
        ))
    }

    /// The one place a running job changes: memory, the store (when `persist`) and the event
    /// stream, together.
    fn update(&self, job: &mut Job, event: JobEvent, persist: bool) -> Result<(), JobError> {
        match &event {
            JobEvent::Progress { progress, .. } => job.progress = Some(progress.clone()),
            JobEvent::Epoch { metrics, .. } => job.history.push(metrics.clone()),
            _ => {}
        }
        {
            let mut state = self.shared.state.lock().expect("job state lock");
            if let Some(j) = state.running.get_mut(&job.job_id) {
                *j = job.clone();
            }
        }
        let stored = if persist {
            self.shared
                .store
                .update(job, Some(&self.shared.config.replica))
                .map_err(JobError::from)
        } else {
            Ok(())
        };
        let _ = self.shared.events.send(event);
        stored
    }

    fn set_progress(
        &self,
        job: &mut Job,
        progress: Progress,
        persist: bool,
    ) -> Result<(), JobError> {
        let event = JobEvent::Progress {
            job_id: job.job_id.clone(),
            progress,
        };
        self.update(job, event, persist)
    }

    /// Where a finished job's model files are written on this machine before they are staged in
    /// the model store (for a folder store, the same place).
    fn staging_dir(&self, id: &str) -> PathBuf {
        self.job_dir(id).join("model")
    }

    /// Moves a succeeded job's staged files into place (weights first, metadata last) and serves
    /// the model here; other replicas' watchers load it from the registry.
    fn publish(&self, id: &str, mut classifier: Classifier) -> Result<(), JobError> {
        move_staged(self.shared.models.as_ref(), id, &classifier.name)?;
        if let Some(path) = self
            .shared
            .models
            .local_path(&format!("{}.safetensors", classifier.name))
        {
            classifier.file = path;
        } else {
            // The head stays on this machine as a cached copy of the store's.
            let cache = self.cache_path(&classifier.name);
            std::fs::create_dir_all(cache.parent().expect("cache path has a parent"))?;
            std::fs::rename(&classifier.file, &cache)?;
            classifier.file = cache;
        }
        let _ = std::fs::remove_dir_all(self.staging_dir(id));
        if self.shared.config.serve {
            self.shared.engine.insert(classifier);
        }
        crate::crash::point("published");
        Ok(())
    }

    fn cache_path(&self, name: &str) -> PathBuf {
        self.shared
            .config
            .dir
            .join(MODEL_CACHE)
            .join(format!("{name}.safetensors"))
    }

    /// Small PNGs of the gallery pictures, as the model saw them (after the resize).
    fn write_thumbnails(
        &self,
        id: &str,
        examples: &[Example],
        data: &Dataset,
    ) -> Result<(), JobError> {
        for (n, png) in thumbnails(examples, data)? {
            self.shared.models.put(&example_key(id, n), &png)?;
        }
        Ok(())
    }

    /// At start: staged models of succeeded jobs are moved into place (the crash came after the
    /// commit point), those of failed and cancelled jobs removed (before it); uploads with no job
    /// (cut off by a crash) are removed: in the model store once still for [`ORPHAN_AGE`], in
    /// this machine's staging folder at once unless replicas share the job store; then the registry is
    /// brought in line with the model store ([`JobManager::reconcile`]).
    fn recover(&self) -> Result<(), JobError> {
        let jobs: HashMap<String, Job> = self
            .shared
            .store
            .all()?
            .into_iter()
            .map(|j| (j.job_id.clone(), j))
            .collect();
        let models = self.shared.models.as_ref();
        for id in models.folders("jobs")? {
            let Some(job) = jobs.get(&id) else {
                self.remove_if_orphan(&id);
                continue;
            };
            let staged = models.list(&format!("jobs/{id}/model"))?;
            if staged.is_empty() {
                continue;
            }
            match job.status {
                Status::Succeeded => {
                    tracing::info!(job = %id, model = %job.name, "publishing the model of a succeeded job");
                    move_staged(models, &id, &job.name)?;
                }
                Status::Failed | Status::Cancelled => {
                    tracing::info!(job = %id, "removing the model files of a job that did not succeed");
                    models.delete_prefix(&format!("jobs/{id}/model"))?;
                }
                Status::Queued | Status::Running => {}
            }
        }
        // Local folders: staging of uploads and models, on this machine only.
        if let Ok(entries) = std::fs::read_dir(self.shared.config.dir.join("jobs")) {
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                match jobs.get(&id) {
                    None if path.is_dir() && !self.shared.store.is_shared() => {
                        tracing::info!(job = %id, "removing the upload of a job that was never created");
                        let _ = std::fs::remove_dir_all(&path);
                    }
                    Some(job) if job.status.is_finished() => {
                        let _ = std::fs::remove_dir_all(path.join("model"));
                    }
                    _ => {}
                }
            }
        }
        self.reconcile()?;
        Ok(())
    }

    /// Removes the uploads in the model store that no job owns, once they have been still for
    /// [`ORPHAN_AGE`]: what a crash between an upload and its job's row leaves behind. At start
    /// and every [`ORPHAN_SWEEP_INTERVAL`].
    fn sweep_orphans(&self) -> Result<(), JobError> {
        let folders = self.shared.models.folders("jobs")?;
        if folders.is_empty() {
            return Ok(());
        }
        let known: std::collections::HashSet<String> = self
            .shared
            .store
            .all()?
            .into_iter()
            .map(|j| j.job_id)
            .collect();
        for id in folders.iter().filter(|id| !known.contains(*id)) {
            self.remove_if_orphan(id);
        }
        Ok(())
    }

    /// [`JobManager::sweep_orphans`] for one folder with no job: asks the job store once more
    /// (a job created since the listing is not an orphan) before removing it. A failure is
    /// logged: the next sweep tries again.
    fn remove_if_orphan(&self, id: &str) {
        let prefix = format!("jobs/{id}");
        let models = self.shared.models.as_ref();
        let removed = || -> Result<bool, JobError> {
            let still = models
                .last_modified(&prefix)?
                .map(|t| t.elapsed().unwrap_or_default());
            if still.is_none_or(|still| still < ORPHAN_AGE) || self.shared.store.get(id)?.is_some()
            {
                return Ok(false);
            }
            models.delete_prefix(&prefix)?;
            Ok(true)
        };
        match removed() {
            Ok(true) => tracing::info!(job = %id, "removed an upload whose job was never created"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "cannot remove an upload whose job was never created")
            }
        }
    }

    /// Brings the registry in line with the model store: heads found in the store without a
    /// registration are registered (put there by hand, or from before the registry), heads
    /// committed but still staged are moved into place, and registrations whose weights are gone
    /// (a delete cut short) are removed.
    pub fn reconcile(&self) -> Result<(), JobError> {
        let models = self.shared.models.as_ref();
        let store = self.shared.store.as_ref();
        let keys = models.list("")?;
        let registered = store.models()?;
        for record in &registered {
            if !keys.contains(&format!("{}.safetensors", record.name)) {
                if let Some(job) = &record.job_id {
                    if !models.list(&format!("jobs/{job}/model"))?.is_empty() {
                        // Committed, not moved yet: its replica is publishing it (or stopped
                        // before it could). Moving it again is harmless.
                        move_staged(models, job, &record.name)?;
                        continue;
                    }
                }
                if models.exists(&format!("{}.safetensors", record.name))? {
                    // Moved into place since the listing.
                    continue;
                }
                tracing::info!(model = %record.name, "unregistering a model whose weights are gone");
                models.delete(&format!("{}.json", record.name))?;
                store.unregister(&record.name)?;
            }
        }
        for key in &keys {
            let Some(name) = key.strip_suffix(".json") else {
                continue;
            };
            if registered.iter().any(|r| r.name == name)
                || !keys.contains(&format!("{name}.safetensors"))
            {
                continue;
            }
            let Some(bytes) = models.get(key)? else {
                continue;
            };
            match serde_json::from_slice::<FineTunedMeta>(&bytes) {
                Ok(meta) if meta.format == FineTunedMeta::FORMAT && meta.name == name => {
                    let record = ModelRecord {
                        name: name.to_string(),
                        job_id: None,
                        meta,
                    };
                    if store.register(&record)? {
                        tracing::info!(model = %name, "registered a fine-tuned model found in the model store");
                    }
                }
                // Not a head's metadata: some other JSON file in the folder.
                _ => {}
            }
        }
        Ok(())
    }

    /// Serves what the registry holds: registered heads not served yet are fetched and loaded,
    /// served ones no longer registered are dropped. Blocking.
    pub fn sync_models(&self) -> Result<(), JobError> {
        self.sync(true)
    }

    /// [`JobManager::sync_models`]; without `retry_failed` (the watcher's polls), a head whose load
    /// failed is not fetched again until the registry records another one under its name.
    fn sync(&self, retry_failed: bool) -> Result<(), JobError> {
        if !self.shared.config.serve {
            return Ok(());
        }
        let engine = &self.shared.engine;
        let records = self.shared.store.models()?;
        let mut unloadable = self.shared.unloadable.lock().expect("unloadable lock");
        if retry_failed {
            unloadable.clear();
        }
        // Models a thread here is publishing are its to put in place and serve.
        let ours = self.working_on();
        for record in &records {
            if record.job_id.as_ref().is_some_and(|j| ours.contains(j)) {
                continue;
            }
            let served = engine.get(&record.name).is_some_and(|c| {
                c.meta
                    .as_ref()
                    .is_some_and(|m| m.created_at == record.meta.created_at)
            });
            if served || unloadable.get(&record.name) == Some(&record.meta.created_at) {
                continue;
            }
            // While it is fetched and loaded, requests for it hear "loading", not "unknown".
            engine.expect([(record.name.clone(), Some(record.meta.arch))]);
            if let Err(e) = self.load_registered(record) {
                if engine.get(&record.name).is_none() {
                    engine.mark_failed(&record.name, Some(record.meta.arch), e.clone());
                }
                tracing::warn!(model = %record.name, error = %e, "registered model not loaded");
                unloadable.insert(record.name.clone(), record.meta.created_at);
            }
        }
        for classifier in engine.models() {
            if classifier.kind == ModelKind::FineTuned
                && !records.iter().any(|r| r.name == classifier.name)
            {
                tracing::info!(model = %classifier.name, "no longer registered: removed");
                engine.remove(&classifier.name);
            }
        }
        Ok(())
    }

    fn load_registered(&self, record: &ModelRecord) -> Result<(), String> {
        let models = self.shared.models.as_ref();
        let key = format!("{}.safetensors", record.name);
        let file = match models.local_path(&key) {
            Some(path) => path,
            None => {
                let cache = self.cache_path(&record.name);
                if let Some(parent) = cache.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                }
                cache
            }
        };
        let present = match models.local_path(&key) {
            Some(path) => path.is_file(),
            None => models.fetch(&key, &file).map_err(|e| e.to_string())?,
        };
        if !present {
            // Committed, not yet moved into place: the staged copy is the same head.
            if let Some(job) = &record.job_id {
                move_staged(models, job, &record.name).map_err(|e| e.to_string())?;
            }
            let found = match models.local_path(&key) {
                Some(path) => path.is_file(),
                None => models.fetch(&key, &file).map_err(|e| e.to_string())?,
            };
            if !found {
                return Err(format!("its weights ({key}) are not in the model store"));
            }
        }
        let engine = &self.shared.engine;
        let base = engine
            .models()
            .into_iter()
            .find(|c| c.is_base_of(&record.meta))
            .ok_or_else(|| {
                format!(
                    "its base model {} (sha256 {}) is not in the weights dir",
                    record.meta.base_model, record.meta.base_sha256
                )
            })?;
        let classifier =
            Classifier::fine_tuned(record.meta.clone(), &file, &base).map_err(|e| e.to_string())?;
        engine.insert(classifier);
        Ok(())
    }

    /// Checks this replica's pretrained weights against the digests the store recorded for them
    /// (the first replica records them). A model whose weights differ is not served: heads
    /// trained on one replica must run on the same backbone everywhere.
    pub fn check_pretrained(&self) -> Result<(), JobError> {
        for classifier in self.shared.engine.models() {
            let Some(identity) = &classifier.identity else {
                continue;
            };
            if !self.shared.store.is_shared() {
                continue;
            }
            // A converted file stands for the download it came from, so that a .pth and its
            // conversion count as the same weights.
            let digest = identity
                .source_sha256
                .as_deref()
                .unwrap_or(&identity.file_sha256);
            if let Some(recorded) = self
                .shared
                .store
                .check_pretrained(&classifier.name, digest)?
            {
                let error = format!(
                    "its weights here (sha256 {digest}) are not the ones the other replicas use \
                     (sha256 {recorded}): give every replica the same weights files"
                );
                tracing::error!(model = %classifier.name, "{error}");
                self.shared.engine.remove(&classifier.name);
                self.shared
                    .engine
                    .mark_failed(&classifier.name, Some(classifier.arch), error);
            }
        }
        Ok(())
    }

    /// The jobs this process's training threads are working on, from their claim until they are
    /// done with them (past their commit and publishing included).
    fn working_on(&self) -> HashSet<String> {
        let state = self.shared.state.lock().expect("job state lock");
        state.cancel.keys().cloned().collect()
    }

    /// Waits `timeout`, or less when the manager stops; true when it stopped.
    fn stopped_within(&self, timeout: Duration) -> bool {
        let stopped = self.shared.stopped.0.lock().expect("stop lock");
        let (stopped, _) = self
            .shared
            .stopped
            .1
            .wait_timeout_while(stopped, timeout, |s| !*s)
            .expect("stop lock");
        *stopped
    }

    /// The heartbeat, on a thread of its own so that nothing slow (a head being fetched and
    /// loaded, a listing of the model store) delays it past a lease: renews the leases of the
    /// jobs this replica is running (and hears cancels sent to other replicas), and fails jobs
    /// whose lease ran out.
    fn heartbeat(&self) {
        let every = (self.shared.config.lease / 3)
            .clamp(Duration::from_millis(200), Duration::from_secs(2));
        while !self.stopped_within(every) {
            self.beat();
        }
    }

    /// Waits until the job store tells of a change, or `timeout`; true when told.
    fn changed_within(&self, timeout: Duration) -> bool {
        let (lock, condvar) = &*self.shared.changed;
        let changed = lock.lock().expect("change lock");
        let (mut changed, _) = condvar
            .wait_timeout_while(changed, timeout, |c| !*c)
            .expect("change lock");
        std::mem::take(&mut *changed)
    }

    fn is_stopped(&self) -> bool {
        *self.shared.stopped.0.lock().expect("stop lock")
    }

    /// The watcher: with a shared store, relays other replicas' job changes as events and serves
    /// the registry's models, woken by the store's notifications (PostgreSQL's LISTEN) and
    /// polling every [`WATCH_INTERVAL`] besides; now and then, removes uploads no job owns.
    fn watch(&self) {
        let shared_store = self.shared.store.is_shared();
        if shared_store {
            let changed = self.shared.changed.clone();
            let wake: store::Wake = Arc::new(move || {
                *changed.0.lock().expect("change lock") = true;
                changed.1.notify_all();
            });
            if let Err(e) = self.shared.store.subscribe(wake) {
                tracing::warn!(error = %e, "cannot listen for the job database's changes: polling only");
            }
        }
        let mut last_sync = Instant::now();
        let mut last_gauges = Instant::now();
        let mut last_sweep = Instant::now();
        let mut seen: HashMap<String, Job> = HashMap::new();
        // Succeeded elsewhere; told `done` once their model is served here.
        let mut waiting: Vec<(Job, Instant)> = Vec::new();
        let mut cursor = match self.shared.store.changes(&Cursor::default()) {
            Ok((cursor, jobs)) => {
                seen.extend(jobs.into_iter().map(|j| (j.job_id.clone(), j)));
                cursor
            }
            Err(_) => Cursor::default(),
        };
        loop {
            let told = self.changed_within(WATCH_INTERVAL);
            if self.is_stopped() {
                return;
            }
            if last_sweep.elapsed() >= ORPHAN_SWEEP_INTERVAL {
                last_sweep = Instant::now();
                if let Err(e) = self.sweep_orphans() {
                    tracing::warn!(error = %e, "cannot look for uploads whose job was never created");
                }
            }
            if !shared_store {
                continue;
            }
            match self.shared.store.changes(&cursor) {
                Ok((next, jobs)) => {
                    cursor = next;
                    for job in jobs {
                        if let Some(job) = self.relay(seen.get(&job.job_id), &job) {
                            waiting.push((job, Instant::now()));
                        }
                        seen.insert(job.job_id.clone(), job);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot follow the job store"),
            }
            // A model just finished elsewhere is fetched at once rather than on the next tick;
            // the gauges keep to the tick.
            if told || !waiting.is_empty() || last_sync.elapsed() >= Duration::from_secs(1) {
                last_sync = Instant::now();
                if let Err(e) = self.sync(false) {
                    tracing::warn!(error = %e, "cannot follow the model registry");
                }
            }
            if last_gauges.elapsed() >= Duration::from_secs(1) {
                last_gauges = Instant::now();
                self.update_gauges();
            }
            waiting.retain(|(job, since)| {
                if !self.serves_model_of(job) && since.elapsed() < DONE_WAIT {
                    return true;
                }
                let _ = self.shared.events.send(JobEvent::Done {
                    job: Box::new(job.clone()),
                });
                false
            });
        }
    }

    /// One heartbeat: renew this replica's leases, pass on cancels, fail expired jobs.
    fn beat(&self) {
        let store = &self.shared.store;
        let config = &self.shared.config;
        // Only the jobs a thread here is working on: a job whose thread gave up without
        // recording its end loses its lease, and another heartbeat fails it.
        let working: Vec<String> = self.working_on().into_iter().collect();
        if config.train && !working.is_empty() {
            match store.renew(&config.replica, &working, config.lease) {
                Ok(held) => {
                    let state = self.shared.state.lock().expect("job state lock");
                    for (id, cancel) in held {
                        if let (true, Some(flag)) = (cancel, state.cancel.get(&id)) {
                            flag.store(true, Ordering::Relaxed);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew this replica's job leases"),
            }
        }
        match store.expire() {
            Ok(expired) => {
                for job in expired {
                    tracing::warn!(job = %job.job_id, "failed: its replica stopped renewing its lease");
                    let _ = self
                        .shared
                        .events
                        .send(JobEvent::Done { job: Box::new(job) });
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot check job leases"),
        }
    }

    /// Turns another replica's write of a job into the events its own subscribers would have
    /// heard.
    ///
    /// Returns a succeeded job whose `done` must wait until its model is served here (a
    /// subscriber told `done` asks the model at once).
    fn relay(&self, before: Option<&Job>, job: &Job) -> Option<Job> {
        // A thread here runs it (or is publishing it): that thread tells its subscribers.
        if self.working_on().contains(&job.job_id) {
            return None;
        }
        let id = &job.job_id;
        let events = &self.shared.events;
        let old_epochs = before.map_or(0, |b| b.history.len());
        for metrics in job.history.iter().skip(old_epochs) {
            let _ = events.send(JobEvent::Epoch {
                job_id: id.clone(),
                metrics: metrics.clone(),
            });
        }
        if let Some(progress) = &job.progress {
            if before.and_then(|b| b.progress.as_ref()) != Some(progress) {
                let _ = events.send(JobEvent::Progress {
                    job_id: id.clone(),
                    progress: progress.clone(),
                });
            }
        }
        if job.status.is_finished() && !before.is_some_and(|b| b.status.is_finished()) {
            if job.status == Status::Succeeded && !self.serves_model_of(job) {
                return Some(job.clone());
            }
            let _ = events.send(JobEvent::Done {
                job: Box::new(job.clone()),
            });
        }
        None
    }

    /// Whether a succeeded job's model is served here, or never will be (this replica serves
    /// nothing, or the model could not be loaded or is gone): then its `done` can be told.
    fn serves_model_of(&self, job: &Job) -> bool {
        let Some(result) = &job.result else {
            return true;
        };
        !self.shared.config.serve
            || self
                .shared
                .engine
                .get(&result.model)
                .is_some_and(|c| c.meta.is_some())
            || self
                .shared
                .unloadable
                .lock()
                .expect("unloadable lock")
                .contains_key(&result.model)
    }
}

/// Why `name` cannot be used for a new job's model.
pub fn name_taken_message(name: &str) -> String {
    format!("a model or an unfinished job is already called `{name}`: choose another name")
}

/// Moves a job's staged `<name>.safetensors`, then `<name>.json`, into place in the model store
/// (a rename in a folder; a copy and a delete in an object store); a file already moved is
/// skipped.
fn move_staged(models: &dyn ModelStore, id: &str, name: &str) -> Result<(), ModelStoreError> {
    for (file, step) in [
        (format!("{name}.safetensors"), Some("renamed")),
        (format!("{name}.json"), None),
    ] {
        models.rename(&staged_key(id, &file), &file)?;
        if let Some(step) = step {
            crate::crash::point(step);
        }
    }
    Ok(())
}

/// The gallery pictures as PNGs, by their index in `examples`.
fn thumbnails(examples: &[Example], data: &Dataset) -> std::io::Result<Vec<(usize, Vec<u8>)>> {
    let by_file: HashMap<&str, &image::RgbImage> = data
        .train
        .iter()
        .chain(&data.test)
        .map(|s| (s.file.as_str(), &s.image))
        .collect();
    let mut out = Vec::new();
    for (n, example) in examples.iter().enumerate() {
        let Some(image) = by_file.get(example.file.as_str()) else {
            continue;
        };
        let thumb = crate::preprocess::resize_bilinear(image, EXAMPLE_THUMBNAIL, EXAMPLE_THUMBNAIL);
        let mut png = std::io::Cursor::new(Vec::new());
        thumb
            .write_to(&mut png, image::ImageFormat::Png)
            .map_err(std::io::Error::other)?;
        out.push((n, png.into_inner()));
    }
    Ok(out)
}

/// Temporary files of writes a crash cut short: never a model, always safe to remove.
fn remove_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp-") {
            tracing::info!(file = %name, "removing a temporary file left by an interrupted write");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
