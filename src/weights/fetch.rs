//! torchvision's official weight downloads: streamed to a temporary file, checked against the
//! sha256 prefix torchvision puts in each file name (as `torch.hub` does), then renamed into place.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::Digest;

use super::WeightsError;
use crate::models::Arch;

/// Where torchvision publishes its pretrained weights.
pub const TORCHVISION_URL: &str = "https://download.pytorch.org/models";

/// torchvision's file name for `arch`'s ImageNet weights; the suffix is the sha256 prefix.
pub fn torchvision_file(arch: Arch) -> &'static str {
    match arch {
        Arch::Vgg11 => "vgg11-8a719046.pth",
        Arch::Vgg11Bn => "vgg11_bn-6002323d.pth",
        Arch::Vgg13 => "vgg13-19584684.pth",
        Arch::Vgg13Bn => "vgg13_bn-abd245e5.pth",
        Arch::Vgg16 => "vgg16-397923af.pth",
        Arch::Vgg16Bn => "vgg16_bn-6c64b313.pth",
        Arch::Vgg19 => "vgg19-dcbb9e9d.pth",
        Arch::Vgg19Bn => "vgg19_bn-c79401a0.pth",
        Arch::Googlenet => "googlenet-1378be20.pth",
    }
}

/// The hex digest prefix in a torchvision file name (`vgg11_bn-6002323d.pth` → `6002323d`).
pub fn hash_prefix(file_name: &str) -> Option<&str> {
    super::pth::split_hash_suffix(file_name.strip_suffix(".pth")?).1
}

/// The file `arch`'s official weights are kept in: `<arch>.safetensors`, served as model `<arch>`.
pub fn target_file(dir: &Path, arch: Arch) -> PathBuf {
    dir.join(format!("{}.safetensors", arch.name()))
}

/// Makes `<arch>.safetensors` in `dir` from torchvision's file unless it is there: converts a
/// torchvision `.pth` already in `dir` (an earlier download), else downloads it from `base_url`
/// (torchvision's file name after it) or from `url` itself when that ends in `.pth`.
///
/// The file's sha256 must start with the prefix in its name, as `torch.hub` checks. The
/// safetensors file records that sha256 (so heads trained on the `.pth` still find their base)
/// and appears whole or not at all; the downloaded `.pth` is not kept.
pub fn fetch_torchvision(
    arch: Arch,
    dir: &Path,
    url: &str,
    progress: bool,
) -> Result<PathBuf, WeightsError> {
    let target = target_file(dir, arch);
    if target.is_file() {
        return Ok(target);
    }
    let (url, name) = match url.rsplit_once('/') {
        Some((_, name)) if name.ends_with(".pth") => (url.to_string(), name.to_string()),
        _ => {
            let name = torchvision_file(arch);
            (
                format!("{}/{name}", url.trim_end_matches('/')),
                name.to_string(),
            )
        }
    };
    let expected = hash_prefix(&name).ok_or_else(|| WeightsError::Format {
        path: PathBuf::from(&name),
        reason: format!(
            "{url}: the file name has no sha256 prefix to check the download against \
             (torchvision names its files <arch>-<first hex digits of the sha256>.pth)"
        ),
    })?;
    let kept = dir.join(&name);
    let sha256 = if kept.is_file() {
        let sha256 = super::sha256_file(&kept)?;
        if !sha256.starts_with(expected) {
            return Err(WeightsError::Format {
                path: kept,
                reason: format!(
                    "sha256 {sha256} does not start with {expected}: corrupt or wrong file"
                ),
            });
        }
        tracing::info!(file = %kept.display(), "converting the torchvision file already here");
        convert(&kept, &target, &name, &sha256)?;
        sha256
    } else {
        // A hidden name the weights dir's scan ignores; removed whatever happens.
        let part = TempFile(dir.join(format!(".{name}.download-{}", std::process::id())));
        let sha256 = download(&url, expected, &part.0, progress).map_err(|e| match e {
            // The temporary file's name means nothing to the user: name the one being made.
            WeightsError::Format { reason, .. } => WeightsError::Format {
                path: target.clone(),
                reason,
            },
            e => e,
        })?;
        convert(&part.0, &target, &name, &sha256)?;
        sha256
    };
    tracing::info!(file = %target.display(), source_sha256 = %sha256, "weights ready");
    Ok(target)
}

/// Writes `source`'s tensors to `target` as safetensors, recording where they came from.
fn convert(source: &Path, target: &Path, name: &str, sha256: &str) -> Result<(), WeightsError> {
    let metadata = [
        ("format".to_string(), "pt".to_string()),
        ("source_file".to_string(), name.to_string()),
        (super::SOURCE_SHA256.to_string(), sha256.to_string()),
    ]
    .into_iter()
    .collect();
    super::convert_to_safetensors(source, target, metadata)
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Streams `url` to `target`, failing (and leaving nothing behind) unless the file's sha256
/// starts with `sha256_prefix`; answers the sha256.
pub fn download(
    url: &str,
    sha256_prefix: &str,
    target: &Path,
    progress: bool,
) -> Result<String, WeightsError> {
    let failed = |reason: String| WeightsError::Format {
        path: target.to_path_buf(),
        reason,
    };
    tracing::info!(%url, file = %target.display(), "downloading weights");
    let response = ureq::get(url)
        .call()
        .map_err(|e| failed(format!("download of {url} failed: {e}")))?;
    let length = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(length.unwrap_or(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(
            target
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut body = response
        .into_body()
        .into_with_config()
        .limit(u64::MAX)
        .reader();
    let digest = crate::atomic::write_with(target, |tmp| {
        let mut file = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut received = 0u64;
        loop {
            let n = body.read(&mut buf).map_err(|e| {
                let of = length.map(|l| format!(" of {l}")).unwrap_or_default();
                std::io::Error::other(format!(
                    "the connection ended after {received}{of} bytes ({e})"
                ))
            })?;
            received += n as u64;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])?;
            bar.inc(n as u64);
        }
        file.flush()?;
        let digest = format!("{:x}", hasher.finalize());
        if !digest.starts_with(sha256_prefix) {
            return Err(std::io::Error::other(format!(
                "sha256 {digest} does not start with {sha256_prefix}: corrupt or wrong file"
            )));
        }
        Ok(digest)
    })
    .map_err(|e| failed(format!("download of {url}: {e}")))?;
    bar.finish_and_clear();
    tracing::info!(file = %target.display(), sha256 = %digest, "downloaded");
    Ok(digest)
}
