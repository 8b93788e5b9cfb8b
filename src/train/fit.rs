//! The training loop: a new head on frozen features, Adam, cross-entropy, the checkpoint with the
//! best validation loss, and the evaluation people need to trust the result.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::dataset::class_counts;
use super::{augment, Dataset, Params, Sample, TrainError};
use crate::models::{layers, Arch, Head, Network, TrainLayers};
use crate::preprocess;

/// What a run is doing, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Decoding and checking the data set.
    Reading,
    /// Running the frozen network once per image, to train on stored features.
    Caching,
    Training,
    /// Scoring the kept checkpoint on the test (or validation) split.
    Evaluating,
    /// Writing and publishing the model.
    Saving,
    /// Finished: the figures are final.
    Done,
}

/// Where a run is: sent when a phase starts, at every cached chunk and training step, and once
/// more when it is done (with final figures: the whole run's speed, no time left).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub phase: Phase,
    /// Units of this phase done and in all: images (caching), steps of the whole run (training).
    pub done: usize,
    pub total: usize,
    /// 1-based; 0 before training.
    pub epoch: usize,
    pub epochs: usize,
    /// Steps done in this epoch, and steps per epoch.
    pub step: usize,
    pub steps: usize,
    /// Training speed: of the current epoch while training, of the whole training once done.
    pub images_per_s: f64,
    pub eta_s: f64,
}

impl Progress {
    /// A phase with nothing counted yet (or nothing to count).
    pub fn phase(phase: Phase, epochs: usize) -> Self {
        Self {
            phase,
            done: 0,
            total: 0,
            epoch: 0,
            epochs,
            step: 0,
            steps: 0,
            images_per_s: 0.0,
            eta_s: 0.0,
        }
    }

    /// The same figures, in `phase`; a finished run shows no time left.
    pub fn moved_to(&self, phase: Phase) -> Self {
        Self {
            phase,
            eta_s: 0.0,
            ..self.clone()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_acc: f64,
    pub valid_loss: f64,
    pub valid_acc: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Event {
    Progress(Progress),
    Epoch(EpochMetrics),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClassMetrics {
    pub class: String,
    pub accuracy: f64,
    pub support: usize,
}

/// One of the most confident predictions, right or wrong: the recipe's gallery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Example {
    pub file: String,
    pub true_label: String,
    pub predicted_label: String,
    pub probability: f64,
    pub correct: bool,
}

/// The best checkpoint on the test split (or on the validation split when there is no test split).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Evaluation {
    /// `test` or `validation`.
    pub split: String,
    pub test_loss: f64,
    pub test_acc: f64,
    /// Rows are the true class, columns the predicted one.
    pub confusion_matrix: Vec<Vec<usize>>,
    pub per_class: Vec<ClassMetrics>,
    /// The most confident correct predictions first, then the most confident wrong ones.
    pub examples: Vec<Example>,
}

/// Images per class in each split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SplitCounts {
    pub train: Vec<usize>,
    pub valid: Vec<usize>,
    pub test: Vec<usize>,
}

#[derive(Debug)]
pub struct TrainedHead {
    /// The last training figures (the whole run's speed), for a finished job's `progress`.
    pub progress: Progress,
    pub arch: Arch,
    pub train_layers: TrainLayers,
    pub classes: Vec<String>,
    /// The best checkpoint's tensors, under torchvision's names.
    pub tensors: HashMap<String, Tensor>,
    pub history: Vec<EpochMetrics>,
    /// 1-based epoch of the kept checkpoint.
    pub best_epoch: usize,
    pub evaluation: Evaluation,
    pub counts: SplitCounts,
}

/// How [`fit_with`] runs, beyond the recipe. There is no device here: training runs where the
/// network's weights are ([`Network::device`]).
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// Without augmentation, run the frozen part once per image and train on the stored outputs.
    /// Off only to check that caching changes nothing.
    pub cache_features: bool,
    /// How many of the most confident correct and wrong predictions to keep, each.
    pub examples: usize,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            cache_features: true,
            examples: 8,
        }
    }
}

/// Trains a head for `data` on the frozen `network` with the recipe in `params`.
pub fn fit(
    network: &Network,
    arch: Arch,
    data: &Dataset,
    params: &Params,
    progress: &mut dyn FnMut(Event),
    cancel: &AtomicBool,
) -> Result<TrainedHead, TrainError> {
    fit_with(
        network,
        arch,
        data,
        params,
        &FitOptions::default(),
        progress,
        cancel,
    )
}

/// Independent random streams, so that changing one knob (augmentation, say) leaves the split,
/// the initialisation and the batch order as they were.
struct Streams {
    split: ChaCha8Rng,
    init: ChaCha8Rng,
    shuffle: ChaCha8Rng,
    augment: ChaCha8Rng,
    dropout: ChaCha8Rng,
}

impl Streams {
    fn new(seed: u64) -> Self {
        let stream = |n: u64| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(n);
            rng
        };
        Self {
            split: stream(1),
            init: stream(2),
            shuffle: stream(3),
            augment: stream(4),
            dropout: stream(5),
        }
    }
}

/// Largest number of images pushed through the frozen network at once when only features are
/// wanted: VGG's im2col buffers grow with it, and the speed does not.
const FEATURE_CHUNK: usize = 16;

pub fn fit_with(
    network: &Network,
    arch: Arch,
    data: &Dataset,
    params: &Params,
    options: &FitOptions,
    progress: &mut dyn FnMut(Event),
    cancel: &AtomicBool,
) -> Result<TrainedHead, TrainError> {
    TrainError::check(arch, params)?;
    let device = network.device();
    let layers = params.train_layers;
    let classes = data.classes.len();
    let mut rng = Streams::new(params.seed);

    let (train_idx, valid_idx) = split(&data.train, classes, params.valid_ratio, &mut rng.split);
    let train: Vec<&Sample> = train_idx.iter().map(|&i| &data.train[i]).collect();
    let valid: Vec<&Sample> = valid_idx.iter().map(|&i| &data.train[i]).collect();
    let (eval_split, eval): (&'static str, Vec<&Sample>) = if data.test.is_empty() {
        ("validation", valid.clone())
    } else {
        ("test", data.test.iter().collect())
    };

    let frozen = |images: &[&RgbImage]| -> Result<Tensor, TrainError> {
        let mut inputs = Vec::with_capacity(images.len());
        for image in images {
            inputs.push(preprocess::to_normalized_tensor(image, device)?);
        }
        let xs = Tensor::stack(&inputs, 0)?;
        Ok(layers.frozen_input(network, &xs)?)
    };
    // Images whose features are stored before training: validation, test, and without
    // augmentation the training split.
    let caches_train = !params.augment && options.cache_features;
    let to_cache = valid.len()
        + if data.test.is_empty() { 0 } else { eval.len() }
        + if caches_train { train.len() } else { 0 };
    let mut cached = 0;
    progress(Event::Progress(Progress {
        total: to_cache,
        ..Progress::phase(Phase::Caching, params.epochs)
    }));
    let mut features_of = |samples: &[&Sample]| -> Result<Tensor, TrainError> {
        let mut chunks = Vec::new();
        for chunk in samples.chunks(FEATURE_CHUNK) {
            if cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let images: Vec<&RgbImage> = chunk.iter().map(|s| &s.image).collect();
            chunks.push(frozen(&images)?);
            cached += chunk.len();
            progress(Event::Progress(Progress {
                done: cached,
                total: to_cache,
                ..Progress::phase(Phase::Caching, params.epochs)
            }));
        }
        Ok(Tensor::cat(&chunks, 0)?)
    };
    let labels_of =
        |samples: &[&Sample]| -> Vec<u32> { samples.iter().map(|s| s.label as u32).collect() };

    let valid_features = features_of(&valid)?;
    let eval_features = if data.test.is_empty() {
        valid_features.clone()
    } else {
        features_of(&eval)?
    };
    let train_cache = if caches_train {
        Some(features_of(&train)?)
    } else {
        None
    };

    let varmap = VarMap::new();
    init_head(&varmap, network, layers, classes, device, &mut rng.init)?;
    let head = Head::new(
        arch,
        layers,
        classes,
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )?;
    let mut optimizer = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: params.learning_rate,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        },
    )?;

    let steps = train.len().div_ceil(params.batch_size);
    let total_steps = steps * params.epochs;
    let started = Instant::now();
    let mut trained_images = 0usize;
    let mut last = Progress::phase(Phase::Training, params.epochs);
    let mut history = Vec::with_capacity(params.epochs);
    let mut best: Option<(f64, usize, HashMap<String, Tensor>)> = None;
    for epoch in 1..=params.epochs {
        let epoch_started = Instant::now();
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut rng.shuffle);
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0usize, 0usize);
        for (step, batch) in order.chunks(params.batch_size).enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let inputs = match &train_cache {
                Some(cache) => {
                    let rows: Vec<u32> = batch.iter().map(|&i| i as u32).collect();
                    cache.index_select(&Tensor::new(rows, device)?, 0)?
                }
                None if params.augment => {
                    let images: Vec<RgbImage> = batch
                        .iter()
                        .map(|&i| augment::random_augment(&train[i].image, &mut rng.augment))
                        .collect();
                    frozen(&images.iter().collect::<Vec<_>>())?
                }
                None => frozen(&batch.iter().map(|&i| &train[i].image).collect::<Vec<_>>())?,
            };
            let targets: Vec<u32> = batch.iter().map(|&i| train[i].label as u32).collect();
            let targets = Tensor::new(targets.as_slice(), device)?;
            let logits = head.forward_with_dropout(&inputs, &mut |xs, p| {
                seeded_dropout(xs, p, &mut rng.dropout)
            })?;
            let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
            optimizer.backward_step(&loss)?;

            let n = batch.len();
            loss_sum += f64::from(loss.to_scalar::<f32>()?) * n as f64;
            correct += count_correct(&logits, &targets)?;
            seen += n;
            let done = (epoch - 1) * steps + step + 1;
            let per_step = started.elapsed().as_secs_f64() / done as f64;
            trained_images += n;
            last = Progress {
                phase: Phase::Training,
                done,
                total: total_steps,
                epoch,
                epochs: params.epochs,
                step: step + 1,
                steps,
                images_per_s: seen as f64 / epoch_started.elapsed().as_secs_f64().max(1e-9),
                eta_s: per_step * (total_steps - done) as f64,
            };
            progress(Event::Progress(last.clone()));
        }
        let scored = score(&head, &valid_features, &labels_of(&valid), device)?;
        let metrics = EpochMetrics {
            epoch,
            train_loss: loss_sum / seen.max(1) as f64,
            train_acc: correct as f64 / seen.max(1) as f64,
            valid_loss: scored.loss,
            valid_acc: scored.accuracy(),
        };
        if best
            .as_ref()
            .is_none_or(|(loss, _, _)| metrics.valid_loss < *loss)
        {
            best = Some((metrics.valid_loss, epoch, snapshot(&varmap)?));
        }
        progress(Event::Epoch(metrics.clone()));
        history.push(metrics);
    }

    let (_, best_epoch, tensors) = best.expect("at least one epoch ran");
    // From here on the figures are the whole training's.
    last.images_per_s = trained_images as f64 / started.elapsed().as_secs_f64().max(1e-9);
    progress(Event::Progress(last.moved_to(Phase::Evaluating)));
    let best_head = Head::new(
        arch,
        layers,
        classes,
        VarBuilder::from_tensors(tensors.clone(), DType::F32, device),
    )?;
    let scored = score(&best_head, &eval_features, &labels_of(&eval), device)?;
    let evaluation = evaluate(eval_split, &scored, &eval, &data.classes, options.examples);
    Ok(TrainedHead {
        progress: last,
        arch,
        train_layers: layers,
        classes: data.classes.clone(),
        tensors,
        history,
        best_epoch,
        evaluation,
        counts: SplitCounts {
            train: class_counts(classes, train.iter().copied()),
            valid: class_counts(classes, valid.iter().copied()),
            test: class_counts(classes, &data.test),
        },
    })
}

/// Images per class in each split, as [`fit`] will make them for `params` (the split depends on
/// the seed alone).
pub fn split_counts(data: &Dataset, params: &Params) -> SplitCounts {
    let classes = data.classes.len();
    let mut rng = Streams::new(params.seed);
    let (train, valid) = split(&data.train, classes, params.valid_ratio, &mut rng.split);
    SplitCounts {
        train: class_counts(classes, train.iter().map(|&i| &data.train[i])),
        valid: class_counts(classes, valid.iter().map(|&i| &data.train[i])),
        test: class_counts(classes, &data.test),
    }
}

/// Per class, a shuffled `valid_ratio` share (rounded, at least one, never all) goes to
/// validation; the rest trains. Returns indices into `samples`, each list in data-set order.
pub fn split(
    samples: &[Sample],
    classes: usize,
    valid_ratio: f64,
    rng: &mut impl Rng,
) -> (Vec<usize>, Vec<usize>) {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, s) in samples.iter().enumerate() {
        by_class[s.label].push(i);
    }
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for mut members in by_class {
        members.shuffle(rng);
        let n = members.len();
        let n_valid =
            ((n as f64 * valid_ratio).round() as usize).clamp(1, n.saturating_sub(1).max(1));
        let n_valid = if n < 2 { 0 } else { n_valid };
        valid.extend_from_slice(&members[..n_valid]);
        train.extend_from_slice(&members[n_valid..]);
    }
    train.sort_unstable();
    valid.sort_unstable();
    (train, valid)
}

/// `nn.Linear`'s own initialisation: weight and bias uniform in ±1/sqrt(fan_in). VGG's
/// `classifier.0` and `.3` start from the pretrained layers when the whole classifier trains.
fn init_head(
    varmap: &VarMap,
    network: &Network,
    layers: TrainLayers,
    classes: usize,
    device: &Device,
    rng: &mut impl Rng,
) -> Result<(), TrainError> {
    let mut uniform = |shape: &[usize], fan_in: usize| -> candle_core::Result<Tensor> {
        let bound = 1.0 / (fan_in as f32).sqrt();
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
        Tensor::from_vec(values, shape, device)
    };
    let mut vars = varmap.data().lock().expect("varmap lock");
    let arch_last = match network {
        Network::GoogLeNet(_) => "fc",
        Network::Vgg(_) => "classifier.6",
    };
    let width = match network {
        Network::GoogLeNet(_) => crate::models::googlenet::EMBEDDING,
        Network::Vgg(_) => 4096,
    };
    let mut put = |name: String, t: Tensor| -> candle_core::Result<()> {
        vars.insert(name, candle_core::Var::from_tensor(&t)?);
        Ok(())
    };
    put(
        format!("{arch_last}.weight"),
        uniform(&[classes, width], width)?,
    )?;
    put(format!("{arch_last}.bias"), uniform(&[classes], width)?)?;
    if layers == TrainLayers::Classifier {
        let Network::Vgg(vgg) = network else {
            unreachable!("checked: only VGG trains its classifier")
        };
        let (fc0, fc3) = vgg.hidden_layers();
        for (prefix, linear) in [("classifier.0", fc0), ("classifier.3", fc3)] {
            put(format!("{prefix}.weight"), linear.weight().copy()?)?;
            let bias = linear
                .bias()
                .expect("torchvision's Linear layers have biases");
            put(format!("{prefix}.bias"), bias.copy()?)?;
        }
    }
    Ok(())
}

/// Copies of the trainable tensors: the optimizer updates the variables in place.
fn snapshot(varmap: &VarMap) -> candle_core::Result<HashMap<String, Tensor>> {
    let vars = varmap.data().lock().expect("varmap lock");
    vars.iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?)))
        .collect()
}

/// Inverted dropout with a mask from our own generator (candle's draws from an unseeded one).
fn seeded_dropout(xs: &Tensor, p: f32, rng: &mut impl Rng) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return Ok(xs.clone());
    }
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..xs.elem_count())
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
        .collect();
    xs * Tensor::from_vec(mask, xs.shape(), xs.device())?
}

fn count_correct(logits: &Tensor, targets: &Tensor) -> candle_core::Result<usize> {
    let predicted = logits.argmax(1)?;
    let hits = predicted.eq(targets)?.to_dtype(DType::U32)?.sum_all()?;
    Ok(hits.to_scalar::<u32>()? as usize)
}

/// Eval-mode predictions on stored features.
struct Scored {
    loss: f64,
    labels: Vec<u32>,
    predicted: Vec<u32>,
    /// Softmax probability of the predicted class.
    confidence: Vec<f32>,
}

impl Scored {
    fn accuracy(&self) -> f64 {
        let hits = self
            .labels
            .iter()
            .zip(&self.predicted)
            .filter(|(a, b)| a == b)
            .count();
        hits as f64 / self.labels.len().max(1) as f64
    }
}

fn score(
    head: &Head,
    features: &Tensor,
    labels: &[u32],
    device: &Device,
) -> Result<Scored, TrainError> {
    if labels.is_empty() {
        return Ok(Scored {
            loss: 0.0,
            labels: Vec::new(),
            predicted: Vec::new(),
            confidence: Vec::new(),
        });
    }
    let logits = head.forward_t(features, false)?;
    let targets = Tensor::new(labels, device)?;
    let loss = f64::from(candle_nn::loss::cross_entropy(&logits, &targets)?.to_scalar::<f32>()?);
    let probabilities = layers::softmax(&logits)?;
    let predicted: Vec<u32> = probabilities.argmax(1)?.to_vec1()?;
    let confidence: Vec<f32> = probabilities.max(1)?.to_vec1()?;
    Ok(Scored {
        loss,
        labels: labels.to_vec(),
        predicted,
        confidence,
    })
}

fn evaluate(
    split: &'static str,
    scored: &Scored,
    samples: &[&Sample],
    classes: &[String],
    examples: usize,
) -> Evaluation {
    let n = classes.len();
    let mut confusion = vec![vec![0usize; n]; n];
    for (&truth, &guess) in scored.labels.iter().zip(&scored.predicted) {
        confusion[truth as usize][guess as usize] += 1;
    }
    let per_class = classes
        .iter()
        .enumerate()
        .map(|(i, class)| {
            let support: usize = confusion[i].iter().sum();
            ClassMetrics {
                class: class.clone(),
                accuracy: if support == 0 {
                    0.0
                } else {
                    confusion[i][i] as f64 / support as f64
                },
                support,
            }
        })
        .collect();
    let mut ranked: Vec<usize> = (0..scored.labels.len()).collect();
    ranked.sort_by(|&a, &b| {
        scored.confidence[b]
            .total_cmp(&scored.confidence[a])
            .then(a.cmp(&b))
    });
    let example = |i: usize| Example {
        file: samples[i].file.clone(),
        true_label: classes[scored.labels[i] as usize].clone(),
        predicted_label: classes[scored.predicted[i] as usize].clone(),
        probability: f64::from(scored.confidence[i]),
        correct: scored.labels[i] == scored.predicted[i],
    };
    let correct = ranked
        .iter()
        .copied()
        .map(example)
        .filter(|e| e.correct)
        .take(examples);
    let wrong = ranked
        .iter()
        .copied()
        .map(example)
        .filter(|e| !e.correct)
        .take(examples);
    Evaluation {
        split: split.to_string(),
        test_loss: scored.loss,
        test_acc: scored.accuracy(),
        confusion_matrix: confusion,
        per_class,
        examples: correct.chain(wrong).collect(),
    }
}
