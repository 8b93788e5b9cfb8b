//! Pooling on NHWC maps: max pooling with PyTorch's padding and ceil-mode rule, adaptive average
//! pooling with PyTorch's windows. Channels are contiguous, so every window is a running maximum
//! or sum over whole channel rows, which the compiler vectorizes.

use rayon::prelude::*;

use super::{Act, Map};
use crate::models::layers::MaxPool2d;

/// `pool` over `input`; padding never wins a maximum, as in PyTorch.
pub fn max_pool(input: Map, pool: &MaxPool2d) -> candle_core::Result<Act> {
    let (ho, wo) = (pool.output_len(input.h)?, pool.output_len(input.w)?);
    let mut out = Act::new(input.n, ho, wo, input.c);
    let c = input.c;
    let window = |o: usize, len: usize| {
        let start = (o * pool.stride) as isize - pool.padding as isize;
        let end = (start + pool.kernel as isize).min(len as isize);
        (start.max(0) as usize, end.max(0) as usize)
    };
    out.data_mut()
        .par_chunks_mut(wo * c)
        .enumerate()
        .for_each(|(row, dst)| {
            let (img, oy) = (row / ho, row % ho);
            let (y0, y1) = window(oy, input.h);
            for ox in 0..wo {
                let (x0, x1) = window(ox, input.w);
                let d = &mut dst[ox * c..][..c];
                d.fill(f32::NEG_INFINITY);
                for y in y0..y1 {
                    for x in x0..x1 {
                        // SAFETY: (img, y, x) lies inside the input map.
                        let src = unsafe { std::slice::from_raw_parts(input.at(img, y, x), c) };
                        for (m, &v) in d.iter_mut().zip(src) {
                            *m = if v > *m { v } else { *m };
                        }
                    }
                }
            }
        });
    Ok(out)
}

/// `nn.AdaptiveAvgPool2d((oh, ow))` on `input`, as `[n, c·oh·ow]` in PyTorch's flatten order.
pub fn adaptive_avg_pool_flat(input: Map, oh: usize, ow: usize) -> Vec<f32> {
    let c = input.c;
    let mut pooled = Act::zeros(input.n, oh, ow, c);
    let window = |i: usize, len: usize, out: usize| (i * len / out, ((i + 1) * len).div_ceil(out));
    for img in 0..input.n {
        for oy in 0..oh {
            let (y0, y1) = window(oy, input.h, oh);
            for ox in 0..ow {
                let (x0, x1) = window(ox, input.w, ow);
                let d = &mut pooled.data_mut()[((img * oh + oy) * ow + ox) * c..][..c];
                for y in y0..y1 {
                    for x in x0..x1 {
                        // SAFETY: (img, y, x) lies inside the input map.
                        let src = unsafe { std::slice::from_raw_parts(input.at(img, y, x), c) };
                        for (s, &v) in d.iter_mut().zip(src) {
                            *s += v;
                        }
                    }
                }
                let count = ((y1 - y0) * (x1 - x0)) as f32;
                for s in d.iter_mut() {
                    *s /= count;
                }
            }
        }
    }
    pooled.to_nchw()
}
