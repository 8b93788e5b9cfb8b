//! Convolutions packed for the CPU, with bias and ReLU fused: 1×1 as one matrix product over the
//! NHWC map, 3×3 stride-1 through Winograd F(4,3) (Lavin & Gray; as NNPACK and ncnn do), any
//! other through im2col, a block of output pixels at a time.
//!
//! Winograd F(4,3) computes a 4×4 output tile from a 6×6 input tile with 36 products per input
//! and output channel pair instead of 144: the input tile is transformed (`Bᵀ d B`), multiplied
//! element-wise with the transformed kernel (`G g Gᵀ`, done once at load, in f64) and summed over
//! input channels, which for each of the 36 positions is a matrix product `[tiles × C_in] ·
//! [C_in × C_out]`, then transformed back (`Aᵀ m A`). Tiles are handled a block at a time, so the
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
    /// 3×3, stride 1, padding 1: Winograd F(4,3).
    Winograd,
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
    /// The 36 transformed kernels, `[C_in × C_out]` each.
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
            Some(ConvKind::Winograd) => {
                assert!(
                    winograd_ok,
                    "Winograd F(4,3) needs a 3×3, stride-1, padding-1 kernel"
                );
                ConvKind::Winograd
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
            None if winograd_ok && c_in >= WINOGRAD_MIN_CHANNELS => ConvKind::Winograd,
            None => ConvKind::Im2col,
        };
        let kk = kernel * kernel;
        let (packed, winograd) = if kind == ConvKind::Winograd {
            (None, transform_kernels(weight, c_out, c_in))
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

    pub fn kind(&self) -> ConvKind {
        self.kind
    }

    pub fn c_in(&self) -> usize {
        self.c_in
    }

    pub fn c_out(&self) -> usize {
        self.c_out
    }

    /// Bytes of packed weights.
    pub fn bytes(&self) -> usize {
        self.packed.as_ref().map_or(0, PackedB::bytes)
            + self.winograd.iter().map(PackedB::bytes).sum::<usize>()
            + self.bias.len() * 4
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
        let (rows, block) = match self.kind {
            ConvKind::Winograd => (output.n * ho.div_ceil(4) * wo.div_ceil(4), TILE_BLOCK),
            ConvKind::Pointwise | ConvKind::Im2col => (output.pixels(), ROW_BLOCK),
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
        if conv.kind == ConvKind::Winograd {
            let (th, tw) = (output.h.div_ceil(4), output.w.div_ceil(4));
            let width = p.len() * NR;
            with_scratch(36 * r * conv.c_in, 36 * r * width, |v, m| {
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
    (th, tw): (usize, usize),
    t0: usize,
    t: usize,
    panels: std::ops::Range<usize>,
    relu: bool,
    v: *mut f32,
    m: *mut f32,
) {
    let cin = conv.c_in;
    let tile = |i: usize| {
        let g = t0 + i;
        (g / (th * tw), (g / tw) % th, g % tw)
    };
    // 1. Bᵀ d B for each tile and input channel: v[ξ][tile][c_in].
    for i in 0..t {
        let (img, ty, tx) = tile(i);
        let mut c = 0;
        while c + S::LANES <= cin {
            input_tile::<S>(input, img, ty, tx, c, v.add(i * cin + c), t * cin);
            c += S::LANES;
        }
        while c < cin {
            input_tile::<Scalar>(input, img, ty, tx, c, v.add(i * cin + c), t * cin);
            c += 1;
        }
    }
    // 2. The 36 products: m[ξ][tile][panels].
    let width = panels.len() * NR;
    for xi in 0..36 {
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
        let mut c = c0;
        while c + S::LANES <= c1 {
            output_tile::<S>(
                output,
                img,
                ty,
                tx,
                c,
                m.add(i * width + c - c0),
                t * width,
                conv.bias.as_ptr().add(c),
                relu,
            );
            c += S::LANES;
        }
        while c < c1 {
            output_tile::<Scalar>(
                output,
                img,
                ty,
                tx,
                c,
                m.add(i * width + c - c0),
                t * width,
                conv.bias.as_ptr().add(c),
                relu,
            );
            c += 1;
        }
    }
}

/// `Bᵀ x` for F(4,3) on six vectors.
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

/// `Aᵀ x` for F(4,3): six vectors to four.
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

/// Transforms the 6×6 input tile at tile `(ty, tx)` of image `img`, channels `c..c+LANES`, and
/// stores the 36 results `xi_stride` floats apart from `dst`.
#[inline(always)]
unsafe fn input_tile<S: Simd>(
    input: Map,
    img: usize,
    ty: usize,
    tx: usize,
    c: usize,
    dst: *mut f32,
    xi_stride: usize,
) {
    let (y0, x0) = (ty as isize * 4 - 1, tx as isize * 4 - 1);
    let mut d = [[S::zero(); 6]; 6];
    let inside = y0 >= 0 && x0 >= 0 && y0 + 6 <= input.h as isize && x0 + 6 <= input.w as isize;
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
    let mut t = [[S::zero(); 6]; 6];
    for col in 0..6 {
        let r = bt::<S>([
            d[0][col], d[1][col], d[2][col], d[3][col], d[4][col], d[5][col],
        ]);
        for (row, v) in r.into_iter().enumerate() {
            t[row][col] = v;
        }
    }
    for (row, tr) in t.iter().enumerate() {
        let r = bt::<S>(*tr);
        for (col, v) in r.into_iter().enumerate() {
            S::store(dst.add((row * 6 + col) * xi_stride), v);
        }
    }
}

/// Transforms the 36 products at `src` (`xi_stride` apart) back into the 4×4 output tile
/// `(ty, tx)` of image `img`, channels `c..c+LANES`, with bias and ReLU; pixels past the map's
/// edge are dropped.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn output_tile<S: Simd>(
    output: Map,
    img: usize,
    ty: usize,
    tx: usize,
    c: usize,
    src: *const f32,
    xi_stride: usize,
    bias: *const f32,
    relu: bool,
) {
    let mut s = [[S::zero(); 6]; 4];
    for col in 0..6 {
        let mut m = [S::zero(); 6];
        for (row, slot) in m.iter_mut().enumerate() {
            *slot = S::load(src.add((row * 6 + col) * xi_stride));
        }
        for (sr, v) in s.iter_mut().zip(at::<S>(m)) {
            sr[col] = v;
        }
    }
    let b = S::load(bias);
    for (row, sr) in s.iter().enumerate() {
        let y = ty * 4 + row;
        if y >= output.h {
            break;
        }
        for (col, v) in at::<S>(*sr).into_iter().enumerate() {
            let x = tx * 4 + col;
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

/// `G g Gᵀ` for every (c_out, c_in) kernel, in f64, packed as 36 `[C_in × C_out]` matrices.
fn transform_kernels(weight: &[f32], c_out: usize, c_in: usize) -> Vec<PackedB> {
    const G: [[f64; 3]; 6] = [
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    // u[ci][ξ][co]: each input channel's rows in one chunk, so the channels transform in
    // parallel and the packing below reads whole rows.
    let mut u = super::zeroed(c_in * 36 * c_out);
    u.par_chunks_mut(36 * c_out)
        .enumerate()
        .for_each(|(ci, rows)| {
            for co in 0..c_out {
                let g = &weight[(co * c_in + ci) * 9..][..9];
                let mut gg = [[0f64; 3]; 6];
                for (i, row) in gg.iter_mut().enumerate() {
                    for (j, slot) in row.iter_mut().enumerate() {
                        *slot = (0..3).map(|k| G[i][k] * g[k * 3 + j] as f64).sum();
                    }
                }
                for i in 0..6 {
                    for j in 0..6 {
                        let v: f64 = (0..3).map(|k| gg[i][k] * G[j][k]).sum();
                        rows[(i * 6 + j) * c_out + co] = v as f32;
                    }
                }
            }
        });
    (0..36)
        .map(|xi| PackedB::from_rows(c_in, c_out, |ci| &u[(ci * 36 + xi) * c_out..][..c_out]))
        .collect()
}
