//! Convolutions packed for the CPU, with bias and ReLU fused: 1×1 as one matrix product over the
//! NHWC map, 3×3 stride-1 through Winograd F(4,3) or F(2,3) (Lavin & Gray; as NNPACK and ncnn do),
//! any other through im2col, a block of output pixels at a time.
//!
//! Winograd F(4,3) computes a 4×4 output tile from a 6×6 input tile with 36 products per input
//! and output channel pair instead of 144: the input tile is transformed (`Bᵀ d B`), multiplied
//! element-wise with the transformed kernel (`G g Gᵀ`, done once at load, in f64) and summed over
//! input channels, which for each of the 36 positions is a matrix product `[tiles × C_in] ·
//! [C_in × C_out]`, then transformed back (`Aᵀ m A`). F(2,3) is the same with 4×4 input tiles, 2×2
//! outputs and 16 products. Tiles are handled a block at a time, so the
//! transformed inputs and products of one block stay in cache between the three steps, and the
//! bias and ReLU are applied by the inverse transform as it writes the output.

use rayon::prelude::*;

use super::gemm::{self, Epilogue, PackedB, NR};
use super::simd::{Scalar, Simd};
use super::{isa_dispatch, split, with_scratch, Isa, Map};

/// How a convolution is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKind {
    /// 1×1, stride 1, no padding: one product over the feature map.
    Pointwise,
    /// Any kernel, stride and padding: patches gathered per block of output pixels.
    Im2col,
    /// 3×3, stride 1, padding 1: Winograd F(4,3), 4×4 outputs from 36 products per channel
    /// pair (a quarter of the direct product's) with the kernels held 4× as large.
    WinogradF43,
    /// 3×3, stride 1, padding 1: Winograd F(2,3), 2×2 outputs from 16 products per channel
    /// pair (4/9 of the direct product's) with the kernels held 16/9 as large: for small maps,
    /// which F(4,3)'s tiles would overhang, or where memory counts.
    WinogradF23,
}

impl ConvKind {
    /// Output tile side and input tile side of a Winograd kind.
    fn winograd_tile(self) -> Option<(usize, usize)> {
        match self {
            ConvKind::WinogradF43 => Some((4, 6)),
            ConvKind::WinogradF23 => Some((2, 4)),
            ConvKind::Pointwise | ConvKind::Im2col => None,
        }
    }
}

/// Output pixels per im2col / pointwise job, tiles per Winograd job (at most).
const ROW_BLOCK: usize = 96;
const TILE_BLOCK: usize = 48;
/// Winograd pays off once the products dominate the transforms.
const WINOGRAD_MIN_CHANNELS: usize = 16;

/// A convolution with its weights packed for [`gemm`], bias included.
#[derive(Debug, Clone)]
pub struct CpuConv {
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    kind: ConvKind,
    /// `[K × C_out]` with `K` ordered (ky, kx, c_in); empty for Winograd.
    packed: Option<PackedB>,
    /// The transformed kernels (36 for F(4,3), 16 for F(2,3)), `[C_in × C_out]` each.
    winograd: Vec<PackedB>,
    /// Zero-padded to whole panels.
    bias: Vec<f32>,
}

impl CpuConv {
    /// From PyTorch's layout: `weight` is `[c_out, c_in, k, k]`, `bias` `[c_out]`. `kind` is
    /// chosen from the shape when `None`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        weight: &[f32],
        bias: &[f32],
        c_out: usize,
        c_in: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        kind: Option<ConvKind>,
    ) -> Self {
        assert_eq!(weight.len(), c_out * c_in * kernel * kernel, "weight size");
        assert_eq!(bias.len(), c_out, "bias size");
        let winograd_ok = kernel == 3 && stride == 1 && padding == 1;
        let pointwise_ok = kernel == 1 && stride == 1 && padding == 0;
        let kind = match kind {
            Some(kind @ (ConvKind::WinogradF43 | ConvKind::WinogradF23)) => {
                assert!(
                    winograd_ok,
                    "Winograd F(m,3) needs a 3×3, stride-1, padding-1 kernel"
                );
                kind
            }
            Some(ConvKind::Pointwise) => {
                assert!(
                    pointwise_ok,
                    "a pointwise convolution is 1×1, stride 1, unpadded"
                );
                ConvKind::Pointwise
            }
            Some(ConvKind::Im2col) => ConvKind::Im2col,
            None if pointwise_ok => ConvKind::Pointwise,
            None if winograd_ok && c_in >= WINOGRAD_MIN_CHANNELS => ConvKind::WinogradF43,
            None => ConvKind::Im2col,
        };
        let kk = kernel * kernel;
        let (packed, winograd) = if let Some((_, alpha)) = kind.winograd_tile() {
            let g: &[[f64; 3]] = if alpha == 6 { &F43::G } else { &F23::G };
            (None, transform_kernels(weight, c_out, c_in, g))
        } else {
            let packed = PackedB::new(kk * c_in, c_out, |row, co| {
                let (tap, ci) = (row / c_in, row % c_in);
                weight[(co * c_in + ci) * kk + tap]
            });
            (Some(packed), Vec::new())
        };
        let mut padded = bias.to_vec();
        padded.resize(c_out.div_ceil(NR) * NR, 0.0);
        Self {
            c_in,
            c_out,
            kernel,
            stride,
            padding,
            kind,
            packed,
            winograd,
            bias: padded,
        }
    }

    /// The same convolution with its weights in bfloat16 (`--dtype bf16`, [`super::bf16`]).
    /// Not for Winograd F(4,3), whose transforms magnify bf16's rounding (about 7% of the output's
    /// scale against 1% for F(2,3)): build those as F(2,3).
    pub fn to_bf16(&self) -> Self {
        assert!(
            self.kind != ConvKind::WinogradF43,
            "bf16 convolutions take Winograd F(2,3), not F(4,3)"
        );
        // Field by field: `..self.clone()` would copy the f32 panels only to drop them.
        Self {
            c_in: self.c_in,
            c_out: self.c_out,
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
            kind: self.kind,
            packed: self.packed.as_ref().map(PackedB::to_bf16),
            winograd: self.winograd.iter().map(PackedB::to_bf16).collect(),
            bias: self.bias.clone(),
        }
    }

    /// Whether the products run in bf16.
    pub fn is_bf16(&self) -> bool {
        match &self.packed {
            Some(p) => p.is_bf16(),
            None => self.winograd.first().is_some_and(PackedB::is_bf16),
        }
    }

    pub fn c_out(&self) -> usize {
        self.c_out
    }

    /// Output height and width for an input of `h × w`.
    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        let out = |len: usize| (len + 2 * self.padding - self.kernel) / self.stride + 1;
        (out(h), out(w))
    }

    /// Convolves `input` into `output` (`n × ho × wo × c_out`, possibly a channel slice of a wider
    /// map), adding the bias and, with `relu`, clamping at zero.
    ///
    /// # Panics
    /// When the maps' shapes do not fit the convolution, or `isa` is not available on this CPU.
    pub fn forward(&self, isa: Isa, input: Map, output: Map, relu: bool) {
        run_together(&[self.prepare(isa, input, output, relu)]);
    }

    /// The parallel jobs of [`CpuConv::forward`], to run with others in one parallel region
    /// ([`run_together`]).
    pub fn prepare(&self, isa: Isa, input: Map, output: Map, relu: bool) -> ConvRun<'_> {
        assert!(
            isa.is_available(),
            "{} is not available on this CPU",
            isa.name()
        );
        assert_eq!(input.c, self.c_in, "input channels");
        assert_eq!(output.c, self.c_out, "output channels");
        assert!(
            input.h + 2 * self.padding >= self.kernel && input.w + 2 * self.padding >= self.kernel,
            "input smaller than the kernel"
        );
        let (ho, wo) = self.output_size(input.h, input.w);
        assert_eq!(
            (output.n, output.h, output.w),
            (input.n, ho, wo),
            "output shape"
        );
        let panels = self.c_out.div_ceil(NR);
        let (rows, block) = match self.kind.winograd_tile() {
            Some((m, _)) => (output.n * ho.div_ceil(m) * wo.div_ceil(m), TILE_BLOCK),
            None => (output.pixels(), ROW_BLOCK),
        };
        let (row_block, per_job) = split(rows, panels, block);
        ConvRun {
            conv: self,
            isa,
            input,
            output,
            relu,
            rows,
            row_block,
            per_job,
            col_jobs: panels.div_ceil(per_job),
        }
    }

    /// Rows `r0..r0+r` of the patch matrix (output pixel × (ky, kx, c_in)) into `a`.
    unsafe fn im2col(
        &self,
        input: Map,
        (ho, wo): (usize, usize),
        r0: usize,
        r: usize,
        a: *mut f32,
    ) {
        let (k, s, pad, cin) = (self.kernel, self.stride, self.padding, self.c_in);
        let row_len = k * k * cin;
        let dense = input.stride == cin;
        for lr in 0..r {
            let px = r0 + lr;
            let (img, oy, ox) = (px / (ho * wo), (px / wo) % ho, px % wo);
            let dst = a.add(lr * row_len);
            let ix0 = (ox * s) as isize - pad as isize;
            for ky in 0..k {
                let iy = (oy * s + ky) as isize - pad as isize;
                let d = dst.add(ky * k * cin);
                if iy < 0 || iy >= input.h as isize {
                    std::ptr::write_bytes(d, 0, k * cin);
                } else if dense && ix0 >= 0 && ix0 + k as isize <= input.w as isize {
                    // The whole kernel row is k neighbouring pixels: one run of k·c_in floats.
                    copy(input.at(img, iy as usize, ix0 as usize), d, k * cin);
                } else {
                    for kx in 0..k {
                        let ix = ix0 + kx as isize;
                        let d = d.add(kx * cin);
                        if ix < 0 || ix >= input.w as isize {
                            std::ptr::write_bytes(d, 0, cin);
                        } else {
                            copy(input.at(img, iy as usize, ix as usize), d, cin);
                        }
                    }
                }
            }
        }
    }
}

/// One convolution over given maps, cut into jobs: blocks of output rows (pixels, or Winograd
/// tiles) × ranges of output-channel panels. Jobs write disjoint parts of the output.
#[derive(Debug, Clone, Copy)]
pub struct ConvRun<'a> {
    conv: &'a CpuConv,
    isa: Isa,
    input: Map,
    output: Map,
    relu: bool,
    rows: usize,
    row_block: usize,
    per_job: usize,
    col_jobs: usize,
}

impl ConvRun<'_> {
    pub fn jobs(&self) -> usize {
        self.rows.div_ceil(self.row_block) * self.col_jobs
    }

    /// Runs job `job` (< [`ConvRun::jobs`]).
    pub fn run(&self, job: usize) {
        let conv = self.conv;
        let (rb, cb) = (job / self.col_jobs, job % self.col_jobs);
        let r0 = rb * self.row_block;
        let r = self.row_block.min(self.rows - r0);
        let panels = conv.c_out.div_ceil(NR);
        let p = cb * self.per_job..((cb + 1) * self.per_job).min(panels);
        let (isa, input, output) = (self.isa, self.input, self.output);
        if let Some((tile, alpha)) = conv.kind.winograd_tile() {
            let (th, tw) = (output.h.div_ceil(tile), output.w.div_ceil(tile));
            let (points, width) = (alpha * alpha, p.len() * NR);
            with_scratch(points * r * conv.c_in, points * r * width, |v, m| {
                // SAFETY: scratch sized above; the job writes its own tiles × channels.
                unsafe {
                    winograd_job(
                        isa,
                        conv,
                        input,
                        output,
                        (th, tw),
                        r0,
                        r,
                        p,
                        self.relu,
                        v,
                        m,
                    );
                }
            });
            return;
        }
        let packed = conv.packed.as_ref().expect("packed weights");
        let ep = Epilogue {
            bias: conv.bias.as_ptr(),
            relu: self.relu,
            accumulate: false,
        };
        // SAFETY: the job writes rows r0..r0+r and the columns of its panels only.
        unsafe {
            let c = output.ptr.add(r0 * output.stride + p.start * NR);
            if conv.kind == ConvKind::Pointwise {
                let a = input.ptr.add(r0 * input.stride);
                gemm_job(isa, r, a, input.stride, packed, p, c, output.stride, ep);
            } else {
                let k = packed.k();
                with_scratch(r * k, 0, |a, _| {
                    conv.im2col(input, (output.h, output.w), r0, r, a);
                    gemm_job(isa, r, a, k, packed, p, c, output.stride, ep);
                });
            }
        }
    }
}

/// Runs the jobs of several convolutions in one parallel region (they must write disjoint
/// outputs): GoogLeNet's branches share one instead of paying for a region each.
pub fn run_together(runs: &[ConvRun]) {
    let mut starts = Vec::with_capacity(runs.len());
    let mut total = 0;
    for run in runs {
        starts.push(total);
        total += run.jobs();
    }
    (0..total).into_par_iter().for_each(|job| {
        let i = starts.partition_point(|&s| s <= job) - 1;
        runs[i].run(job - starts[i]);
    });
}

/// Copies `len` floats; short runs (an RGB pixel, a kernel row of one) without a call to memcpy.
#[inline(always)]
unsafe fn copy(src: *const f32, dst: *mut f32, len: usize) {
    if len < 32 {
        for i in 0..len {
            *dst.add(i) = *src.add(i);
        }
    } else {
        std::ptr::copy_nonoverlapping(src, dst, len);
    }
}

isa_dispatch! {
    /// [`gemm::gemm`] compiled for `isa`.
    unsafe fn gemm_job = gemm_generic(
        rows: usize, a: *const f32, lda: usize, b: &PackedB, panels: std::ops::Range<usize>,
        c: *mut f32, ldc: usize, ep: Epilogue,
    )
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_generic<S: Simd, const MR: usize, const NV: usize>(
    rows: usize,
    a: *const f32,
    lda: usize,
    b: &PackedB,
    panels: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    ep: Epilogue,
) {
    gemm::gemm::<S, MR, NV>(rows, a, lda, b, panels, c, ldc, ep)
}

isa_dispatch! {
    /// One block of tiles × one range of output panels, transformed, multiplied and transformed
    /// back, compiled for `isa`.
    unsafe fn winograd_job = winograd_generic(
        conv: &CpuConv, input: Map, output: Map, tiles_hw: (usize, usize), t0: usize, t: usize,
        panels: std::ops::Range<usize>, relu: bool, v: *mut f32, m: *mut f32,
    )
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn winograd_generic<S: Simd, const MR: usize, const NV: usize>(
    conv: &CpuConv,
    input: Map,
    output: Map,
    tiles_hw: (usize, usize),
    t0: usize,
    t: usize,
    panels: std::ops::Range<usize>,
    relu: bool,
    v: *mut f32,
    m: *mut f32,
) {
    let args = (conv, input, output, tiles_hw, t0, t, panels, relu, v, m);
    if conv.kind == ConvKind::WinogradF23 {
        winograd_tiles::<S, MR, NV, F23, 4, 2>(args)
    } else {
        winograd_tiles::<S, MR, NV, F43, 6, 4>(args)
    }
}

type JobArgs<'a> = (
    &'a CpuConv,
    Map,
    Map,
    (usize, usize),
    usize,
    usize,
    std::ops::Range<usize>,
    bool,
    *mut f32,
    *mut f32,
);

/// [`winograd_generic`] for one algorithm: `A`-point input tiles, `M`-point output tiles.
#[inline(always)]
unsafe fn winograd_tiles<
    S: Simd,
    const MR: usize,
    const NV: usize,
    T: Tile<A, M>,
    const A: usize,
    const M: usize,
>(
    (conv, input, output, (th, tw), t0, t, panels, relu, v, m): JobArgs,
) {
    let cin = conv.c_in;
    let points = A * A;
    let tile = |i: usize| {
        let g = t0 + i;
        (g / (th * tw), (g / tw) % th, g % tw)
    };
    // 1. Bᵀ d B for each tile and input channel: v[ξ][tile][c_in].
    for i in 0..t {
        let (img, ty, tx) = tile(i);
        let mut c = 0;
        while c + S::LANES <= cin {
            input_tile::<S, T, A, M>(input, img, ty, tx, c, v.add(i * cin + c), t * cin);
            c += S::LANES;
        }
        while c < cin {
            input_tile::<Scalar, T, A, M>(input, img, ty, tx, c, v.add(i * cin + c), t * cin);
            c += 1;
        }
    }
    // 2. One product per point ξ: m[ξ][tile][panels].
    let width = panels.len() * NR;
    for xi in 0..points {
        gemm::gemm::<S, MR, NV>(
            t,
            v.add(xi * t * cin),
            cin,
            &conv.winograd[xi],
            panels.clone(),
            m.add(xi * t * width),
            width,
            Epilogue::NONE,
        );
    }
    // 3. Aᵀ m A + bias, ReLU, into the output.
    let c0 = panels.start * NR;
    let c1 = (panels.end * NR).min(conv.c_out);
    for i in 0..t {
        let (img, ty, tx) = tile(i);
        let at = |c: usize| -> OutputAt {
            (output, img, ty, tx, c, m.add(i * width + c - c0), t * width)
        };
        let mut c = c0;
        while c + S::LANES <= c1 {
            output_tile::<S, T, A, M>(at(c), conv.bias.as_ptr().add(c), relu);
            c += S::LANES;
        }
        while c < c1 {
            output_tile::<Scalar, T, A, M>(at(c), conv.bias.as_ptr().add(c), relu);
            c += 1;
        }
    }
}

/// A Winograd algorithm F(M, 3): its input transform `Bᵀ` on `A = M + 2` points, its output
/// transform `Aᵀ` to `M` points, and its kernel transform `G` (`A × 3`).
trait Tile<const A: usize, const M: usize> {
    const G: [[f64; 3]; A];
    unsafe fn bt<S: Simd>(d: [S::V; A]) -> [S::V; A];
    unsafe fn at<S: Simd>(m: [S::V; A]) -> [S::V; M];
}

/// F(4,3) with the points 0, ±1, ±2 (Lavin & Gray).
struct F43;

impl Tile<6, 4> for F43 {
    const G: [[f64; 3]; 6] = [
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];

    #[inline(always)]
    unsafe fn bt<S: Simd>(d: [S::V; 6]) -> [S::V; 6] {
        let (two, four, m4, m5) = (S::splat(2.0), S::splat(4.0), S::splat(-4.0), S::splat(-5.0));
        [
            S::fma(four, d[0], S::fma(m5, d[2], d[4])),
            S::fma(m4, S::add(d[1], d[2]), S::add(d[3], d[4])),
            S::fma(four, S::sub(d[1], d[2]), S::sub(d[4], d[3])),
            S::fma(two, S::sub(d[3], d[1]), S::sub(d[4], d[2])),
            S::fma(two, S::sub(d[1], d[3]), S::sub(d[4], d[2])),
            S::fma(four, d[1], S::fma(m5, d[3], d[5])),
        ]
    }

    #[inline(always)]
    unsafe fn at<S: Simd>(m: [S::V; 6]) -> [S::V; 4] {
        let (two, four, eight) = (S::splat(2.0), S::splat(4.0), S::splat(8.0));
        let (s12, d12) = (S::add(m[1], m[2]), S::sub(m[1], m[2]));
        let (s34, d34) = (S::add(m[3], m[4]), S::sub(m[3], m[4]));
        [
            S::add(S::add(m[0], s12), s34),
            S::fma(two, d34, d12),
            S::fma(four, s34, s12),
            S::add(S::fma(eight, d34, d12), m[5]),
        ]
    }
}

/// F(2,3) with the points 0, ±1.
struct F23;

impl Tile<4, 2> for F23 {
    const G: [[f64; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];

    #[inline(always)]
    unsafe fn bt<S: Simd>(d: [S::V; 4]) -> [S::V; 4] {
        [
            S::sub(d[0], d[2]),
            S::add(d[1], d[2]),
            S::sub(d[2], d[1]),
            S::sub(d[1], d[3]),
        ]
    }

    #[inline(always)]
    unsafe fn at<S: Simd>(m: [S::V; 4]) -> [S::V; 2] {
        [
            S::add(S::add(m[0], m[1]), m[2]),
            S::sub(S::sub(m[1], m[2]), m[3]),
        ]
    }
}

/// Transforms the `A×A` input tile at tile `(ty, tx)` of image `img`, channels `c..c+LANES`, and
/// stores the `A·A` results `xi_stride` floats apart from `dst`.
#[inline(always)]
unsafe fn input_tile<S: Simd, T: Tile<A, M>, const A: usize, const M: usize>(
    input: Map,
    img: usize,
    ty: usize,
    tx: usize,
    c: usize,
    dst: *mut f32,
    xi_stride: usize,
) {
    let (y0, x0) = ((ty * M) as isize - 1, (tx * M) as isize - 1);
    let mut d = [[S::zero(); A]; A];
    let side = A as isize;
    let inside =
        y0 >= 0 && x0 >= 0 && y0 + side <= input.h as isize && x0 + side <= input.w as isize;
    for (r, row) in d.iter_mut().enumerate() {
        let y = y0 + r as isize;
        if y < 0 || y >= input.h as isize {
            continue;
        }
        for (col, slot) in row.iter_mut().enumerate() {
            let x = x0 + col as isize;
            if inside || (x >= 0 && x < input.w as isize) {
                *slot = S::load(input.at(img, y as usize, x as usize).add(c));
            }
        }
    }
    // Columns first (Bᵀ d), then rows ((Bᵀ d) B).
    let mut t = [[S::zero(); A]; A];
    for col in 0..A {
        let mut column = [S::zero(); A];
        for (r, slot) in column.iter_mut().enumerate() {
            *slot = d[r][col];
        }
        for (tr, v) in t.iter_mut().zip(T::bt::<S>(column)) {
            tr[col] = v;
        }
    }
    for (row, tr) in t.iter().enumerate() {
        for (col, v) in T::bt::<S>(*tr).into_iter().enumerate() {
            S::store(dst.add((row * A + col) * xi_stride), v);
        }
    }
}

/// Where [`output_tile`] reads and writes: the output map, image, tile row and column, first
/// channel, the products of point 0 and the distance between points.
type OutputAt = (Map, usize, usize, usize, usize, *const f32, usize);

/// Transforms the `A·A` products back into the `M×M` output tile, with bias and ReLU; pixels
/// past the map's edge are dropped.
#[inline(always)]
unsafe fn output_tile<S: Simd, T: Tile<A, M>, const A: usize, const M: usize>(
    (output, img, ty, tx, c, src, xi_stride): OutputAt,
    bias: *const f32,
    relu: bool,
) {
    let mut s = [[S::zero(); A]; M];
    for col in 0..A {
        let mut m = [S::zero(); A];
        for (row, slot) in m.iter_mut().enumerate() {
            *slot = S::load(src.add((row * A + col) * xi_stride));
        }
        for (sr, v) in s.iter_mut().zip(T::at::<S>(m)) {
            sr[col] = v;
        }
    }
    let b = S::load(bias);
    for (row, sr) in s.iter().enumerate() {
        let y = ty * M + row;
        if y >= output.h {
            break;
        }
        for (col, v) in T::at::<S>(*sr).into_iter().enumerate() {
            let x = tx * M + col;
            if x >= output.w {
                break;
            }
            let mut v = S::add(v, b);
            if relu {
                v = S::max(v, S::zero());
            }
            S::store(output.at(img, y, x).add(c), v);
        }
    }
}

/// `G g Gᵀ` for every (c_out, c_in) kernel, in f64, packed as `A·A` matrices `[C_in × C_out]`
/// (`A` = `g.len()`).
fn transform_kernels(
    weight: &[f32],
    c_out: usize,
    c_in: usize,
    g_rows: &[[f64; 3]],
) -> Vec<PackedB> {
    let alpha = g_rows.len();
    let points = alpha * alpha;
    // u[ci][ξ][co]: each input channel's rows in one chunk, so the channels transform in
    // parallel and the packing below reads whole rows.
    let mut u = super::zeroed(c_in * points * c_out);
    u.par_chunks_mut(points * c_out)
        .enumerate()
        .for_each(|(ci, rows)| {
            let mut gg = vec![[0f64; 3]; alpha];
            for co in 0..c_out {
                let g = &weight[(co * c_in + ci) * 9..][..9];
                for (i, row) in gg.iter_mut().enumerate() {
                    for (j, slot) in row.iter_mut().enumerate() {
                        *slot = (0..3).map(|k| g_rows[i][k] * g[k * 3 + j] as f64).sum();
                    }
                }
                for i in 0..alpha {
                    for j in 0..alpha {
                        let v: f64 = (0..3).map(|k| gg[i][k] * g_rows[j][k]).sum();
                        rows[(i * alpha + j) * c_out + co] = v as f32;
                    }
                }
            }
        });
    (0..points)
        .map(|xi| PackedB::from_rows(c_in, c_out, |ci| &u[(ci * points + xi) * c_out..][..c_out]))
        .collect()
}
