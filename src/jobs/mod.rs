//! Fine-tuning jobs: a queue, training threads, and a store that outlives the process.
//!
//! [`JobManager`] is a cheap `Clone` handle. Every state change is written to SQLite first, then
//! to memory, then announced to subscribers. Training runs on dedicated threads inside a small
//! thread pool, so `/predict` keeps cores to itself while a job runs. A finished model is saved
//! atomically into the weights dir and swapped into the engine at once.

pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
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
use store::{Store, StoreError};

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
    #[error("job files: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct JobConfig {
    /// The weights dir: models are written here, and jobs live in `jobs.sqlite` and `jobs/`.
    pub dir: PathBuf,
    pub max_concurrent_jobs: usize,
    /// Threads one training may use; the rest stay free for inference.
    pub training_threads: usize,
    pub dataset_limits: DatasetLimits,
}

/// The size the recipe resizes to before anything else.
pub const IMAGE_SIZE: (u32, u32) = (256, 256);
const EXAMPLE_THUMBNAIL: u32 = 128;
/// Progress is kept in memory at every step but written to disk at most this often.
const PROGRESS_WRITE_INTERVAL: Duration = Duration::from_secs(1);

struct State {
    jobs: BTreeMap<String, Job>,
    queue: VecDeque<String>,
    /// Validated data sets of queued jobs, so that they are not decoded twice.
    datasets: HashMap<String, Dataset>,
    cancel: HashMap<String, Arc<AtomicBool>>,
    /// Running jobs past their commit point: trained, not cancelled, now saving and publishing
    /// their model. A cancel of one of these is answered 409.
    publishing: HashSet<String>,
    shutting_down: bool,
}

/// Where a job can be held by [`JobManager::hold`] (a test aid): just before its commit point
/// (where a cancel still wins) or just after it (where a cancel is too late).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    BeforeCommit,
    AfterCommit,
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
    fn drop(&mut self) {
        self.0.gate.state.lock().expect("gate lock").held = None;
        self.0.gate.changed.notify_all();
    }
}

struct Shared {
    config: JobConfig,
    engine: Engine,
    metrics: Arc<Metrics>,
    store: Mutex<Store>,
    state: Mutex<State>,
    wake: Condvar,
    events: broadcast::Sender<JobEvent>,
    pool: rayon::ThreadPool,
    gate: Gate,
}

#[derive(Clone)]
pub struct JobManager {
    shared: Arc<Shared>,
}

impl JobManager {
    /// Opens the job store in `config.dir`: jobs that were running when the last process ended
    /// are marked failed, queued ones are queued again. Nothing runs before [`JobManager::start`]
    /// (the server calls it once the models are loaded, so that queued jobs find their base).
    pub fn open(config: JobConfig, engine: Engine) -> Result<Self, JobError> {
        std::fs::create_dir_all(config.dir.join("jobs"))?;
        let store = Store::open(&config.dir.join("jobs.sqlite"))?;
        let mut jobs = BTreeMap::new();
        let mut queue = VecDeque::new();
        for mut job in store.all()? {
            match job.status {
                Status::Running => {
                    job.status = Status::Failed;
                    job.finished_at = Some(Utc::now());
                    job.error =
                        Some("interrupted: the server stopped while this job was running".into());
                    store.put(&job)?;
                }
                Status::Queued => queue.push_back(job.job_id.clone()),
                _ => {}
            }
            jobs.insert(job.job_id.clone(), job);
        }
        remove_temporaries(&config.dir);
        recover(&config.dir, &jobs);
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
                store: Mutex::new(store),
                state: Mutex::new(State {
                    jobs,
                    queue,
                    datasets: HashMap::new(),
                    cancel: HashMap::new(),
                    publishing: HashSet::new(),
                    shutting_down: false,
                }),
                wake: Condvar::new(),
                events,
                pool,
                gate: Gate::default(),
            }),
        };
        manager.update_gauges();
        Ok(manager)
    }

    /// Starts the training threads.
    pub fn start(&self) -> Result<(), JobError> {
        for i in 0..self.shared.config.max_concurrent_jobs.max(1) {
            let worker = self.clone();
            std::thread::Builder::new()
                .name(format!("jobs-{i}"))
                .spawn(move || worker.work())?;
        }
        Ok(())
    }

    /// A fresh job id and the folder its upload goes to.
    pub fn new_job_dir(&self) -> Result<(String, PathBuf), JobError> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let dir = self.job_dir(&id);
        std::fs::create_dir_all(&dir)?;
        Ok((id, dir))
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.shared.config.dir.join("jobs").join(id)
    }

    /// The uploaded data set of a job.
    pub fn dataset_path(&self, id: &str) -> PathBuf {
        self.job_dir(id).join("dataset.zip")
    }

    pub fn config(&self) -> &JobConfig {
        &self.shared.config
    }

    /// True when a model of this name exists or a job that has not finished will write one.
    pub fn name_taken(&self, name: &str) -> bool {
        let state = self.shared.state.lock().expect("job state lock");
        self.taken_in(&state, name)
    }

    fn taken_in(&self, state: &State, name: &str) -> bool {
        self.shared.engine.get(name).is_some()
            || state
                .jobs
                .values()
                .any(|j| j.name == name && !j.status.is_finished())
    }

    /// Queues a job whose data set was validated already.
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
        {
            // The name is reserved where the job is queued, under one lock: of concurrent
            // uploads with one name, exactly one gets here first. The store's unique index on
            // unfinished jobs' names is the same rule on disk.
            let mut state = self.shared.state.lock().expect("job state lock");
            if self.taken_in(&state, &job.name) {
                return Err(JobError::Conflict(name_taken_message(&job.name)));
            }
            match self.store(&job) {
                Err(JobError::Store(StoreError::NameTaken(_))) => {
                    return Err(JobError::Conflict(name_taken_message(&job.name)))
                }
                other => other?,
            }
            state.jobs.insert(id.clone(), job.clone());
            state.datasets.insert(id.clone(), dataset);
            state.queue.push_back(id);
        }
        self.shared.wake.notify_one();
        self.update_gauges();
        Ok(job)
    }

    pub fn get(&self, id: &str) -> Option<Job> {
        let state = self.shared.state.lock().expect("job state lock");
        state.jobs.get(id).cloned()
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<Job> {
        let state = self.shared.state.lock().expect("job state lock");
        let mut jobs: Vec<Job> = state.jobs.values().cloned().collect();
        jobs.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then(b.job_id.cmp(&a.job_id))
        });
        jobs
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.shared.events.subscribe()
    }

    /// Cancels a queued job at once, a running one at its next training step.
    pub fn cancel(&self, id: &str) -> Result<Job, JobError> {
        let mut state = self.shared.state.lock().expect("job state lock");
        let job = state
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        match job.status {
            Status::Queued => {
                state.queue.retain(|q| q != id);
                state.datasets.remove(id);
                drop(state);
                let mut job = job;
                job.status = Status::Cancelled;
                job.finished_at = Some(Utc::now());
                job.error = Some("cancelled before it started".into());
                self.finish(job.clone(), None)?;
                Ok(job)
            }
            // Decided under the state lock, as the commit point is: either the job has not
            // committed and will stop, or it has and the cancel is refused.
            Status::Running if state.publishing.contains(id) => Err(JobError::Conflict(format!(
                "job {id} has finished training and is saving its model: too late to cancel"
            ))),
            Status::Running => {
                if let Some(flag) = state.cancel.get(id) {
                    flag.store(true, Ordering::Relaxed);
                }
                Ok(job)
            }
            status => Err(JobError::Conflict(format!(
                "job {id} already {}: nothing to cancel",
                status.as_str()
            ))),
        }
    }

    /// Forgets a finished job and deletes its uploaded data and pictures (not its model).
    pub fn purge(&self, id: &str) -> Result<Job, JobError> {
        let mut state = self.shared.state.lock().expect("job state lock");
        let job = state
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        if !job.status.is_finished() {
            return Err(JobError::Conflict(format!(
                "job {id} is {}: cancel it first",
                job.status.as_str()
            )));
        }
        self.shared.store.lock().expect("store lock").delete(id)?;
        state.jobs.remove(id);
        drop(state);
        let dir = self.job_dir(id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        self.update_gauges();
        Ok(job)
    }

    /// The thumbnail of example `n` of a succeeded job.
    pub fn example_path(&self, id: &str, n: usize) -> Option<PathBuf> {
        // Only ids we issued become paths: a crafted one (`..`) must not reach other folders.
        self.get(id)?;
        let path = self.job_dir(id).join("examples").join(format!("{n}.png"));
        path.is_file().then_some(path)
    }

    /// Stops for good: queued jobs stay queued (they run at the next start); a running one is
    /// stopped and marked failed, so that nothing is left half done.
    pub fn shutdown(&self) {
        let mut state = self.shared.state.lock().expect("job state lock");
        state.shutting_down = true;
        for flag in state.cancel.values() {
            flag.store(true, Ordering::Relaxed);
        }
        drop(state);
        self.shared.wake.notify_all();
        let _ = self.shared.events.send(JobEvent::Shutdown);
    }

    /// Blocks until no job is running (after [`JobManager::shutdown`], until the running one
    /// has recorded that it stopped).
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let running = {
                let state = self.shared.state.lock().expect("job state lock");
                !state.cancel.is_empty()
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

    fn store(&self, job: &Job) -> Result<(), JobError> {
        self.shared.store.lock().expect("store lock").put(job)?;
        Ok(())
    }

    fn update_gauges(&self) {
        let state = self.shared.state.lock().expect("job state lock");
        for status in Status::ALL {
            let n = state.jobs.values().filter(|j| j.status == status).count();
            self.shared
                .metrics
                .jobs
                .get_or_create(&JobLabels {
                    status: status.as_str().to_string(),
                })
                .set(n as i64);
        }
    }

    /// Records a finished job, publishes its model, and tells subscribers. The store's row is the
    /// commit point: a crash before it leaves a failed job and no model (the staged files are
    /// removed at the next start), a crash after it a succeeded job whose staged files the next
    /// start moves into place.
    fn finish(&self, job: Job, staged: Option<Classifier>) -> Result<(), JobError> {
        self.store(&job)?;
        if let Some(classifier) = staged {
            crate::crash::point("committed");
            self.publish(&job.job_id, classifier)?;
        }
        {
            let mut state = self.shared.state.lock().expect("job state lock");
            state.jobs.insert(job.job_id.clone(), job.clone());
        }
        self.update_gauges();
        let _ = self
            .shared
            .events
            .send(JobEvent::Done { job: Box::new(job) });
        Ok(())
    }

    /// A training thread: takes queued jobs one at a time until shutdown.
    fn work(&self) {
        loop {
            let next = {
                let mut state = self.shared.state.lock().expect("job state lock");
                loop {
                    if state.shutting_down {
                        return;
                    }
                    if let Some(id) = state.queue.pop_front() {
                        let dataset = state.datasets.remove(&id);
                        let flag = Arc::new(AtomicBool::new(false));
                        state.cancel.insert(id.clone(), flag.clone());
                        break (id, dataset, flag);
                    }
                    state = self.shared.wake.wait(state).expect("job state lock");
                }
            };
            let (id, dataset, cancel) = next;
            if let Err(e) = self.run(&id, dataset, &cancel) {
                tracing::error!(job = %id, error = %e, "could not record the job's state");
            }
            let mut state = self.shared.state.lock().expect("job state lock");
            state.cancel.remove(&id);
            state.publishing.remove(&id);
        }
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
    }

    /// The commit point of a job: from here its model is saved and published, and a cancel is
    /// answered 409; before it, a cancel stops the job with nothing published.
    fn commit(&self, id: &str, cancel: &AtomicBool) -> Result<(), TrainError> {
        self.checkpoint(Checkpoint::BeforeCommit);
        {
            let mut state = self.shared.state.lock().expect("job state lock");
            if cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            state.publishing.insert(id.to_string());
        }
        self.checkpoint(Checkpoint::AfterCommit);
        Ok(())
    }

    fn run(&self, id: &str, dataset: Option<Dataset>, cancel: &AtomicBool) -> Result<(), JobError> {
        let Some(mut job) = self.get(id) else {
            return Ok(());
        };
        job.status = Status::Running;
        job.started_at = Some(Utc::now());
        let reading = Progress::phase(Phase::Reading, job.params.epochs);
        self.set_progress(&mut job, reading, true)?;
        self.update_gauges();
        tracing::info!(job = %id, name = %job.name, base = %job.base_model, "training started");

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
            let _ = std::fs::remove_dir_all(self.staging_dir(id));
            // Final figures: where it stopped, nothing left to wait for.
            job.progress = job.progress.take().map(|p| Progress { eta_s: 0.0, ..p });
        }
        self.finish(job, staged)
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
            None => train::dataset::load(
                &self.dataset_path(&id),
                &self.shared.config.dataset_limits,
                IMAGE_SIZE,
            )?,
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
                    write_error.get_or_insert(e);
                }
            };
            let network = base.network().clone();
            let arch = base.arch;
            self.shared
                .pool
                .install(|| train::fit(&network, arch, &dataset, &params, &mut on_event, cancel))?
        };
        if let Some(e) = write_error {
            return Err(TrainError::Io(std::io::Error::other(e.to_string())));
        }
        self.commit(&id, cancel)?;
        let saving = trained.progress.moved_to(Phase::Saving);
        self.set_progress(job, saving, true)
            .map_err(|e| TrainError::Io(std::io::Error::other(e.to_string())))?;
        // Staged in the job's folder and loaded from there (a model that does not load is a
        // failed job); moved into the weights dir only once the job is recorded as succeeded.
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
        let classifier = Classifier::fine_tuned(saved.meta, &saved.weights, &base)?;
        if let Err(err) =
            write_thumbnails(&self.job_dir(&id), &trained.evaluation.examples, &dataset)
        {
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
            if let Some(j) = state.jobs.get_mut(&job.job_id) {
                *j = job.clone();
            }
        }
        let stored = if persist { self.store(job) } else { Ok(()) };
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

    /// Where a finished job's model files wait for the job to be recorded as succeeded.
    fn staging_dir(&self, id: &str) -> PathBuf {
        self.job_dir(id).join("model")
    }

    /// Moves a succeeded job's staged files into the weights dir (weights first, metadata last:
    /// a fine-tuned model exists once its `.json` does) and serves the model.
    fn publish(&self, id: &str, mut classifier: Classifier) -> std::io::Result<()> {
        let dir = &self.shared.config.dir;
        let moved = move_staged(&self.staging_dir(id), dir, &classifier.name)?;
        classifier.file = moved;
        self.shared.engine.insert(classifier);
        let _ = std::fs::remove_dir(self.staging_dir(id));
        crate::crash::point("published");
        Ok(())
    }
}

/// Why `name` cannot be used for a new job's model.
pub fn name_taken_message(name: &str) -> String {
    format!("a model or an unfinished job is already called `{name}`: choose another name")
}

/// Small PNGs of the gallery pictures, as the model saw them (after the resize).
fn write_thumbnails(job_dir: &Path, examples: &[Example], data: &Dataset) -> std::io::Result<()> {
    let dir = job_dir.join("examples");
    std::fs::create_dir_all(&dir)?;
    let by_file: HashMap<&str, &image::RgbImage> = data
        .train
        .iter()
        .chain(&data.test)
        .map(|s| (s.file.as_str(), &s.image))
        .collect();
    for (n, example) in examples.iter().enumerate() {
        let Some(image) = by_file.get(example.file.as_str()) else {
            continue;
        };
        let thumb = crate::preprocess::resize_bilinear(image, EXAMPLE_THUMBNAIL, EXAMPLE_THUMBNAIL);
        let mut png = std::io::Cursor::new(Vec::new());
        thumb
            .write_to(&mut png, image::ImageFormat::Png)
            .map_err(std::io::Error::other)?;
        crate::atomic::write(&dir.join(format!("{n}.png")), &png.into_inner())?;
    }
    Ok(())
}

/// Temporary files of writes a crash cut short: never a model, always safe to remove.
/// Moves `<name>.safetensors`, then `<name>.json`, from `staging` into `dir` (each a rename on one
/// file system); a file already moved is skipped. The weights' final path.
fn move_staged(staging: &Path, dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    let weights = dir.join(format!("{name}.safetensors"));
    for (file, step) in [
        (format!("{name}.safetensors"), Some("renamed")),
        (format!("{name}.json"), None),
    ] {
        let from = staging.join(&file);
        if from.exists() {
            std::fs::rename(&from, dir.join(&file))?;
        }
        if let Some(step) = step {
            crate::crash::point(step);
        }
    }
    crate::atomic::sync_dir(dir)?;
    Ok(weights)
}

/// At start, before any model loads: staged models of succeeded jobs are moved into place (the
/// crash came after the commit point), other staged models are removed (before it), and job
/// folders with no job (an upload cut off by a crash) are removed.
fn recover(dir: &Path, jobs: &BTreeMap<String, Job>) {
    let Ok(entries) = std::fs::read_dir(dir.join("jobs")) else {
        return;
    };
    for entry in entries.flatten() {
        let id = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let Some(job) = jobs.get(&id) else {
            if path.is_dir() {
                tracing::info!(job = %id, "removing the upload of a job that was never created");
                let _ = std::fs::remove_dir_all(&path);
            }
            continue;
        };
        let staging = path.join("model");
        if !staging.exists() {
            continue;
        }
        if job.status == Status::Succeeded {
            tracing::info!(job = %id, model = %job.name, "publishing the model of a succeeded job");
            if let Err(e) = move_staged(&staging, dir, &job.name) {
                tracing::error!(job = %id, error = %e, "could not publish the model");
                continue;
            }
        } else {
            tracing::info!(job = %id, "removing the model files of a job that did not succeed");
        }
        let _ = std::fs::remove_dir_all(&staging);
    }
}

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
