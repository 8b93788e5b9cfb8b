//! The one matrix product every CPU convolution ends in: `C = A · B` with `B` packed once at load.
//!
//! Laid out as MLAS and BLIS lay theirs: `B` (the weights, `K × N`) is stored in panels of
//! [`NR`] columns, each panel `K` rows of `NR` contiguous floats, zero-padded past `N`. `A` (the
//! activations) is read in place, row by row with a stride, so an NHWC feature map *is* the `A`
//! of a 1×1 convolution and the Winograd transform writes its `A` directly: nothing is packed per
//! call. The microkernel keeps an `MR × NR` block of `C` in registers, broadcasting one element
//! of `A` per row against one row of the panel; `K` is cut into [`KC`]-long slices so that a
//! panel slice stays in L1 while the rows of `A` stream past it. Bias, ReLU and an accumulate
//! into `C` are fused into the store of the last slice.
//!
//! Every element of `C` is summed in the same order whatever the thread count or the block it
//! falls in, so results do not depend on how the work was split.

use super::simd::Simd;

/// Columns per panel: two AVX2 registers, one AVX-512 register.
pub const NR: usize = 16;
/// Length of the `K` slice one pass of the microkernel covers.
pub const KC: usize = 256;

/// `B` (`k × n`) in [`NR`]-wide panels.
#[derive(Debug, Clone)]
pub struct PackedB {
    k: usize,
    n: usize,
    /// f32 panels; empty once [`PackedB::to_bf16`] made `pairs`.
    data: Vec<f32>,
    /// bf16 panels in pairs of rows ([`super::bf16`]); empty for f32.
    pairs: Vec<u32>,
}

impl PackedB {
    /// Packs `B` given element by element: `b(row, col)` for `row < k`, `col < n`.
    pub fn new(k: usize, n: usize, b: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        Self::pack(k, n, |row, cols, dst| {
            for (j, slot) in dst.iter_mut().enumerate() {
                *slot = b(row, cols.start + j);
            }
        })
    }

    /// Packs `B` given row by row: `row(r)` is row `r`, `n` floats.
    pub fn from_rows<'a>(k: usize, n: usize, row: impl Fn(usize) -> &'a [f32] + Sync) -> Self {
        Self::pack(k, n, |r, cols, dst| dst.copy_from_slice(&row(r)[cols]))
    }

    /// Fills each panel row in parallel: `fill(row, columns, dst)` writes `B[row][columns]` into
    /// `dst` (the panel's padding past `n` stays zero).
    fn pack(
        k: usize,
        n: usize,
        fill: impl Fn(usize, std::ops::Range<usize>, &mut [f32]) + Sync,
    ) -> Self {
        use rayon::prelude::*;
        let mut data = super::zeroed(n.div_ceil(NR) * k * NR);
        if k > 0 {
            data.par_chunks_mut(k * NR)
                .enumerate()
                .for_each(|(p, panel)| {
                    let cols = p * NR..n.min((p + 1) * NR);
                    for (row, dst) in panel.chunks_exact_mut(NR).enumerate() {
                        fill(row, cols.clone(), &mut dst[..cols.len()]);
                    }
                });
        }
        Self {
            k,
            n,
            data,
            pairs: Vec::new(),
        }
    }

    /// The same `B` rounded to bfloat16 for [`super::bf16`]'s products (half the memory).
    pub fn to_bf16(&self) -> Self {
        use super::bf16::to_bf16;
        if self.is_bf16() {
            return self.clone();
        }
        let half = self.k.div_ceil(2);
        let mut pairs = vec![0u32; self.panels() * half * NR];
        for p in 0..self.panels() {
            let panel = &self.data[p * self.k * NR..][..self.k * NR];
            for q in 0..half {
                for j in 0..NR {
                    let lo = to_bf16(panel[2 * q * NR + j]) as u32;
                    let hi = if 2 * q + 1 < self.k {
                        to_bf16(panel[(2 * q + 1) * NR + j]) as u32
                    } else {
                        0
                    };
                    pairs[(p * half + q) * NR + j] = lo | (hi << 16);
                }
            }
        }
        Self {
            k: self.k,
            n: self.n,
            data: Vec::new(),
            pairs,
        }
    }

    /// Whether the products run in bf16.
    pub fn is_bf16(&self) -> bool {
        !self.pairs.is_empty()
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    fn panel(&self, p: usize) -> *const f32 {
        self.data[p * self.k * NR..].as_ptr()
    }
}

/// What happens to `C` as the product is stored.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue {
    /// Added per column (`bias[col]`, indexed from column 0 of `B`); null for none. Must hold
    /// a whole number of panels (zero-padded).
    pub bias: *const f32,
    pub relu: bool,
    /// Add the product to what `C` holds instead of overwriting it.
    pub accumulate: bool,
}

impl Epilogue {
    pub const NONE: Epilogue = Epilogue {
        bias: std::ptr::null(),
        relu: false,
        accumulate: false,
    };
}

/// `C[rows × cols] = A[rows × k] · B[k × panels]` for the panels `panels` of `b`.
///
/// `a` points at row 0 of `A` (row `r` at `a + r·lda`); `c` at the element of row 0 in the first
/// column of `panels.start` (row `r` at `c + r·ldc`). Columns past `B`'s width are not stored.
///
/// # Safety
/// The pointers must cover what the shapes say, and the CPU must have `S`'s instruction set.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm<S: Simd, const MR: usize, const NV: usize>(
    rows: usize,
    a: *const f32,
    lda: usize,
    b: &PackedB,
    panels: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    ep: Epilogue,
) {
    debug_assert_eq!(NV * S::LANES, NR);
    let k = b.k;
    if k == 0 {
        return;
    }
    if b.is_bf16() {
        return super::bf16::gemm(rows, a, lda, k, b.n, &b.pairs, panels, c, ldc, ep);
    }
    let mut k0 = 0;
    while k0 < k {
        let kc = KC.min(k - k0);
        let (first, last) = (k0 == 0, k0 + kc == k);
        let step = Epilogue {
            bias: if last { ep.bias } else { std::ptr::null() },
            relu: last && ep.relu,
            accumulate: !first || ep.accumulate,
        };
        for (i, p) in panels.clone().enumerate() {
            let bp = b.panel(p).add(k0 * NR);
            let cols = NR.min(b.n - p * NR);
            let bias = if step.bias.is_null() {
                step.bias
            } else {
                step.bias.add(p * NR)
            };
            let mut r0 = 0;
            while r0 < rows {
                let mr = MR.min(rows - r0);
                microkernel::<S, MR, NV>(
                    kc,
                    a.add(r0 * lda + k0),
                    lda,
                    mr,
                    bp,
                    c.add(r0 * ldc + i * NR),
                    ldc,
                    cols,
                    Epilogue { bias, ..step },
                );
                r0 += MR;
            }
        }
        k0 += kc;
    }
}

/// One `mr × cols` block of `C` (at most `MR × NR`) over a `kc`-long slice.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn microkernel<S: Simd, const MR: usize, const NV: usize>(
    kc: usize,
    a: *const f32,
    lda: usize,
    mr: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    ep: Epilogue,
) {
    let mut rows = [a; MR];
    for (i, row) in rows.iter_mut().enumerate() {
        // Rows past `mr` repeat the last real one; their results are not stored.
        *row = a.add(i.min(mr - 1) * lda);
    }
    let mut acc = [[S::zero(); NV]; MR];
    for p in 0..kc {
        let mut bv = [S::zero(); NV];
        for (v, slot) in bv.iter_mut().enumerate() {
            *slot = S::load(b.add(p * NR + v * S::LANES));
        }
        for i in 0..MR {
            let av = S::splat(*rows[i].add(p));
            for v in 0..NV {
                acc[i][v] = S::fma(av, bv[v], acc[i][v]);
            }
        }
    }
    store::<S, MR, NV>(&acc, mr, c, ldc, cols, ep);
}

/// Stores an `MR × NR` block of accumulators into `C` (its first `mr` rows and `cols` columns),
/// applying the epilogue: what both the f32 and the bf16 microkernels end in.
#[inline(always)]
pub(super) unsafe fn store<S: Simd, const MR: usize, const NV: usize>(
    acc: &[[S::V; NV]; MR],
    mr: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    ep: Epilogue,
) {
    if mr == MR && cols == NR {
        for (i, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                let dst = c.add(i * ldc + v * S::LANES);
                let mut x = x;
                if ep.accumulate {
                    x = S::add(x, S::load(dst));
                }
                if !ep.bias.is_null() {
                    x = S::add(x, S::load(ep.bias.add(v * S::LANES)));
                }
                if ep.relu {
                    x = S::max(x, S::zero());
                }
                S::store(dst, x);
            }
        }
    } else {
        let mut tmp = [[0f32; NR]; MR];
        for (i, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                S::store(tmp[i].as_mut_ptr().add(v * S::LANES), x);
            }
        }
        for (i, row) in tmp.iter().enumerate().take(mr) {
            for (j, &x) in row.iter().enumerate().take(cols) {
                let dst = c.add(i * ldc + j);
                let mut x = x;
                if ep.accumulate {
                    x += *dst;
                }
                if !ep.bias.is_null() {
                    x += *ep.bias.add(j);
                }
                if ep.relu {
                    x = x.max(0.0);
                }
                *dst = x;
            }
        }
    }
}
