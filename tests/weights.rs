//! Loading weights: what a wrong file says, and that every architecture builds from its key tree.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use cnnserve::models::{Arch, NetworkConfig};
use cnnserve::weights::{self, WeightsError};

fn googlenet_tensors() -> HashMap<String, Tensor> {
    let path = common::fixtures().join("googlenet/weights.safetensors");
    weights::to_f32(weights::read_tensors(&path, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn a_missing_tensor_is_named_with_the_shape_the_model_expects() {
    let mut ts = googlenet_tensors();
    ts.remove("inception4a.branch2.1.conv.weight");
    match weights::build_torchvision(Arch::Googlenet, ts, &Device::Cpu) {
        Err(WeightsError::Missing { name, expected }) => {
            assert_eq!(name, "inception4a.branch2.1.conv.weight");
            assert_eq!(expected, vec![208, 96, 3, 3]);
        }
        other => panic!("expected Missing, got {other:?}"),
    }
}

#[test]
fn a_misshapen_tensor_is_named_with_both_shapes() {
    let mut ts = googlenet_tensors();
    // The "5x5" branch that torchvision builds 3x3: a true 5x5 kernel must be refused.
    ts.insert(
        "inception3a.branch3.1.conv.weight".into(),
        Tensor::zeros((32, 16, 5, 5), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = weights::build_torchvision(Arch::Googlenet, ts, &Device::Cpu).unwrap_err();
    match &err {
        WeightsError::Shape {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "inception3a.branch3.1.conv.weight");
            assert_eq!(expected, &vec![32, 16, 3, 3]);
            assert_eq!(found, &vec![32, 16, 5, 5]);
        }
        other => panic!("expected Shape, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("[32, 16, 5, 5]") && message.contains("[32, 16, 3, 3]"),
        "{message}"
    );
}

#[test]
fn unexpected_tensors_are_reported_but_aux_heads_and_bn_counters_are_not() {
    let ts = googlenet_tensors();
    assert!(ts.keys().any(|k| k.starts_with("aux1.")));
    assert!(ts.keys().any(|k| k.ends_with("num_batches_tracked")));
    let mut extra = ts.clone();
    extra.insert(
        "fc2.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    extra.insert(
        "classifier.0.bias".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    match weights::build_torchvision(Arch::Googlenet, extra, &Device::Cpu) {
        Err(WeightsError::Unexpected { names }) => {
            assert_eq!(names, vec!["classifier.0.bias", "fc2.weight"])
        }
        other => panic!("expected Unexpected, got {other:?}"),
    }
    weights::build_torchvision(Arch::Googlenet, ts, &Device::Cpu).unwrap();
}

#[test]
fn weights_for_another_architecture_are_refused_by_name() {
    let path = common::fixtures().join("googlenet/weights.safetensors");
    let err = weights::load_network(Arch::Vgg11Bn, &path, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, WeightsError::Missing { name, .. } if name == "classifier.6.weight"),
        "{err:?}"
    );
}

#[test]
fn the_class_count_comes_from_the_last_layer() {
    let mut ts = googlenet_tensors();
    let dev = Device::Cpu;
    ts.insert(
        "fc.weight".into(),
        Tensor::randn(0f32, 0.01, (2, 1024), &dev).unwrap(),
    );
    ts.insert(
        "fc.bias".into(),
        Tensor::zeros(2, DType::F32, &dev).unwrap(),
    );
    // torchvision's aux heads keep their 1000 outputs in such a file; they are not read.
    let net = weights::build_torchvision(Arch::Googlenet, ts, &dev).unwrap();
    assert_eq!(net.num_classes(), 2);
    let xs = Tensor::randn(0f32, 1., (3, 3, 97, 131), &dev).unwrap();
    assert_eq!(net.forward(&xs).unwrap().dims(), &[3, 2]);
    assert_eq!(net.features(&xs).unwrap().dims(), &[3, 1024]);
}

#[test]
fn googlenet_runs_any_batch_and_odd_non_square_sizes_from_64() {
    let net =
        weights::build_torchvision(Arch::Googlenet, googlenet_tensors(), &Device::Cpu).unwrap();
    for (n, h, w) in [(1, 64, 64), (2, 65, 99), (1, 224, 161)] {
        let xs = Tensor::randn(0f32, 1., (n, 3, h, w), &Device::Cpu).unwrap();
        let logits = net.forward(&xs).unwrap();
        assert_eq!(logits.dims(), &[n, 1000], "{h}x{w}");
        let finite: f32 = logits
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(finite.is_finite());
    }
    let tiny = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let err = net.forward(&tiny).unwrap_err().to_string();
    assert!(err.contains("too small"), "{err}");
}

#[test]
fn not_a_weights_file_is_a_format_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.safetensors");
    std::fs::write(&path, "just some text, not tensors").unwrap();
    let err = weights::load_network(Arch::Googlenet, &path, &Device::Cpu).unwrap_err();
    assert!(matches!(err, WeightsError::Format { .. }), "{err:?}");
    let missing = dir.path().join("absent.safetensors");
    let err = weights::load_network(Arch::Googlenet, &missing, &Device::Cpu).unwrap_err();
    assert!(matches!(err, WeightsError::Io { .. }), "{err:?}");
}

#[test]
fn a_truncated_safetensors_file_is_a_format_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(common::fixtures().join("googlenet/subset_zip.safetensors")).unwrap();
    let path = dir.path().join("cut.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = weights::read_tensors(&path, &Device::Cpu).unwrap_err();
    assert!(matches!(err, WeightsError::Format { .. }), "{err:?}");
}

/// torchvision's own key trees: where the last conv of each VGG sits, and how many tensors a
/// state_dict holds without the BN counters (`len([k for k in sd if "num_batches" not in k])`).
#[test]
fn every_vgg_variant_reads_torchvision_key_names() {
    let cases = [
        (Arch::Vgg11, "features.18.weight", 22),
        (Arch::Vgg11Bn, "features.26.running_var", 54),
        (Arch::Vgg13, "features.22.weight", 26),
        (Arch::Vgg13Bn, "features.32.running_var", 66),
        (Arch::Vgg16, "features.28.weight", 32),
        (Arch::Vgg16Bn, "features.41.running_var", 84),
        (Arch::Vgg19, "features.34.weight", 38),
        (Arch::Vgg19Bn, "features.50.running_var", 102),
    ];
    for (arch, last_feature, count) in cases {
        let expected =
            weights::expected_tensors(&arch.config(1000), &candle_core::Device::Cpu).unwrap();
        let names: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(expected.len(), count, "{arch}");
        assert!(names.contains(&last_feature), "{arch}: {names:?}");
        let shapes: HashMap<&str, &Vec<usize>> =
            expected.iter().map(|(n, s)| (n.as_str(), s)).collect();
        assert_eq!(
            shapes["classifier.0.weight"],
            &vec![4096, 512 * 7 * 7],
            "{arch}"
        );
        assert_eq!(shapes["classifier.6.weight"], &vec![1000, 4096], "{arch}");
    }
}

#[test]
fn the_fixture_files_hold_exactly_the_tensors_the_models_read() {
    for (arch, path) in [
        (Arch::Vgg11Bn, common::vgg11_bn_weights()),
        (
            Arch::Googlenet,
            common::fixtures().join("googlenet/weights.safetensors"),
        ),
    ] {
        let file = unsafe { candle_core::safetensors::MmapedSafetensors::new(&path) }.unwrap();
        let mut in_file: Vec<(String, Vec<usize>)> = file
            .tensors()
            .into_iter()
            .filter(|(name, _)| !arch.is_ignorable_key(name))
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect();
        in_file.sort();
        let mut expected =
            weights::expected_tensors(&arch.config(1000), &candle_core::Device::Cpu).unwrap();
        expected.sort();
        assert_eq!(expected, in_file, "{arch}");
    }
}

/// Random weights with plausible batch-norm statistics for whatever `cfg` asks for.
fn random_weights(cfg: &NetworkConfig) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    weights::expected_tensors(cfg, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, shape)| {
            let t = if name.ends_with("running_var") {
                Tensor::rand(0.5f32, 1.5, shape, &dev)
            } else {
                let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
                Tensor::randn(0f32, (2.0 / fan_in as f32).sqrt(), shape, &dev)
            };
            (name, t.unwrap())
        })
        .collect()
}

#[test]
fn every_vgg_variant_builds_and_runs_on_small_random_weights() {
    for arch in Arch::ALL.into_iter().filter(|a| *a != Arch::Googlenet) {
        let NetworkConfig::Vgg(cfg) = arch.config(3) else {
            unreachable!()
        };
        let cfg = NetworkConfig::Vgg(cfg.narrowed(16));
        let net =
            weights::build_network(arch, &cfg, random_weights(&cfg), &Device::Cpu, DType::F32)
                .unwrap();
        // 64: the last map is 2x2, pooled up to 7x7; 97x75: odd, non-square, floors at each pool.
        for (n, h, w) in [(2, 64, 64), (1, 97, 75), (3, 224, 224)] {
            let xs = Tensor::randn(0f32, 1., (n, 3, h, w), &Device::Cpu).unwrap();
            let logits = net.forward(&xs).unwrap();
            assert_eq!(logits.dims(), &[n, 3], "{arch} {h}x{w}");
            let sum: f32 = logits
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(sum.is_finite() && sum > 0.0, "{arch}: {sum}");
            assert_eq!(net.features(&xs).unwrap().dims(), &[n, 4096 / 16]);
        }
        // Dropout acts only in training: eval is deterministic, training is not.
        let xs = Tensor::randn(0f32, 1., (2, 3, 64, 64), &Device::Cpu).unwrap();
        let a = net.forward(&xs).unwrap();
        let b = net.forward(&xs).unwrap();
        assert_eq!(common::max_abs_diff(&a, &b), 0.0);
        let t = net.forward_t(&xs, true).unwrap();
        assert!(
            common::max_abs_diff(&a, &t) > 0.0,
            "{arch}: dropout inactive in training"
        );
    }
}
