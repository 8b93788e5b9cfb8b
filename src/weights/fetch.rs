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

/// Downloads `arch`'s weights from `base_url` into `dir` unless they are already there.
pub fn fetch_torchvision(
    arch: Arch,
    dir: &Path,
    base_url: &str,
    progress: bool,
) -> Result<PathBuf, WeightsError> {
    let name = torchvision_file(arch);
    let target = dir.join(name);
    if target.is_file() {
        return Ok(target);
    }
    let url = format!("{}/{name}", base_url.trim_end_matches('/'));
    let expected = hash_prefix(name).expect("torchvision names carry a hash");
    download(&url, expected, &target, progress)?;
    Ok(target)
}

/// Streams `url` to `target`, failing (and leaving nothing behind) unless the file's sha256
/// starts with `sha256_prefix`.
pub fn download(
    url: &str,
    sha256_prefix: &str,
    target: &Path,
    progress: bool,
) -> Result<(), WeightsError> {
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
        loop {
            let n = body.read(&mut buf)?;
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
    Ok(())
}
