//! The CPU kernels (`models::cpu`) against candle's own convolution and pooling, on random odd
//! shapes, strides and paddings, with every instruction set this CPU has forced in turn.

use candle_core::{Device, Tensor};
use cnnserve::models::cpu::{pool, Act, ConvKind, CpuConv, Isa};
use cnnserve::models::layers::MaxPool2d;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Instruction sets to force: every one this CPU runs. The test says which it could not.
fn isas() -> Vec<Isa> {
    let (ran, missing): (Vec<Isa>, Vec<Isa>) = Isa::ALL.into_iter().partition(|i| i.is_available());
    for isa in &missing {
        eprintln!(
            "NOTE: this CPU has no {}: its kernels are not exercised on this machine",
            isa.name()
        );
    }
    assert!(ran.contains(&Isa::Scalar) && ran.contains(&Isa::best()));
    ran
}

fn random(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

struct Case {
    n: usize,
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    h: usize,
    w: usize,
}

/// candle's conv2d + bias (+ ReLU), as NCHW.
fn reference(case: &Case, x: &[f32], weight: &[f32], bias: &[f32], relu: bool) -> Tensor {
    let dev = Device::Cpu;
    let xs = Tensor::from_slice(x, (case.n, case.c_in, case.h, case.w), &dev).unwrap();
    let k = case.kernel;
    let ws = Tensor::from_slice(weight, (case.c_out, case.c_in, k, k), &dev).unwrap();
    let bs = Tensor::from_slice(bias, (1, case.c_out, 1, 1), &dev).unwrap();
    let ys = xs
        .conv2d(&ws, case.padding, case.stride, 1, 1)
        .unwrap()
        .broadcast_add(&bs)
        .unwrap();
    if relu {
        ys.relu().unwrap()
    } else {
        ys
    }
}

/// Runs `conv` writing into channels `offset..offset+c_out` of a wider map whose other channels
/// hold a sentinel, checks the sentinel survived, and returns the slice as NCHW.
fn run_into_slice(conv: &CpuConv, isa: Isa, case: &Case, x: &[f32], relu: bool) -> Tensor {
    let mut input = Act::from_nchw(x, case.n, case.c_in, case.h, case.w);
    let (ho, wo) = conv.output_size(case.h, case.w);
    let (offset, extra) = (3, 5);
    let wide = case.c_out + offset + extra;
    let mut out = Act::new(case.n, ho, wo, wide);
    out.data_mut().fill(777.0);
    conv.forward(
        isa,
        input.map(),
        out.map().channels(offset, case.c_out),
        relu,
    );
    let mut slice = Vec::with_capacity(case.n * ho * wo * case.c_out);
    for px in out.data().chunks_exact(wide) {
        assert!(px[..offset]
            .iter()
            .chain(&px[offset + case.c_out..])
            .all(|&v| v == 777.0));
        slice.extend_from_slice(&px[offset..offset + case.c_out]);
    }
    let nhwc = Tensor::from_vec(slice, (case.n, ho, wo, case.c_out), &Device::Cpu).unwrap();
    nhwc.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn every_convolution_path_equals_candles_on_random_shapes_for_each_instruction_set() {
    let mut rng = ChaCha8Rng::seed_from_u64(20261201);
    let mut cases: Vec<Case> = (0..40)
        .map(|_| {
            let kernel = [1, 2, 3, 3, 3, 5, 7][rng.random_range(0..7)];
            let stride = if rng.random_bool(0.7) { 1 } else { 2 };
            let padding = rng.random_range(0..=kernel / 2 + 1);
            Case {
                n: rng.random_range(1..=3),
                c_in: rng.random_range(1..=40),
                c_out: rng.random_range(1..=70),
                kernel,
                stride,
                padding,
                h: rng.random_range(kernel.max(2)..=23),
                w: rng.random_range(kernel.max(2)..=23),
            }
        })
        .collect();
    // Shapes the models have: K past one KC slice, Winograd's edge tiles, 1×1 on wide inputs.
    for (c_in, c_out, kernel, padding, side) in [
        (300, 40, 3, 1, 9),
        (19, 33, 3, 1, 14),
        (64, 48, 3, 1, 7),
        (280, 24, 1, 0, 5),
        (3, 64, 7, 3, 31),
    ] {
        cases.push(Case {
            n: 2,
            c_in,
            c_out,
            kernel,
            stride: if kernel == 7 { 2 } else { 1 },
            padding,
            h: side,
            w: side + 2,
        });
    }
    let isas = isas();
    let bf16 = cnnserve::models::cpu::bf16::available();
    if !bf16 {
        eprintln!("NOTE: this CPU has no AVX512_BF16: the bf16 products are not exercised on this machine");
    }
    let (mut checked, mut checked_bf16) = (0, 0);
    for case in &cases {
        let k = case.kernel;
        let x = random(&mut rng, case.n * case.c_in * case.h * case.w);
        let weight = random(&mut rng, case.c_out * case.c_in * k * k);
        let bias = random(&mut rng, case.c_out);
        let relu = rng.random_bool(0.5);
        let expected = reference(case, &x, &weight, &bias, relu);
        let scale = max_abs(&expected).max(1.0);
        let mut kinds = vec![ConvKind::Im2col];
        if k == 1 && case.stride == 1 && case.padding == 0 {
            kinds.push(ConvKind::Pointwise);
        }
        if k == 3 && case.stride == 1 && case.padding == 1 {
            kinds.push(ConvKind::WinogradF43);
            kinds.push(ConvKind::WinogradF23);
        }
        for kind in kinds {
            let conv = CpuConv::new(
                &weight,
                &bias,
                case.c_out,
                case.c_in,
                k,
                case.stride,
                case.padding,
                Some(kind),
            );
            for &isa in &isas {
                let got = run_into_slice(&conv, isa, case, &x, relu);
                assert_eq!(got.dims(), expected.dims());
                let diff = max_abs(&(&got - &expected).unwrap());
                // Winograd F(4,3) rounds a little more than a direct sum.
                let tolerance = if kind == ConvKind::WinogradF43 {
                    2e-5
                } else {
                    5e-6
                } * scale;
                assert!(
                    diff <= tolerance,
                    "{kind:?} on {}: n={} c_in={} c_out={} k={k} s={} p={} {}x{}: max diff {diff} > {tolerance}",
                    isa.name(),
                    case.n,
                    case.c_in,
                    case.c_out,
                    case.stride,
                    case.padding,
                    case.h,
                    case.w,
                );
                checked += 1;
            }
            // bf16 convolutions are never F(4,3): its transforms magnify bf16's rounding (7% here).
            if bf16 && kind != ConvKind::WinogradF43 {
                check_bf16(&conv, kind, case, (&x, &weight, &bias), relu, scale);
                checked_bf16 += 1;
            }
        }
    }
    eprintln!(
        "checked {checked} convolutions on {:?}, {checked_bf16} in bf16",
        isas.iter().map(|i| i.name()).collect::<Vec<_>>()
    );
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    use cnnserve::models::cpu::bf16::{from_bf16, to_bf16};
    v.iter().map(|&x| from_bf16(to_bf16(x))).collect()
}

/// `--dtype bf16`'s products (AVX512_BF16). Direct paths: products of bf16 values are exact in
/// f32, so the result is candle's f32 convolution of the bf16-rounded input and weights, up to
/// summation order. Winograd F(2,3) rounds its transformed tiles and kernels too: within 2% of
/// the scale.
fn check_bf16(
    conv: &CpuConv,
    kind: ConvKind,
    case: &Case,
    (x, weight, bias): (&[f32], &[f32], &[f32]),
    relu: bool,
    scale: f32,
) {
    let half = conv.to_bf16();
    assert!(half.is_bf16() && !conv.is_bf16());
    let got = run_into_slice(&half, Isa::best(), case, x, relu);
    let (expected, tolerance) = match kind {
        ConvKind::WinogradF43 | ConvKind::WinogradF23 => {
            (reference(case, x, weight, bias, relu), 2e-2 * scale)
        }
        _ => (
            reference(case, &round_bf16(x), &round_bf16(weight), bias, relu),
            1e-5 * scale,
        ),
    };
    let diff = max_abs(&(&got - &expected).unwrap());
    assert!(
        diff <= tolerance,
        "bf16 {kind:?}: n={} c_in={} c_out={} k={} s={} p={} {}x{}: max diff {diff} > {tolerance}",
        case.n,
        case.c_in,
        case.c_out,
        case.kernel,
        case.stride,
        case.padding,
        case.h,
        case.w,
    );
}

#[test]
fn max_pool_with_padding_and_ceil_mode_equals_the_candle_layer() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (kernel, stride, padding, ceil, h, w) in [
        (2, 2, 0, false, 9, 8),
        (3, 2, 0, true, 15, 14),
        (3, 1, 1, true, 7, 7),
        (2, 2, 0, true, 7, 5),
        (3, 2, 1, false, 10, 11),
    ] {
        let (n, c) = (2, 21);
        let x = random(&mut rng, n * c * h * w);
        let mut pool_cfg = MaxPool2d::new(kernel, stride).padding(padding);
        if ceil {
            pool_cfg = pool_cfg.ceil_mode();
        }
        let xs = Tensor::from_slice(&x, (n, c, h, w), &Device::Cpu).unwrap();
        let expected = candle_core::Module::forward(&pool_cfg, &xs).unwrap();
        let mut act = Act::from_nchw(&x, n, c, h, w);
        let out = pool::max_pool(act.map(), &pool_cfg).unwrap();
        let got = Tensor::from_vec(out.to_nchw(), expected.dims(), &Device::Cpu).unwrap();
        assert_eq!(
            max_abs(&(&got - &expected).unwrap()),
            0.0,
            "k={kernel} s={stride} p={padding}"
        );
    }
}

#[test]
fn adaptive_average_pool_equals_the_candle_layer_in_flatten_order() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for (h, w, oh, ow) in [(8, 8, 7, 7), (2, 3, 7, 7), (7, 7, 1, 1), (14, 9, 7, 7)] {
        let (n, c) = (2, 5);
        let x = random(&mut rng, n * c * h * w);
        let xs = Tensor::from_slice(&x, (n, c, h, w), &Device::Cpu).unwrap();
        let expected = cnnserve::models::layers::adaptive_avg_pool2d(&xs, oh, ow)
            .unwrap()
            .flatten_from(1)
            .unwrap();
        let mut act = Act::from_nchw(&x, n, c, h, w);
        let flat = pool::adaptive_avg_pool_flat(act.map(), oh, ow);
        let got = Tensor::from_vec(flat, (n, c * oh * ow), &Device::Cpu).unwrap();
        let diff = max_abs(&(&got - &expected).unwrap());
        assert!(diff < 1e-6, "{h}x{w} -> {oh}x{ow}: {diff}");
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (n, c_in, c_out, h, w) = (2, 48, 40, 19, 23);
    let x = random(&mut rng, n * c_in * h * w);
    let weight = random(&mut rng, c_out * c_in * 9);
    let bias = random(&mut rng, c_out);
    for kind in [
        ConvKind::WinogradF43,
        ConvKind::WinogradF23,
        ConvKind::Im2col,
    ] {
        let conv = CpuConv::new(&weight, &bias, c_out, c_in, 3, 1, 1, Some(kind));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut input = Act::from_nchw(&x, n, c_in, h, w);
                let mut out = Act::new(n, h, w, c_out);
                conv.forward(Isa::best(), input.map(), out.map(), true);
                out.data().to_vec()
            })
        };
        let one = run(1);
        assert_eq!(one, run(3), "{kind:?}: 1 thread vs 3");
        assert_eq!(one, run(2), "{kind:?}: 1 thread vs 2");
    }
}
