//! The command line as a user runs it: `cnnserve predict` and the weights it accepts.

mod common;

use std::process::Command;

use candle_core::{DType, Device};
use cnnserve::models::Arch;
use cnnserve::weights;
use serde_json::Value;

fn cnnserve() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cnnserve"));
    command.env("RUST_LOG", "warn").env_remove("RUST_BACKTRACE");
    command
}

#[test]
fn legacy_pth_gives_the_same_logits_as_safetensors() {
    let fixtures = common::fixtures();
    let from_pth = weights::load_network(
        Arch::Googlenet,
        &fixtures.join("googlenet/weights.pth"),
        &Device::Cpu,
    )
    .unwrap();
    let from_st = weights::load_network(
        Arch::Googlenet,
        &fixtures.join("googlenet/weights.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let refs = candle_core::safetensors::load(
        fixtures.join("googlenet/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let xs = &refs["inputs_224x224"];
    let a = from_pth.forward(xs).unwrap();
    assert_eq!(common::max_abs_diff(&a, &from_st.forward(xs).unwrap()), 0.0);
    assert!(common::max_abs_diff(&a, &refs["logits_224x224"]) < 1e-3);
}

#[test]
fn half_precision_weights_are_converted_to_f32_on_load() {
    let fixtures = common::fixtures();
    let dir = tempfile::tempdir().unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let tensors = weights::read_tensors(
            &fixtures.join("googlenet/weights.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let t = if t.dtype() == DType::F32 {
                t.to_dtype(dtype).unwrap()
            } else {
                t
            };
            (n, t)
        })
        .collect();
        let path = dir.path().join(format!("googlenet-{dtype:?}.safetensors"));
        weights::save_safetensors(&tensors, &path).unwrap();
        let loaded = weights::to_f32(weights::read_tensors(&path, &Device::Cpu).unwrap()).unwrap();
        let key = "inception4a.branch1.conv.weight";
        assert_eq!(loaded[key].dtype(), DType::F32);
        let expected = tensors[key].to_dtype(DType::F32).unwrap();
        assert_eq!(common::max_abs_diff(&loaded[key], &expected), 0.0);
        // The network runs in f32 and still lands near PyTorch's f32 logits.
        let net = weights::load_network(Arch::Googlenet, &path, &Device::Cpu).unwrap();
        let refs = candle_core::safetensors::load(
            fixtures.join("googlenet/reference.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let logits = net.forward(&refs["inputs_224x224"]).unwrap();
        assert_eq!(logits.dtype(), DType::F32);
        let diff = common::max_abs_diff(&logits, &refs["logits_224x224"]);
        assert!(diff < 0.5, "{dtype:?}: {diff}");
    }
}

fn json_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn predict_prints_sorted_softmax_probabilities_with_imagenet_labels() {
    let fixtures = common::fixtures();
    let pre = fixtures.join("preprocess");
    let out = cnnserve()
        .args([
            "predict",
            "--model",
            "googlenet",
            "--json",
            "--top-k",
            "3",
            "--weights",
        ])
        .arg(fixtures.join("googlenet/weights.pth"))
        .arg(pre.join("img0.jpg"))
        .arg(pre.join("img2.jpg"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 2);
    let labels: Vec<&str> = include_str!("../src/engine/imagenet_classes.txt")
        .lines()
        .collect();
    for (line, name) in lines.iter().zip(["img0.jpg", "img2.jpg"]) {
        assert!(line["file"].as_str().unwrap().ends_with(name));
        let predictions = line["predictions"].as_array().unwrap();
        assert_eq!(predictions.len(), 3);
        let probs: Vec<f64> = predictions
            .iter()
            .map(|p| p["probability"].as_f64().unwrap())
            .collect();
        assert!(probs.windows(2).all(|w| w[0] >= w[1]), "{probs:?}");
        for p in predictions {
            let index = p["index"].as_u64().unwrap() as usize;
            assert_eq!(p["label"], labels[index]);
        }
    }

    let all = cnnserve()
        .args([
            "predict",
            "--model",
            "googlenet",
            "--json",
            "--top-k",
            "0",
            "--weights",
        ])
        .arg(fixtures.join("googlenet/weights.safetensors"))
        .arg(pre.join("img1.jpg"))
        .output()
        .unwrap();
    let line = &json_lines(&all.stdout)[0];
    let total: f64 = line["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["probability"].as_f64().unwrap())
        .sum();
    assert_eq!(line["predictions"].as_array().unwrap().len(), 1000);
    assert!((total - 1.0).abs() < 1e-3, "{total}");
}

#[test]
fn a_torchvision_file_name_says_the_architecture_and_bad_images_fail_the_command() {
    let fixtures = common::fixtures();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("googlenet-1378be20.pth");
    std::os::unix::fs::symlink(fixtures.join("googlenet/weights.pth"), &file).unwrap();
    let text = dir.path().join("notes.jpg");
    std::fs::write(&text, "not an image").unwrap();
    let out = cnnserve()
        .args(["predict", "--top-k", "1", "--weights"])
        .arg(&file)
        .arg(fixtures.join("preprocess/img4.jpg"))
        .arg(&text)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stdout.contains("img4.jpg") && stdout.contains('%'),
        "{stdout}"
    );
    assert!(
        stderr.contains("notes.jpg") && stderr.contains("not an image"),
        "{stderr}"
    );
    assert!(stderr.contains("1 of 2 images"), "{stderr}");
}

#[test]
fn bench_prints_one_json_line_per_batch_size_with_its_timings() {
    let weights = common::fixtures().join("googlenet/weights.safetensors");
    let out = cnnserve()
        .args([
            "bench",
            "--model",
            "googlenet",
            "--batch",
            "1,3",
            "--size",
            "64",
        ])
        .args(["--iters", "4", "--warmup", "1", "--weights"])
        .arg(&weights)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, batch) in lines.iter().zip([1.0, 3.0]) {
        assert_eq!(line["model"], "googlenet");
        assert_eq!(line["dtype"], "f32");
        assert_eq!(line["batch"].as_f64(), Some(batch));
        assert_eq!(line["iters"].as_f64(), Some(4.0));
        let (min, median, max) = (
            line["ms_min"].as_f64().unwrap(),
            line["ms_median"].as_f64().unwrap(),
            line["ms_max"].as_f64().unwrap(),
        );
        assert!(0.0 < min && min <= median && median <= max, "{line}");
        let per_s = line["images_per_s"].as_f64().unwrap();
        assert!(
            (per_s - batch * 1e3 / median).abs() <= 0.01 * per_s + 0.01,
            "{line}"
        );
    }
    let refused = cnnserve()
        .args(["bench", "--dtype", "f16", "--weights"])
        .arg(&weights)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--dtype f16 is not available"));
}

/// A candle error (the input is smaller than GoogLeNet's pools allow) with `RUST_BACKTRACE=1`,
/// which makes both anyhow and candle capture backtraces: the user still reads one sentence.
#[test]
fn errors_are_one_sentence_even_with_rust_backtrace_set() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("tiny.safetensors");
    let tiny = candle_core::Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("x", tiny)]), &input)
        .unwrap();
    let out = cnnserve()
        .env("RUST_BACKTRACE", "1")
        .args(["forward", "--model", "googlenet", "--weights"])
        .arg(common::fixtures().join("googlenet/weights.safetensors"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("out.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, no backtrace:\n{stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("too small"),
        "{stderr}"
    );
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
}
