//! GoogLeNet (Inception v1) as torchvision builds it (`torchvision/models/googlenet.py`).
//!
//! Quirks kept, each of which changes the logits:
//! - `BasicConv2d` is a conv without bias + `BatchNorm2d(eps=0.001)` + ReLU (folded here, see [`ConvBn`]).
//! - `branch3`, called "5×5" in the paper and the argument names, is built with a 3×3 kernel.
//! - every max-pool uses `ceil_mode=True`; branch 4's 3×3 pool also pads by 1.
//! - `transform_input`, which torchvision turns on for its pretrained weights, re-maps the
//!   ImageNet-normalized input to the `(x - 0.5) / 0.5` normalization the weights were ported with.
//! - `aux1.*` / `aux2.*` exist in the checkpoint but only run in training; they are never loaded here.
//! - dropout (p = 0.2) sits between the pooled 1024 features and `fc`.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, Linear, VarBuilder};

use super::layers::{self, ConvBn, ConvBnConfig, MaxPool2d};

/// Key prefixes of the auxiliary classifiers, present in torchvision's files and unused in eval.
pub const AUX_PREFIXES: &[&str] = &["aux1.", "aux2."];
/// The dropout before `fc`.
pub const DROPOUT: f32 = 0.2;
pub const EMBEDDING: usize = 1024;
pub const MIN_INPUT_SIDE: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoogLeNetConfig {
    pub num_classes: usize,
    pub transform_input: bool,
}

impl GoogLeNetConfig {
    /// As `torchvision.models.googlenet(weights=...)` builds it for pretrained weights.
    pub fn imagenet(num_classes: usize) -> Self {
        Self {
            num_classes,
            transform_input: true,
        }
    }
}

/// `BasicConv2d`: `conv` (no bias) then `bn`.
#[derive(Debug, Clone)]
struct BasicConv2d(ConvBn);

impl BasicConv2d {
    fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = ConvBnConfig {
            conv: Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            },
            conv_bias: false,
            eps: 1e-3,
        };
        Ok(Self(ConvBn::new(
            in_channels,
            out_channels,
            kernel,
            cfg,
            vb.pp("conv"),
            vb.pp("bn"),
        )?))
    }
}

impl Module for BasicConv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.0.forward(xs)?.relu()
    }
}

/// `Inception(in, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj)`; branches concatenate on channels.
#[derive(Debug, Clone)]
struct Inception {
    branch1: BasicConv2d,
    branch2: [BasicConv2d; 2],
    branch3: [BasicConv2d; 2],
    branch4_pool: MaxPool2d,
    branch4_proj: BasicConv2d,
}

impl Inception {
    #[allow(clippy::too_many_arguments)] // torchvision's own signature, kept for side-by-side reading
    fn new(
        in_channels: usize,
        ch1x1: usize,
        ch3x3red: usize,
        ch3x3: usize,
        ch5x5red: usize,
        ch5x5: usize,
        pool_proj: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let b2 = vb.pp("branch2");
        let b3 = vb.pp("branch3");
        Ok(Self {
            branch1: BasicConv2d::new(in_channels, ch1x1, 1, 1, 0, vb.pp("branch1"))?,
            branch2: [
                BasicConv2d::new(in_channels, ch3x3red, 1, 1, 0, b2.pp(0))?,
                BasicConv2d::new(ch3x3red, ch3x3, 3, 1, 1, b2.pp(1))?,
            ],
            branch3: [
                BasicConv2d::new(in_channels, ch5x5red, 1, 1, 0, b3.pp(0))?,
                // torchvision: "kernel_size=3 instead of kernel_size=5 is a known bug"
                BasicConv2d::new(ch5x5red, ch5x5, 3, 1, 1, b3.pp(1))?,
            ],
            branch4_pool: MaxPool2d::new(3, 1).padding(1).ceil_mode(),
            branch4_proj: BasicConv2d::new(
                in_channels,
                pool_proj,
                1,
                1,
                0,
                vb.pp("branch4").pp(1),
            )?,
        })
    }
}

impl Module for Inception {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let b1 = self.branch1.forward(xs)?;
        let b2 = self.branch2[1].forward(&self.branch2[0].forward(xs)?)?;
        let b3 = self.branch3[1].forward(&self.branch3[0].forward(xs)?)?;
        let b4 = self.branch4_proj.forward(&self.branch4_pool.forward(xs)?)?;
        Tensor::cat(&[b1, b2, b3, b4], 1)
    }
}

/// torchvision's `GoogLeNet` in eval form (no aux heads).
#[derive(Debug, Clone)]
pub struct GoogLeNet {
    transform_input: Option<(Tensor, Tensor)>,
    conv1: BasicConv2d,
    conv2: BasicConv2d,
    conv3: BasicConv2d,
    inception3a: Inception,
    inception3b: Inception,
    inception4a: Inception,
    inception4b: Inception,
    inception4c: Inception,
    inception4d: Inception,
    inception4e: Inception,
    inception5a: Inception,
    inception5b: Inception,
    fc: Linear,
}

impl GoogLeNet {
    pub fn new(cfg: &GoogLeNetConfig, vb: VarBuilder) -> Result<Self> {
        let transform_input = if cfg.transform_input {
            // torchvision computes these constants in Python floats, then applies them in f32.
            let mean = [0.485f64, 0.456, 0.406];
            let std = [0.229f64, 0.224, 0.225];
            let scale: Vec<f32> = std.iter().map(|s| (s / 0.5) as f32).collect();
            let shift: Vec<f32> = mean.iter().map(|m| ((m - 0.5) / 0.5) as f32).collect();
            let dev = vb.device();
            Some((
                Tensor::from_vec(scale, (1, 3, 1, 1), dev)?.to_dtype(vb.dtype())?,
                Tensor::from_vec(shift, (1, 3, 1, 1), dev)?.to_dtype(vb.dtype())?,
            ))
        } else {
            None
        };
        Ok(Self {
            transform_input,
            conv1: BasicConv2d::new(3, 64, 7, 2, 3, vb.pp("conv1"))?,
            conv2: BasicConv2d::new(64, 64, 1, 1, 0, vb.pp("conv2"))?,
            conv3: BasicConv2d::new(64, 192, 3, 1, 1, vb.pp("conv3"))?,
            inception3a: Inception::new(192, 64, 96, 128, 16, 32, 32, vb.pp("inception3a"))?,
            inception3b: Inception::new(256, 128, 128, 192, 32, 96, 64, vb.pp("inception3b"))?,
            inception4a: Inception::new(480, 192, 96, 208, 16, 48, 64, vb.pp("inception4a"))?,
            inception4b: Inception::new(512, 160, 112, 224, 24, 64, 64, vb.pp("inception4b"))?,
            inception4c: Inception::new(512, 128, 128, 256, 24, 64, 64, vb.pp("inception4c"))?,
            inception4d: Inception::new(512, 112, 144, 288, 32, 64, 64, vb.pp("inception4d"))?,
            inception4e: Inception::new(528, 256, 160, 320, 32, 128, 128, vb.pp("inception4e"))?,
            inception5a: Inception::new(832, 256, 160, 320, 32, 128, 128, vb.pp("inception5a"))?,
            inception5b: Inception::new(832, 384, 192, 384, 48, 128, 128, vb.pp("inception5b"))?,
            fc: candle_nn::linear(EMBEDDING, cfg.num_classes, vb.pp("fc"))?,
        })
    }

    /// Everything up to `avgpool` + `flatten`: the frozen 1024-wide embedding a new `fc` trains on.
    pub fn features(&self, xs: &Tensor) -> Result<Tensor> {
        layers::check_input(xs, MIN_INPUT_SIDE)?;
        let pool = |k: usize| MaxPool2d::new(k, 2).ceil_mode();
        let mut xs = match &self.transform_input {
            Some((scale, shift)) => xs.broadcast_mul(scale)?.broadcast_add(shift)?,
            None => xs.clone(),
        };
        xs = self.conv1.forward(&xs)?;
        xs = pool(3).forward(&xs)?; // maxpool1
        xs = self.conv3.forward(&self.conv2.forward(&xs)?)?;
        xs = pool(3).forward(&xs)?; // maxpool2
        xs = self.inception3b.forward(&self.inception3a.forward(&xs)?)?;
        xs = pool(3).forward(&xs)?; // maxpool3
        for block in [
            &self.inception4a,
            &self.inception4b,
            &self.inception4c,
            &self.inception4d,
            &self.inception4e,
        ] {
            xs = block.forward(&xs)?;
        }
        xs = pool(2).forward(&xs)?; // maxpool4
        xs = self.inception5b.forward(&self.inception5a.forward(&xs)?)?;
        layers::flatten(&layers::adaptive_avg_pool2d(&xs, 1, 1)?)
    }

    /// `dropout` + `fc` on the embedding.
    pub fn head_forward(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        self.fc.forward(&layers::dropout(features, DROPOUT, train)?)
    }

    /// The last layer, `fc`.
    pub fn head(&self) -> &Linear {
        &self.fc
    }

    pub fn num_classes(&self) -> usize {
        self.fc.weight().dim(0).unwrap_or(0)
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.head_forward(&self.features(xs)?, train)
    }
}
