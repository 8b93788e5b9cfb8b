//! The recipe's random transforms, on the already resized image, as torchvision applies them to
//! PIL images: `RandomRotation(5)` (PIL `rotate`, nearest neighbour, same size, black fill) and
//! `RandomHorizontalFlip(0.5)`. Randomness comes from the caller's seeded generator.

use image::RgbImage;
use rand::Rng;

/// Rotates counter-clockwise by `degrees` about the centre, as PIL's `Image.rotate(angle,
/// NEAREST, expand=False, fillcolor=0)`: each output pixel reads the input at the inverse-rotated
/// position of its centre; positions outside the image are black.
pub fn rotate_nearest(img: &RgbImage, degrees: f64) -> RgbImage {
    let (w, h) = img.dimensions();
    let angle = -(degrees % 360.0).to_radians();
    // PIL rounds the matrix to 15 decimals before use.
    let round15 = |v: f64| (v * 1e15).round() / 1e15;
    let (a, b, d, e) = (
        round15(angle.cos()),
        round15(angle.sin()),
        round15(-angle.sin()),
        round15(angle.cos()),
    );
    let (cx, cy) = (f64::from(w) / 2.0, f64::from(h) / 2.0);
    let c = a * -cx + b * -cy + cx;
    let f = d * -cx + e * -cy + cy;
    let mut out = RgbImage::new(w, h);
    for y in 0..h {
        for x in 0..w {
            let (px, py) = (f64::from(x) + 0.5, f64::from(y) + 0.5);
            let xin = a * px + b * py + c;
            let yin = d * px + e * py + f;
            // PIL's COORD: negative → outside, else truncate.
            if xin >= 0.0 && yin >= 0.0 {
                let (xi, yi) = (xin as u32, yin as u32);
                if xi < w && yi < h {
                    out.put_pixel(x, y, *img.get_pixel(xi, yi));
                }
            }
        }
    }
    out
}

/// One draw of the recipe's augmentation: a rotation in [-5°, 5°], then a flip half the time.
pub fn random_augment(img: &RgbImage, rng: &mut impl Rng) -> RgbImage {
    let degrees = rng.random_range(-5.0..=5.0);
    let rotated = rotate_nearest(img, degrees);
    if rng.random_bool(0.5) {
        image::imageops::flip_horizontal(&rotated)
    } else {
        rotated
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, (x + y) as u8]))
    }

    #[test]
    fn zero_rotation_is_the_identity() {
        let img = gradient(31, 17);
        assert_eq!(rotate_nearest(&img, 0.0), img);
    }

    #[test]
    fn quarter_turn_moves_corners_like_pil() {
        // PIL: Image.rotate(90) turns counter-clockwise: the top-right pixel goes top-left.
        let img = gradient(8, 8);
        let out = rotate_nearest(&img, 90.0);
        assert_eq!(out.get_pixel(0, 0), img.get_pixel(7, 0));
        assert_eq!(out.get_pixel(0, 7), img.get_pixel(0, 0));
    }

    #[test]
    fn small_rotation_blackens_only_corners() {
        let img = RgbImage::from_pixel(64, 64, image::Rgb([200, 100, 50]));
        let out = rotate_nearest(&img, 5.0);
        assert_eq!(out.get_pixel(0, 0), &image::Rgb([0, 0, 0]));
        assert_eq!(out.get_pixel(32, 32), &image::Rgb([200, 100, 50]));
        let black = out.pixels().filter(|p| p.0 == [0, 0, 0]).count();
        assert!(black > 0 && black < 64 * 64 / 10, "{black}");
    }

    #[test]
    fn the_same_seed_gives_the_same_augmentation() {
        let img = gradient(40, 30);
        let mut a = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut b = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..4 {
            assert_eq!(random_augment(&img, &mut a), random_augment(&img, &mut b));
        }
    }
}
