//! A new classifier head on a frozen pretrained network: what fine-tuning trains and what a
//! fine-tuned model file holds, under torchvision's own key names (`fc.*`, `classifier.{0,3,6}.*`).

use candle_core::{Result, Tensor};
use candle_nn::{Linear, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{googlenet, layers, vgg, Arch, Network};

/// Which layers fine-tuning replaces and trains; everything before them stays frozen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainLayers {
    /// The last Linear: VGG's `classifier.6`, GoogLeNet's `fc`.
    #[default]
    Head,
    /// VGG's three Linear layers, `classifier.{0,3,6}`.
    Classifier,
}

impl std::str::FromStr for TrainLayers {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        TrainLayers::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown layers `{s}` (known: head, classifier)"))
    }
}

impl TrainLayers {
    pub const ALL: [TrainLayers; 2] = [TrainLayers::Head, TrainLayers::Classifier];

    pub fn name(self) -> &'static str {
        match self {
            TrainLayers::Head => "head",
            TrainLayers::Classifier => "classifier",
        }
    }

    /// Whether `arch` has such layers (GoogLeNet has a single `fc`).
    pub fn supported_by(self, arch: Arch) -> bool {
        self == TrainLayers::Head || arch != Arch::Googlenet
    }

    /// Width of the frozen input the trained layers read.
    pub fn input_width(self, arch: Arch) -> usize {
        match self {
            TrainLayers::Head => arch.embedding_width(),
            TrainLayers::Classifier => 512 * 7 * 7,
        }
    }

    /// What the frozen part of `network` hands these layers: [`Network::features`] for the last
    /// layer, [`Network::pooled`] for VGG's whole classifier.
    pub fn frozen_input(self, network: &Network, xs: &Tensor) -> Result<Tensor> {
        match self {
            TrainLayers::Head => network.features(xs),
            TrainLayers::Classifier => network.pooled(xs),
        }
    }

    /// The tensors a head of this kind holds, with their shapes, in torchvision's names.
    pub fn tensor_shapes(self, arch: Arch, num_classes: usize) -> Vec<(String, Vec<usize>)> {
        let linear = |prefix: &str, out: usize, inp: usize| {
            [
                (format!("{prefix}.weight"), vec![out, inp]),
                (format!("{prefix}.bias"), vec![out]),
            ]
        };
        match (self, arch) {
            (TrainLayers::Head, Arch::Googlenet) => {
                linear("fc", num_classes, googlenet::EMBEDDING).to_vec()
            }
            (TrainLayers::Head, _) => linear("classifier.6", num_classes, 4096).to_vec(),
            (TrainLayers::Classifier, _) => [
                linear("classifier.0", 4096, 512 * 7 * 7),
                linear("classifier.3", 4096, 4096),
                linear("classifier.6", num_classes, 4096),
            ]
            .concat(),
        }
    }
}

/// The replaced layers, applied to the frozen network's output.
#[derive(Debug, Clone)]
pub enum Head {
    /// One Linear on [`Network::features`], after the dropout that precedes it in torchvision.
    Last { linear: Linear, dropout: f32 },
    /// VGG's whole classifier on the pooled conv features.
    Classifier {
        fc0: Linear,
        fc3: Linear,
        fc6: Linear,
    },
}

impl Head {
    /// Reads a head of `layers` kind for `arch` under torchvision's names; `vb` is the model's root.
    pub fn new(
        arch: Arch,
        layers: TrainLayers,
        num_classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if !layers.supported_by(arch) {
            candle_core::bail!("{arch} has no `{}` layers to train", layers.name());
        }
        Ok(match (layers, arch) {
            (TrainLayers::Head, Arch::Googlenet) => Head::Last {
                linear: candle_nn::linear(googlenet::EMBEDDING, num_classes, vb.pp("fc"))?,
                dropout: googlenet::DROPOUT,
            },
            (TrainLayers::Head, _) => Head::Last {
                linear: candle_nn::linear(4096, num_classes, vb.pp("classifier").pp(6))?,
                dropout: vgg::DROPOUT,
            },
            (TrainLayers::Classifier, _) => {
                let c = vb.pp("classifier");
                Head::Classifier {
                    fc0: candle_nn::linear(512 * 7 * 7, 4096, c.pp(0))?,
                    fc3: candle_nn::linear(4096, 4096, c.pp(3))?,
                    fc6: candle_nn::linear(4096, num_classes, c.pp(6))?,
                }
            }
        })
    }

    pub fn train_layers(&self) -> TrainLayers {
        match self {
            Head::Last { .. } => TrainLayers::Head,
            Head::Classifier { .. } => TrainLayers::Classifier,
        }
    }

    /// The frozen network's output this head reads, computed in eval mode.
    pub fn frozen_input(&self, network: &Network, xs: &Tensor) -> Result<Tensor> {
        self.train_layers().frozen_input(network, xs)
    }

    /// Logits from [`Head::frozen_input`]; dropout is active only when `train`.
    pub fn forward_t(&self, input: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with_dropout(input, &mut |xs, p| layers::dropout(xs, p, train))
    }

    /// Logits with the dropouts inside the head applied by `dropout(xs, p)`: training passes a
    /// seeded one, so that a run can be repeated exactly.
    pub fn forward_with_dropout(
        &self,
        input: &Tensor,
        dropout: &mut dyn FnMut(&Tensor, f32) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match self {
            Head::Last { linear, dropout: p } => linear.forward(&dropout(input, *p)?),
            Head::Classifier { fc0, fc3, fc6 } => {
                let xs = fc0.forward(input)?.relu()?;
                let xs = fc3.forward(&dropout(&xs, vgg::DROPOUT)?)?.relu()?;
                fc6.forward(&dropout(&xs, vgg::DROPOUT)?)
            }
        }
    }

    pub fn num_classes(&self) -> usize {
        let last = match self {
            Head::Last { linear, .. } => linear,
            Head::Classifier { fc6, .. } => fc6,
        };
        last.weight().dim(0).unwrap_or(0)
    }
}
