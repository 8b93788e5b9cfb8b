//! torch `.pth` readers.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::WeightsError;

/// Reads every tensor of a torch state_dict file (zip format) onto `device`.
pub fn read_pth(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>, WeightsError> {
    let tensors = candle_core::pickle::read_all(path).map_err(|e| WeightsError::Format {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(device)?)))
        .collect()
}
