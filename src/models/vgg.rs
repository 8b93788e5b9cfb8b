//! VGG 11/13/16/19, with and without batch norm, as torchvision builds them
//! (`torchvision/models/vgg.py`: `cfgs`, `make_layers`, `VGG`).
//!
//! Key tree: `features.{i}` numbers every module of the feature stack, ReLUs and max-pools included,
//! so a conv sits at `features.{i}` and its batch norm at `features.{i+1}`; the classifier is
//! `Linear(512·7·7, 4096) ReLU Dropout Linear(4096, 4096) ReLU Dropout Linear(4096, classes)`, hence
//! `classifier.{0,3,6}`. Quirks kept: `AdaptiveAvgPool2d((7, 7))` before the classifier (overlapping
//! windows for 256×256 input, repeated cells below 224×224), dropout 0.5 active only in training.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

use super::cpu::{self, Act, ConvKind, CpuConv, Isa};
use super::layers::{self, ConvBn, ConvBnConfig, MaxPool2d};

/// One entry of torchvision's `cfgs`: a 3×3 convolution with this many output channels, or a 2×2 max-pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Conv(usize),
    Pool,
}

use Stage::{Conv as C, Pool as M};

/// torchvision's `cfgs["A"]`, `["B"]`, `["D"]`, `["E"]`.
#[rustfmt::skip]
pub const VGG11: &[Stage] = &[C(64), M, C(128), M, C(256), C(256), M, C(512), C(512), M, C(512), C(512), M];
#[rustfmt::skip]
pub const VGG13: &[Stage] = &[
    C(64), C(64), M, C(128), C(128), M, C(256), C(256), M, C(512), C(512), M, C(512), C(512), M,
];
#[rustfmt::skip]
pub const VGG16: &[Stage] = &[
    C(64), C(64), M, C(128), C(128), M, C(256), C(256), C(256), M, C(512), C(512), C(512), M,
    C(512), C(512), C(512), M,
];
#[rustfmt::skip]
pub const VGG19: &[Stage] = &[
    C(64), C(64), M, C(128), C(128), M, C(256), C(256), C(256), C(256), M, C(512), C(512), C(512),
    C(512), M, C(512), C(512), C(512), C(512), M,
];

/// The shape of a VGG: the layer table, batch norm or not, and the classifier's sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VggConfig {
    pub stages: Vec<Stage>,
    pub batch_norm: bool,
    pub hidden: usize,
    pub num_classes: usize,
}

impl VggConfig {
    /// The ImageNet model torchvision builds for this table.
    pub fn imagenet(stages: &[Stage], batch_norm: bool, num_classes: usize) -> Self {
        Self {
            stages: stages.to_vec(),
            batch_norm,
            hidden: 4096,
            num_classes,
        }
    }

    /// The same key tree with every width divided by `divisor`: kilobytes of weights for tests.
    pub fn narrowed(mut self, divisor: usize) -> Self {
        for stage in &mut self.stages {
            if let Stage::Conv(c) = stage {
                *c = (*c / divisor).max(1);
            }
        }
        self.hidden = (self.hidden / divisor).max(1);
        self
    }

    fn last_channels(&self) -> usize {
        self.stages
            .iter()
            .rev()
            .find_map(|s| match s {
                Stage::Conv(c) => Some(*c),
                Stage::Pool => None,
            })
            .unwrap_or(3)
    }
}

/// One module of `features` (its ReLU fused): a convolution (batch norm folded in) or a max-pool.
#[derive(Debug, Clone)]
enum Feature<C> {
    Conv(C),
    Pool,
}

/// The feature stack: candle's convolutions, or on the CPU in f32 the same ones packed for
/// [`cpu`]'s kernels (the candle copies are dropped then, so the weights are held once).
#[derive(Debug, Clone)]
enum Features {
    Candle(Vec<Feature<Conv2d>>),
    Cpu(Vec<Feature<CpuConv>>),
}

/// torchvision's `VGG` module.
#[derive(Debug, Clone)]
pub struct Vgg {
    features: Features,
    last_channels: usize,
    classifier_0: Linear,
    classifier_3: Linear,
    classifier_6: Linear,
}

const POOLED: usize = 7;
/// `classifier.2` and `classifier.5`.
pub const DROPOUT: f32 = 0.5;
/// Five 2×2 pools must leave at least one pixel.
pub const MIN_INPUT_SIDE: usize = 32;

impl Vgg {
    pub fn new(cfg: &VggConfig, vb: VarBuilder) -> Result<Self> {
        let (bf16, vb) = layers::cpu_bf16(vb)?;
        let features_vb = vb.pp("features");
        let conv_cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let mut features = Vec::new();
        let mut index = 0;
        let mut in_channels = 3;
        for stage in &cfg.stages {
            match *stage {
                Stage::Pool => {
                    features.push(Feature::Pool);
                    index += 1;
                }
                Stage::Conv(out_channels) if cfg.batch_norm => {
                    let conv = ConvBn::new(
                        in_channels,
                        out_channels,
                        3,
                        ConvBnConfig {
                            conv: conv_cfg,
                            conv_bias: true,
                            eps: 1e-5,
                        },
                        features_vb.pp(index),
                        features_vb.pp(index + 1),
                    )?;
                    features.push(Feature::Conv(conv.conv().clone()));
                    index += 3; // conv, bn, relu
                    in_channels = out_channels;
                }
                Stage::Conv(out_channels) => {
                    features.push(Feature::Conv(layers::conv2d(
                        in_channels,
                        out_channels,
                        3,
                        conv_cfg,
                        features_vb.pp(index),
                    )?));
                    index += 2; // conv, relu
                    in_channels = out_channels;
                }
            }
        }
        let features = if layers::uses_cpu_kernels(&vb) {
            use rayon::prelude::*;
            // The last stage runs on 14×14 maps at 224×224, which F(4,3) covers with 16×16 of
            // tiles: F(2,3) tiles them exactly, nearly as fast, with 16/9 the weights instead of
            // 4× (75 MB less for vgg11).
            let last_stage = features
                .iter()
                .rposition(|f| matches!(f, Feature::Pool))
                .and_then(|last| {
                    features[..last]
                        .iter()
                        .rposition(|f| matches!(f, Feature::Pool))
                })
                .unwrap_or(0);
            let packed = features.par_iter().enumerate().map(|(i, f)| match f {
                Feature::Conv(conv) => {
                    let kind = (i > last_stage).then_some(ConvKind::WinogradF23);
                    Ok(Feature::Conv(layers::cpu_conv(conv, kind, bf16)?))
                }
                Feature::Pool => Ok(Feature::Pool),
            });
            Features::Cpu(packed.collect::<Result<_>>()?)
        } else {
            Features::Candle(features)
        };
        let flat = cfg.last_channels() * POOLED * POOLED;
        let classifier = vb.pp("classifier");
        Ok(Self {
            features,
            last_channels: cfg.last_channels(),
            classifier_0: candle_nn::linear(flat, cfg.hidden, classifier.pp(0))?,
            classifier_3: candle_nn::linear(cfg.hidden, cfg.hidden, classifier.pp(3))?,
            classifier_6: candle_nn::linear(cfg.hidden, cfg.num_classes, classifier.pp(6))?,
        })
    }

    /// `features` + `avgpool` + `flatten`: what `classifier.0` reads, `[N, 512·7·7]`.
    pub fn pooled(&self, xs: &Tensor) -> Result<Tensor> {
        layers::check_input(xs, MIN_INPUT_SIDE)?;
        let features = match &self.features {
            Features::Cpu(features) => return cpu::in_pool(|| self.pooled_cpu(features, xs)),
            Features::Candle(features) => features,
        };
        let mut xs = xs.clone();
        for layer in features {
            xs = match layer {
                Feature::Conv(conv) => conv.forward(&xs)?.relu()?,
                Feature::Pool => xs.max_pool2d(2)?,
            };
        }
        layers::flatten(&layers::adaptive_avg_pool2d(&xs, POOLED, POOLED)?)
    }

    /// [`Vgg::pooled`] through the CPU kernels, on NHWC maps from the first layer to the last.
    fn pooled_cpu(&self, features: &[Feature<CpuConv>], xs: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = xs.dims4()?;
        let data = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut act = Act::from_nchw(&data, n, c, h, w);
        let isa = Isa::best();
        for layer in features {
            act = match layer {
                Feature::Conv(conv) => {
                    let (ho, wo) = conv.output_size(act.h, act.w);
                    let mut out = Act::new(n, ho, wo, conv.c_out());
                    conv.forward(isa, act.map(), out.map(), true);
                    out
                }
                Feature::Pool => cpu::pool::max_pool(act.map(), &MaxPool2d::new(2, 2))?,
            };
        }
        let flat = cpu::pool::adaptive_avg_pool_flat(act.map(), POOLED, POOLED);
        Tensor::from_vec(flat, (n, self.last_channels * POOLED * POOLED), xs.device())
    }

    /// `classifier.0` … `classifier.4` on pooled features: the 4096-wide input of the last layer.
    pub fn hidden_from_pooled(&self, pooled: &Tensor, train: bool) -> Result<Tensor> {
        let xs = self.classifier_0.forward(pooled)?.relu()?;
        let xs = layers::dropout(&xs, DROPOUT, train)?;
        self.classifier_3.forward(&xs)?.relu()
    }

    /// The frozen embedding a new head is trained on: the 4096 activations after `classifier.3` + ReLU.
    pub fn features(&self, xs: &Tensor) -> Result<Tensor> {
        self.hidden_from_pooled(&self.pooled(xs)?, false)
    }

    /// `classifier.5` (dropout) + `classifier.6` on the embedding.
    pub fn head_forward(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        self.classifier_6
            .forward(&layers::dropout(features, DROPOUT, train)?)
    }

    /// Whether the CPU kernels run its convolutions in bf16.
    pub fn cpu_bf16(&self) -> bool {
        match &self.features {
            Features::Cpu(features) => features.iter().any(|f| match f {
                Feature::Conv(conv) => conv.is_bf16(),
                Feature::Pool => false,
            }),
            Features::Candle(_) => false,
        }
    }

    /// The last layer, `classifier.6`.
    pub fn head(&self) -> &Linear {
        &self.classifier_6
    }

    /// `classifier.0` and `classifier.3`, the starting point when the whole classifier trains.
    pub fn hidden_layers(&self) -> (&Linear, &Linear) {
        (&self.classifier_0, &self.classifier_3)
    }

    pub fn num_classes(&self) -> usize {
        self.classifier_6.weight().dim(0).unwrap_or(0)
    }

    /// Where the weights live, and so where inputs must be and the work runs.
    pub fn device(&self) -> &candle_core::Device {
        self.classifier_6.weight().device()
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let hidden = self.hidden_from_pooled(&self.pooled(xs)?, train)?;
        self.head_forward(&hidden, train)
    }
}
