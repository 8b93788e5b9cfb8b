//! Fine-tuning: a new classifier head on a frozen pretrained network, with the course note's
//! recipe (Resize((256,256)), RandomRotation(5), RandomHorizontalFlip, ImageNet normalization,
//! a 90/10 train/validation split, Adam, cross-entropy, best-validation-loss checkpoint).
//!
//! Knows candle and threads, not HTTP: [`fit`] is a plain function that reports progress through
//! a callback and stops when its cancel flag is raised.

pub mod augment;
pub mod dataset;
pub mod fit;
pub mod output;

use serde::{Deserialize, Serialize};

use crate::models::{Arch, TrainLayers};

pub use dataset::{Dataset, DatasetError, DatasetLimits, Sample};
pub use fit::{fit, EpochMetrics, Evaluation, Event, Progress, TrainedHead};

/// The recipe's knobs, with its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct Params {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Share of each class held out for validation (at least one image per class).
    pub valid_ratio: f64,
    /// RandomRotation(5) and RandomHorizontalFlip(0.5) on training images.
    pub augment: bool,
    /// `head` (the last Linear) or `classifier` (VGG's three Linear layers).
    #[schema(value_type = String, example = "head")]
    pub train_layers: TrainLayers,
    pub seed: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            epochs: 5,
            batch_size: 32,
            learning_rate: 1e-3,
            valid_ratio: 0.1,
            augment: true,
            train_layers: TrainLayers::Head,
            seed: 0,
        }
    }
}

impl Params {
    /// Every value out of range, each in a sentence; empty when all are fine.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(1..=1000).contains(&self.epochs) {
            problems.push(format!(
                "epochs must be between 1 and 1000, not {}",
                self.epochs
            ));
        }
        if !(1..=4096).contains(&self.batch_size) {
            problems.push(format!(
                "batch_size must be between 1 and 4096, not {}",
                self.batch_size
            ));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate <= 10.0) {
            problems.push(format!(
                "learning_rate must be in (0, 10], not {}",
                self.learning_rate
            ));
        }
        if !(self.valid_ratio > 0.0 && self.valid_ratio < 1.0) {
            problems.push(format!(
                "valid_ratio must be between 0 and 1 (exclusive), not {}",
                self.valid_ratio
            ));
        }
        problems
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid parameters: {}", .0.join("; "))]
    InvalidParams(Vec<String>),
    #[error("{arch} cannot train `{layers}`: {reason}")]
    Unsupported {
        arch: Arch,
        layers: &'static str,
        reason: &'static str,
    },
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    #[error("training failed: {0}")]
    Candle(candle_core::Error),
    #[error("cannot write the model: {0}")]
    Io(#[from] std::io::Error),
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Candle(crate::models::without_backtrace(e))
    }
}

impl TrainError {
    pub fn check(arch: Arch, params: &Params) -> Result<(), TrainError> {
        let problems = params.problems();
        if !problems.is_empty() {
            return Err(TrainError::InvalidParams(problems));
        }
        if !params.train_layers.supported_by(arch) {
            return Err(TrainError::Unsupported {
                arch,
                layers: params.train_layers.name(),
                reason: "GoogLeNet has a single `fc` layer: use train_layers=head",
            });
        }
        Ok(())
    }
}
