//! `--dtype bf16` on the CPU: the same products as [`super::gemm`] with `B` held in bfloat16 and
//! `A` rounded to bfloat16 per `K` slice, multiplied by AVX512_BF16's `vdpbf16ps` (two products
//! per lane, summed into f32 accumulators), as oneDNN and MLAS do on these CPUs.
//!
//! `B`'s panels hold pairs: for panel column `j` and pair row `q`, one 32-bit word with
//! `B[2q][j]` in its low half and `B[2q+1][j]` in its high half, so one 512-bit load is 16
//! columns × 2 rows, and one broadcast of `A`'s pair `(A[r][2q], A[r][2q+1])` multiplies it. An
//! odd `K` is padded with a zero row. Rounding is to nearest, ties to even, both for the weights
//! (once, at load) and the activations. Bias, ReLU and the accumulate are applied in f32, as
//! for f32. Like the f32 products, every element is summed in one fixed order.

use super::gemm::{Epilogue, KC, NR};

/// Whether this CPU runs the bf16 products (AVX-512 with the BF16 extension).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 → bfloat16 bits, rounded to nearest with ties to even (NaN stays a quiet NaN).
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// bfloat16 bits → f32 (exact).
pub fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// Rows of `A` per microkernel call: 14 accumulators and a `B` register of the 32.
const MR: usize = 14;

/// `C = A · B` for `B` packed as bf16 pairs; see [`super::gemm::gemm`] for the arguments.
///
/// # Safety
/// As for [`super::gemm::gemm`]; the CPU must have what [`available`] checks.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    rows: usize,
    a: *const f32,
    lda: usize,
    k: usize,
    n: usize,
    pairs: &[u32],
    panels: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    ep: Epilogue,
) {
    #[cfg(target_arch = "x86_64")]
    {
        debug_assert!(available());
        avx512::gemm(rows, a, lda, k, n, pairs, panels, c, ldc, ep)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, a, lda, k, n, pairs, panels, c, ldc, ep);
        unreachable!("bf16 products need AVX512_BF16");
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use super::{Epilogue, KC, MR, NR};

    thread_local! {
        /// `A`'s rows of one `K` slice in bf16, packed, and one row being converted; reused from call
    /// to call.
        static ROWS: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        rows: usize,
        a: *const f32,
        lda: usize,
        k: usize,
        n: usize,
        pairs: &[u32],
        panels: std::ops::Range<usize>,
        c: *mut f32,
        ldc: usize,
        ep: Epilogue,
    ) {
        if k == 0 || rows == 0 {
            return;
        }
        let half = k.div_ceil(2);
        let blocks = rows.div_ceil(MR);
        ROWS.with_borrow_mut(|(buf, row)| {
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                // Pairs of this slice, rounded up: KC is even, so slices start on a pair.
                let kp = kc.div_ceil(2);
                // `A` packed as MLAS packs it: per block of MR rows, per pair, MR words side by
                // side, so the microkernel broadcasts from fixed offsets of one pointer.
                buf.clear();
                buf.resize(blocks * kp * MR, 0);
                row.clear();
                row.resize(kp, 0);
                for r in 0..rows {
                    row[kp - 1] = 0; // an odd slice's last pair keeps a zero high half
                    convert_row(a.add(r * lda + k0), kc, row.as_mut_ptr() as *mut u16);
                    let (block, i) = (r / MR, r % MR);
                    let dst = &mut buf[block * kp * MR..][..kp * MR];
                    for (q, &pair) in row.iter().enumerate() {
                        dst[q * MR + i] = pair;
                    }
                }
                let (first, last) = (k0 == 0, k0 + kc == k);
                let step = Epilogue {
                    bias: if last { ep.bias } else { std::ptr::null() },
                    relu: last && ep.relu,
                    accumulate: !first || ep.accumulate,
                };
                for (i, p) in panels.clone().enumerate() {
                    let bp = pairs.as_ptr().add((p * half + k0 / 2) * NR);
                    let cols = NR.min(n - p * NR);
                    let bias = if step.bias.is_null() {
                        step.bias
                    } else {
                        step.bias.add(p * NR)
                    };
                    for block in 0..blocks {
                        let r0 = block * MR;
                        microkernel(
                            kp,
                            buf.as_ptr().add(block * kp * MR),
                            MR.min(rows - r0),
                            bp,
                            c.add(r0 * ldc + i * NR),
                            ldc,
                            cols,
                            Epilogue { bias, ..step },
                        );
                    }
                }
                k0 += kc;
            }
        });
    }

    /// `len` floats at `src` → bf16 at `dst` (an odd tail is followed by the zero already there).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn convert_row(src: *const f32, len: usize, dst: *mut u16) {
        let mut i = 0;
        while i + 16 <= len {
            let v = _mm512_loadu_ps(src.add(i));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_storeu_si256(dst.add(i) as *mut __m256i, h);
            i += 16;
        }
        while i < len {
            *dst.add(i) = super::to_bf16(*src.add(i));
            i += 1;
        }
    }

    /// One `mr × cols` block of `C` over `kp` pairs of `K`; `a` is one packed block of `A`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn microkernel(
        kp: usize,
        a: *const u32,
        mr: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        ep: Epilogue,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 1]; MR];
        for q in 0..kp {
            let bv: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR) as *const _));
            let aq = a.add(q * MR);
            for (i, acc) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*aq.add(i) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], av, bv);
            }
        }
        crate::models::cpu::gemm::store::<crate::models::cpu::simd::Avx512, MR, 1>(
            &acc, mr, c, ldc, cols, ep,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even 1.0.
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }
}
