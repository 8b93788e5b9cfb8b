//! The preprocessing pipeline against torchvision's own output, and decoding of every format.

use cnnserve::preprocess::*;
use image::{Rgb, RgbImage};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    let dir = std::env::var_os("CNNSERVE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    let dir = dir.join("preprocess");
    assert!(
        dir.join("expected.safetensors").is_file(),
        "preprocess fixtures not found in {}: set CNNSERVE_FIXTURES to the fixtures directory \
         (the one containing preprocess/expected.safetensors); without our shared folder, make \
         them with `python3 scripts/make-fixtures.py DIR` (PyTorch, torchvision)",
        dir.display()
    );
    dir
}

/// (mean, max) absolute difference between two tensors of the same shape.
fn diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let d: Vec<f32> = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).collect();
    (
        d.iter().sum::<f32>() / d.len() as f32,
        d.iter().cloned().fold(0.0, f32::max),
    )
}

#[test]
fn matches_torchvision_on_fixture_photos() {
    let dir = fixtures();
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    for i in 0..5 {
        let bytes = std::fs::read(dir.join(format!("img{i}.jpg"))).unwrap();
        let img = decode_rgb(&bytes, DEFAULT_MAX_PIXELS).unwrap();
        for (t, key) in [
            (Transform::Resize256x256, "resize256x256"),
            (Transform::Imagenet, "resize256_crop224"),
        ] {
            let got = t.apply(&img, &candle_core::Device::Cpu).unwrap();
            let want = &expected[&format!("img{i}_{key}")];
            let (mean, max) = diff(&got, want);
            eprintln!("img{i} {key}: mean {mean:.3e} max {max:.3e}");
            assert!(
                mean <= 0.01 && max <= 0.06,
                "img{i} {key}: mean {mean} max {max}"
            );
            // Decoding, resizing and normalising all follow Pillow and torchvision step for
            // step, so nothing but float noise may remain (in practice: nothing).
            assert!(max <= 1e-6, "img{i} {key}: no longer bit-exact, max {max}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

fn encode(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    out.extend(kind);
    out.extend(data);
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend(crc.sum().to_be_bytes());
}

/// A PNG written by hand, for layouts the `image` encoder cannot produce.
fn handmade_png(
    width: u32,
    height: u32,
    color_type: u8,
    extra: &[(&[u8; 4], Vec<u8>)],
    rows: &[Vec<u8>],
) -> Vec<u8> {
    use std::io::Write;
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, color_type, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    for (kind, data) in extra {
        png_chunk(&mut out, kind, data);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    for row in rows {
        z.write_all(&[0]).unwrap(); // filter type None
        z.write_all(row).unwrap();
    }
    png_chunk(&mut out, b"IDAT", &z.finish().unwrap());
    png_chunk(&mut out, b"IEND", &[]);
    out
}

fn decode(bytes: &[u8]) -> RgbImage {
    decode_rgb(bytes, DEFAULT_MAX_PIXELS).unwrap()
}

#[test]
fn png_gray_is_replicated() {
    let img = image::GrayImage::from_fn(3, 2, |x, y| image::Luma([(x * 40 + y * 100) as u8]));
    let got = decode(&encode(img.into(), image::ImageFormat::Png));
    assert_eq!(got.get_pixel(2, 1).0, [180, 180, 180]);
    assert_eq!(got.get_pixel(0, 0).0, [0, 0, 0]);
}

#[test]
fn png_gray_alpha_drops_alpha() {
    // Pillow's convert("RGB") discards alpha: a fully transparent pixel keeps its gray value.
    let img = image::GrayAlphaImage::from_fn(2, 1, |x, _| {
        image::LumaA([if x == 0 { 10 } else { 250 }, 0])
    });
    let got = decode(&encode(img.into(), image::ImageFormat::Png));
    assert_eq!(got.get_pixel(0, 0).0, [10, 10, 10]);
    assert_eq!(got.get_pixel(1, 0).0, [250, 250, 250]);
}

#[test]
fn png_rgba_drops_alpha_without_compositing() {
    let img = image::RgbaImage::from_fn(2, 1, |x, _| {
        image::Rgba(if x == 0 {
            [200, 100, 50, 0]
        } else {
            [1, 2, 3, 128]
        })
    });
    let got = decode(&encode(img.into(), image::ImageFormat::Png));
    assert_eq!(got.get_pixel(0, 0).0, [200, 100, 50]);
    assert_eq!(got.get_pixel(1, 0).0, [1, 2, 3]);
}

#[test]
fn png_palette_is_expanded_and_transparency_ignored() {
    let plte = vec![255, 0, 0, 0, 255, 0, 0, 0, 255];
    let trns = vec![0, 255]; // index 0 fully transparent
    let png = handmade_png(
        3,
        1,
        3,
        &[(b"PLTE", plte), (b"tRNS", trns)],
        &[vec![0, 1, 2]],
    );
    let got = decode(&png);
    assert_eq!(got.into_raw(), vec![255, 0, 0, 0, 255, 0, 0, 0, 255]);
}

#[test]
fn png_16_bit_keeps_the_high_byte_like_pillow() {
    // Pillow reads 16-bit RGB PNGs with rawmode "RGB;16B": the high byte. 0x80FF → 0x80 (the
    // `image` crate's own rounding would give 0x81).
    let img = image::ImageBuffer::<Rgb<u16>, Vec<u16>>::from_fn(2, 1, |x, _| {
        Rgb(if x == 0 {
            [0x80FF, 0x00FF, 0xFFFF]
        } else {
            [0x0100, 0x7F80, 0]
        })
    });
    let got = decode(&encode(img.into(), image::ImageFormat::Png));
    assert_eq!(got.into_raw(), vec![0x80, 0x00, 0xFF, 0x01, 0x7F, 0x00]);

    let gray = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(1, 1, |_, _| {
        image::Luma([0xC0FF])
    });
    let got = decode(&encode(gray.into(), image::ImageFormat::Png));
    assert_eq!(got.into_raw(), vec![0xC0; 3]);
}

fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([(x * 30) as u8, (y * 50) as u8, ((x + y) * 20) as u8])
    })
}

#[test]
fn bmp_decodes_exactly() {
    let img = pattern(5, 3);
    assert_eq!(
        decode(&encode(img.clone().into(), image::ImageFormat::Bmp)),
        img
    );
}

#[test]
fn webp_lossless_decodes_exactly() {
    let img = pattern(5, 3);
    let mut bytes = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut bytes)
        .encode(img.as_raw(), 5, 3, image::ExtendedColorType::Rgb8)
        .unwrap();
    assert!(bytes.starts_with(b"RIFF"));
    assert_eq!(decode(&bytes), img);
}

#[test]
fn webp_lossy_matches_pillow() {
    let got = decode(&test_data("webp/lossy.webp"));
    assert_eq!(got.dimensions(), (33, 21));
    assert_eq!(got.into_raw(), test_data("webp/lossy.rgb"));
}

#[test]
fn gif_first_frame() {
    // Few colours, so the GIF palette holds them exactly.
    let img = RgbImage::from_fn(4, 2, |x, _| {
        Rgb(if x < 2 { [255, 0, 0] } else { [0, 0, 255] })
    });
    let bytes = encode(img.clone().into(), image::ImageFormat::Gif);
    assert!(bytes.starts_with(b"GIF8"));
    assert_eq!(decode(&bytes), img);
}

#[test]
fn jpeg_decodes_close_to_source() {
    let img = RgbImage::from_fn(16, 16, |x, _| {
        Rgb(if x < 8 { [200, 40, 40] } else { [40, 40, 200] })
    });
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95)
        .encode_image(&img)
        .unwrap();
    let got = decode(&bytes);
    assert_eq!(got.dimensions(), (16, 16));
    for (a, b) in got.pixels().zip(img.pixels()) {
        for c in 0..3 {
            assert!(
                (i32::from(a[c]) - i32::from(b[c])).abs() <= 24,
                "{a:?} vs {b:?}"
            );
        }
    }
    assert!(got.get_pixel(1, 8)[0] > 150 && got.get_pixel(14, 8)[2] > 150);
}

#[test]
fn format_comes_from_content_not_name() {
    // img2.jpg in the data set is a BMP; and a PNG is a PNG whatever it is called.
    let bmp = std::fs::read(fixtures().join("img2.jpg")).unwrap();
    assert!(bmp.starts_with(b"BM"));
    assert_eq!(decode(&bmp).dimensions(), (157, 200));
    let png = encode(pattern(3, 2).into(), image::ImageFormat::Png);
    assert_eq!(decode(&png), pattern(3, 2));
}

// ---------------------------------------------------------------------------------------------
// JPEG: libjpeg-turbo's pixels

/// A file under `tests/data` (small inputs with the pixels Pillow decodes from them).
fn test_data(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn jpeg_data(name: &str) -> Vec<u8> {
    test_data(&format!("jpeg/{name}"))
}

/// Every chroma layout libjpeg upsamples differently, plus gray, RGB, progressive and restarts.
const JPEG_LAYOUTS: [&str; 10] = [
    "h2v2",
    "h2v1_progressive",
    "h1v2",
    "h4v1",
    "h3v1",
    "chroma_larger_than_luma",
    "gray",
    "rgb",
    "restart_progressive",
    "tiny_h2v2",
];

#[test]
fn jpeg_pixels_match_pillow_exactly() {
    for name in JPEG_LAYOUTS {
        let got = decode(&jpeg_data(&format!("{name}.jpg")));
        let want = jpeg_data(&format!("{name}.rgb"));
        let diffs = got
            .as_raw()
            .iter()
            .zip(&want)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(got.as_raw().len(), want.len(), "{name}");
        assert_eq!(diffs, 0, "{name}: {diffs} samples differ from Pillow");
    }
}

#[test]
fn jpeg_cut_anywhere_is_an_error() {
    for name in ["h2v2", "h2v1_progressive", "restart_progressive"] {
        let bytes = jpeg_data(&format!("{name}.jpg"));
        for cut in 0..bytes.len() {
            assert!(
                decode_rgb(&bytes[..cut], DEFAULT_MAX_PIXELS).is_err(),
                "{name} cut to {cut} of {} bytes decoded",
                bytes.len()
            );
        }
    }
}

#[test]
fn jpeg_features_beyond_the_exact_decoder() {
    // Progressive files that never send all coefficient bits are smoothed by libjpeg; we hand
    // them to the general decoder, which still gives a picture.
    let img = decode(&jpeg_data("incomplete_progressive.jpg"));
    assert_eq!(img.dimensions(), (37, 23));
    let err = decode_rgb(&jpeg_data("arithmetic.jpg"), DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(
        matches!(err, ImageError::UnsupportedFeature { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("arithmetic"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// EXIF orientation

/// A JPEG of a `w`×`h` image whose left half is red and right half blue, with an EXIF APP1
/// segment carrying `orientation`.
fn jpeg_with_orientation(w: u32, h: u32, orientation: u16) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| {
        Rgb(if y < h / 2 && x < w / 2 {
            [255, 0, 0] // top-left quadrant red
        } else if x >= w / 2 {
            [0, 0, 255] // right half blue
        } else {
            [0, 255, 0] // bottom-left green
        })
    });
    let mut plain = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut plain, 95)
        .encode_image(&img)
        .unwrap();
    // TIFF header (big endian), one IFD with one entry: tag 0x0112 SHORT count 1.
    let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
    tiff.extend([0x00, 0x01]);
    tiff.extend([0x01, 0x12, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01]);
    tiff.extend(orientation.to_be_bytes());
    tiff.extend([0, 0]);
    tiff.extend([0, 0, 0, 0]); // no next IFD
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend(tiff);
    let mut out = plain[..2].to_vec(); // SOI
    out.extend([0xFF, 0xE1]);
    out.extend(((app1.len() + 2) as u16).to_be_bytes());
    out.extend(app1);
    out.extend(&plain[2..]);
    out
}

fn color_at(img: &RgbImage, x: u32, y: u32) -> &'static str {
    let p = img.get_pixel(x, y).0;
    match p.iter().enumerate().max_by_key(|(_, &v)| v).map(|(i, _)| i) {
        Some(0) => "red",
        Some(1) => "green",
        _ => "blue",
    }
}

#[test]
fn exif_orientation_is_applied() {
    let (w, h) = (32, 16);
    let upright = decode(&jpeg_with_orientation(w, h, 1));
    assert_eq!(upright.dimensions(), (32, 16));
    assert_eq!(color_at(&upright, 2, 2), "red");

    // 6: the stored image must be rotated 90° clockwise to display it.
    let rotated = decode(&jpeg_with_orientation(w, h, 6));
    assert_eq!(rotated.dimensions(), (16, 32));
    // Stored top-left (red) goes to the top-right; stored right half (blue) to the bottom.
    assert_eq!(color_at(&rotated, 13, 2), "red");
    assert_eq!(color_at(&rotated, 2, 2), "green");
    assert_eq!(color_at(&rotated, 8, 28), "blue");

    // 3: rotate 180°.
    let flipped = decode(&jpeg_with_orientation(w, h, 3));
    assert_eq!(flipped.dimensions(), (32, 16));
    assert_eq!(color_at(&flipped, 29, 13), "red");
    assert_eq!(color_at(&flipped, 2, 8), "blue");

    // 8: rotate 90° counter-clockwise; stored top-left goes to the bottom-left.
    let ccw = decode(&jpeg_with_orientation(w, h, 8));
    assert_eq!(ccw.dimensions(), (16, 32));
    assert_eq!(color_at(&ccw, 2, 29), "red");
    assert_eq!(color_at(&ccw, 8, 2), "blue");
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[test]
fn random_bytes_and_text_are_unsupported() {
    let mut seed = 0x1234_5678_u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        })
        .collect();
    let err = decode_rgb(&noise, DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(matches!(err, ImageError::Unsupported { .. }), "{err}");

    let err = decode_rgb(
        b"<html><body>404 Not Found</body></html>",
        DEFAULT_MAX_PIXELS,
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("HTML"), "{err}");

    let err = decode_rgb(b"", DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(matches!(err, ImageError::Empty), "{err}");
}

#[test]
fn corrupt_data_behind_a_valid_signature_is_an_error() {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(b"this is not a chunk structure at all, just text after the signature");
    let err = decode_rgb(&png, DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::Corrupt { .. } | ImageError::Truncated { .. }
        ),
        "{err}"
    );

    let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xDB, 0x00, 0x43, 0x00];
    jpeg.extend([7u8; 64]);
    jpeg.extend([0xFF, 0xD9]); // EOI without any frame
    let err = decode_rgb(&jpeg, DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(!matches!(err, ImageError::Unsupported { .. }), "{err}");
}

#[test]
fn truncated_files_are_errors() {
    let photo = std::fs::read(fixtures().join("img0.jpg")).unwrap();
    let progressive = std::fs::read(fixtures().join("img3.jpg")).unwrap();
    for (name, bytes) in [
        ("baseline JPEG", &photo),
        ("progressive JPEG", &progressive),
    ] {
        for cut in [bytes.len() / 2, bytes.len() - 2, 700] {
            let err = decode_rgb(&bytes[..cut], DEFAULT_MAX_PIXELS).unwrap_err();
            assert!(
                matches!(err, ImageError::Truncated { .. }),
                "{name} cut at {cut}: {err}"
            );
        }
    }
    let big = RgbImage::from_fn(64, 64, |x, y| {
        Rgb([(x * 4) as u8, (y * 4) as u8, (x ^ y) as u8])
    });
    for format in [
        image::ImageFormat::Png,
        image::ImageFormat::Bmp,
        image::ImageFormat::Gif,
    ] {
        let bytes = encode(big.clone().into(), format);
        let half = &bytes[..bytes.len() / 2];
        let err = decode_rgb(half, DEFAULT_MAX_PIXELS).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::Truncated { .. } | ImageError::Corrupt { .. }
            ),
            "{format:?}: {err}"
        );
    }
    let mut webp = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
        .encode(big.as_raw(), 64, 64, image::ExtendedColorType::Rgb8)
        .unwrap();
    assert!(decode_rgb(&webp[..webp.len() / 2], DEFAULT_MAX_PIXELS).is_err());
}

#[test]
fn oversized_header_is_rejected_before_decoding() {
    // A PNG that claims 100000x100000 pixels but holds no image data at all: only the header
    // can be looked at, so an error naming the size proves nothing was decoded.
    let png = handmade_png(100_000, 100_000, 2, &[], &[]);
    match decode_rgb(&png, DEFAULT_MAX_PIXELS) {
        Err(ImageError::TooManyPixels {
            width,
            height,
            limit,
        }) => {
            assert_eq!(
                (width, height, limit),
                (100_000, 100_000, DEFAULT_MAX_PIXELS)
            );
        }
        other => panic!("expected TooManyPixels, got {other:?}"),
    }
    // A real JPEG whose frame header was edited to claim 60000x60000.
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
        .encode_image(&pattern(8, 8))
        .unwrap();
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
    let err = decode_rgb(&jpeg, DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::TooManyPixels {
                width: 60000,
                height: 60000,
                ..
            }
        ),
        "{err}"
    );
    // The limit is a parameter.
    let photo = std::fs::read(fixtures().join("img0.jpg")).unwrap();
    let err = decode_rgb(&photo, 500 * 375 - 1).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::TooManyPixels {
                width: 500,
                height: 375,
                ..
            }
        ),
        "{err}"
    );
    assert!(decode_rgb(&photo, 500 * 375).is_ok());
}

#[test]
fn mangled_files_never_panic() {
    let mut seed = 42u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    let mut inputs = Vec::new();
    for i in [0, 2, 3] {
        inputs.push(std::fs::read(fixtures().join(format!("img{i}.jpg"))).unwrap());
    }
    for name in JPEG_LAYOUTS {
        inputs.push(jpeg_data(&format!("{name}.jpg")));
    }
    let small = pattern(9, 7);
    for format in [
        image::ImageFormat::Png,
        image::ImageFormat::Gif,
        image::ImageFormat::Bmp,
    ] {
        inputs.push(encode(small.clone().into(), format));
    }
    for original in &inputs {
        for _ in 0..200 {
            let mut bytes = original.clone();
            for _ in 0..1 + next() % 8 {
                let at = next() % bytes.len();
                bytes[at] = next() as u8;
            }
            if next() % 3 == 0 {
                bytes.truncate(next() % bytes.len());
            }
            let _ = decode_rgb(&bytes, DEFAULT_MAX_PIXELS);
        }
    }
}

/// The pixel limit holds the same way for every format: a header edited to claim a huge size is
/// `TooManyPixels` with that size (422 over HTTP), never a decode error.
#[test]
fn every_format_reports_an_oversized_header_as_too_many_pixels() {
    let small = pattern(8, 8);
    let encode = |format: image::ImageFormat| {
        let mut out = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(small.clone())
            .write_to(&mut out, format)
            .unwrap();
        out.into_inner()
    };
    let mut bmp = encode(image::ImageFormat::Bmp);
    bmp[18..22].copy_from_slice(&100_000i32.to_le_bytes());
    bmp[22..26].copy_from_slice(&100_000i32.to_le_bytes());
    let mut gif = encode(image::ImageFormat::Gif);
    gif[6..10].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    let mut webp = encode(image::ImageFormat::WebP);
    assert_eq!(&webp[12..16], b"VP8L", "a lossless WebP");
    let bits = u32::from_le_bytes(webp[21..25].try_into().unwrap());
    let bits = (bits & !((1 << 28) - 1)) | 16382 | (16382 << 14);
    webp[21..25].copy_from_slice(&bits.to_le_bytes());
    for (name, bytes, size) in [
        ("BMP", bmp, (100_000, 100_000)),
        ("GIF", gif, (65_535, 65_535)),
        ("WebP", webp, (16_383, 16_383)),
    ] {
        match decode_rgb(&bytes, DEFAULT_MAX_PIXELS) {
            Err(ImageError::TooManyPixels { width, height, .. }) => {
                assert_eq!((width, height), size, "{name}")
            }
            other => panic!("{name}: expected TooManyPixels, got {other:?}"),
        }
    }
}
