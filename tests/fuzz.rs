//! Property tests of the parsers that read untrusted bytes, on stable Rust: real files, mutated
//! (bit flips, odd bytes, truncation, duplicated and inserted runs, zeroed ranges) with a seeded
//! generator. Each parser must answer every mutant with a value or an error: no panic, no hang.
//!
//! `CNNSERVE_FUZZ_ITERS` sets the mutants per file (default 300, a few seconds each in CI);
//! `scripts/fuzz.sh` runs a long campaign. A failure prints the seed and iteration to replay.

mod common;

use std::time::{Duration, Instant};

use cnnserve::preprocess::{decode_rgb, ImageError, DEFAULT_MAX_PIXELS};

fn iterations() -> usize {
    std::env::var("CNNSERVE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn seed() -> u64 {
    std::env::var("CNNSERVE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed)
}

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four mutations of `original`.
fn mutate(original: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut bytes = original.to_vec();
    for _ in 0..1 + rng.below(4) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.below(bytes.len());
        match rng.below(7) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => bytes[at] = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE][rng.below(6)],
            2 => bytes.truncate(at),
            3 => {
                let len = rng.below(64).min(bytes.len() - at);
                let run = bytes[at..at + len].to_vec();
                let to = rng.below(bytes.len());
                bytes.splice(to..to, run);
            }
            4 => {
                let run: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                bytes.splice(at..at, run);
            }
            5 => {
                let len = rng.below(256).min(bytes.len() - at);
                bytes[at..at + len].fill(0);
            }
            _ => {
                // Big-endian and little-endian length fields: make one huge.
                let end = (at + 4).min(bytes.len());
                bytes[at..end].fill(0xFF);
            }
        }
    }
    bytes
}

/// Runs `parse` on mutants of every file; `parse` answers whether the outcome is acceptable.
fn fuzz(
    name: &str,
    files: &[Vec<u8>],
    per_input: Duration,
    parse: impl Fn(&[u8]) -> Result<(), String>,
) {
    let seed = seed();
    let mut rng = Rng(seed);
    let n = iterations();
    for (f, original) in files.iter().enumerate() {
        for i in 0..n {
            let bytes = mutate(original, &mut rng);
            let started = Instant::now();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(&bytes)));
            let took = started.elapsed();
            let replay = format!("{name}: file {f}, iteration {i}, CNNSERVE_FUZZ_SEED={seed}");
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(problem)) => panic!("{replay}: {problem}"),
                Err(_) => panic!("{replay}: the parser panicked"),
            }
            assert!(took < per_input, "{replay}: took {took:?}");
        }
    }
}

#[test]
fn the_image_decoders_never_panic_on_mutated_photos() {
    let files: Vec<Vec<u8>> = [0, 1, 4]
        .iter()
        .map(|i| std::fs::read(common::fixtures().join(format!("preprocess/img{i}.jpg"))).unwrap())
        .chain([common::picture(0, 1), common::picture(1, 2)])
        .collect();
    fuzz("image", &files, Duration::from_secs(10), |bytes| {
        match decode_rgb(bytes, DEFAULT_MAX_PIXELS) {
            // decode_rgb turns a decoder panic into this error: a panic all the same.
            Err(ImageError::Corrupt { reason, .. }) if reason.contains("decoder failed") => {
                Err(format!("a decoder panicked: {reason}"))
            }
            _ => Ok(()),
        }
    });
}

#[test]
fn the_pth_reader_never_panics_on_mutated_checkpoints() {
    let file = std::fs::read(common::fixtures().join("googlenet/subset_zip.pth")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mutant.pth");
    fuzz("pth", &[file], Duration::from_secs(10), |bytes| {
        std::fs::write(&path, bytes).unwrap();
        let _ = cnnserve::weights::pth::read_pth(&path, &candle_core::Device::Cpu);
        Ok(())
    });
}

#[test]
fn the_zip_reader_never_panics_on_mutated_archives() {
    let file = common::dataset_zip(3);
    let limits = cnnserve::train::DatasetLimits::default();
    fuzz("zip", &[file], Duration::from_secs(10), |bytes| {
        let _ = cnnserve::train::dataset::load_zip(std::io::Cursor::new(bytes), &limits, (64, 64));
        Ok(())
    });
}
