//! Pillow's bilinear resampling, ported from `src/libImaging/Resample.c` for 8-bit RGB.
//!
//! The port keeps Pillow's arithmetic step for step: double-precision filter weights normalised to
//! sum 1, rounded to 22-bit fixed point, integer accumulation that starts at one half, a horizontal
//! pass that writes `u8` before the vertical pass reads it. Any shortcut (float accumulation, a
//! single 2-D pass, other rounding) moves pixels by one level, which is what we are avoiding.
//!
//! One structural difference: taps are computed per output column/row on the fly instead of
//! being tabulated for the whole axis, and callers may ask for a window of the output. Each
//! output sample depends only on its own taps, so a window equals the same crop of a full resize,
//! but a crop of an extreme resize no longer needs the full-size intermediate image.

use image::RgbImage;
use std::ops::Range;

/// Pillow's `PRECISION_BITS`: 8 bits for the result, 2 for filters with negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Accumulators start at one half so that the final shift rounds to nearest.
const HALF: i64 = 1 << (PRECISION_BITS - 1);

/// Pillow's `clip8`: shift the fixed-point sum back to 8 bits and saturate.
#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Geometry of one axis of a resize, as `precompute_coeffs` derives it for the box `(0, in_size)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Axis {
    in_size: usize,
    scale: f64,
    filterscale: f64,
    support: f64,
}

impl Axis {
    pub(crate) fn new(in_size: u32, out_size: u32) -> Self {
        // Pillow receives the box as C floats, so a huge size is rounded to f32 before the
        // division in double; doing the same keeps the taps identical for any size.
        let scale = f64::from(in_size as f32) / f64::from(out_size);
        // Downscaling widens the filter by the scale factor: this is Pillow's antialiasing.
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        Axis {
            in_size: in_size as usize,
            scale,
            filterscale,
            support: 1.0 * filterscale,
        }
    }

    /// The first source index and the normalised double weights for output index `out_index`.
    pub(crate) fn weights(&self, out_index: usize, weights: &mut Vec<f64>) -> usize {
        let center = (out_index as f64 + 0.5) * self.scale;
        let ss = 1.0 / self.filterscale;
        // `as i64` truncates toward zero like C's `(int)` cast, which Pillow relies on to round.
        let xmin = ((center - self.support + 0.5) as i64).max(0);
        let xmax = ((center + self.support + 0.5) as i64).min(self.in_size as i64);
        weights.clear();
        let mut total = 0.0;
        for x in xmin..xmax.max(xmin) {
            let w = bilinear_filter((x as f64 - center + 0.5) * ss);
            weights.push(w);
            total += w;
        }
        if total != 0.0 {
            for w in weights.iter_mut() {
                *w /= total;
            }
        }
        xmin as usize
    }

    /// Fixed-point taps for output index `out_index` (Pillow's `normalize_coeffs_8bpc`).
    fn taps(&self, out_index: usize, scratch: &mut Vec<f64>, taps: &mut Vec<i64>) -> usize {
        let first = self.weights(out_index, scratch);
        let one = f64::from(1u32 << PRECISION_BITS);
        taps.clear();
        taps.extend(scratch.iter().map(|&w| {
            // Round half away from zero, then truncate, exactly as the C code does.
            if w < 0.0 {
                (-0.5 + w * one) as i32 as i64
            } else {
                (0.5 + w * one) as i32 as i64
            }
        }));
        first
    }

    /// Source indices `[first, last)` read by the output indices in `range`.
    fn source_span(&self, range: Range<usize>) -> Range<usize> {
        let mut scratch = Vec::new();
        let (Some(first_out), Some(last_out)) = (range.clone().next(), range.clone().next_back())
        else {
            return 0..0;
        };
        let first = self.weights(first_out, &mut scratch);
        let last_first = self.weights(last_out, &mut scratch);
        first..(last_first + scratch.len()).max(first)
    }
}

/// Resize `img` to `width`×`height` exactly like Pillow's
/// `Image.resize((width, height), Image.BILINEAR)` (default `reducing_gap=None`).
///
/// Bit-exact with Pillow 13 for RGB images: same taps, same fixed-point rounding, same pass
/// order. Pillow before 13.0 always ran the horizontal pass first; since 13.0 (python-pillow
/// PR #9549) it runs the vertical pass first when the height shrinks by more than twice as many
/// pixels as the width. The order changes results by one level on a few pixels, and the
/// torchvision reference tensors we test against follow the new order.
pub fn resize_bilinear(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize_window(img, width, height, 0..width, 0..height)
}

/// The pixels `cols`×`rows` of `resize_bilinear(img, width, height)`, without computing the rest.
///
/// The ranges are clipped to `0..width` and `0..height`.
pub(crate) fn resize_window(
    img: &RgbImage,
    width: u32,
    height: u32,
    cols: Range<u32>,
    rows: Range<u32>,
) -> RgbImage {
    let cols = cols.start.min(width) as usize..cols.end.min(width) as usize;
    let rows = rows.start.min(height) as usize..rows.end.min(height) as usize;
    let (out_w, out_h) = (cols.len(), rows.len());
    if out_w == 0 || out_h == 0 {
        return RgbImage::new(out_w as u32, out_h as u32);
    }
    let (in_w, in_h) = img.dimensions();
    if in_w == 0 || in_h == 0 {
        // Nothing to sample; Pillow cannot even hold such an image.
        return RgbImage::new(out_w as u32, out_h as u32);
    }
    let src = Plane {
        data: img.as_raw(),
        width: in_w as usize,
        x0: 0,
        y0: 0,
    };
    let horizontal = Axis::new(in_w, width);
    let vertical = Axis::new(in_h, height);
    // Pillow skips a pass whose size does not change. Its identity taps would give the same
    // pixels, but the skip decides which pass runs on which rows.
    let need_horizontal = width != in_w;
    let need_vertical = height != in_h;
    // Pillow 13's rule, in C `int` arithmetic (i64 here so that it cannot overflow).
    let shrink_h = i64::from(in_h) - i64::from(height);
    let shrink_w = i64::from(in_w) - i64::from(width);
    let vertical_first = shrink_h > 0 && shrink_h > shrink_w * 2;

    let out = if vertical_first {
        // Only the source columns that the horizontal taps of `cols` will read.
        let src_cols = if need_horizontal {
            horizontal.source_span(cols.clone())
        } else {
            cols.clone()
        };
        let tmp = vertical_pass(&src, src_cols.clone(), &vertical, rows.clone());
        let tmp = Plane {
            data: &tmp,
            width: src_cols.len(),
            x0: src_cols.start,
            y0: rows.start,
        };
        if need_horizontal {
            horizontal_pass(&tmp, rows, &horizontal, cols)
        } else {
            tmp.copy(cols, rows)
        }
    } else {
        // Only the source rows that the vertical taps of `rows` will read (Pillow's
        // ybox_first..ybox_last).
        let src_rows = if need_vertical {
            vertical.source_span(rows.clone())
        } else {
            rows.clone()
        };
        let tmp = if need_horizontal {
            horizontal_pass(&src, src_rows.clone(), &horizontal, cols.clone())
        } else {
            src.copy(cols.clone(), src_rows.clone())
        };
        let tmp = Plane {
            data: &tmp,
            width: out_w,
            x0: cols.start,
            y0: src_rows.start,
        };
        if need_vertical {
            vertical_pass(&tmp, cols, &vertical, rows)
        } else {
            tmp.copy(cols, rows)
        }
    };
    RgbImage::from_raw(out_w as u32, out_h as u32, out)
        .unwrap_or_else(|| RgbImage::new(out_w as u32, out_h as u32))
}

/// A block of RGB pixels that holds columns `x0..x0 + width` and rows from `y0` of a larger
/// image; all coordinates given to it are those of the larger image.
struct Plane<'a> {
    data: &'a [u8],
    width: usize,
    x0: usize,
    y0: usize,
}

impl Plane<'_> {
    /// The pixels of row `y`, columns `cols`, as interleaved RGB.
    fn row(&self, y: usize, cols: Range<usize>) -> &[u8] {
        let start = ((y - self.y0) * self.width + cols.start - self.x0) * 3;
        &self.data[start..start + cols.len() * 3]
    }

    fn copy(&self, cols: Range<usize>, rows: Range<usize>) -> Vec<u8> {
        let mut out = Vec::with_capacity(cols.len() * rows.len() * 3);
        for y in rows {
            out.extend_from_slice(self.row(y, cols.clone()));
        }
        out
    }
}

/// `ImagingResampleHorizontal_8bpc` for rows `rows` and output columns `cols`.
fn horizontal_pass(src: &Plane, rows: Range<usize>, axis: &Axis, cols: Range<usize>) -> Vec<u8> {
    let out_w = cols.len();
    let mut out = vec![0u8; rows.len() * out_w * 3];
    let (mut scratch, mut taps) = (Vec::new(), Vec::new());
    // Column by column so that each column's taps are computed once and never tabulated: a
    // very wide image would otherwise need a tap table proportional to its width.
    for (ox, xx) in cols.enumerate() {
        let first = axis.taps(xx, &mut scratch, &mut taps);
        for (oy, y) in rows.clone().enumerate() {
            let span = src.row(y, first..first + taps.len());
            let mut acc = [HALF; 3];
            for (px, &k) in span.chunks_exact(3).zip(&taps) {
                acc[0] += i64::from(px[0]) * k;
                acc[1] += i64::from(px[1]) * k;
                acc[2] += i64::from(px[2]) * k;
            }
            let o = (oy * out_w + ox) * 3;
            out[o] = clip8(acc[0]);
            out[o + 1] = clip8(acc[1]);
            out[o + 2] = clip8(acc[2]);
        }
    }
    out
}

/// `ImagingResampleVertical_8bpc` for columns `cols` and output rows `rows`.
fn vertical_pass(src: &Plane, cols: Range<usize>, axis: &Axis, rows: Range<usize>) -> Vec<u8> {
    let stride = cols.len() * 3;
    let mut out = vec![0u8; rows.len() * stride];
    let (mut scratch, mut taps) = (Vec::new(), Vec::new());
    let mut acc = vec![0i64; stride];
    for (oy, yy) in rows.enumerate() {
        let first = axis.taps(yy, &mut scratch, &mut taps);
        acc.fill(HALF);
        for (dy, &k) in taps.iter().enumerate() {
            for (a, &v) in acc.iter_mut().zip(src.row(first + dy, cols.clone())) {
                *a += i64::from(v) * k;
            }
        }
        for (o, &a) in out[oy * stride..(oy + 1) * stride].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed_taps(in_size: u32, out_size: u32, index: usize) -> (usize, Vec<i64>) {
        let (mut scratch, mut taps) = (Vec::new(), Vec::new());
        let first = Axis::new(in_size, out_size).taps(index, &mut scratch, &mut taps);
        (first, taps)
    }

    #[test]
    fn identity_taps_select_one_pixel() {
        for i in 0..5 {
            let (first, taps) = fixed_taps(5, 5, i);
            let one = 1i64 << PRECISION_BITS;
            let hit: Vec<_> = taps.iter().enumerate().filter(|(_, &k)| k != 0).collect();
            assert_eq!(hit, vec![(i - first, &one)], "index {i}: {taps:?}");
        }
    }

    #[test]
    fn downscale_by_two_widens_the_filter() {
        // Halving: support 2, centre at 2i+1, weights 1/8, 3/8, 3/8, 1/8 (clipped at the edges).
        let (first, taps) = fixed_taps(8, 4, 1);
        assert_eq!(first, 1);
        let one = f64::from(1u32 << PRECISION_BITS);
        let expect: Vec<i64> = [0.125, 0.375, 0.375, 0.125]
            .iter()
            .map(|w| (0.5 + w * one) as i64)
            .collect();
        assert_eq!(taps, expect);
        // First output: xmin clipped to 0, weights 3/8, 3/8, 1/8 renormalised to 3/7, 3/7, 1/7.
        let (first, taps) = fixed_taps(8, 4, 0);
        assert_eq!(first, 0);
        let expect: Vec<i64> = [3.0 / 7.0, 3.0 / 7.0, 1.0 / 7.0]
            .iter()
            .map(|w| (0.5 + w * one) as i64)
            .collect();
        assert_eq!(taps, expect);
    }

    #[test]
    fn weights_sum_to_one() {
        for (i, o) in [(500, 256), (243, 256), (7, 3), (3, 7), (1, 9), (1000, 1)] {
            let axis = Axis::new(i, o);
            let mut w = Vec::new();
            for x in 0..o as usize {
                axis.weights(x, &mut w);
                let s: f64 = w.iter().sum();
                assert!((s - 1.0).abs() < 1e-12, "{i}->{o} at {x}: {s}");
            }
        }
    }

    #[test]
    fn window_equals_crop_of_full_resize() {
        let img = RgbImage::from_fn(37, 23, |x, y| {
            image::Rgb([(x * 7 + y * 3) as u8, (x * y) as u8, (255 - x * 5) as u8])
        });
        for (w, h) in [(20, 50), (50, 20), (37, 11), (30, 5), (13, 23), (64, 64)] {
            let full = resize_bilinear(&img, w, h);
            let (x0, y0) = (w / 4, h / 3);
            let win = resize_window(&img, w, h, x0..w - 2, y0..h - 1);
            let crop = image::imageops::crop_imm(&full, x0, y0, w - 2 - x0, h - 1 - y0).to_image();
            assert_eq!(win, crop, "{w}x{h}");
        }
    }

    fn rgb(w: u32, h: u32, data: &[u8]) -> RgbImage {
        RgbImage::from_raw(w, h, data.to_vec()).unwrap()
    }

    /// 5x3 image used for the Pillow reference values below.
    const SMALL: [u8; 45] = [
        10, 200, 30, 50, 60, 70, 255, 0, 128, 90, 91, 92, 0, 0, 0, //
        17, 34, 51, 200, 100, 0, 12, 24, 36, 250, 251, 252, 100, 50, 25, //
        1, 2, 3, 64, 128, 192, 33, 66, 99, 7, 14, 21, 255, 255, 255,
    ];

    #[test]
    fn matches_pillow_on_small_images() {
        // Pillow 13.0, Python:
        //   a = np.array(SMALL, np.uint8).reshape(3, 5, 3)
        //   list(np.asarray(Image.fromarray(a, "RGB").resize(size, Image.BILINEAR)).flat)
        let img = rgb(5, 3, &SMALL);
        let down = [
            53, 111, 40, 148, 55, 95, 86, 75, 70, 53, 58, 63, 61, 77, 92, 155, 146, 143,
        ];
        assert_eq!(resize_bilinear(&img, 3, 2).into_raw(), down);
        let up: [u8; 120] = [
            10, 200, 30, 28, 139, 48, 63, 56, 74, 191, 19, 110, 203, 28, 117, 100, 85, 94, 39, 40,
            40, 0, 0, 0, 13, 134, 38, 56, 109, 40, 113, 72, 45, 143, 31, 76, 156, 55, 112, 154,
            146, 152, 90, 79, 74, 40, 20, 10, 17, 34, 51, 97, 63, 29, 188, 95, 2, 71, 48, 25, 86,
            95, 104, 235, 237, 239, 166, 138, 124, 100, 50, 25, 7, 15, 22, 56, 59, 63, 112, 112,
            112, 54, 70, 87, 49, 68, 87, 99, 105, 111, 155, 145, 141, 193, 173, 163, 1, 2, 3, 29,
            57, 86, 62, 124, 186, 43, 85, 128, 25, 50, 75, 9, 17, 26, 147, 150, 153, 255, 255, 255,
        ];
        assert_eq!(resize_bilinear(&img, 8, 5).into_raw(), up);
        let mixed = [
            86, 92, 71, 97, 40, 70, 101, 69, 36, 146, 129, 119, 34, 69, 103, 94, 108, 121,
        ];
        assert_eq!(resize_bilinear(&img, 2, 3).into_raw(), mixed);
    }

    #[test]
    fn pass_order_follows_pillow_13() {
        // Height shrinks by 7, width by 1: Pillow 13 runs the vertical pass first. The
        // horizontal-first order of older Pillow gives 97, 140 ... 132 ... 136 instead.
        #[rustfmt::skip]
        let tall: [u8; 108] = [
            241, 160, 175, 229, 148, 198, 213, 57, 14, 76, 72, 223, 233, 1, 127, 210, 33, 204,
            30, 119, 209, 77, 87, 71, 184, 65, 253, 113, 122, 129, 149, 141, 130, 254, 206, 202,
            179, 159, 87, 253, 119, 55, 216, 41, 219, 156, 29, 11, 113, 9, 36, 131, 248, 119,
            206, 234, 210, 161, 112, 131, 68, 127, 97, 63, 254, 3, 24, 49, 248, 177, 225, 51,
            184, 94, 125, 0, 158, 212, 169, 39, 136, 68, 247, 225, 47, 130, 240, 216, 181, 163,
            10, 189, 121, 23, 62, 138, 186, 129, 156, 223, 175, 92, 164, 153, 27, 15, 169, 99,
        ];
        let img = rgb(4, 9, &tall);
        let pillow13 = [
            182, 96, 141, 160, 121, 149, 149, 115, 135, 126, 131, 132, 122, 154, 137, 98, 146, 135,
        ];
        assert_eq!(resize_bilinear(&img, 3, 2).into_raw(), pillow13);
    }

    #[test]
    fn identity_resize_is_a_copy() {
        let img = rgb(5, 3, &SMALL);
        assert_eq!(resize_bilinear(&img, 5, 3), img);
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(64, 48, image::Rgb([3, 128, 251]));
        for (w, h) in [(32, 24), (7, 5), (100, 13), (1, 1)] {
            let out = resize_bilinear(&img, w, h);
            assert!(out.pixels().all(|p| p.0 == [3, 128, 251]), "{w}x{h}");
        }
    }

    #[test]
    fn empty_inputs_do_not_panic() {
        let empty = RgbImage::new(0, 0);
        assert_eq!(resize_bilinear(&empty, 3, 2).dimensions(), (3, 2));
        let img = RgbImage::new(4, 4);
        assert_eq!(resize_bilinear(&img, 0, 5).dimensions(), (0, 5));
    }
}
