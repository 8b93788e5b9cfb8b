//! The pieces torchvision's models use that candle-nn lacks or spells differently: a convolution with
//! its batch norm folded in, max pooling with padding and `ceil_mode`, and `AdaptiveAvgPool2d`.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use super::cpu::{ConvKind, CpuConv};

/// `Conv2d` followed by an eval-mode `BatchNorm2d`, folded into one convolution at load time.
///
/// The backbone is never trained (fine-tuning trains heads only), so the batch norm's running
/// statistics are constants and folding saves a full pass over every activation map.
#[derive(Debug, Clone)]
pub struct ConvBn {
    conv: Conv2d,
}

impl ConvBn {
    /// Reads `weight` (and `bias` when `cfg.conv_bias`) from `conv_vb` and the four batch-norm
    /// tensors from `bn_vb`, the way torchvision lays them out.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        cfg: ConvBnConfig,
        conv_vb: VarBuilder,
        bn_vb: VarBuilder,
    ) -> Result<Self> {
        // Folded in f32 whatever the network runs in, then rounded once to its dtype.
        let dtype = conv_vb.dtype();
        let (conv_vb, bn_vb) = (conv_vb.to_dtype(DType::F32), bn_vb.to_dtype(DType::F32));
        let weight = conv_vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = if cfg.conv_bias {
            Some(conv_vb.get(out_channels, "bias")?)
        } else {
            None
        };
        let gamma = bn_vb.get(out_channels, "weight")?;
        let beta = bn_vb.get(out_channels, "bias")?;
        let mean = bn_vb.get(out_channels, "running_mean")?;
        let var = bn_vb.get(out_channels, "running_var")?;

        let scale = gamma.broadcast_div(&(var + cfg.eps)?.sqrt()?)?;
        let weight = weight.broadcast_mul(&scale.reshape((out_channels, 1, 1, 1))?)?;
        let shifted = match bias {
            Some(b) => (b - &mean)?,
            None => mean.neg()?,
        };
        let bias = (shifted * &scale)?.add(&beta)?;
        Ok(Self {
            conv: Conv2d::new(
                weight.to_dtype(dtype)?,
                Some(bias.to_dtype(dtype)?),
                cfg.conv,
            ),
        })
    }
}

/// How a [`ConvBn`] pair is built: VGG's convolutions carry a bias and use BN's default eps,
/// GoogLeNet's `BasicConv2d` has no conv bias and eps = 0.001.
#[derive(Debug, Clone, Copy)]
pub struct ConvBnConfig {
    pub conv: Conv2dConfig,
    pub conv_bias: bool,
    pub eps: f64,
}

impl ConvBn {
    /// The folded convolution.
    pub fn conv(&self) -> &Conv2d {
        &self.conv
    }
}

impl Module for ConvBn {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv.forward(xs)
    }
}

/// Whether a network built from `vb` runs its convolutions through the CPU kernels of
/// [`super::cpu`] (f32 and bf16 on the CPU) rather than candle's (every other device and dtype).
pub fn uses_cpu_kernels(vb: &VarBuilder) -> bool {
    vb.device().is_cpu() && matches!(vb.dtype(), DType::F32 | DType::BF16)
}

/// For a network the CPU kernels run in bf16 (`--dtype bf16` on the CPU): whether it is one, and
/// the builder it is built from, in f32. Its batch norms fold and its kernels transform in f32;
/// only the packed weights are then rounded to bf16, once. The fully connected layers stay f32.
pub fn cpu_bf16(vb: VarBuilder) -> Result<(bool, VarBuilder)> {
    if !(vb.device().is_cpu() && vb.dtype() == DType::BF16) {
        return Ok((false, vb));
    }
    if !super::cpu::bf16::available() {
        candle_core::bail!("bf16 on the CPU needs AVX512_BF16, which this CPU lacks");
    }
    Ok((true, vb.set_dtype(DType::F32)))
}

/// A candle convolution (square kernel, bias, no groups or dilation) packed for the CPU kernels;
/// `kind` as [`CpuConv::new`] takes it; its products in bf16 when `bf16`.
pub fn cpu_conv(conv: &Conv2d, kind: Option<ConvKind>, bf16: bool) -> Result<CpuConv> {
    let cfg = conv.config();
    let (c_out, c_in, kh, kw) = conv.weight().dims4()?;
    if kh != kw || cfg.groups != 1 || cfg.dilation != 1 {
        candle_core::bail!("the CPU kernels take square, ungrouped, undilated convolutions");
    }
    let weight = conv
        .weight()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bias = match conv.bias() {
        Some(b) => b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        None => vec![0.0; c_out],
    };
    // F(4,3)'s transforms magnify rounding errors more than F(2,3)'s: bf16 takes the smaller tiles.
    let winograd = kh == 3 && cfg.stride == 1 && cfg.padding == 1 && c_in >= 16;
    let kind = match kind {
        None | Some(ConvKind::WinogradF43) if bf16 && winograd => Some(ConvKind::WinogradF23),
        kind => kind,
    };
    let packed = CpuConv::new(
        &weight,
        &bias,
        c_out,
        c_in,
        kh,
        cfg.stride,
        cfg.padding,
        kind,
    );
    Ok(if bf16 { packed.to_bf16() } else { packed })
}

/// A plain `Conv2d` with bias, read under torchvision's names.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
    let bias = vb.get(out_channels, "bias")?;
    Ok(Conv2d::new(weight, Some(bias), cfg))
}

/// `nn.MaxPool2d(kernel, stride, padding, ceil_mode)` with PyTorch's output-size rule.
#[derive(Debug, Clone, Copy)]
pub struct MaxPool2d {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub ceil_mode: bool,
}

impl MaxPool2d {
    pub fn new(kernel: usize, stride: usize) -> Self {
        Self {
            kernel,
            stride,
            padding: 0,
            ceil_mode: false,
        }
    }

    pub fn padding(self, padding: usize) -> Self {
        Self { padding, ..self }
    }

    pub fn ceil_mode(self) -> Self {
        Self {
            ceil_mode: true,
            ..self
        }
    }

    /// PyTorch's `pooling_output_shape`: in ceil mode the last window may hang over the edge, but it
    /// must start inside the input or its left padding.
    pub fn output_len(&self, len: usize) -> Result<usize> {
        let span = len + 2 * self.padding;
        if span < self.kernel {
            candle_core::bail!(
                "max pool: input of size {len} is smaller than the {}-wide window",
                self.kernel
            );
        }
        let steps = span - self.kernel;
        let mut out = if self.ceil_mode {
            steps.div_ceil(self.stride) + 1
        } else {
            steps / self.stride + 1
        };
        if self.ceil_mode && (out - 1) * self.stride >= len + self.padding {
            out -= 1;
        }
        Ok(out)
    }
}

impl Module for MaxPool2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (out_h, out_w) = (self.output_len(h)?, self.output_len(w)?);
        // Lay the input out so that candle's floor-mode pooling yields exactly PyTorch's windows:
        // -inf padding never wins a max, as PyTorch's implicit padding never does.
        let xs = self.fit(xs, 2, h, out_h)?;
        let xs = self.fit(&xs, 3, w, out_w)?;
        xs.max_pool2d_with_stride(self.kernel, self.stride)
    }
}

impl MaxPool2d {
    fn fit(&self, xs: &Tensor, dim: usize, len: usize, out: usize) -> Result<Tensor> {
        let needed = (out - 1) * self.stride + self.kernel;
        let after = needed as isize - (len + self.padding) as isize;
        let xs = if after < 0 {
            xs.narrow(dim, 0, (len as isize + after) as usize)?
        } else {
            xs.clone()
        };
        pad_neg_inf(&xs, dim, self.padding, after.max(0) as usize)
    }
}

fn pad_neg_inf(xs: &Tensor, dim: usize, before: usize, after: usize) -> Result<Tensor> {
    if before == 0 && after == 0 {
        return Ok(xs.clone());
    }
    let filler = |n: usize| -> Result<Tensor> {
        let mut dims = xs.dims().to_vec();
        dims[dim] = n;
        Tensor::full(f32::NEG_INFINITY, dims, xs.device())?.to_dtype(xs.dtype())
    };
    let mut parts = Vec::with_capacity(3);
    if before > 0 {
        parts.push(filler(before)?);
    }
    parts.push(xs.clone());
    if after > 0 {
        parts.push(filler(after)?);
    }
    Tensor::cat(&parts, dim)
}

/// `nn.AdaptiveAvgPool2d((out_h, out_w))`, exact for every input size: output cell `i` averages
/// input rows `floor(i*h/out_h) .. ceil((i+1)*h/out_h)`, so windows overlap when the sizes do not
/// divide (8 → 7 at 256×256 input) and repeat when the input is smaller than the output.
pub fn adaptive_avg_pool2d(xs: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (n, c, h, w) = xs.dims4()?;
    if h == out_h && w == out_w {
        return Ok(xs.clone());
    }
    if h % out_h == 0 && w % out_w == 0 {
        return xs.avg_pool2d((h / out_h, w / out_w));
    }
    // Averaging over arbitrary windows is a product with a fixed pooling matrix per axis.
    let pool_w = pooling_matrix(w, out_w, xs.device())?.to_dtype(xs.dtype())?;
    let pool_h = pooling_matrix(h, out_h, xs.device())?.to_dtype(xs.dtype())?;
    let xs = xs
        .contiguous()?
        .reshape((n * c * h, w))?
        .matmul(&pool_w.t()?)?
        .reshape((n * c, h, out_w))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n * c * out_w, h))?
        .matmul(&pool_h.t()?)?
        .reshape((n * c, out_w, out_h))?
        .transpose(1, 2)?;
    xs.contiguous()?.reshape((n, c, out_h, out_w))
}

/// Row `i` holds `1/len` over PyTorch's adaptive window `i`.
fn pooling_matrix(len: usize, out: usize, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; out * len];
    for i in 0..out {
        let start = i * len / out;
        let end = ((i + 1) * len).div_ceil(out);
        let weight = 1.0 / (end - start) as f32;
        for j in start..end {
            m[i * len + j] = weight;
        }
    }
    Tensor::from_vec(m, (out, len), device)
}

/// Flattens `[N, C, H, W]` to `[N, C*H*W]` in PyTorch's (channel-major) order.
pub fn flatten(xs: &Tensor) -> Result<Tensor> {
    xs.flatten_from(1)
}

/// Dropout that is the identity outside training, as `nn.Dropout` in `eval()`.
pub fn dropout(xs: &Tensor, p: f32, train: bool) -> Result<Tensor> {
    if train && p > 0.0 {
        candle_nn::ops::dropout(xs, p)
    } else {
        Ok(xs.clone())
    }
}

/// Softmax over the class axis, computed in f32 whatever the logits' dtype.
pub fn softmax(logits: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?.contiguous()?)
}

/// Rejects inputs no torchvision classifier accepts, with the shape in the message.
pub fn check_input(xs: &Tensor, min_side: usize) -> Result<()> {
    let dims = xs.dims();
    if dims.len() != 4 || dims[1] != 3 {
        candle_core::bail!("expected an image batch [N, 3, H, W], got {:?}", dims);
    }
    let (h, w) = (xs.dim(2)?, xs.dim(D::Minus1)?);
    if h < min_side || w < min_side {
        candle_core::bail!(
            "input {h}x{w} is too small: this model needs at least {min_side}x{min_side}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU in a CUDA build on a machine with one, else the CPU: these layers run on both.
    fn device() -> Device {
        Device::cuda_if_available(0).unwrap()
    }

    fn t(data: &[f32], shape: (usize, usize, usize, usize)) -> Tensor {
        Tensor::from_slice(data, shape, &device()).unwrap()
    }

    #[test]
    fn ceil_mode_output_lengths_match_pytorch() {
        // torch.nn.MaxPool2d(3, 2, ceil_mode=True)(torch.zeros(1,1,n,n)).shape[-1] for n in (112, 56, 55, 7)
        let pool = MaxPool2d::new(3, 2).ceil_mode();
        let got: Vec<usize> = [112, 56, 55, 7]
            .iter()
            .map(|&n| pool.output_len(n).unwrap())
            .collect();
        assert_eq!(got, vec![56, 28, 27, 3]);
        // floor mode drops the partial window: 55 -> 27, 112 -> 55
        let floor = MaxPool2d::new(3, 2);
        assert_eq!(floor.output_len(112).unwrap(), 55);
        // a window may not start in the right padding: k=2,s=2,p=1 on 2 gives 2, not 3
        let padded = MaxPool2d::new(2, 2).padding(1).ceil_mode();
        assert_eq!(padded.output_len(2).unwrap(), 2);
    }

    #[test]
    fn ceil_mode_pool_takes_max_of_the_partial_window() {
        let xs = t(&[-1., -2., -3., -4., -5., -6., -7., -8., -9.], (1, 1, 3, 3));
        let out = MaxPool2d::new(2, 2).ceil_mode().forward(&xs).unwrap();
        assert_eq!(out.dims4().unwrap(), (1, 1, 2, 2));
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![-1., -3., -7., -9.]);
    }

    #[test]
    fn padded_same_size_pool_ignores_padding_for_negative_inputs() {
        let xs = t(&[-5., -1., -3., -2.], (1, 1, 2, 2));
        let out = MaxPool2d::new(3, 1)
            .padding(1)
            .ceil_mode()
            .forward(&xs)
            .unwrap();
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![-1.; 4]);
    }

    #[test]
    fn adaptive_pool_averages_overlapping_windows() {
        // 3 -> 2: windows [0,2) and [1,3)
        let xs = t(&[1., 2., 4., 8., 16., 32., 64., 128., 256.], (1, 1, 3, 3));
        let out = adaptive_avg_pool2d(&xs, 2, 2).unwrap();
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        let expect = [
            (1. + 2. + 8. + 16.) / 4.,
            (2. + 4. + 16. + 32.) / 4.,
            (8. + 16. + 64. + 128.) / 4.,
            (16. + 32. + 128. + 256.) / 4.,
        ];
        for (a, b) in v.iter().zip(expect) {
            assert!((a - b).abs() < 1e-5, "{v:?}");
        }
    }

    #[test]
    fn adaptive_pool_repeats_cells_when_upsampling() {
        // 2 -> 7 (a 64x64 VGG input): cell i reads floor(2i/7)..ceil(2(i+1)/7)
        let xs = t(&[1., 3., 5., 7.], (1, 1, 2, 2));
        let out = adaptive_avg_pool2d(&xs, 7, 7).unwrap();
        assert_eq!(out.dims4().unwrap(), (1, 1, 7, 7));
        let rows: Vec<Vec<f32>> = out
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        // column 3 straddles both input columns: window [0, 2)
        assert_eq!(rows[0][0], 1.0);
        assert_eq!(rows[0][3], 2.0);
        assert_eq!(rows[0][6], 3.0);
        assert_eq!(rows[3][3], 4.0);
        assert_eq!(rows[6][6], 7.0);
    }

    #[test]
    fn folded_conv_bn_equals_conv_then_batch_norm() {
        let dev = device();
        let mut ts = std::collections::HashMap::new();
        ts.insert(
            "c.weight".into(),
            Tensor::randn(0f32, 1., (4, 3, 3, 3), &dev).unwrap(),
        );
        ts.insert("c.bias".into(), Tensor::randn(0f32, 1., 4, &dev).unwrap());
        ts.insert(
            "b.weight".into(),
            Tensor::new(&[0.5f32, 1.0, 1.5, 2.0], &dev).unwrap(),
        );
        ts.insert(
            "b.bias".into(),
            Tensor::new(&[0.1f32, -0.2, 0.3, 0.0], &dev).unwrap(),
        );
        ts.insert(
            "b.running_mean".into(),
            Tensor::new(&[0.2f32, -1.0, 0.0, 3.0], &dev).unwrap(),
        );
        ts.insert(
            "b.running_var".into(),
            Tensor::new(&[1.0f32, 0.5, 2.0, 4.0], &dev).unwrap(),
        );
        let vb = VarBuilder::from_tensors(ts.clone(), DType::F32, &dev);
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let folded = ConvBn::new(
            3,
            4,
            3,
            ConvBnConfig {
                conv: cfg,
                conv_bias: true,
                eps: 1e-5,
            },
            vb.pp("c"),
            vb.pp("b"),
        )
        .unwrap();
        let xs = Tensor::randn(0f32, 1., (2, 3, 5, 5), &dev).unwrap();

        let conv = Conv2d::new(ts["c.weight"].clone(), Some(ts["c.bias"].clone()), cfg);
        let bn = candle_nn::BatchNorm::new(
            4,
            ts["b.running_mean"].clone(),
            ts["b.running_var"].clone(),
            ts["b.weight"].clone(),
            ts["b.bias"].clone(),
            1e-5,
        )
        .unwrap();
        let expected =
            candle_nn::ModuleT::forward_t(&bn, &conv.forward(&xs).unwrap(), false).unwrap();
        let diff = (folded.forward(&xs).unwrap() - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "max diff {diff}");
    }
}
