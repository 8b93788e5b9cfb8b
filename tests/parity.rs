//! Logits parity with PyTorch on the fixtures' random-but-realistic weights.
//!
//! The references were made as the fixtures' README says; per model, in essence:
//! ```python
//! m = torchvision.models.vgg11_bn(weights=None)  # or googlenet(aux_logits=True, transform_input=True, init_weights=True)
//! m.load_state_dict(state_dict); m.eval()
//! for s in (224, 256):
//!     x = torch.randn(2, 3, s, s)  # seeded
//!     out[f"inputs_{s}x{s}"], out[f"logits_{s}x{s}"] = x, m(x)
//! ```

mod common;

use std::path::Path;
use std::sync::OnceLock;

use candle_core::Device;
use cnnserve::models::{Arch, Network};
use cnnserve::weights;

/// 1e-4 is typical (summation order differs); 1e-3 still catches any wrong tensor, eps or layout.
const TOLERANCE: f32 = 1e-3;

fn vgg11_bn() -> &'static Network {
    static NET: OnceLock<Network> = OnceLock::new();
    NET.get_or_init(|| {
        weights::load_network(Arch::Vgg11Bn, &common::vgg11_bn_weights(), &Device::Cpu).unwrap()
    })
}

fn googlenet() -> &'static Network {
    static NET: OnceLock<Network> = OnceLock::new();
    NET.get_or_init(|| {
        let path = common::fixtures().join("googlenet/weights.safetensors");
        weights::load_network(Arch::Googlenet, &path, &Device::Cpu).unwrap()
    })
}

fn assert_matches_pytorch(net: &Network, reference: &Path, size: usize) {
    let refs = candle_core::safetensors::load(reference, &Device::Cpu).unwrap();
    let inputs = &refs[&format!("inputs_{size}x{size}")];
    let expected = &refs[&format!("logits_{size}x{size}")];
    let logits = net.forward(inputs).unwrap();
    let diff = common::max_abs_diff(&logits, expected);
    eprintln!(
        "{}: max |Δlogit| at {size}x{size} = {diff:e}",
        reference.display()
    );
    assert!(diff < TOLERANCE, "max abs difference {diff} ≥ {TOLERANCE}");
}

#[test]
fn vgg11_bn_matches_pytorch_at_224() {
    let reference = common::fixtures().join("vgg11_bn/reference.safetensors");
    assert_matches_pytorch(vgg11_bn(), &reference, 224);
}

#[test]
fn vgg11_bn_matches_pytorch_at_256_where_adaptive_pool_windows_overlap() {
    let reference = common::fixtures().join("vgg11_bn/reference.safetensors");
    assert_matches_pytorch(vgg11_bn(), &reference, 256);
}

#[test]
fn googlenet_matches_pytorch_at_224() {
    let reference = common::fixtures().join("googlenet/reference.safetensors");
    assert_matches_pytorch(googlenet(), &reference, 224);
}

#[test]
fn googlenet_matches_pytorch_at_256() {
    let reference = common::fixtures().join("googlenet/reference.safetensors");
    assert_matches_pytorch(googlenet(), &reference, 256);
}

#[test]
fn features_then_head_equals_forward() {
    let refs = candle_core::safetensors::load(
        common::fixtures().join("googlenet/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let xs = &refs["inputs_224x224"];
    for net in [googlenet(), vgg11_bn()] {
        let features = net.features(xs).unwrap();
        assert_eq!(features.dim(0).unwrap(), 2);
        let via_head = net.head_forward(&features, false).unwrap();
        let diff = common::max_abs_diff(&via_head, &net.forward(xs).unwrap());
        assert!(diff < 1e-5, "{diff}");
    }
}

#[test]
fn forward_command_writes_pytorch_logits_under_the_input_names() {
    let dir = tempfile::tempdir().unwrap();
    let reference = common::fixtures().join("googlenet/reference.safetensors");
    let out = dir.path().join("logits.safetensors");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_cnnserve"))
        .args(["forward", "--model", "googlenet", "--weights"])
        .arg(common::fixtures().join("googlenet/weights.safetensors"))
        .arg("--input")
        .arg(&reference)
        .arg("--output")
        .arg(&out)
        .args(["--batch-size", "1"])
        .status()
        .unwrap();
    assert!(status.success());
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let refs = candle_core::safetensors::load(&reference, &Device::Cpu).unwrap();
    // Only the [N,3,H,W] inputs run; the logits tensors in the same file are skipped.
    let mut names: Vec<_> = got.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["inputs_224x224", "inputs_256x256"]);
    for size in [224, 256] {
        let diff = common::max_abs_diff(
            &got[&format!("inputs_{size}x{size}")],
            &refs[&format!("logits_{size}x{size}")],
        );
        assert!(diff < TOLERANCE, "{size}: {diff}");
    }
}

/// Reduced precision: `--dtype f16` (one of CUDA's options) through candle's layers, run here on
/// the CPU, and `--dtype bf16` through the CPU kernels' AVX512_BF16 products: the BN folded in f32
/// first, the logits back in f32. Tolerances, as a share of the largest reference logit: f16 5%
/// (measured: googlenet 1.7%, vgg11_bn 0.4%); bf16 15% (measured: googlenet 8.5%, vgg11_bn 2.1%;
/// PyTorch's own bf16 on the same weights and inputs lands at 8.8% and 3.0% under autocast, 10.4%
/// and 2.7% with the model cast to bf16). The top class is printed, not asserted: on these random
/// weights and inputs the top two logits of an image can lie closer than f16 or bf16 resolves. On
/// a CPU without AVX512_BF16 the bf16 cases check that the load refuses with a sentence instead
/// (and say so).
#[test]
fn reduced_precision_lands_within_its_documented_tolerance() {
    use candle_core::DType;
    let cases = [
        (Arch::Googlenet, "googlenet", DType::F16, 0.05),
        (Arch::Vgg11Bn, "vgg11_bn", DType::F16, 0.05),
        (Arch::Googlenet, "googlenet", DType::BF16, 0.15),
        (Arch::Vgg11Bn, "vgg11_bn", DType::BF16, 0.15),
    ];
    for (arch, dir, dtype, tolerance) in cases {
        let path = match arch {
            Arch::Vgg11Bn => common::vgg11_bn_weights(),
            _ => common::fixtures().join(format!("{dir}/weights.safetensors")),
        };
        if dtype == DType::BF16 && !cnnserve::models::cpu::bf16::available() {
            eprintln!(
                "NOTE: this CPU has no AVX512_BF16: bf16 is refused, not run, on this machine"
            );
            let err = weights::load_network_as(arch, &path, &Device::Cpu, dtype).unwrap_err();
            assert!(err.to_string().contains("AVX512_BF16"), "{err}");
            assert!(cnnserve::models::Precision::Bf16
                .check(&Device::Cpu)
                .is_err());
            continue;
        }
        let net = weights::load_network_as(arch, &path, &Device::Cpu, dtype).unwrap();
        assert_eq!(net.dtype(), dtype);
        let refs = candle_core::safetensors::load(
            common::fixtures().join(format!("{dir}/reference.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let (inputs, expected) = (&refs["inputs_224x224"], &refs["logits_224x224"]);
        let started = std::time::Instant::now();
        let logits = net.forward(inputs).unwrap();
        assert_eq!(logits.dtype(), DType::F32);
        let diff = common::max_abs_diff(&logits, expected);
        let scale = expected
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let same_top = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap()
            == expected.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        eprintln!(
            "{dir} {dtype:?}: max |Δlogit| {diff:e} of max |logit| {scale} ({:.2}%), same top-1: {same_top}, {:?}",
            100.0 * diff / scale,
            started.elapsed()
        );
        assert!(
            diff <= tolerance * scale,
            "{dir} {dtype:?}: {diff} > {tolerance} × {scale}"
        );
    }
}
