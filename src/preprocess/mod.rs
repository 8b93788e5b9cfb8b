//! Image bytes → the normalised tensor a torchvision classifier expects.
//!
//! The models we serve were trained and evaluated on tensors made by Pillow and torchvision, so
//! this module reproduces that pipeline exactly rather than doing "something similar":
//!
//! - decoding ([`decode_rgb`]) gives the pixels of `PIL.Image.open(f).convert("RGB")`: format
//!   recognised by content, alpha dropped, palettes expanded, gray replicated, and JPEGs decoded
//!   with a port of libjpeg-turbo's IDCT, upsampling and colour conversion (`jpeg.rs`), since
//!   other JPEG decoders move pixels by a few levels;
//! - resizing ([`resize_bilinear`]) is a port of Pillow's `Resample.c` bilinear filter with
//!   antialiasing, which is what torchvision's `Resize` calls for PIL images;
//! - [`Transform`] applies torchvision's `Resize`/`CenterCrop` geometry, then
//!   [`to_normalized_tensor`] does `ToTensor` + `Normalize` in the same float32 operation order.
//!
//! On the reference photos the tensors are bit-identical to torchvision's (Pillow 13).
//!
//! Where we deliberately differ from Pillow + torchvision:
//! - EXIF orientation is applied (phone photos are stored sideways with a rotation tag; Pillow
//!   ignores the tag unless `ImageOps.exif_transpose` is called);
//! - 16-bit gray images are scaled to 8 bits (`v >> 8`) instead of clamped at 255;
//! - truncated or corrupt files and headers over the pixel limit are errors (libjpeg would
//!   decode corrupt JPEG data with a warning);
//! - rare JPEG flavours (arithmetic coding, 12-bit, CMYK, progressive files missing coefficient
//!   bits) are decoded by zune-jpeg and may differ by a few levels;
//! - resizing follows Pillow 13's pass order; Pillow 12 and older differ by one level on a few
//!   pixels when the height shrinks much more than the width (see [`resize_bilinear`]).

mod decode;
mod jpeg;
mod resample;

pub use decode::{declared_pixels, decode_rgb, ImageError, DEFAULT_MAX_PIXELS};
pub use resample::resize_bilinear;

use candle_core::{Device, Tensor};
use image::RgbImage;

/// torchvision's ImageNet statistics, as float32 like `Normalize` stores them.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The evaluation transforms a model can be served with.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
pub enum Transform {
    /// torchvision's ImageNet eval transform: `Resize(256)` (shorter side) → `CenterCrop(224)`
    /// → `ToTensor` → `Normalize`. Output 3×224×224.
    #[serde(rename = "imagenet")]
    #[value(name = "imagenet")]
    Imagenet,
    /// `Resize((256, 256))` (aspect ratio not kept) → `ToTensor` → `Normalize`. Output 3×256×256.
    #[serde(rename = "resize256x256")]
    #[value(name = "resize256x256")]
    Resize256x256,
}

impl Transform {
    /// The name used on the command line and in configuration files.
    pub fn name(&self) -> &'static str {
        match self {
            Transform::Imagenet => "imagenet",
            Transform::Resize256x256 => "resize256x256",
        }
    }

    /// `(width, height)` of the tensor [`Transform::apply`] returns.
    pub fn output_size(&self) -> (u32, u32) {
        match self {
            Transform::Imagenet => (224, 224),
            Transform::Resize256x256 => (256, 256),
        }
    }

    /// The model input for `img`: an f32 tensor of shape `[3, H, W]` on `device` (the model's).
    pub fn apply(&self, img: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 {
            candle_core::bail!("cannot transform an empty {w}x{h} image");
        }
        let pixels = match self {
            Transform::Imagenet => {
                let (rw, rh) = shorter_side_size(w, h, 256)?;
                resize_center_crop(img, rw, rh, 224, 224)
            }
            Transform::Resize256x256 => resize_bilinear(img, 256, 256),
        };
        to_normalized_tensor(&pixels, device)
    }
}

impl std::fmt::Display for Transform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// torchvision `Resize(size)` with an int: the shorter side becomes `size` and the longer side
/// `int(size * long / short)`, truncated (`_compute_resized_output_size`).
fn shorter_side_size(w: u32, h: u32, size: u32) -> candle_core::Result<(u32, u32)> {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (f64::from(size) * f64::from(long) / f64::from(short)).trunc();
    // Pillow stores sizes in a C int; torchvision would fail there too.
    if new_long > f64::from(i32::MAX) {
        candle_core::bail!(
            "the {w}x{h} image is too elongated to resize its shorter side to {size}"
        );
    }
    let new_long = new_long as u32;
    Ok(if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    })
}

/// `CenterCrop((crop_h, crop_w))` of `resize_bilinear(img, rw, rh)`, computing only the
/// pixels that survive the crop.
///
/// Follows torchvision's `center_crop`: an image smaller than the crop is first padded with
/// zeros (left/top get the smaller half), then the crop offset is
/// `int(round((size - crop) / 2.0))` with Python's round-half-to-even.
fn resize_center_crop(img: &RgbImage, rw: u32, rh: u32, crop_w: u32, crop_h: u32) -> RgbImage {
    let (pad_left, pad_top) = (crop_w.saturating_sub(rw) / 2, crop_h.saturating_sub(rh) / 2);
    let (padded_w, padded_h) = (rw.max(crop_w), rh.max(crop_h));
    let left = center_offset(padded_w, crop_w);
    let top = center_offset(padded_h, crop_h);
    // The crop window in the coordinates of the resized (unpadded) image.
    let x0 = left.saturating_sub(pad_left);
    let y0 = top.saturating_sub(pad_top);
    let x1 = (left + crop_w - pad_left).min(rw);
    let y1 = (top + crop_h - pad_top).min(rh);
    let window = resample::resize_window(img, rw, rh, x0..x1, y0..y1);
    if pad_left == 0 && pad_top == 0 {
        return window;
    }
    let mut out = RgbImage::new(crop_w, crop_h);
    image::imageops::replace(
        &mut out,
        &window,
        i64::from(pad_left + x0 - left),
        i64::from(pad_top + y0 - top),
    );
    out
}

fn center_offset(size: u32, crop: u32) -> u32 {
    (f64::from(size - crop) / 2.0).round_ties_even() as u32
}

/// torchvision `ToTensor` + `Normalize(mean, std)` with ImageNet statistics: `[3, H, W]` f32
/// on `device`.
pub fn to_normalized_tensor(img: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = img.dimensions();
    Tensor::from_vec(normalized(img), (3, h as usize, w as usize), device)
}

/// The values of [`to_normalized_tensor`], channel-major.
///
/// Computed as `(v / 255 - mean) / std` in float32, the order torchvision uses (a fused
/// `v * scale + shift` would differ in the last bit).
pub fn normalized(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = w as usize * h as usize;
    let mut data = vec![0f32; 3 * plane];
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * plane + i] = (f32::from(px[c]) / 255.0 - MEAN[c]) / STD[c];
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_shorter_side_truncates() {
        // int(256 * 500 / 375) = int(341.33) = 341
        assert_eq!(shorter_side_size(500, 375, 256).unwrap(), (341, 256));
        assert_eq!(shorter_side_size(288, 345, 256).unwrap(), (256, 306));
        assert_eq!(shorter_side_size(300, 300, 256).unwrap(), (256, 256));
        assert!(shorter_side_size(1, 40_000_000, 256).is_err());
    }

    #[test]
    fn center_offset_rounds_half_to_even() {
        // Python: int(round(32.5)) == 32, int(round(33.5)) == 34
        assert_eq!(center_offset(289, 224), 32);
        assert_eq!(center_offset(291, 224), 34);
        assert_eq!(center_offset(290, 224), 33);
        assert_eq!(center_offset(224, 224), 0);
    }

    #[test]
    fn crop_pads_small_images_with_zeros() {
        // torchvision pads (crop - size) // 2 on the left/top, the rest right/bottom.
        let img = RgbImage::from_pixel(3, 2, image::Rgb([9, 9, 9]));
        let out = resize_center_crop(&img, 3, 2, 6, 5);
        let lit: Vec<(u32, u32)> = out
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0 != [0, 0, 0])
            .map(|(x, y, _)| (x, y))
            .collect();
        assert_eq!(lit, vec![(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (3, 2)]);
        // Padded in one direction, cropped in the other.
        let img = RgbImage::from_fn(2, 9, |_, y| image::Rgb([y as u8 + 1, 0, 0]));
        let out = resize_center_crop(&img, 2, 9, 4, 4);
        // pad left 1; top = round((9 - 4) / 2) = round(2.5) = 2
        assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(1, 0).0, [3, 0, 0]);
        assert_eq!(out.get_pixel(2, 3).0, [6, 0, 0]);
        assert_eq!(out.get_pixel(3, 3).0, [0, 0, 0]);
    }

    #[test]
    fn normalize_matches_torchvision_float_order() {
        let img = RgbImage::from_pixel(1, 1, image::Rgb([0, 128, 255]));
        let v = normalized(&img);
        let expect: Vec<f32> = (0..3)
            .map(|c| ([0f32, 128., 255.][c] / 255.0 - MEAN[c]) / STD[c])
            .collect();
        assert_eq!(v, expect);
        assert!((v[0] - (-0.485 / 0.229)).abs() < 1e-6);
    }

    #[test]
    fn names_round_trip() {
        use clap::ValueEnum;
        for t in Transform::value_variants() {
            let json = serde_json::to_string(t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.name()));
            assert_eq!(serde_json::from_str::<Transform>(&json).unwrap(), *t);
            assert_eq!(Transform::from_str(t.name(), false).unwrap(), *t);
        }
    }
}
