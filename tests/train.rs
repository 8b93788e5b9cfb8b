//! Fine-tuning: the loop learns, repeats itself exactly, caches without changing a number, and
//! writes a model the rest of cnnserve serves.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

use candle_core::Device;
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};

use cnnserve::models::{Arch, Network, TrainLayers};
use cnnserve::train::fit::{fit_with, FitOptions};
use cnnserve::train::{self, Dataset, Event, Params, Sample, TrainError};
use cnnserve::weights;

fn googlenet() -> &'static Network {
    static NET: OnceLock<Network> = OnceLock::new();
    NET.get_or_init(|| {
        let path = common::fixtures().join("googlenet/weights.safetensors");
        weights::load_network(Arch::Googlenet, &path, &Device::Cpu).unwrap()
    })
}

/// Two visibly different kinds of picture: warm stripes and cool blobs, with noise.
fn picture(class: usize, seed: u64) -> RgbImage {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    RgbImage::from_fn(256, 256, |x, y| {
        let noise: i32 = rng.random_range(-30..30);
        let v = |base: i32| (base + noise).clamp(0, 255) as u8;
        if class == 0 {
            let stripe = if (x / 16) % 2 == 0 { 220 } else { 120 };
            Rgb([v(stripe), v(90), v(40)])
        } else {
            let d = ((x as i32 - 128).pow(2) + (y as i32 - 128).pow(2)) as f32;
            let blob = if d.sqrt() < 70.0 { 230 } else { 60 };
            Rgb([v(30), v(blob / 2), v(blob)])
        }
    })
}

/// 6 training images per class and 2 test images each: 16 in all.
fn small_dataset() -> Dataset {
    let classes = vec!["stripes".to_string(), "blobs".to_string()];
    let sample = |split: &str, class: usize, i: u64| Sample {
        file: format!("{split}/{}/{i}.png", classes[class]),
        label: class,
        image: picture(class, i * 10 + class as u64),
    };
    let train = (0..2)
        .flat_map(|c| (0..6).map(move |i| (c, i)))
        .map(|(c, i)| sample("train", c, i))
        .collect();
    let test = (0..2)
        .flat_map(|c| (100..102).map(move |i| (c, i)))
        .map(|(c, i)| sample("test", c, i))
        .collect();
    Dataset {
        classes,
        train,
        test,
        skipped: vec![],
        ignored: 0,
    }
}

fn run(data: &Dataset, params: &Params, options: &FitOptions) -> (train::TrainedHead, Vec<Event>) {
    let mut events = Vec::new();
    let trained = fit_with(
        googlenet(),
        Arch::Googlenet,
        data,
        params,
        options,
        &mut |e| events.push(e),
        &AtomicBool::new(false),
    )
    .unwrap();
    (trained, events)
}

#[test]
fn training_learns_a_small_generated_set() {
    let data = small_dataset();
    let params = Params {
        epochs: 15,
        batch_size: 4,
        augment: false,
        valid_ratio: 0.2,
        ..Params::default()
    };
    let (trained, events) = run(&data, &params, &FitOptions::default());
    let history = &trained.history;
    assert_eq!(history.len(), 15);
    let last = history.last().unwrap();
    assert_eq!(last.train_acc, 1.0, "{history:?}");
    assert!(last.train_loss < history[0].train_loss / 2.0, "{history:?}");
    assert_eq!(trained.counts.train, vec![5, 5]);
    assert_eq!(trained.counts.valid, vec![1, 1]);
    assert_eq!(trained.counts.test, vec![2, 2]);
    let eval = &trained.evaluation;
    assert_eq!(eval.split, "test");
    assert_eq!(eval.test_acc, 1.0, "{eval:?}");
    assert_eq!(eval.confusion_matrix, vec![vec![2, 0], vec![0, 2]]);
    assert_eq!(eval.per_class[1].support, 2);
    assert!(eval
        .examples
        .iter()
        .all(|e| e.correct && e.probability > 0.5));
    assert!(eval
        .examples
        .windows(2)
        .all(|w| w[0].probability >= w[1].probability));
    // The kept checkpoint is the one with the lowest validation loss.
    let best = history
        .iter()
        .min_by(|a, b| a.valid_loss.total_cmp(&b.valid_loss))
        .unwrap();
    assert_eq!(trained.best_epoch, best.epoch);
    // Progress: 3 steps per epoch, then an epoch event.
    let steps: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) if p.epoch == 1 => Some((p.step, p.steps)),
            _ => None,
        })
        .collect();
    assert_eq!(steps, vec![(1, 3), (2, 3), (3, 3)]);
    let epochs = events
        .iter()
        .filter(|e| matches!(e, Event::Epoch(_)))
        .count();
    assert_eq!(epochs, 15);
}

#[test]
fn the_same_seed_gives_the_same_metrics_with_augmentation_and_dropout() {
    let data = small_dataset();
    let params = Params {
        epochs: 2,
        batch_size: 5,
        augment: true,
        seed: 42,
        ..Params::default()
    };
    let (a, _) = run(&data, &params, &FitOptions::default());
    let (b, _) = run(&data, &params, &FitOptions::default());
    assert_eq!(a.history, b.history);
    assert_eq!(a.evaluation, b.evaluation);
    let (c, _) = run(
        &data,
        &Params { seed: 43, ..params },
        &FitOptions::default(),
    );
    assert_ne!(a.history, c.history, "another seed, another run");
}

#[test]
fn cached_features_give_the_same_numbers_as_running_the_backbone_each_epoch() {
    let data = small_dataset();
    let params = Params {
        epochs: 3,
        batch_size: 4,
        augment: false,
        seed: 7,
        ..Params::default()
    };
    let (cached, _) = run(&data, &params, &FitOptions::default());
    let uncached_options = FitOptions {
        cache_features: false,
        ..FitOptions::default()
    };
    let (uncached, _) = run(&data, &params, &uncached_options);
    for (a, b) in cached.history.iter().zip(&uncached.history) {
        assert_eq!(a.train_acc, b.train_acc);
        assert_eq!(a.valid_acc, b.valid_acc);
        assert!((a.train_loss - b.train_loss).abs() < 1e-5, "{a:?} {b:?}");
        assert!((a.valid_loss - b.valid_loss).abs() < 1e-5, "{a:?} {b:?}");
    }
}

#[test]
fn bad_parameters_are_refused_before_any_work() {
    let data = small_dataset();
    let cancel = AtomicBool::new(false);
    let bad = Params {
        epochs: 0,
        learning_rate: -1.0,
        valid_ratio: 1.5,
        ..Params::default()
    };
    match train::fit(
        googlenet(),
        Arch::Googlenet,
        &data,
        &bad,
        &mut |_| {},
        &cancel,
    ) {
        Err(TrainError::InvalidParams(problems)) => assert_eq!(problems.len(), 3, "{problems:?}"),
        other => panic!("{other:?}"),
    }
    let classifier = Params {
        train_layers: TrainLayers::Classifier,
        ..Params::default()
    };
    let err = train::fit(
        googlenet(),
        Arch::Googlenet,
        &data,
        &classifier,
        &mut |_| {},
        &cancel,
    )
    .unwrap_err();
    assert!(matches!(err, TrainError::Unsupported { .. }), "{err:?}");
}

#[test]
fn a_raised_cancel_flag_stops_the_run() {
    let data = small_dataset();
    let cancel = AtomicBool::new(false);
    let mut steps = 0;
    let params = Params {
        epochs: 50,
        batch_size: 2,
        ..Params::default()
    };
    let result = train::fit(
        googlenet(),
        Arch::Googlenet,
        &data,
        &params,
        &mut |e| {
            if matches!(e, Event::Progress(_)) {
                steps += 1;
                if steps == 3 {
                    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        },
        &cancel,
    );
    assert!(matches!(result, Err(TrainError::Cancelled)), "{result:?}");
    assert_eq!(steps, 3);
}

#[test]
fn a_saved_head_is_served_by_predict_with_the_data_set_classes() {
    let data = small_dataset();
    let params = Params {
        epochs: 6,
        batch_size: 4,
        augment: false,
        ..Params::default()
    };
    let (trained, _) = run(&data, &params, &FitOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("googlenet.safetensors");
    std::os::unix::fs::symlink(
        common::fixtures().join("googlenet/weights.safetensors"),
        &base,
    )
    .unwrap();
    let (_, identity) =
        cnnserve::weights::load_network_with_identity(Arch::Googlenet, &base, &Device::Cpu)
            .unwrap();
    let saved = train::output::save(
        &trained,
        "shapes",
        "googlenet",
        &identity,
        &params,
        dir.path(),
    )
    .unwrap();
    assert!(saved.weights.ends_with("shapes.safetensors") && saved.metadata.is_file());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 3, "no temporary files left: {names:?}");

    let classifier = cnnserve::engine::classifier::open(
        &saved.weights,
        None,
        &Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    assert_eq!(classifier.labels, vec!["stripes", "blobs"]);
    assert_eq!(classifier.transform.name(), "resize256x256");
    let meta = classifier.meta.as_ref().unwrap();
    assert_eq!(meta.metrics["best_epoch"], trained.best_epoch);
    assert_eq!(meta.params["epochs"], 6);
    // The served model classifies the test pictures as the evaluation said.
    for sample in &data.test {
        let xs = cnnserve::preprocess::to_normalized_tensor(&sample.image, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let predicted: Vec<u32> = classifier
            .logits(&xs)
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(predicted[0] as usize, sample.label, "{}", sample.file);
    }
}

#[test]
fn vgg_trains_its_whole_classifier_from_the_pretrained_layers() {
    let network =
        weights::load_network(Arch::Vgg11Bn, &common::vgg11_bn_weights(), &Device::Cpu).unwrap();
    let mut data = small_dataset();
    data.train.truncate(3);
    data.train
        .extend(small_dataset().train.into_iter().skip(6).take(3));
    data.test.clear();
    let params = Params {
        epochs: 1,
        batch_size: 4,
        augment: false,
        learning_rate: 1e-6,
        train_layers: TrainLayers::Classifier,
        ..Params::default()
    };
    let trained = fit_with(
        &network,
        Arch::Vgg11Bn,
        &data,
        &params,
        &FitOptions::default(),
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap();
    let mut names: Vec<_> = trained.tensors.keys().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "classifier.0.bias",
            "classifier.0.weight",
            "classifier.3.bias",
            "classifier.3.weight",
            "classifier.6.bias",
            "classifier.6.weight"
        ]
    );
    assert_eq!(trained.tensors["classifier.6.weight"].dims(), &[2, 4096]);
    assert_eq!(trained.evaluation.split, "validation");
    // One tiny Adam step moves each weight by about the learning rate, from the pretrained value.
    let Network::Vgg(vgg) = &network else {
        unreachable!()
    };
    let pretrained = vgg.hidden_layers().0.weight();
    let moved = common::max_abs_diff(&trained.tensors["classifier.0.weight"], pretrained);
    assert!(moved > 0.0 && moved <= 2e-6, "{moved}");
}

/// The recipe on the course note's own data, with the fixture GoogLeNet (random weights, so the
/// accuracy means little; the numbers' shapes and the loss going down do).
#[test]
fn the_recipe_runs_on_the_cat_and_dog_data_set() {
    let data = train::dataset::load(
        &common::data_dir().join("catanddog"),
        &train::DatasetLimits::default(),
        (256, 256),
    )
    .unwrap();
    assert_eq!(data.classes, vec!["Cat", "Dog"]);
    assert_eq!((data.train.len(), data.test.len()), (529, 12));
    let params = Params {
        augment: false,
        ..Params::default()
    };
    let (trained, _) = run(&data, &params, &FitOptions::default());
    assert_eq!(trained.history.len(), 5);
    // 90/10 per class: round(266 * 0.1) = 27 cats and round(263 * 0.1) = 26 dogs validate.
    assert_eq!(trained.counts.valid, vec![27, 26]);
    assert_eq!(trained.counts.train, vec![239, 237]);
    assert_eq!(trained.counts.test, vec![6, 6]);
    let first = &trained.history[0];
    let last = &trained.history[4];
    assert!(last.train_loss < first.train_loss, "{:?}", trained.history);
    let eval = &trained.evaluation;
    assert_eq!(eval.split, "test");
    let total: usize = eval.confusion_matrix.iter().flatten().sum();
    assert_eq!(total, 12);
    assert!(eval.test_loss.is_finite() && (0.0..=1.0).contains(&eval.test_acc));
    eprintln!(
        "catanddog, googlenet fixture, augment off: {:?} -> {eval:?}",
        trained.history
    );
}

#[test]
fn the_finetune_command_trains_writes_and_the_result_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (c, class) in ["stripes", "blobs"].iter().enumerate() {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..5u64 {
            picture(c, i * 3 + c as u64)
                .save(data.join(class).join(format!("{i}.png")))
                .unwrap();
        }
    }
    let weights_dir = dir.path().join("weights");
    std::fs::create_dir_all(&weights_dir).unwrap();
    let base = weights_dir.join("googlenet.safetensors");
    std::os::unix::fs::symlink(
        common::fixtures().join("googlenet/weights.safetensors"),
        &base,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cnnserve"))
        .args([
            "finetune",
            "--base-model",
            "googlenet",
            "--epochs",
            "3",
            "--batch-size",
            "4",
        ])
        .args([
            "--augment",
            "false",
            "--name",
            "shapes",
            "--valid-ratio",
            "0.2",
        ])
        .arg("--dataset")
        .arg(&data)
        .arg("--weights")
        .arg(&base)
        .arg("--weights-dir")
        .arg(&weights_dir)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("2 classes (blobs, stripes)"), "{stderr}");
    assert!(stdout.contains("train_loss"), "{stdout}");
    let epochs = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with(['1', '2', '3']))
        .count();
    assert_eq!(epochs, 3, "one table row per epoch: {stdout}");
    assert!(
        stdout.contains("best epoch") && stdout.contains("confusion matrix"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("note:"),
        "the base sits in the weights dir: {stdout}"
    );
    assert!(
        weights_dir.join("shapes.safetensors").is_file()
            && weights_dir.join("shapes.json").is_file()
    );

    let predict = std::process::Command::new(env!("CARGO_BIN_EXE_cnnserve"))
        .args(["predict", "--json", "--weights"])
        .arg(weights_dir.join("shapes.safetensors"))
        .arg(data.join("blobs/0.png"))
        .output()
        .unwrap();
    assert!(
        predict.status.success(),
        "{}",
        String::from_utf8_lossy(&predict.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&predict.stdout).unwrap();
    let labels: Vec<&str> = line["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels.len(), 2);
    assert!(labels.contains(&"blobs") && labels.contains(&"stripes"));

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_cnnserve"))
        .args([
            "finetune",
            "--base-model",
            "googlenet",
            "--train-layers",
            "classifier",
        ])
        .arg("--dataset")
        .arg(&data)
        .arg("--weights")
        .arg(&base)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("train_layers=head"));
}

/// What training and loading report from candle is a sentence, also when candle captured a
/// backtrace (it does under `RUST_BACKTRACE=1`): jobs store it as their `error`.
#[test]
fn training_and_weights_errors_drop_candle_backtraces() {
    let with_backtrace = |msg: &str| candle_core::Error::WithBacktrace {
        inner: Box::new(candle_core::Error::Msg(msg.into())),
        backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
    };
    let e = train::TrainError::from(with_backtrace("device mismatch in conv2d"));
    assert_eq!(e.to_string(), "training failed: device mismatch in conv2d");
    let e = cnnserve::weights::WeightsError::from(with_backtrace("bad tensor"));
    assert_eq!(e.to_string(), "bad tensor");
}
