//! What `/predict` runs: a network (shared by every model built on it), an optional fine-tuned head,
//! class labels and the preprocessing the model expects, plus where it came from.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::models::{Arch, Head, Network};
use crate::preprocess::Transform;
use crate::weights::finetuned::{load_head, FineTunedMeta};
use crate::weights::{self, WeightsError};

/// The 1000 ImageNet class names of torchvision's pretrained weights, in index order.
pub const IMAGENET_LABELS: &str = include_str!("imagenet_classes.txt");

pub fn imagenet_labels() -> Vec<String> {
    IMAGENET_LABELS.lines().map(str::to_string).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Pretrained,
    FineTuned,
}

/// A servable model.
#[derive(Debug)]
pub struct Classifier {
    pub name: String,
    pub arch: Arch,
    pub kind: ModelKind,
    pub labels: Vec<String>,
    pub transform: Transform,
    pub file: PathBuf,
    pub sha256: String,
    /// For pretrained weights: what fine-tuned heads find them by.
    pub identity: Option<weights::WeightsIdentity>,
    pub loaded_at: DateTime<Utc>,
    /// For a fine-tuned model: its metadata (base model, params, metrics).
    pub meta: Option<FineTunedMeta>,
    network: Arc<Network>,
    head: Option<Head>,
}

impl Classifier {
    /// A torchvision checkpoint: ImageNet labels when it has 1000 classes, `class_N` otherwise.
    pub fn pretrained(
        name: &str,
        arch: Arch,
        file: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, WeightsError> {
        // Hashing reads the file a second time: let it run beside the load, not after it.
        let (loaded, sha256) = std::thread::scope(|s| {
            let hash = s.spawn(|| sha256_file(file));
            let loaded = weights::load_network_as(arch, file, device, dtype);
            let sha256 = hash.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            (loaded, sha256)
        });
        let (network, sha256) = (loaded?, sha256?);
        let identity = weights::WeightsIdentity::new(arch, file, sha256.clone());
        warm_up(&network)?;
        let labels = if network.num_classes() == 1000 {
            imagenet_labels()
        } else {
            (0..network.num_classes())
                .map(|i| format!("class_{i}"))
                .collect()
        };
        Ok(Self {
            name: name.to_string(),
            arch,
            kind: ModelKind::Pretrained,
            labels,
            transform: Transform::Imagenet,
            file: file.to_path_buf(),
            sha256,
            identity: Some(identity),
            loaded_at: Utc::now(),
            meta: None,
            network: Arc::new(network),
            head: None,
        })
    }

    /// A fine-tuned head file put on `base`'s network, which is shared, not copied.
    pub fn fine_tuned(
        meta: FineTunedMeta,
        file: &Path,
        base: &Classifier,
    ) -> Result<Self, WeightsError> {
        if !base.is_base_of(&meta) {
            return Err(WeightsError::Format {
                path: file.to_path_buf(),
                reason: format!(
                    "head was trained on {} ({}), not on {} ({})",
                    meta.base_model,
                    short(&meta.base_sha256),
                    base.name,
                    short(&base.sha256)
                ),
            });
        }
        // The head goes where its base network is.
        let head = load_head(&meta, file, base.device())?;
        Ok(Self {
            name: meta.name.clone(),
            arch: meta.arch,
            kind: ModelKind::FineTuned,
            labels: meta.classes.clone(),
            transform: meta.transform,
            file: file.to_path_buf(),
            sha256: sha256_file(file)?,
            identity: None,
            loaded_at: Utc::now(),
            meta: Some(meta),
            network: base.network.clone(),
            head: Some(head),
        })
    }

    /// Whether this is the pretrained model `meta`'s head was trained on.
    pub fn is_base_of(&self, meta: &FineTunedMeta) -> bool {
        self.identity
            .as_ref()
            .is_some_and(|id| meta.is_trained_on(self.arch, id))
    }

    /// Eval-mode logits for a normalized batch.
    pub fn logits(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match &self.head {
            None => self.network.forward(xs),
            Some(head) => head.forward_t(&head.frozen_input(&self.network, xs)?, false),
        }
    }

    pub fn num_classes(&self) -> usize {
        self.labels.len()
    }

    pub fn network(&self) -> &Arc<Network> {
        &self.network
    }

    /// Where this model runs: its network's device. Inputs are prepared there.
    pub fn device(&self) -> &Device {
        self.network.device()
    }
}

/// On a GPU, one forward pass before the model is served: the first one on a fresh machine waits
/// seconds for the driver to compile candle's kernels, and that wait belongs to loading, not to the
/// first request. The CPU needs none.
fn warm_up(network: &Network) -> Result<(), WeightsError> {
    let device = network.device();
    if device.is_cpu() {
        return Ok(());
    }
    let xs = Tensor::zeros((1, 3, 224, 224), candle_core::DType::F32, device)?;
    network
        .forward(&xs)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?;
    Ok(())
}

pub use crate::weights::sha256_file;

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// Opens one model file: a fine-tuned head (a `<name>.json` beside it) is put on its base model,
/// found in the same folder by sha256; any other file is torchvision weights of `arch`.
pub fn open(
    file: &Path,
    arch: Option<Arch>,
    device: &Device,
    dtype: DType,
) -> Result<Classifier, WeightsError> {
    let meta_path = file.with_extension("json");
    if !meta_path.is_file() {
        let name = weights::pth::model_name_from_file(file);
        let arch = match arch {
            Some(arch) => arch,
            None => name
                .parse()
                .map_err(|e: crate::models::UnknownArch| WeightsError::Format {
                    path: file.to_path_buf(),
                    reason: format!("{e}: say which with --model"),
                })?,
        };
        return Classifier::pretrained(&name, arch, file, device, dtype);
    }
    let meta = FineTunedMeta::read(&meta_path)?;
    if let Some(arch) = arch.filter(|a| *a != meta.arch) {
        return Err(WeightsError::Format {
            path: file.to_path_buf(),
            reason: format!("a fine-tuned {} head, not {arch}", meta.arch),
        });
    }
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let scan = super::scan(dir).map_err(|source| WeightsError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for (name, base_arch, base_file) in scan.pretrained {
        if base_arch != meta.arch {
            continue;
        }
        let base = Classifier::pretrained(&name, base_arch, &base_file, device, dtype)?;
        if base.is_base_of(&meta) {
            return Classifier::fine_tuned(meta, file, &base);
        }
    }
    Err(WeightsError::Format {
        path: file.to_path_buf(),
        reason: format!(
            "its base model {} (sha256 {}) is not in {}: put the weights it was trained on there",
            meta.base_model,
            short(&meta.base_sha256),
            dir.display()
        ),
    })
}
