//! The files of a fine-tuned model: `<name>.safetensors` holds the trained layers under
//! torchvision's names (`fc.*` or `classifier.{0,3,6}.*`), `<name>.json` says what they sit on.

use std::path::Path;

use candle_core::Device;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::WeightsError;
use crate::models::{Arch, Head, TrainLayers};
use crate::preprocess::Transform;

/// The JSON file written beside a fine-tuned head (`<name>.json` next to `<name>.safetensors`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FineTunedMeta {
    /// Always [`FineTunedMeta::FORMAT`]; lets a reader refuse files it does not understand.
    pub format: String,
    pub name: String,
    pub arch: Arch,
    /// Name of the pretrained model the head was trained on.
    pub base_model: String,
    /// sha256 of the pretrained weights file, so a head is never put on another backbone.
    pub base_sha256: String,
    /// sha256 of the base's tensors ([`super::tensors_sha256`]): survives a conversion of the
    /// base to another format. Absent in heads from before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_tensors_sha256: Option<String>,
    pub train_layers: TrainLayers,
    pub classes: Vec<String>,
    pub transform: Transform,
    pub created_at: DateTime<Utc>,
    /// Training parameters and evaluation, as the trainer reports them.
    #[serde(default)]
    pub params: serde_json::Value,
    #[serde(default)]
    pub metrics: serde_json::Value,
}

impl FineTunedMeta {
    pub const FORMAT: &'static str = "cnnserve-finetuned/1";

    /// Whether pretrained `arch` weights known as `base` are the ones this head was trained on:
    /// the same tensors, or (heads that recorded only a file) the same file or the file it was
    /// converted from.
    pub fn is_trained_on(&self, arch: Arch, base: &super::WeightsIdentity) -> bool {
        if arch != self.arch {
            return false;
        }
        if self.base_sha256 == base.file_sha256
            || base.source_sha256.as_deref() == Some(self.base_sha256.as_str())
        {
            return true;
        }
        // Only now the tensors (the base was converted some other way): a read of its file.
        let Some(wanted) = self.base_tensors_sha256.as_deref() else {
            return false;
        };
        match base.tensors_sha256() {
            Ok(digest) => digest == wanted,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a base model's tensors");
                false
            }
        }
    }

    pub fn read(path: &Path) -> Result<Self, WeightsError> {
        let bytes = std::fs::read(path).map_err(|source| WeightsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let meta: Self = serde_json::from_slice(&bytes).map_err(|e| WeightsError::Format {
            path: path.to_path_buf(),
            reason: format!("not fine-tuned model metadata: {e}"),
        })?;
        if meta.format != Self::FORMAT {
            return Err(WeightsError::Format {
                path: path.to_path_buf(),
                reason: format!(
                    "metadata format `{}`, expected `{}`",
                    meta.format,
                    Self::FORMAT
                ),
            });
        }
        Ok(meta)
    }
}

/// Reads a head file, checking each tensor against what `meta` says it must hold.
pub fn load_head(meta: &FineTunedMeta, file: &Path, device: &Device) -> Result<Head, WeightsError> {
    let tensors = super::to_f32(super::read_tensors(file, device)?)?;
    let expected = meta
        .train_layers
        .tensor_shapes(meta.arch, meta.classes.len());
    super::check_tensors(meta.arch, &expected, &tensors)?;
    let vb = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, device);
    Ok(Head::new(
        meta.arch,
        meta.train_layers,
        meta.classes.len(),
        vb,
    )?)
}
