//! Bytes from a user → an RGB8 image, the way Pillow's `Image.open(...).convert("RGB")` sees it.

use super::jpeg::{self, JpegError};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
use std::io::Cursor;

/// The default limit on `width × height` read from an image header, checked before decoding.
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

/// Why an upload could not be turned into pixels. Every variant is the sender's problem except
/// [`ImageError::Io`], and each message is meant to be shown to them as is.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image file is empty")]
    Empty,
    #[error(
        "unsupported image format: the data {looks_like}; send a JPEG, PNG, BMP, WebP or GIF image"
    )]
    Unsupported { looks_like: String },
    #[error("this {format} image uses a feature that is not supported: {reason}")]
    UnsupportedFeature {
        format: &'static str,
        reason: String,
    },
    #[error(
        "the image is {width}x{height} = {} pixels, more than the limit of {limit} pixels",
        u64::from(*width) * u64::from(*height)
    )]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("decoding this {format} image would need more memory than allowed: {reason}")]
    TooLarge {
        format: &'static str,
        reason: String,
    },
    #[error("the {format} image is truncated (the file ends too early): {reason}")]
    Truncated {
        format: &'static str,
        reason: String,
    },
    #[error("the {format} image is corrupt: {reason}")]
    Corrupt {
        format: &'static str,
        reason: String,
    },
    #[error("cannot read the image: {0}")]
    Io(#[from] std::io::Error),
}

/// Decode `bytes` (JPEG, PNG, BMP, WebP or GIF, recognised by content) into RGB8.
///
/// The result is what Pillow's `Image.open(...).convert("RGB")` gives: alpha is dropped, not
/// composited over a background (a transparent pixel keeps its stored colour); palettes are
/// expanded; gray is copied to the three channels; a GIF yields its first frame. Pixels are
/// identical to Pillow's for PNG, BMP, GIF and WebP (lossless and lossy), and for JPEG as
/// photos use it (baseline or progressive, gray or YCbCr, any integer chroma sampling), which
/// we decode with a port of libjpeg-turbo's arithmetic (see `jpeg.rs`). Rarer JPEGs
/// (arithmetic-coded, 12-bit, CMYK, progressive files missing coefficient bits) fall back to
/// the `image` crate's zune-jpeg, whose pixels differ by a few levels.
///
/// Deliberate differences from Pillow + torchvision:
/// - EXIF orientation is applied, so a phone photo stored sideways comes out upright. Pillow and
///   torchvision ignore it unless `ImageOps.exif_transpose` is called, so a model trained on
///   unrotated data saw such photos sideways; we prefer the upright photo.
/// - 16-bit samples become `v >> 8` (the high byte). That is exactly what Pillow does for 16-bit
///   RGB, RGBA and gray+alpha PNGs (the `image` crate's own conversion rounds, `(v + 128) / 257`,
///   which differs by one level for about half the values). For 16-bit *gray* Pillow clamps
///   instead (mode `I;16` → RGB maps every value above 255 to 255, turning a real 16-bit photo
///   white); we use the high byte there too.
/// - Damaged files are errors. Pillow also refuses truncated files by default
///   (`LOAD_TRUNCATED_IMAGES = False`), but libjpeg only warns about corrupt JPEG data and
///   decodes garbage; we reject it.
///
/// `width × height` from the header is checked against `max_pixels` before any pixel is
/// decoded, and the decoders get matching allocation limits so that a header that lies about
/// the size cannot make them allocate without bound.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    // The decoders are meant never to panic on bad input, but they are large and the input is
    // hostile; a panic must become a rejected upload, not a dead worker.
    match std::panic::catch_unwind(|| decode_inner(bytes, max_pixels)) {
        Ok(result) => result,
        Err(_) => Err(ImageError::Corrupt {
            format: sniff_name(bytes),
            reason: "the decoder failed on malformed data".into(),
        }),
    }
}

fn decode_inner(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Bmp)) => f,
        Some(f @ (ImageFormat::WebP | ImageFormat::Gif)) => f,
        Some(other) => {
            return Err(ImageError::Unsupported {
                looks_like: format!("looks like {}", describe_format(other, bytes)),
            })
        }
        None => {
            return Err(ImageError::Unsupported {
                looks_like: describe_unknown(bytes),
            })
        }
    };

    let mut unsupported_jpeg = None;
    if format == ImageFormat::Jpeg {
        match jpeg::decode(bytes, max_pixels) {
            Ok(decoded) => return jpeg_to_rgb(decoded),
            // Exotic JPEGs go to zune-jpeg below; its pixels differ slightly from Pillow's.
            Err(JpegError::Unsupported(reason)) => unsupported_jpeg = Some(reason),
            Err(e) => return Err(map_jpeg_error(e, max_pixels)),
        }
        // zune-jpeg pads a truncated scan with grey and reports success, so check first.
        check_jpeg_complete(bytes)?;
    }
    // image-rs's BMP decoder refuses sides over 65535 before it says the size: read it here, so
    // that every format reports an oversized header the same way.
    if let Some((width, height)) = (format == ImageFormat::Bmp)
        .then(|| bmp_declared_size(bytes))
        .flatten()
    {
        if u64::from(width) * u64::from(height) > max_pixels {
            return Err(ImageError::TooManyPixels {
                width,
                height,
                limit: max_pixels,
            });
        }
    }
    let result = decode_with_image_crate(reader, format, max_pixels);
    match (result, unsupported_jpeg) {
        // Neither decoder handles it: name the feature our decoder recognised.
        (Err(ImageError::Corrupt { .. } | ImageError::UnsupportedFeature { .. }), Some(reason)) => {
            Err(ImageError::UnsupportedFeature {
                format: "JPEG",
                reason,
            })
        }
        (result, _) => result,
    }
}

fn decode_with_image_crate(
    mut reader: ImageReader<Cursor<&[u8]>>,
    format: ImageFormat,
    max_pixels: u64,
) -> Result<RgbImage, ImageError> {
    let name = format_name(format);
    let map = |e| map_error(name, e);
    // Width and height are left unlimited here so that an oversized header reaches our own
    // check below and gets its precise error; the allocation cap is already in force because
    // the PNG decoder only takes limits at construction.
    reader.limits(limits(None, max_pixels));
    let mut decoder = reader.into_decoder().map_err(map)?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            limit: max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(ImageError::Corrupt {
            format: name,
            reason: format!("the header gives an empty size, {width}x{height}"),
        });
    }
    decoder
        .set_limits(limits(Some(max_pixels), max_pixels))
        .map_err(map)?;
    // Broken metadata must not cost the user their photo: treat it as "no rotation".
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);

    let decoded = DynamicImage::from_decoder(decoder).map_err(map)?;
    Ok(upright(to_rgb8_like_pillow(decoded, name)?, orientation))
}

/// Width × height as the image's header declares them, without decoding; `None` when the bytes
/// are no image we can read a header of.
pub fn declared_pixels(bytes: &[u8]) -> Option<u64> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()?;
    let (width, height) = match reader.format()? {
        ImageFormat::Bmp => bmp_declared_size(bytes)?,
        _ => reader.into_dimensions().ok()?,
    };
    Some(u64::from(width) * u64::from(height))
}

/// A BMP's width and height as its header declares them: `BITMAPCOREHEADER` (12 bytes) holds
/// 16-bit sides, the later headers signed 32-bit ones (a negative height means top-down rows).
fn bmp_declared_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let u16_at = |at: usize| -> Option<u32> {
        Some(u32::from(u16::from_le_bytes(
            bytes.get(at..at + 2)?.try_into().ok()?,
        )))
    };
    let i32_at = |at: usize| -> Option<u32> {
        Some(i32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?).unsigned_abs())
    };
    let header_size = u32::from_le_bytes(bytes.get(14..18)?.try_into().ok()?);
    if header_size == 12 {
        Some((u16_at(18)?, u16_at(20)?))
    } else {
        Some((i32_at(18)?, i32_at(22)?))
    }
}

/// Apply an EXIF orientation so that the image displays as the camera meant it.
fn upright(rgb: RgbImage, orientation: Orientation) -> RgbImage {
    let mut img = DynamicImage::ImageRgb8(rgb);
    img.apply_orientation(orientation);
    img.into_rgb8()
}

fn jpeg_to_rgb(d: jpeg::Decoded) -> Result<RgbImage, ImageError> {
    let pixels = if d.channels == 1 {
        d.pixels.iter().flat_map(|&l| [l, l, l]).collect()
    } else {
        d.pixels
    };
    let rgb = RgbImage::from_raw(d.width, d.height, pixels).ok_or_else(|| ImageError::Corrupt {
        format: "JPEG",
        reason: "decoded size does not match the header".into(),
    })?;
    let orientation = d
        .exif
        .as_deref()
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms);
    Ok(upright(rgb, orientation))
}

fn map_jpeg_error(err: JpegError, max_pixels: u64) -> ImageError {
    let format = "JPEG";
    match err {
        JpegError::TooManyPixels { width, height } => ImageError::TooManyPixels {
            width,
            height,
            limit: max_pixels,
        },
        JpegError::TooLarge(reason) => ImageError::TooLarge { format, reason },
        JpegError::Truncated(reason) => ImageError::Truncated { format, reason },
        JpegError::Corrupt(reason) => ImageError::Corrupt { format, reason },
        JpegError::Unsupported(reason) => ImageError::UnsupportedFeature { format, reason },
    }
}

fn limits(max_side: Option<u64>, max_pixels: u64) -> Limits {
    let mut limits = Limits::default();
    let side = max_side.map(|s| u32::try_from(s).unwrap_or(u32::MAX));
    limits.max_image_width = side;
    limits.max_image_height = side;
    limits.max_alloc = Some(alloc_budget(max_pixels));
    limits
}

/// Bytes a decoder may allocate for an image at the pixel limit: the largest legitimate decode
/// is RGBA16 (8 bytes a pixel); the slack covers working buffers of small images.
pub(super) fn alloc_budget(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(8).saturating_add(16 << 20)
}

/// Pillow's `convert("RGB")` for every layout our decoders produce.
fn to_rgb8_like_pillow(img: DynamicImage, format: &'static str) -> Result<RgbImage, ImageError> {
    let (w, h) = (img.width(), img.height());
    let hi = |v: u16| (v >> 8) as u8;
    let data: Vec<u8> = match img {
        DynamicImage::ImageRgb8(rgb) => return Ok(rgb),
        DynamicImage::ImageRgba8(i) => i
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        DynamicImage::ImageLuma8(i) => i.as_raw().iter().flat_map(|&l| [l, l, l]).collect(),
        DynamicImage::ImageLumaA8(i) => i
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        DynamicImage::ImageRgb16(i) => i.as_raw().iter().map(|&v| hi(v)).collect(),
        DynamicImage::ImageRgba16(i) => i
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [hi(p[0]), hi(p[1]), hi(p[2])])
            .collect(),
        DynamicImage::ImageLuma16(i) => i
            .as_raw()
            .iter()
            .flat_map(|&l| [hi(l), hi(l), hi(l)])
            .collect(),
        DynamicImage::ImageLumaA16(i) => i
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| [hi(p[0]), hi(p[0]), hi(p[0])])
            .collect(),
        // Float layouts come only from formats we do not enable.
        other => return Ok(other.to_rgb8()),
    };
    RgbImage::from_raw(w, h, data).ok_or_else(|| ImageError::Corrupt {
        format,
        reason: "the decoder returned fewer pixels than the header promised".into(),
    })
}

/// Walk the JPEG marker structure and require an end-of-image marker after the last scan.
///
/// Entropy-coded data cannot contain a bare `FF D9` (an `FF` there is always followed by `00`
/// or a restart marker), so reaching EOI through the segments proves the file was not cut.
fn check_jpeg_complete(bytes: &[u8]) -> Result<(), ImageError> {
    let truncated = |reason: &str| ImageError::Truncated {
        format: "JPEG",
        reason: reason.into(),
    };
    let mut pos = 2; // after SOI
    let mut seen_scan = false;
    loop {
        // Like libjpeg, tolerate stray bytes and fill bytes before a marker.
        while pos < bytes.len() && bytes[pos] != 0xFF {
            pos += 1;
        }
        while pos < bytes.len() && bytes[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = bytes.get(pos) else {
            return Err(truncated(if seen_scan {
                "the end-of-image marker is missing"
            } else {
                "the file ends before any image data"
            }));
        };
        pos += 1;
        match marker {
            0xD9 => return Ok(()),
            // Markers without a length field.
            0x01 | 0xD0..=0xD8 => {}
            _ => {
                let Some(len) = bytes.get(pos..pos + 2) else {
                    return Err(truncated("the file ends inside a marker segment"));
                };
                let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
                if len < 2 {
                    return Err(ImageError::Corrupt {
                        format: "JPEG",
                        reason: format!("marker FF{marker:02X} has an invalid length {len}"),
                    });
                }
                pos += len;
                if pos > bytes.len() {
                    return Err(truncated("the file ends inside a marker segment"));
                }
                if marker == 0xDA {
                    seen_scan = true;
                    pos = skip_entropy_data(bytes, pos).ok_or_else(|| {
                        truncated("the file ends inside the compressed image data")
                    })?;
                }
            }
        }
    }
}

/// The position of the marker that ends the entropy-coded segment starting at `pos`.
fn skip_entropy_data(bytes: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        pos += bytes.get(pos..)?.iter().position(|&b| b == 0xFF)?;
        match *bytes.get(pos + 1)? {
            // Stuffed zero byte, restart marker, or fill byte: still inside the scan.
            0x00 | 0xD0..=0xD7 | 0xFF => pos += 1,
            _ => return Some(pos),
        }
    }
}

fn map_error(format: &'static str, err: image::ImageError) -> ImageError {
    use image::error::{ImageError as E, LimitErrorKind};
    match err {
        E::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => ImageError::Truncated {
            format,
            reason: e.to_string(),
        },
        E::IoError(e) => ImageError::Io(e),
        E::Limits(e) => match e.kind() {
            LimitErrorKind::DimensionError => ImageError::TooLarge {
                format,
                reason: "a side is longer than the pixel limit allows".into(),
            },
            _ => ImageError::TooLarge {
                format,
                reason: e.to_string(),
            },
        },
        E::Unsupported(e) => ImageError::UnsupportedFeature {
            format,
            reason: e.to_string(),
        },
        E::Decoding(e) => {
            let reason = e.to_string();
            if is_eof(&e) {
                ImageError::Truncated { format, reason }
            } else {
                ImageError::Corrupt { format, reason }
            }
        }
        other => ImageError::Corrupt {
            format,
            reason: other.to_string(),
        },
    }
}

/// Whether a decoder error was caused by running out of input, anywhere in its source chain.
fn is_eof(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::UnexpectedEof {
                return true;
            }
        }
        let text = e.to_string().to_ascii_lowercase();
        if text.contains("unexpected end") || text.contains("unexpected eof") {
            return true;
        }
        cur = e.source();
    }
    false
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::Bmp => "BMP",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        _ => "image",
    }
}

fn sniff_name(bytes: &[u8]) -> &'static str {
    image::guess_format(bytes).map_or("image", format_name)
}

fn describe_format(format: ImageFormat, bytes: &[u8]) -> String {
    // Two-byte signatures (BMP's "BM", PNM's "P1".."P7") also start ordinary text.
    if looks_like_text(bytes) {
        return describe_unknown(bytes);
    }
    let name = format
        .extensions_str()
        .first()
        .copied()
        .unwrap_or("unknown");
    format!("a {} image", name.to_ascii_uppercase())
}

fn describe_unknown(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(32)];
    if bytes.starts_with(b"%PDF") {
        return "is a PDF document".into();
    }
    if bytes.get(4..8) == Some(b"ftyp") {
        let brand = String::from_utf8_lossy(&bytes[8..bytes.len().min(12)]).into_owned();
        return match brand.as_str() {
            "heic" | "heix" | "hevc" | "mif1" | "msf1" => {
                "looks like an HEIC/HEIF photo (the iPhone default); convert it to JPEG".into()
            }
            "avif" | "avis" => "looks like an AVIF image".into(),
            _ => format!("looks like an MP4/QuickTime container (brand \"{brand}\")"),
        };
    }
    if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        return "looks like a TIFF image".into();
    }
    if looks_like_text(bytes) {
        let text = String::from_utf8_lossy(head);
        let trimmed = text.trim_start();
        let kind = if trimmed.starts_with('<') {
            "is HTML/XML text"
        } else if trimmed.starts_with('{') || trimmed.starts_with('[') {
            "is JSON text"
        } else if trimmed.starts_with("data:image") || is_base64(trimmed) {
            "looks like base64 text; send the decoded bytes"
        } else {
            "is text"
        };
        return format!("{kind}, not an image (it starts with {:?})", trimmed);
    }
    let hex: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("is not a recognised image (first bytes: {})", hex.join(" "))
}

fn looks_like_text(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(512)];
    let utf8 = match std::str::from_utf8(head) {
        Ok(_) => true,
        // Our 512-byte window may cut a multi-byte character; that is still text.
        Err(e) => e.error_len().is_none(),
    };
    let no_controls = head
        .iter()
        .all(|&b| (b >= 0x20 && b != 0x7F) || matches!(b, b'\n' | b'\r' | b'\t'));
    !head.is_empty() && utf8 && no_controls
}

fn is_base64(s: &str) -> bool {
    s.len() >= 16
        && s.bytes()
            .take(64)
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_structure_check() {
        // SOI, a COM segment containing FF D9, SOS, data with stuffing and a restart, EOI.
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xFE, 0x00, 0x04, 0xFF, 0xD9];
        jpeg.extend([
            0xFF, 0xDA, 0x00, 0x02, 0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56,
        ]);
        assert!(matches!(
            check_jpeg_complete(&jpeg),
            Err(ImageError::Truncated { .. })
        ));
        jpeg.extend([0xFF, 0xD9]);
        check_jpeg_complete(&jpeg).unwrap();
        // A length running past the end.
        let cut = [0xFF, 0xD8, 0xFF, 0xE1, 0x10, 0x00, 0x01];
        assert!(matches!(
            check_jpeg_complete(&cut),
            Err(ImageError::Truncated { .. })
        ));
    }

    #[test]
    fn describes_what_the_bytes_look_like() {
        assert!(describe_unknown(b"<!DOCTYPE html><html>").contains("HTML"));
        assert!(describe_unknown(b"{\"error\": \"not found\"}").contains("JSON"));
        assert!(describe_unknown(b"\0\0\0\x18ftypheic\0\0\0\0").contains("HEIC"));
        assert!(describe_unknown(b"%PDF-1.7").contains("PDF"));
        assert!(describe_unknown(&[1, 2, 3, 250]).contains("01 02 03 fa"));
    }
}
