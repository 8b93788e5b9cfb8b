//! A trained head on disk: `<name>.safetensors` and `<name>.json`, each written atomically, the
//! metadata last, so that a model exists for a reader only once both files are whole.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::{Params, TrainError, TrainedHead};
use crate::preprocess::Transform;
use crate::weights::finetuned::FineTunedMeta;

/// The preprocessing a fine-tuned model trains and predicts with: the recipe's `Resize((256,256))`.
pub const TRANSFORM: Transform = Transform::Resize256x256;

/// A model name becomes a file name: letters, digits, `_`, `-` and `.`, not leading with `.`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "model name `{name}` must be 1-100 letters, digits, `_`, `-` or `.`, not starting with `.`"
        ))
    }
}

pub struct Saved {
    pub weights: PathBuf,
    pub metadata: PathBuf,
    pub meta: FineTunedMeta,
}

/// Writes the head and its metadata into `dir` as model `name`.
pub fn save(
    trained: &TrainedHead,
    name: &str,
    base_model: &str,
    base: &crate::weights::WeightsIdentity,
    params: &Params,
    dir: &Path,
) -> Result<Saved, TrainError> {
    check_name(name).map_err(|e| TrainError::InvalidParams(vec![e]))?;
    let weights = dir.join(format!("{name}.safetensors"));
    let metadata = dir.join(format!("{name}.json"));
    crate::weights::save_safetensors(&trained.tensors, &weights)?;
    let meta = FineTunedMeta {
        format: FineTunedMeta::FORMAT.to_string(),
        name: name.to_string(),
        arch: trained.arch,
        base_model: base_model.to_string(),
        base_sha256: base.file_sha256.clone(),
        base_tensors_sha256: Some(base.tensors_sha256()?.to_string()),
        train_layers: trained.train_layers,
        classes: trained.classes.clone(),
        transform: TRANSFORM,
        created_at: chrono::Utc::now(),
        params: serde_json::to_value(params).expect("params serialize"),
        metrics: json!({
            "history": trained.history,
            "best_epoch": trained.best_epoch,
            "evaluation": trained.evaluation,
            "counts": trained.counts,
        }),
    };
    let bytes = serde_json::to_vec_pretty(&meta).expect("metadata serializes");
    crate::atomic::write(&metadata, &bytes)?;
    Ok(Saved {
        weights,
        metadata,
        meta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_file_names() {
        for good in ["pets", "vgg11_bn-ft-1a2b3c4d", "cats.v2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "../etc", "a/b", ".hidden", "sp ace", "ünï"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
