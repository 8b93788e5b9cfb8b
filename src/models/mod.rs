//! The classifiers, in candle, keyed exactly as torchvision's state_dicts.
//!
//! This layer knows candle, and in [`cpu`] its own CPU kernels (rayon for threads, libc for memory
//! advice), and nothing else: it is handed a `VarBuilder`, never opens a file, never touches async
//! code or HTTP.

pub mod cpu;
pub mod googlenet;
pub mod head;
pub mod layers;
pub mod vgg;

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

pub use googlenet::{GoogLeNet, GoogLeNetConfig};
pub use head::{Head, TrainLayers};
pub use vgg::{Vgg, VggConfig};

/// An architecture, named as torchvision names its constructor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Vgg11,
    Vgg11Bn,
    Vgg13,
    Vgg13Bn,
    Vgg16,
    Vgg16Bn,
    Vgg19,
    Vgg19Bn,
    Googlenet,
}

impl Arch {
    pub const ALL: [Arch; 9] = [
        Arch::Vgg11,
        Arch::Vgg11Bn,
        Arch::Vgg13,
        Arch::Vgg13Bn,
        Arch::Vgg16,
        Arch::Vgg16Bn,
        Arch::Vgg19,
        Arch::Vgg19Bn,
        Arch::Googlenet,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Vgg11 => "vgg11",
            Arch::Vgg11Bn => "vgg11_bn",
            Arch::Vgg13 => "vgg13",
            Arch::Vgg13Bn => "vgg13_bn",
            Arch::Vgg16 => "vgg16",
            Arch::Vgg16Bn => "vgg16_bn",
            Arch::Vgg19 => "vgg19",
            Arch::Vgg19Bn => "vgg19_bn",
            Arch::Googlenet => "googlenet",
        }
    }

    /// The last layer's weight, whose first dimension is the number of classes.
    pub fn head_key(self) -> &'static str {
        match self {
            Arch::Googlenet => "fc.weight",
            _ => "classifier.6.weight",
        }
    }

    /// Tensors a torchvision checkpoint may hold that the eval model does not use.
    pub fn is_ignorable_key(self, key: &str) -> bool {
        // BatchNorm's step counter only matters to momentum=None training.
        key.ends_with(".num_batches_tracked")
            || (self == Arch::Googlenet
                && googlenet::AUX_PREFIXES.iter().any(|p| key.starts_with(p)))
    }

    /// The full-size configuration torchvision uses for pretrained weights.
    pub fn config(self, num_classes: usize) -> NetworkConfig {
        let vgg = |stages, batch_norm| {
            NetworkConfig::Vgg(VggConfig::imagenet(stages, batch_norm, num_classes))
        };
        match self {
            Arch::Vgg11 => vgg(vgg::VGG11, false),
            Arch::Vgg11Bn => vgg(vgg::VGG11, true),
            Arch::Vgg13 => vgg(vgg::VGG13, false),
            Arch::Vgg13Bn => vgg(vgg::VGG13, true),
            Arch::Vgg16 => vgg(vgg::VGG16, false),
            Arch::Vgg16Bn => vgg(vgg::VGG16, true),
            Arch::Vgg19 => vgg(vgg::VGG19, false),
            Arch::Vgg19Bn => vgg(vgg::VGG19, true),
            Arch::Googlenet => NetworkConfig::GoogLeNet(GoogLeNetConfig::imagenet(num_classes)),
        }
    }

    /// Width of the embedding [`Network::features`] returns.
    pub fn embedding_width(self) -> usize {
        match self {
            Arch::Googlenet => googlenet::EMBEDDING,
            _ => 4096,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The name is not one of torchvision's architectures that cnnserve implements.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown architecture `{0}` (known: vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn, googlenet)")]
pub struct UnknownArch(pub String);

impl FromStr for Arch {
    type Err = UnknownArch;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| UnknownArch(s.to_string()))
    }
}

/// The arithmetic a network's forward pass runs in: `--dtype`, defined once for every device.
///
/// `f32` is the default and the only one that is exact against PyTorch's f32. The others trade
/// accuracy for speed where the hardware has them: `bf16` on CPUs with AVX512_BF16, and `tf32`,
/// `bf16`, `f16` on CUDA GPUs. [`Precision::check`] says which this build runs on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    Tf32,
    Bf16,
    F16,
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown dtype `{s}` (known: f32, tf32, bf16, f16)"))
    }
}

impl Precision {
    pub const ALL: [Precision; 4] = [
        Precision::F32,
        Precision::Tf32,
        Precision::Bf16,
        Precision::F16,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// Whether this build can run `self` on `device`; the error is a sentence for the user.
    /// CUDA runs all four; the CPU runs f32, and bf16 where it has AVX512_BF16.
    pub fn check(self, device: &candle_core::Device) -> std::result::Result<(), String> {
        match (self, device.is_cpu()) {
            (Precision::F32, _) | (_, false) => Ok(()),
            (Precision::Bf16, true)
                if cpu::bf16::available() && cpu::Isa::best() == cpu::Isa::Avx512 =>
            {
                Ok(())
            }
            (Precision::Bf16, true) => Err(
                "--dtype bf16 on the CPU needs AVX-512 with the BF16 extension (AVX512_BF16: \
                 Intel Cooper Lake / Sapphire Rapids or later, AMD Zen 4 or later), which this \
                 CPU lacks or CNNSERVE_CPU_ISA turned off; use --dtype f32"
                    .to_string(),
            ),
            (other, true) => Err(format!(
                "--dtype {} is not available on the CPU: the CPU kernels run f32 (exact) and \
                 bf16 (with AVX512_BF16); use --dtype f32, or a CUDA device",
                other.name()
            )),
        }
    }

    /// The dtype the weights and activations are held in: f32 for `f32` and `tf32` (TF32 only
    /// changes how the GPU's matrix units multiply f32).
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 | Precision::Tf32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// Process-wide settings the precision needs: TF32 for f32 matrix products on CUDA (a no-op in
    /// a build without CUDA). Called once, at start, before any model is loaded.
    pub fn enable(self) {
        candle_core::cuda::set_gemm_reduced_precision_f32(self == Precision::Tf32);
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkConfig {
    Vgg(VggConfig),
    GoogLeNet(GoogLeNetConfig),
}

/// A loaded classifier of either family.
#[derive(Debug, Clone)]
pub enum Network {
    Vgg(Vgg),
    // Boxed: its 13 blocks would make every `Network` as large as itself.
    GoogLeNet(Box<GoogLeNet>),
}

impl Network {
    pub fn new(cfg: &NetworkConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match cfg {
            NetworkConfig::Vgg(c) => Network::Vgg(Vgg::new(c, vb)?),
            NetworkConfig::GoogLeNet(c) => Network::GoogLeNet(Box::new(GoogLeNet::new(c, vb)?)),
        })
    }

    /// Eval-mode logits `[N, classes]` for a normalized batch `[N, 3, H, W]`.
    ///
    /// Every method here takes f32 (or any float) inputs and answers f32, whatever dtype the
    /// network runs in ([`Network::dtype`]): callers, and heads trained on the outputs, see f32 only.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_t(xs, false)
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let xs = self.input(xs)?;
        match self {
            Network::Vgg(m) => m.forward_t(&xs, train),
            Network::GoogLeNet(m) => m.forward_t(&xs, train),
        }?
        .to_dtype(DType::F32)
    }

    /// The frozen embedding the last layer reads (VGG: 4096, GoogLeNet: 1024), in eval mode.
    pub fn features(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.input(xs)?;
        match self {
            Network::Vgg(m) => m.features(&xs),
            Network::GoogLeNet(m) => m.features(&xs),
        }?
        .to_dtype(DType::F32)
    }

    /// The last layer (with the dropout before it) applied to [`Network::features`].
    pub fn head_forward(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        let features = self.input(features)?;
        match self {
            Network::Vgg(m) => m.head_forward(&features, train),
            Network::GoogLeNet(m) => m.head_forward(&features, train),
        }?
        .to_dtype(DType::F32)
    }

    /// VGG's pooled conv features `[N, 512·7·7]`, the input of `classifier.0`.
    pub fn pooled(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Network::Vgg(m) => m.pooled(&self.input(xs)?)?.to_dtype(DType::F32),
            Network::GoogLeNet(_) => {
                candle_core::bail!("googlenet has no VGG classifier: train its `fc` (head) only")
            }
        }
    }

    /// The dtype the weights are held and the forward pass runs in (`--dtype`).
    pub fn dtype(&self) -> DType {
        let cpu_bf16 = match self {
            Network::Vgg(m) => m.cpu_bf16(),
            Network::GoogLeNet(m) => m.cpu_bf16(),
        };
        if cpu_bf16 {
            DType::BF16
        } else {
            self.layer_dtype()
        }
    }

    /// What candle's layers hold (f32 under the CPU kernels, whatever they run in).
    fn layer_dtype(&self) -> DType {
        match self {
            Network::Vgg(m) => m.head().weight().dtype(),
            Network::GoogLeNet(m) => m.head().weight().dtype(),
        }
    }

    fn input(&self, xs: &Tensor) -> Result<Tensor> {
        xs.to_dtype(self.layer_dtype())
    }

    pub fn num_classes(&self) -> usize {
        match self {
            Network::Vgg(m) => m.num_classes(),
            Network::GoogLeNet(m) => m.num_classes(),
        }
    }

    /// The device the weights were loaded onto. Everything that feeds or trains this network takes
    /// its device from here, never from a default: inputs, heads, optimizer state.
    pub fn device(&self) -> &candle_core::Device {
        match self {
            Network::Vgg(m) => m.device(),
            Network::GoogLeNet(m) => m.device(),
        }
    }
}

/// A candle error as a sentence: candle appends a backtrace to its errors when `RUST_BACKTRACE` is
/// set, which must never reach a job's `error`, an API answer or a log line.
pub fn error_message(e: &candle_core::Error) -> String {
    use candle_core::Error;
    match e {
        Error::WithBacktrace { inner, .. } => error_message(inner),
        Error::WithPath { inner, path } => format!("{}: {}", path.display(), error_message(inner)),
        Error::Context { inner, context } => format!("{context}: {}", error_message(inner)),
        e => e.to_string(),
    }
}

/// `e` with any backtrace removed (see [`error_message`]); other errors are returned as they are.
pub fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error;
    match e {
        Error::WithBacktrace { .. } | Error::WithPath { .. } | Error::Context { .. } => {
            Error::Msg(error_message(&e))
        }
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_backtrace(e: candle_core::Error) -> candle_core::Error {
        candle_core::Error::WithBacktrace {
            inner: Box::new(e),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        }
    }

    #[test]
    fn candle_errors_lose_their_backtraces_on_the_way_out() {
        let e = with_backtrace(candle_core::Error::Msg("input too small".into()));
        assert!(e.to_string().lines().count() > 1, "the case under test");
        assert_eq!(error_message(&e), "input too small");
        let e = with_backtrace(candle_core::Error::Msg("bad".into())).with_path("/w/x.pth");
        assert_eq!(without_backtrace(e).to_string(), "/w/x.pth: bad");
    }

    #[test]
    fn names_round_trip_through_str_and_serde() {
        for arch in Arch::ALL {
            assert_eq!(arch.name().parse::<Arch>().unwrap(), arch);
            let json = serde_json::to_string(&arch).unwrap();
            assert_eq!(json, format!("\"{}\"", arch.name()));
        }
        assert!("resnet50".parse::<Arch>().is_err());
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
        }
        for t in TrainLayers::ALL {
            assert_eq!(t.name().parse::<TrainLayers>().unwrap(), t);
            assert_eq!(
                serde_json::to_string(&t).unwrap(),
                format!("\"{}\"", t.name())
            );
        }
    }

    #[test]
    fn aux_heads_are_ignorable_only_for_googlenet() {
        assert!(Arch::Googlenet.is_ignorable_key("aux1.fc2.weight"));
        assert!(!Arch::Vgg11Bn.is_ignorable_key("aux1.fc2.weight"));
        assert!(Arch::Vgg11Bn.is_ignorable_key("features.1.num_batches_tracked"));
        assert!(!Arch::Googlenet.is_ignorable_key("fc.weight"));
    }
}
