//! Weight files → named tensors → a checked, built [`Network`].
//!
//! Files are recognised by their first bytes, never by their extension: safetensors (read through a
//! memory map), torch's zip `.pth` and torch's legacy `.pth` (see [`pth`]). Before a model is built,
//! every tensor it asks for is checked against the file, so a wrong file fails with the tensor's
//! name and both shapes instead of a shape error deep inside a convolution.

pub mod fetch;
pub mod finetuned;
pub mod pth;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::models::{Arch, Network, NetworkConfig};

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
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for WeightsError {
    fn from(e: candle_core::Error) -> Self {
        WeightsError::Candle(crate::models::without_backtrace(e))
    }
}

/// How a weights file is serialized, told apart by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Safetensors,
    /// torch ≥ 1.6 `torch.save`: a zip archive.
    PthZip,
    /// torch < 1.6 `torch.save`: consecutive pickles, then raw storages.
    PthLegacy,
}

pub fn sniff(path: &Path) -> Result<FileFormat, WeightsError> {
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 9];
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]).map_err(io)? {
            0 => break,
            n => filled += n,
        }
    }
    let head = &head[..filled];
    if head.starts_with(b"PK\x03\x04") {
        Ok(FileFormat::PthZip)
    } else if head.first() == Some(&0x80) {
        Ok(FileFormat::PthLegacy)
    } else if head.len() == 9 && head[8] == b'{' {
        // safetensors: u64 header length, then a JSON object
        Ok(FileFormat::Safetensors)
    } else {
        Err(WeightsError::Format {
            path: path.to_path_buf(),
            reason: "not a safetensors or torch .pth file".into(),
        })
    }
}

/// Every tensor in the file, in its stored dtype.
pub fn read_tensors(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>, WeightsError> {
    match sniff(path)? {
        FileFormat::Safetensors => {
            let format = |e: candle_core::Error| WeightsError::Format {
                path: path.to_path_buf(),
                reason: crate::models::error_message(&e),
            };
            if device.is_cpu() {
                return read_safetensors_cpu(path, device);
            }
            // SAFETY: the map is read-only and dropped before we return; a file truncated
            // underneath us could fault, as with any mmap-based reader (candle's own included).
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
                .map_err(format)?;
            let mut names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
            names.sort();
            names
                .into_iter()
                .map(|name| {
                    let t = st.load(&name, device).map_err(format)?;
                    Ok((name, t))
                })
                .collect()
        }
        FileFormat::PthZip | FileFormat::PthLegacy => pth::read_pth(path, device),
    }
}

/// A safetensors file's tensors on the CPU. f32 tensors (nearly all of a torchvision file) are
/// copied once into huge-page-backed memory, which saves most of the page faults that a load of
/// hundreds of MB otherwise spends; other dtypes go through candle.
fn read_safetensors_cpu(path: &Path, cpu: &Device) -> Result<Vec<(String, Tensor)>, WeightsError> {
    let format = |reason: String| WeightsError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: read-only and dropped before we return; a file truncated underneath us could
    // fault, as with any mmap-based reader (candle's own included).
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| format(e.to_string()))?;
    let mut views = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    views
        .into_iter()
        .map(|(name, view)| {
            let shape = view.shape().to_vec();
            let tensor = if view.dtype() == safetensors::Dtype::F32 {
                let data = crate::models::cpu::f32_from_le_bytes(view.data());
                Tensor::from_vec(data, shape, cpu)
            } else {
                candle_core::safetensors::Load::load(&view, cpu)
            };
            let tensor = tensor.map_err(|e| format(format!("{name}: {e}")))?;
            Ok((name, tensor))
        })
        .collect()
}

/// Float tensors become f32 (f16/bf16/f64 checkpoints load like f32 ones); integer ones stay.
pub fn to_f32(tensors: Vec<(String, Tensor)>) -> Result<HashMap<String, Tensor>, WeightsError> {
    tensors
        .into_iter()
        .map(|(name, t)| {
            let t = if t.dtype().is_float() {
                t.to_dtype(DType::F32)?
            } else {
                t
            };
            Ok((name, t))
        })
        .collect()
}

/// The number of classes a checkpoint was trained for, read off its last layer.
pub fn num_classes(arch: Arch, tensors: &HashMap<String, Tensor>) -> Result<usize, WeightsError> {
    let key = arch.head_key();
    let t = tensors.get(key).ok_or_else(|| WeightsError::Missing {
        name: key.to_string(),
        expected: vec![1000, arch.embedding_width()],
    })?;
    match t.dims() {
        [classes, _] if *classes > 0 => Ok(*classes),
        dims => Err(WeightsError::Shape {
            name: key.to_string(),
            expected: vec![1000, arch.embedding_width()],
            found: dims.to_vec(),
        }),
    }
}

/// Every tensor name and shape the model built from `cfg` reads, in the order it reads them.
pub fn expected_tensors(
    cfg: &NetworkConfig,
    device: &Device,
) -> Result<Vec<(String, Vec<usize>)>, WeightsError> {
    let recorder = ShapeRecorder::default();
    let seen = recorder.seen.clone();
    let vb = VarBuilder::from_backend(Box::new(recorder), DType::F32, device.clone());
    Network::new(cfg, vb)?;
    let seen = seen.lock().expect("recorder lock").clone();
    Ok(seen)
}

/// Compares a file's tensors with what the model reads: the first missing or mis-shaped one is an
/// error naming it; then any leftover that is not a known unused key is reported together.
pub fn check_tensors(
    arch: Arch,
    expected: &[(String, Vec<usize>)],
    found: &HashMap<String, Tensor>,
) -> Result<(), WeightsError> {
    for (name, shape) in expected {
        match found.get(name) {
            None => {
                return Err(WeightsError::Missing {
                    name: name.clone(),
                    expected: shape.clone(),
                })
            }
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(WeightsError::Shape {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: t.dims().to_vec(),
                })
            }
            Some(_) => {}
        }
    }
    let wanted: std::collections::HashSet<&str> =
        expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<String> = found
        .keys()
        .filter(|k| !wanted.contains(k.as_str()) && !arch.is_ignorable_key(k))
        .cloned()
        .collect();
    if !extra.is_empty() {
        extra.sort();
        return Err(WeightsError::Unexpected { names: extra });
    }
    Ok(())
}

/// Builds the network `cfg` describes from named tensors, checking them first; it runs in `dtype`
/// (batch norms are folded in f32 first).
pub fn build_network(
    arch: Arch,
    cfg: &NetworkConfig,
    tensors: HashMap<String, Tensor>,
    device: &Device,
    dtype: DType,
) -> Result<Network, WeightsError> {
    check_tensors(arch, &expected_tensors(cfg, device)?, &tensors)?;
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    Ok(Network::new(cfg, vb)?)
}

/// Builds torchvision's `arch` in f32 from named tensors; the class count comes from its last layer.
pub fn build_torchvision(
    arch: Arch,
    tensors: HashMap<String, Tensor>,
    device: &Device,
) -> Result<Network, WeightsError> {
    let cfg = arch.config(num_classes(arch, &tensors)?);
    build_network(arch, &cfg, tensors, device, DType::F32)
}

/// Reads a weights file of any supported format and builds torchvision's `arch` from it, in f32.
pub fn load_network(arch: Arch, path: &Path, device: &Device) -> Result<Network, WeightsError> {
    load_network_as(arch, path, device, DType::F32)
}

/// [`load_network`] for a network that runs in `dtype` (`--dtype`).
pub fn load_network_as(
    arch: Arch,
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<Network, WeightsError> {
    let tensors = to_f32(read_tensors(path, device)?)?;
    let cfg = arch.config(num_classes(arch, &tensors)?);
    build_network(arch, &cfg, tensors, device, dtype)
}

/// [`load_network_as`] that also answers the weights' [`tensors_sha256`], computed beside the
/// build.
pub fn load_network_identified(
    arch: Arch,
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(Network, String), WeightsError> {
    let tensors = to_f32(read_tensors(path, device)?)?;
    let cfg = arch.config(num_classes(arch, &tensors)?);
    let expected = expected_tensors(&cfg, device)?;
    check_tensors(arch, &expected, &tensors)?;
    std::thread::scope(|s| {
        let digest = s.spawn(|| tensors_sha256(&expected, &tensors));
        // Tensors are shared handles: the map's clone copies no weights.
        let vb = VarBuilder::from_tensors(tensors.clone(), dtype, device);
        let network = Network::new(&cfg, vb);
        let digest = digest
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        Ok((network?, digest?))
    })
}

/// What identifies a set of weights whatever file holds them: sha256 over the tensors a model
/// reads, sorted by name, each as its name, its shape and its f32 values (little-endian). A
/// `.pth` and the safetensors converted from it have the same one; tensors the model ignores
/// (batch-norm counters, GoogLeNet's auxiliary heads) do not count.
pub fn tensors_sha256(
    expected: &[(String, Vec<usize>)],
    tensors: &HashMap<String, Tensor>,
) -> Result<String, WeightsError> {
    use sha2::Digest;
    let mut names: Vec<&(String, Vec<usize>)> = expected.iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    names.dedup_by(|a, b| a.0 == b.0);
    let mut hasher = sha2::Sha256::new();
    let mut buf = Vec::with_capacity(1 << 16);
    for (name, shape) in names {
        let tensor = tensors.get(name).ok_or_else(|| WeightsError::Missing {
            name: name.clone(),
            expected: shape.clone(),
        })?;
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update((shape.len() as u64).to_le_bytes());
        for &d in shape {
            hasher.update((d as u64).to_le_bytes());
        }
        let flat = tensor.to_dtype(DType::F32)?.flatten_all()?;
        let mut hash_values = |values: &[f32]| {
            for chunk in values.chunks(1 << 14) {
                buf.clear();
                for v in chunk {
                    buf.extend_from_slice(&v.to_le_bytes());
                }
                hasher.update(&buf);
            }
        };
        if flat.device().is_cpu() {
            let (storage, layout) = flat.storage_and_layout();
            if let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
                (&*storage, layout.contiguous_offsets())
            {
                hash_values(&cpu.as_slice::<f32>()?[start..end]);
                continue;
            }
        }
        hash_values(&flat.to_vec1::<f32>()?);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// What pretrained weights are known by when a fine-tuned head looks for the base it was
/// trained on: the file's sha256 at once, the tensors' sha256 when first asked for (it reads the
/// file again: loading a model stays as fast as before, and most heads are found by the file).
#[derive(Debug)]
pub struct WeightsIdentity {
    /// sha256 of the file.
    pub file_sha256: String,
    /// For a converted file: the sha256 of the file it was converted from, so heads recorded
    /// against that file (before heads recorded tensors) still find it.
    pub source_sha256: Option<String>,
    arch: Arch,
    file: PathBuf,
    tensors: std::sync::OnceLock<String>,
}

impl WeightsIdentity {
    /// The identity of `arch` weights in `file`, whose sha256 is known.
    pub fn new(arch: Arch, file: &Path, file_sha256: String) -> Self {
        Self {
            file_sha256,
            source_sha256: source_sha256(file),
            arch,
            file: file.to_path_buf(),
            tensors: std::sync::OnceLock::new(),
        }
    }

    /// [`tensors_sha256`] of these weights: the same for a `.pth` and its safetensors
    /// conversion. Computed once, from the file.
    pub fn tensors_sha256(&self) -> Result<&str, WeightsError> {
        if let Some(known) = self.tensors.get() {
            return Ok(known);
        }
        let tensors = to_f32(read_tensors(&self.file, &Device::Cpu)?)?;
        let cfg = self.arch.config(num_classes(self.arch, &tensors)?);
        let expected = expected_tensors(&cfg, &Device::Cpu)?;
        check_tensors(self.arch, &expected, &tensors)?;
        let digest = tensors_sha256(&expected, &tensors)?;
        Ok(self.tensors.get_or_init(|| digest))
    }

    /// [`WeightsIdentity::tensors_sha256`] if it was computed already.
    pub fn tensors_sha256_if_known(&self) -> Option<&str> {
        self.tensors.get().map(String::as_str)
    }
}

/// Loads `arch` from `path` on `device` in f32 with its identity (what a head trained on it
/// records).
pub fn load_network_with_identity(
    arch: Arch,
    path: &Path,
    device: &Device,
) -> Result<(Network, WeightsIdentity), WeightsError> {
    let (network, tensors) = load_network_identified(arch, path, device, DType::F32)?;
    let identity = WeightsIdentity::new(arch, path, sha256_file(path)?);
    let _ = identity.tensors.set(tensors);
    Ok((network, identity))
}

pub fn sha256_file(path: &Path) -> Result<String, WeightsError> {
    use sha2::Digest;
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = sha2::Sha256::new();
    // Hash through a map of the file: no copy of hundreds of MB through a read buffer.
    // SAFETY: read-only, dropped at return; a file truncated underneath could fault.
    match unsafe { memmap2::Mmap::map(&file) } {
        Ok(map) => hasher.update(&map[..]),
        Err(_) => {
            std::io::copy(&mut file, &mut hasher).map_err(io)?;
        }
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// The metadata key under which a converted file records the sha256 of the file it came from.
pub const SOURCE_SHA256: &str = "source_sha256";

/// For a safetensors file converted from another (`cnnserve fetch-weights`), the sha256 of that
/// file; None for anything else.
pub fn source_sha256(path: &Path) -> Option<String> {
    if sniff(path).ok()? != FileFormat::Safetensors {
        return None;
    }
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: read-only and dropped before we return; only the header is read.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&map).ok()?;
    metadata.metadata().as_ref()?.get(SOURCE_SHA256).cloned()
}

/// Writes every tensor of `source` (any supported format, dtypes kept) to `target` as
/// safetensors, atomically, recording `metadata` in its header.
pub fn convert_to_safetensors(
    source: &Path,
    target: &Path,
    metadata: HashMap<String, String>,
) -> Result<(), WeightsError> {
    let tensors = read_tensors(source, &Device::Cpu)?
        .into_iter()
        .map(|(name, t)| Ok((name, t.contiguous()?)))
        .collect::<Result<Vec<(String, Tensor)>, WeightsError>>()?;
    crate::atomic::write_with(target, |tmp| {
        safetensors::serialize_to_file(
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
            Some(metadata),
            tmp,
        )
        .map_err(std::io::Error::other)
    })
    .map_err(|source| WeightsError::Io {
        path: target.to_path_buf(),
        source,
    })
}

/// Writes named tensors as safetensors, atomically.
pub fn save_safetensors(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<(), WeightsError> {
    crate::atomic::write_with(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(std::io::Error::other)
    })
    .map_err(|source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Tensor names with their shapes, in the order a model asked for them.
type Requests = std::sync::Arc<Mutex<Vec<(String, Vec<usize>)>>>;

/// A `VarBuilder` backend that hands out zero-cost placeholders and writes down what was asked for.
#[derive(Default)]
struct ShapeRecorder {
    seen: Requests,
}

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .expect("recorder lock")
            .push((name.to_string(), shape.dims().to_vec()));
        // A broadcast scalar allocates nothing, whatever the shape.
        Tensor::zeros((), dtype, device)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape recorder: `{name}` requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}
