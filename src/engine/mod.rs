//! Inference: the registry of servable models and the batching workers behind them.
//!
//! [`Engine`] is a cheap `Clone` handle. Every model name has one worker thread that owns the
//! queue for that name; requests decode and preprocess on the blocking pool, then wait on a
//! oneshot for their row of the batch. A semaphore bounds the requests in flight: one more is
//! refused at once ([`EngineError::Overloaded`]) rather than queued without end.

pub mod classifier;
mod worker;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use serde::Serialize;
use tokio::sync::{oneshot, Semaphore};

pub use crate::weights::finetuned::FineTunedMeta;
pub use classifier::{Classifier, ModelKind};

use crate::metrics::Metrics;
use crate::models::Arch;
use crate::preprocess::{self, ImageError};
use crate::weights::{self, WeightsError};

/// Default of `--max-inflight-pixels`: 200 megapixels, ~700 MB of decoding.
pub const DEFAULT_PIXEL_BUDGET: u64 = 200_000_000;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    pub max_concurrent_requests: usize,
    pub max_pixels: u64,
    /// Pixels decoded at once over all requests in flight (≥ `max_pixels`).
    pub pixel_budget: u64,
    /// Where models are loaded, and the dtype their networks run in (`--dtype`).
    pub device: Device,
    pub dtype: DType,
}

impl EngineConfig {
    /// The default limits, with models loaded onto `device` (there is no default device: it comes
    /// from the command line).
    pub fn on(device: Device) -> Self {
        Self {
            max_batch_size: 16,
            max_batch_delay: Duration::from_millis(5),
            max_concurrent_requests: 64,
            max_pixels: preprocess::DEFAULT_MAX_PIXELS,
            pixel_budget: DEFAULT_PIXEL_BUDGET,
            device,
            dtype: DType::F32,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown model `{name}`; known models: {}", .known.join(", "))]
    UnknownModel { name: String, known: Vec<String> },
    #[error("too many requests: {limit} are already in flight; retry shortly")]
    Overloaded { limit: usize },
    #[error("too many pixels being decoded: this request's {pixels} would go over the {budget}-pixel budget (--max-inflight-pixels); retry shortly")]
    PixelBudget { pixels: u64, budget: u64 },
    #[error("no image in the request")]
    NoImage,
    /// A prepared input batch the model cannot take (its shape, or its size against its data).
    #[error("{0}")]
    BadTensor(String),
    #[error("the input's {height}x{width} pixels are more than --max-pixels ({max})")]
    TensorTooLarge {
        height: usize,
        width: usize,
        max: u64,
    },
    #[error("image {index}: {source}")]
    Image {
        index: usize,
        #[source]
        source: ImageError,
    },
    #[error("model `{0}` is pretrained; only fine-tuned models can be deleted (remove its file and reload instead)")]
    NotDeletable(String),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("the device ran out of memory for this batch ({0}); retry shortly, or send fewer or smaller images")]
    OutOfMemory(String),
    #[error("model `{0}` is still loading; retry in a few seconds")]
    Loading(String),
    #[error("model `{0}` failed on this request's batch; retry")]
    WorkerFailed(String),
    #[error("model `{name}` could not be loaded: {error}")]
    LoadFailed { name: String, error: String },
}

/// Where a model found in the weights dir stands: `loading` until it is served (`ready`) or its
/// load failed (`failed`, with the reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelState {
    Loading,
    Ready,
    Failed(String),
}

impl ModelState {
    pub fn name(&self) -> &'static str {
        match self {
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Failed(_) => "failed",
        }
    }

    pub fn error(&self) -> Option<&str> {
        match self {
            ModelState::Failed(e) => Some(e),
            _ => None,
        }
    }
}

/// A model found in the weights dir that is not served: loading, or failed to load.
#[derive(Debug, Clone)]
pub struct Pending {
    pub name: String,
    pub arch: Option<Arch>,
    /// `None` while loading; the reason once the load failed.
    pub error: Option<String>,
}

impl Pending {
    /// `loading`, or `failed` with the reason.
    pub fn state(&self) -> ModelState {
        match &self.error {
            None => ModelState::Loading,
            Some(e) => ModelState::Failed(e.clone()),
        }
    }
}

impl EngineError {
    /// A forward pass's failure, told apart when the device ran out of memory: that one passes.
    pub fn from_forward(message: String) -> Self {
        let lower = message.to_ascii_lowercase();
        if lower.contains("out_of_memory") || lower.contains("out of memory") {
            EngineError::OutOfMemory(message)
        } else {
            EngineError::Inference(message)
        }
    }
}

/// One class of a prediction.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Prediction {
    pub index: usize,
    pub label: String,
    pub probability: f32,
}

/// The `k` most probable classes, most probable first; `k = 0` or `k ≥ classes` gives all.
pub fn top_k(probabilities: &[f32], labels: &[String], k: usize) -> Vec<Prediction> {
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_by(|&a, &b| {
        probabilities[b]
            .total_cmp(&probabilities[a])
            .then(a.cmp(&b))
    });
    let k = if k == 0 {
        order.len()
    } else {
        k.min(order.len())
    };
    order
        .into_iter()
        .take(k)
        .map(|index| Prediction {
            index,
            label: labels
                .get(index)
                .cloned()
                .unwrap_or_else(|| index.to_string()),
            probability: probabilities[index],
        })
        .collect()
}

/// Logits and softmax rows for every image of a request, with the model that produced them.
pub struct Predicted {
    pub classifier: Arc<Classifier>,
    pub logits: Vec<Vec<f32>>,
    pub probabilities: Vec<Vec<f32>>,
    /// The longest wait and forward pass among the request's images.
    pub queue_time: Duration,
    pub inference_time: Duration,
}

/// What one request asks a model to classify.
enum Inputs {
    /// Encoded images, decoded and preprocessed here.
    Images(Vec<bytes::Bytes>),
    /// `[N, 3, H, W]`, row-major, already preprocessed.
    Tensor { data: Vec<f32>, shape: [usize; 4] },
}

impl Inputs {
    /// The pixels this request is charged at admission, once its inputs are known to be ones
    /// `classifier` can take.
    fn pixels(&self, classifier: &Classifier, max_pixels: u64) -> Result<u64, EngineError> {
        match self {
            Inputs::Images(images) => {
                if images.is_empty() {
                    return Err(EngineError::NoImage);
                }
                Ok(images
                    .iter()
                    .map(|b| {
                        preprocess::declared_pixels(b).map_or(max_pixels, |p| p.min(max_pixels))
                    })
                    .sum())
            }
            Inputs::Tensor { data, shape } => {
                let [n, channels, height, width] = *shape;
                if n == 0 {
                    return Err(EngineError::NoImage);
                }
                if channels != 3 {
                    return Err(EngineError::BadTensor(format!(
                        "an input batch is [N, 3, H, W]: this one has {channels} channels, not 3"
                    )));
                }
                let min = match classifier.arch {
                    Arch::Googlenet => crate::models::googlenet::MIN_INPUT_SIDE,
                    _ => crate::models::vgg::MIN_INPUT_SIDE,
                };
                if height < min || width < min {
                    return Err(EngineError::BadTensor(format!(
                        "the input's {height}x{width} pixels are too few: model `{}` needs at \
                         least {min}x{min}",
                        classifier.name
                    )));
                }
                let pixels = (height as u64).saturating_mul(width as u64);
                if pixels > max_pixels {
                    return Err(EngineError::TensorTooLarge {
                        height,
                        width,
                        max: max_pixels,
                    });
                }
                let expected = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                if expected != Some(data.len()) {
                    return Err(EngineError::BadTensor(format!(
                        "the input has {} values, but its shape {shape:?} holds {}",
                        data.len(),
                        expected.map_or("more than can be counted".to_string(), |e| e.to_string())
                    )));
                }
                Ok(pixels.saturating_mul(n as u64))
            }
        }
    }
}

struct Slot {
    classifier: Arc<Classifier>,
    queue: mpsc::Sender<worker::Job>,
    shared: Arc<worker::Shared>,
}

pub use worker::Hold;

struct Inner {
    config: EngineConfig,
    models: RwLock<BTreeMap<String, Slot>>,
    /// Models found but not served (yet): one home for `loading` and `failed`. A name leaves it
    /// when its model is inserted, or when its file is gone.
    pending: RwLock<BTreeMap<String, Pending>>,
    permits: Arc<Semaphore>,
    /// One permit per pixel being decoded (see [`EngineConfig::pixel_budget`]).
    pixels: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    pub fn new(config: EngineConfig, metrics: Arc<Metrics>) -> Self {
        let permits = Arc::new(Semaphore::new(config.max_concurrent_requests));
        let budget = config.pixel_budget.max(config.max_pixels);
        let pixels = Arc::new(Semaphore::new(
            usize::try_from(budget.min(u64::from(u32::MAX)))
                .unwrap_or(usize::MAX)
                .min(Semaphore::MAX_PERMITS),
        ));
        Self {
            inner: Arc::new(Inner {
                config,
                models: RwLock::new(BTreeMap::new()),
                pending: RwLock::new(BTreeMap::new()),
                permits,
                pixels,
                metrics,
            }),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Adds a model, or swaps it in for the one of the same name. Images already admitted finish
    /// on the model they were admitted with; later ones use the new one.
    pub fn insert(&self, classifier: Classifier) -> Arc<Classifier> {
        let classifier = Arc::new(classifier);
        let mut models = self.inner.models.write().expect("model registry lock");
        self.inner
            .pending
            .write()
            .expect("pending models lock")
            .remove(&classifier.name);
        match models.get_mut(&classifier.name) {
            Some(slot) => slot.classifier = classifier.clone(),
            None => {
                let (queue, jobs) = mpsc::channel();
                let policy = worker::BatchPolicy {
                    max_batch_size: self.inner.config.max_batch_size.max(1),
                    max_batch_delay: self.inner.config.max_batch_delay,
                };
                let metrics = self.inner.metrics.clone();
                let name = classifier.name.clone();
                let shared = Arc::new(worker::Shared::default());
                let worker_shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("model-{name}"))
                    .spawn(move || worker::run(name, jobs, policy, worker_shared, metrics))
                    .expect("spawning a model worker thread");
                models.insert(
                    classifier.name.clone(),
                    Slot {
                        classifier: classifier.clone(),
                        queue,
                        shared,
                    },
                );
            }
        }
        tracing::info!(model = %classifier.name, arch = %classifier.arch, classes = classifier.num_classes(), "model ready");
        classifier
    }

    /// Takes a model out of service; its worker finishes what is queued, then stops.
    pub fn remove(&self, name: &str) -> Option<Arc<Classifier>> {
        let mut models = self.inner.models.write().expect("model registry lock");
        models.remove(name).map(|slot| slot.classifier)
    }

    /// Holds model `name`'s worker before its next batch until the guard is dropped: images
    /// queue up meanwhile. A test aid, for seeing requests wait without relying on timing.
    pub fn hold(&self, name: &str) -> Option<Hold> {
        let models = self.inner.models.read().expect("model registry lock");
        models.get(name).map(|slot| slot.shared.hold())
    }

    pub fn get(&self, name: &str) -> Option<Arc<Classifier>> {
        let models = self.inner.models.read().expect("model registry lock");
        models.get(name).map(|slot| slot.classifier.clone())
    }

    pub fn models(&self) -> Vec<Arc<Classifier>> {
        let models = self.inner.models.read().expect("model registry lock");
        models
            .values()
            .map(|slot| slot.classifier.clone())
            .collect()
    }

    /// The names of the pretrained models served (the bases a job can train on).
    pub fn pretrained_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .models()
            .iter()
            .filter(|c| c.kind == ModelKind::Pretrained)
            .map(|c| c.name.clone())
            .collect();
        names.sort();
        names
    }

    /// Marks models about to be loaded as `loading` (those not served already), so that readiness
    /// and requests see them from the first moment, before their loads start.
    pub fn expect(&self, models: impl IntoIterator<Item = (String, Option<Arch>)>) {
        let served = self.inner.models.read().expect("model registry lock");
        let mut pending = self.inner.pending.write().expect("pending models lock");
        for (name, arch) in models {
            if !served.contains_key(&name) {
                let error = None;
                pending.insert(name.clone(), Pending { name, arch, error });
            }
        }
    }

    /// Records that model `name` could not be made ready (a load or a download failed).
    pub fn mark_failed(&self, name: &str, arch: Option<Arch>, error: String) {
        let name = name.to_string();
        let error = Some(error);
        self.inner
            .pending
            .write()
            .expect("pending models lock")
            .insert(name.clone(), Pending { name, arch, error });
    }

    /// Models found but not served: loading, or failed.
    pub fn pending(&self) -> Vec<Pending> {
        let pending = self.inner.pending.read().expect("pending models lock");
        pending.values().cloned().collect()
    }

    /// The state of model `name`, if the engine knows of it.
    pub fn state(&self, name: &str) -> Option<ModelState> {
        if self.get(name).is_some() {
            return Some(ModelState::Ready);
        }
        let pending = self.inner.pending.read().expect("pending models lock");
        pending.get(name).map(Pending::state)
    }

    /// Every known model's state, by name: served ones `ready`, the others `loading` or `failed`.
    pub fn states(&self) -> BTreeMap<String, ModelState> {
        let mut states: BTreeMap<String, ModelState> = self
            .model_names()
            .into_iter()
            .map(|n| (n, ModelState::Ready))
            .collect();
        for p in self.pending() {
            let state = p.state();
            states.entry(p.name).or_insert(state);
        }
        states
    }

    pub fn model_names(&self) -> Vec<String> {
        let models = self.inner.models.read().expect("model registry lock");
        models.keys().cloned().collect()
    }

    /// Why model `name` cannot answer: still loading, failed to load, or unknown.
    pub fn unknown(&self, name: &str) -> EngineError {
        match self.state(name) {
            Some(ModelState::Loading) => EngineError::Loading(name.to_string()),
            Some(ModelState::Failed(error)) => EngineError::LoadFailed {
                name: name.to_string(),
                error,
            },
            _ => EngineError::UnknownModel {
                name: name.to_string(),
                known: self.model_names(),
            },
        }
    }

    /// Decodes, preprocesses and classifies `images` with model `name`.
    pub async fn predict(
        &self,
        name: &str,
        images: Vec<bytes::Bytes>,
    ) -> Result<Predicted, EngineError> {
        self.run(name, Inputs::Images(images)).await
    }

    /// Classifies a batch already preprocessed: `data` is `[N, 3, H, W]` in row-major order,
    /// normalized as the model expects (`shape` says N, 3, H and W). Its images go through the
    /// same admission, queue and batches as [`Engine::predict`]'s.
    pub async fn predict_tensor(
        &self,
        name: &str,
        data: Vec<f32>,
        shape: [usize; 4],
    ) -> Result<Predicted, EngineError> {
        self.run(name, Inputs::Tensor { data, shape }).await
    }

    async fn run(&self, name: &str, inputs: Inputs) -> Result<Predicted, EngineError> {
        let _permit = self
            .inner
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| EngineError::Overloaded {
                limit: self.inner.config.max_concurrent_requests,
            })?;
        let (classifier, queue, incoming) = {
            let models = self.inner.models.read().expect("model registry lock");
            let slot = models.get(name).ok_or_else(|| self.unknown(name))?;
            (
                slot.classifier.clone(),
                slot.queue.clone(),
                slot.shared.incoming(),
            )
        };
        let max_pixels = self.inner.config.max_pixels;
        let pixels = inputs.pixels(&classifier, max_pixels)?;
        // Admission by pixels (of image headers, or of the tensor): held until this request is
        // answered, so that decoding never holds more than the budget across requests. One
        // request alone always fits (its charge is capped at the budget).
        let budget = self.inner.config.pixel_budget.max(max_pixels);
        let charge = u32::try_from(pixels.min(budget)).unwrap_or(u32::MAX);
        let _pixels = self
            .inner
            .pixels
            .clone()
            .try_acquire_many_owned(charge)
            .map_err(|_| EngineError::PixelBudget { pixels, budget })?;
        let transform = classifier.transform;
        let device = classifier.device().clone();
        let inputs = tokio::task::spawn_blocking(move || match inputs {
            Inputs::Images(images) => images
                .iter()
                .enumerate()
                .map(|(index, bytes)| {
                    let image = preprocess::decode_rgb(bytes, max_pixels)
                        .map_err(|source| EngineError::Image { index, source })?;
                    transform
                        .apply(&image, &device)
                        .map_err(|e| EngineError::Inference(crate::models::error_message(&e)))
                })
                .collect::<Result<Vec<_>, _>>(),
            Inputs::Tensor { data, shape } => {
                let rows = || -> candle_core::Result<Vec<candle_core::Tensor>> {
                    let xs = candle_core::Tensor::from_vec(data, shape.to_vec(), &device)?;
                    (0..shape[0]).map(|i| xs.get(i)).collect()
                };
                rows().map_err(|e| EngineError::Inference(crate::models::error_message(&e)))
            }
        })
        .await
        .map_err(|e| EngineError::Inference(format!("preprocessing task failed: {e}")))??;

        let label = Metrics::model(name);
        let mut replies = Vec::with_capacity(inputs.len());
        for input in inputs {
            let (reply, answer) = oneshot::channel();
            let job = worker::Job {
                classifier: classifier.clone(),
                input,
                enqueued: Instant::now(),
                reply,
            };
            self.inner.metrics.queue_depth.get_or_create(&label).inc();
            if queue.send(job).is_err() {
                self.inner.metrics.queue_depth.get_or_create(&label).dec();
                return Err(self.unknown(name));
            }
            replies.push(answer);
        }
        drop(incoming);
        let mut logits = Vec::with_capacity(replies.len());
        let mut probabilities = Vec::with_capacity(replies.len());
        let (mut queue_time, mut inference_time) = (Duration::ZERO, Duration::ZERO);
        for answer in replies {
            let scored = answer
                .await
                .map_err(|_| EngineError::WorkerFailed(name.to_string()))?
                .map_err(EngineError::from_forward)?;
            queue_time = queue_time.max(scored.queue_time);
            inference_time = inference_time.max(scored.inference_time);
            logits.push(scored.logits);
            probabilities.push(scored.probabilities);
        }
        Ok(Predicted {
            classifier,
            logits,
            probabilities,
            queue_time,
            inference_time,
        })
    }

    /// Deletes a fine-tuned model: out of service first, then its files.
    pub fn delete(&self, name: &str) -> Result<Arc<Classifier>, EngineError> {
        let classifier = self.get(name).ok_or_else(|| self.unknown(name))?;
        if classifier.kind != ModelKind::FineTuned {
            return Err(EngineError::NotDeletable(name.to_string()));
        }
        self.remove(name);
        for path in [
            classifier.file.clone(),
            classifier.file.with_extension("json"),
        ] {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "could not remove model file");
            }
        }
        Ok(classifier)
    }

    /// Brings the served models in line with `dir`: new and changed files are loaded, models whose
    /// file is gone are removed, unchanged ones are kept as they are. Blocking: seconds per model.
    pub fn reload(&self, dir: &Path) -> ReloadReport {
        let mut report = ReloadReport::default();
        let found = match scan(dir) {
            Ok(found) => found,
            Err(e) => {
                report.failed.push((dir.to_path_buf(), e.to_string()));
                return report;
            }
        };
        report.skipped = found.skipped;
        // Served models stay `ready` while a changed file reloads; `expect` skips them.
        self.expect(
            found
                .pretrained
                .iter()
                .map(|(name, arch, _)| (name.clone(), Some(*arch)))
                .chain(
                    found
                        .fine_tuned
                        .iter()
                        .map(|(meta, _)| (meta.name.clone(), Some(meta.arch))),
                ),
        );
        let mut wanted: Vec<String> = Vec::new();
        for (name, arch, file) in found.pretrained {
            wanted.push(name.clone());
            if self.is_current(&name, &file) {
                report.unchanged.push(name);
                continue;
            }
            match Classifier::pretrained(
                &name,
                arch,
                &file,
                &self.inner.config.device,
                self.inner.config.dtype,
            ) {
                Ok(c) => {
                    self.insert(c);
                    report.loaded.push(name);
                }
                Err(e) => {
                    if self.get(&name).is_none() {
                        self.mark_failed(&name, Some(arch), e.to_string());
                    }
                    report.failed.push((file, e.to_string()));
                }
            }
        }
        for (meta, file) in found.fine_tuned {
            let name = meta.name.clone();
            wanted.push(name.clone());
            if self.is_current(&name, &file) {
                report.unchanged.push(name);
                continue;
            }
            let base = self.models().into_iter().find(|c| c.is_base_of(&meta));
            let arch = meta.arch;
            let loaded = match base {
                None => Err(format!(
                    "its base model {} (sha256 {}) is not in the weights dir",
                    meta.base_model, meta.base_sha256
                )),
                Some(base) => Classifier::fine_tuned(meta, &file, &base).map_err(|e| e.to_string()),
            };
            match loaded {
                Ok(c) => {
                    self.insert(c);
                    report.loaded.push(name);
                }
                Err(e) => {
                    if self.get(&name).is_none() {
                        self.mark_failed(&name, Some(arch), e.clone());
                    }
                    report.failed.push((file, e));
                }
            }
        }
        // Models from elsewhere (heads fetched from an object store) are not this scan's to drop.
        for model in self.models() {
            let from_dir = model.file.parent() == Some(dir);
            if from_dir && !wanted.contains(&model.name) {
                self.remove(&model.name);
                report.removed.push(model.name.clone());
            }
        }
        self.inner
            .pending
            .write()
            .expect("pending models lock")
            .retain(|name, _| wanted.contains(name));
        for (file, error) in &report.failed {
            tracing::warn!(file = %file.display(), %error, "model not loaded");
        }
        report
    }
}

impl Engine {
    /// Whether model `name` is loaded from `file` and the file has not changed since.
    fn is_current(&self, name: &str, file: &Path) -> bool {
        self.get(name)
            .is_some_and(|c| c.file == file && !changed_since(file, c.loaded_at))
    }
}

fn changed_since(file: &Path, loaded_at: chrono::DateTime<chrono::Utc>) -> bool {
    let modified = std::fs::metadata(file).and_then(|m| m.modified());
    match modified {
        Ok(modified) => chrono::DateTime::<chrono::Utc>::from(modified) > loaded_at,
        Err(_) => true,
    }
}

/// What a reload did, by model name, and the files it could not use.
#[derive(Debug, Default, Serialize)]
pub struct ReloadReport {
    pub loaded: Vec<String>,
    pub unchanged: Vec<String>,
    pub removed: Vec<String>,
    pub failed: Vec<(PathBuf, String)>,
    pub skipped: Vec<(PathBuf, String)>,
}

/// The models a weights dir holds.
#[derive(Debug, Default)]
pub struct Scan {
    pub pretrained: Vec<(String, Arch, PathBuf)>,
    pub fine_tuned: Vec<(FineTunedMeta, PathBuf)>,
    pub skipped: Vec<(PathBuf, String)>,
}

/// Every `<name>.safetensors` / `<name>.pth` in `dir`: fine-tuned when a `<name>.json` sits beside
/// it, else pretrained with the architecture named by the file (torchvision's `-<hash>` suffix
/// dropped). Where both formats exist for one name, safetensors wins.
pub fn scan(dir: &Path) -> std::io::Result<Scan> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("safetensors" | "pth")
            )
        })
        .collect();
    // safetensors sorts after pth: visiting in reverse lets it claim the name first
    files.sort();
    files.reverse();
    let mut out = Scan::default();
    let mut taken = std::collections::HashSet::new();
    for file in files {
        let meta_path = file.with_extension("json");
        if meta_path.is_file() {
            match FineTunedMeta::read(&meta_path) {
                Ok(meta) if taken.insert(meta.name.clone()) => out.fine_tuned.push((meta, file)),
                Ok(meta) => out
                    .skipped
                    .push((file, format!("model `{}` already found", meta.name))),
                Err(e) => out.skipped.push((file, e.to_string())),
            }
            continue;
        }
        let name = weights::pth::model_name_from_file(&file);
        match name.parse::<Arch>() {
            Ok(arch) if taken.insert(name.clone()) => out.pretrained.push((name, arch, file)),
            Ok(_) => out
                .skipped
                .push((file, format!("model `{name}` already found"))),
            Err(_) => out.skipped.push((
                file,
                format!(
                    "`{name}` is not an architecture name: name pretrained files after theirs \
                     (vgg11_bn.safetensors, googlenet-1378be20.pth, …)"
                ),
            )),
        }
    }
    for (file, why) in &out.skipped {
        tracing::warn!(file = %file.display(), reason = %why, "skipped");
    }
    out.pretrained.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
