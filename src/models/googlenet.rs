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

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};
use rayon::prelude::*;

use super::cpu::{self, Act, ConvKind, CpuConv, Isa};
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

/// An [`Inception`] packed for the CPU kernels. The three 1×1 convolutions that read the block's
/// input (`branch1`, `branch2.0`, `branch3.0`) are one product; every branch writes its channel
/// slice of the output map, so the concatenation costs nothing.
#[derive(Debug, Clone)]
struct CpuInception {
    reduce: CpuConv,
    branch2: CpuConv,
    branch3: CpuConv,
    branch4: CpuConv,
    pool: MaxPool2d,
    /// `ch1x1`, `ch3x3red`, `ch5x5red`: the widths of `reduce`'s output.
    reduced: [usize; 3],
}

impl CpuInception {
    fn new(block: &Inception, bf16: bool) -> Result<Self> {
        let parts = [&block.branch1, &block.branch2[0], &block.branch3[0]];
        let weight = Tensor::cat(&parts.map(|b| b.0.conv().weight().clone()), 0)?;
        let bias = parts
            .iter()
            .map(|b| b.0.conv().bias().cloned())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| candle_core::Error::Msg("folded convolutions carry a bias".into()))?;
        let reduce = Conv2d::new(weight, Some(Tensor::cat(&bias, 0)?), Default::default());
        let reduced = parts.map(|b| b.0.conv().weight().dim(0).unwrap_or(0));
        Ok(Self {
            reduce: layers::cpu_conv(&reduce, Some(ConvKind::Pointwise), bf16)?,
            branch2: layers::cpu_conv(block.branch2[1].0.conv(), None, bf16)?,
            branch3: layers::cpu_conv(block.branch3[1].0.conv(), None, bf16)?,
            branch4: layers::cpu_conv(
                block.branch4_proj.0.conv(),
                Some(ConvKind::Pointwise),
                bf16,
            )?,
            pool: block.branch4_pool,
            reduced,
        })
    }

    fn forward(&self, isa: Isa, xs: &mut Act) -> Result<Act> {
        let [ch1, ch3red, ch5red] = self.reduced;
        let (ch3, ch5) = (self.branch2.c_out(), self.branch3.c_out());
        let total = ch1 + ch3 + ch5 + self.branch4.c_out();
        let mut out = Act::new(xs.n, xs.h, xs.w, total);
        let mut reduced = Act::new(xs.n, xs.h, xs.w, ch1 + ch3red + ch5red);
        let (input, r) = (xs.map(), reduced.map());
        let (_, pooled) = rayon::join(
            || self.reduce.forward(isa, input, r, true),
            || cpu::pool::max_pool(input, &self.pool),
        );
        let mut pooled = pooled?;
        let width = reduced.c;
        for (dst, src) in out
            .data_mut()
            .chunks_exact_mut(total)
            .zip(reduced.data().chunks_exact(width))
        {
            dst[..ch1].copy_from_slice(&src[..ch1]);
        }
        let (r, o) = (reduced.map(), out.map());
        let proj = self.branch4.c_out();
        cpu::run_together(&[
            self.branch2
                .prepare(isa, r.channels(ch1, ch3red), o.channels(ch1, ch3), true),
            self.branch3.prepare(
                isa,
                r.channels(ch1 + ch3red, ch5red),
                o.channels(ch1 + ch3, ch5),
                true,
            ),
            self.branch4
                .prepare(isa, pooled.map(), o.channels(ch1 + ch3 + ch5, proj), true),
        ]);
        Ok(out)
    }
}

/// torchvision's `GoogLeNet` in eval form (no aux heads).
#[derive(Debug, Clone)]
pub struct GoogLeNet {
    /// `transform_input`'s per-channel scale and shift.
    transform_input: Option<([f32; 3], [f32; 3])>,
    body: Body,
    fc: Linear,
}

/// Everything between the input and `avgpool`: candle's modules, or on the CPU in f32 the same
/// ones packed for [`cpu`]'s kernels (the candle copies are dropped then).
#[derive(Debug, Clone)]
enum Body {
    Candle(Box<CandleBody>),
    Cpu(Box<CpuBody>),
}

#[derive(Debug, Clone)]
struct CandleBody {
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
}

#[derive(Debug, Clone)]
struct CpuBody {
    conv1: CpuConv,
    conv2: CpuConv,
    conv3: CpuConv,
    /// 3a, 3b, 4a … 4e, 5a, 5b.
    inceptions: Vec<CpuInception>,
}

impl CpuBody {
    fn new(body: &CandleBody, bf16: bool) -> Result<Self> {
        Ok(Self {
            conv1: layers::cpu_conv(body.conv1.0.conv(), None, bf16)?,
            conv2: layers::cpu_conv(body.conv2.0.conv(), None, bf16)?,
            conv3: layers::cpu_conv(body.conv3.0.conv(), None, bf16)?,
            inceptions: body
                .inceptions()
                .par_iter()
                .map(|b| CpuInception::new(b, bf16))
                .collect::<Result<_>>()?,
        })
    }

    fn features(&self, mut xs: Act) -> Result<Vec<f32>> {
        let isa = Isa::best();
        let pool = |k: usize| MaxPool2d::new(k, 2).ceil_mode();
        let conv = |conv: &CpuConv, xs: &mut Act| {
            let (h, w) = conv.output_size(xs.h, xs.w);
            let mut out = Act::new(xs.n, h, w, conv.c_out());
            conv.forward(isa, xs.map(), out.map(), true);
            out
        };
        xs = conv(&self.conv1, &mut xs);
        xs = cpu::pool::max_pool(xs.map(), &pool(3))?; // maxpool1
        xs = conv(&self.conv2, &mut xs);
        xs = conv(&self.conv3, &mut xs);
        xs = cpu::pool::max_pool(xs.map(), &pool(3))?; // maxpool2
        for (i, block) in self.inceptions.iter().enumerate() {
            xs = block.forward(isa, &mut xs)?;
            xs = match i {
                1 => cpu::pool::max_pool(xs.map(), &pool(3))?, // maxpool3, after 3b
                6 => cpu::pool::max_pool(xs.map(), &pool(2))?, // maxpool4, after 4e
                _ => xs,
            };
        }
        Ok(cpu::pool::adaptive_avg_pool_flat(xs.map(), 1, 1))
    }
}

impl CandleBody {
    fn inceptions(&self) -> [&Inception; 9] {
        [
            &self.inception3a,
            &self.inception3b,
            &self.inception4a,
            &self.inception4b,
            &self.inception4c,
            &self.inception4d,
            &self.inception4e,
            &self.inception5a,
            &self.inception5b,
        ]
    }

    fn features(&self, mut xs: Tensor) -> Result<Tensor> {
        let pool = |k: usize| MaxPool2d::new(k, 2).ceil_mode();
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
}

impl GoogLeNet {
    pub fn new(cfg: &GoogLeNetConfig, vb: VarBuilder) -> Result<Self> {
        let (bf16, vb) = layers::cpu_bf16(vb)?;
        let transform_input = cfg.transform_input.then(|| {
            // torchvision computes these constants in Python floats, then applies them in f32.
            let mean = [0.485f64, 0.456, 0.406];
            let std = [0.229f64, 0.224, 0.225];
            (
                std.map(|s| (s / 0.5) as f32),
                mean.map(|m| ((m - 0.5) / 0.5) as f32),
            )
        });
        let body = CandleBody {
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
        };
        let body = if layers::uses_cpu_kernels(&vb) {
            Body::Cpu(Box::new(CpuBody::new(&body, bf16)?))
        } else {
            Body::Candle(Box::new(body))
        };
        Ok(Self {
            transform_input,
            body,
            fc: candle_nn::linear(EMBEDDING, cfg.num_classes, vb.pp("fc"))?,
        })
    }

    /// Everything up to `avgpool` + `flatten`: the frozen 1024-wide embedding a new `fc` trains on.
    pub fn features(&self, xs: &Tensor) -> Result<Tensor> {
        layers::check_input(xs, MIN_INPUT_SIDE)?;
        match &self.body {
            Body::Cpu(body) => {
                let (n, c, h, w) = xs.dims4()?;
                let data = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                // `x * scale + shift`, two roundings, as torchvision's `_transform_input`.
                let input = match self.transform_input {
                    Some((scale, shift)) => {
                        Act::from_nchw_with(&data, (n, c, h, w), |ch, v| v * scale[ch] + shift[ch])
                    }
                    None => Act::from_nchw(&data, n, c, h, w),
                };
                let flat = cpu::in_pool(|| body.features(input))?;
                Tensor::from_vec(flat, (n, EMBEDDING), xs.device())
            }
            Body::Candle(body) => {
                let xs = match self.transform_input {
                    Some((scale, shift)) => {
                        let param = |v: [f32; 3]| {
                            Tensor::from_slice(&v, (1, 3, 1, 1), xs.device())?.to_dtype(xs.dtype())
                        };
                        xs.broadcast_mul(&param(scale)?)?
                            .broadcast_add(&param(shift)?)?
                    }
                    None => xs.clone(),
                };
                body.features(xs)
            }
        }
    }

    /// `dropout` + `fc` on the embedding.
    pub fn head_forward(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        self.fc.forward(&layers::dropout(features, DROPOUT, train)?)
    }

    /// Whether the CPU kernels run its convolutions in bf16.
    pub fn cpu_bf16(&self) -> bool {
        match &self.body {
            Body::Cpu(body) => body.conv1.is_bf16(),
            Body::Candle(_) => false,
        }
    }

    /// The last layer, `fc`.
    pub fn head(&self) -> &Linear {
        &self.fc
    }

    pub fn num_classes(&self) -> usize {
        self.fc.weight().dim(0).unwrap_or(0)
    }

    /// Where the weights live, and so where inputs must be and the work runs.
    pub fn device(&self) -> &candle_core::Device {
        self.fc.weight().device()
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.head_forward(&self.features(xs)?, train)
    }
}
