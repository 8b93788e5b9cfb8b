//! Weight files → named f32 tensors, with errors that name the tensor at fault.

pub mod pth;

use std::path::PathBuf;

/// Everything that can go wrong between a weights file on disk and a built model.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("missing tensor `{name}` (the model expects shape {expected:?})")]
    Missing { name: String, expected: Vec<usize> },
    #[error("tensor `{name}` has shape {found:?} in the file, the model expects {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("unexpected tensors in the file, not part of the model: {}", .names.join(", "))]
    Unexpected { names: Vec<String> },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
