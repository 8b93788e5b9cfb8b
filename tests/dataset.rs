//! The ImageFolder loader against hand-made folders and zips, hostile archives, and the real
//! cat/dog data set.

mod common;

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use cnnserve::train::dataset::{self, Dataset, DatasetError, DatasetLimits, Problem};
use image::{ImageFormat, Rgb, RgbImage};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

const SIZE: (u32, u32) = (8, 8);

fn encode(format: ImageFormat, shade: u8) -> Vec<u8> {
    let img = RgbImage::from_fn(12, 10, |x, y| Rgb([shade, x as u8 * 20, y as u8 * 20]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn png() -> Vec<u8> {
    encode(ImageFormat::Png, 10)
}

fn jpeg() -> Vec<u8> {
    encode(ImageFormat::Jpeg, 20)
}

fn bmp() -> Vec<u8> {
    encode(ImageFormat::Bmp, 30)
}

fn truncated_jpeg() -> Vec<u8> {
    let mut bytes = jpeg();
    bytes.truncate(bytes.len() * 2 / 3);
    bytes
}

type Tree<'a> = &'a [(&'a str, Vec<u8>)];

fn folder(tree: Tree) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in tree {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    dir
}

fn zip_bytes(tree: Tree) -> Vec<u8> {
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    for (name, bytes) in tree {
        zip.start_file(*name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// Writes `bytes` to a file whose name says nothing: the loader must go by content.
fn zip_file(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("upload.bin");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn load(path: &Path) -> Result<Dataset, DatasetError> {
    dataset::load(path, &DatasetLimits::default(), SIZE)
}

/// The same tree loaded as a folder and as a zip must give the same result.
fn load_both(tree: Tree) -> Vec<Result<Dataset, DatasetError>> {
    let dir = folder(tree);
    let (_zdir, zip) = zip_file(&zip_bytes(tree));
    vec![load(dir.path()), load(&zip)]
}

fn files(samples: &[dataset::Sample]) -> Vec<(&str, usize)> {
    samples.iter().map(|s| (s.file.as_str(), s.label)).collect()
}

fn problems(result: Result<Dataset, DatasetError>) -> Vec<Problem> {
    match result {
        Err(DatasetError::Invalid(problems)) => problems,
        Err(e) => panic!("expected Invalid, got {e}"),
        Ok(data) => panic!("expected Invalid, got classes {:?}", data.classes),
    }
}

fn problem_files(problems: &[Problem]) -> Vec<Option<&str>> {
    problems.iter().map(|p| p.file.as_deref()).collect()
}

#[test]
fn flat_layout_sorts_classes_by_code_point_and_keeps_nested_files() {
    let tree = [
        ("b/1.png", png()),
        ("b/2.png", png()),
        ("B/1.png", png()),
        ("B/deep/er/2.png", png()),
        ("a/1.png", png()),
        ("a/2.png", png()),
    ];
    for result in load_both(&tree) {
        let data = result.unwrap();
        // Python's sorted(): uppercase before lowercase.
        assert_eq!(data.classes, ["B", "a", "b"]);
        assert_eq!(
            files(&data.train),
            [
                ("B/1.png", 0),
                ("B/deep/er/2.png", 0),
                ("a/1.png", 1),
                ("a/2.png", 1),
                ("b/1.png", 2),
                ("b/2.png", 2),
            ]
        );
        assert!(data.test.is_empty());
        assert!(data.skipped.is_empty());
        assert_eq!(data.ignored, 0);
        assert!(data.train.iter().all(|s| s.image.dimensions() == SIZE));
    }
}

#[test]
fn train_and_test_layout() {
    let tree = [
        ("train/Dog/1.png", png()),
        ("train/Dog/2.png", png()),
        ("train/Cat/1.png", png()),
        ("train/Cat/2.png", png()),
        ("test/Dog/9.png", png()),
        ("test/Cat/9.png", png()),
    ];
    for result in load_both(&tree) {
        let data = result.unwrap();
        assert_eq!(data.classes, ["Cat", "Dog"]);
        assert_eq!(
            files(&data.train),
            [
                ("train/Cat/1.png", 0),
                ("train/Cat/2.png", 0),
                ("train/Dog/1.png", 1),
                ("train/Dog/2.png", 1),
            ]
        );
        assert_eq!(
            files(&data.test),
            [("test/Cat/9.png", 0), ("test/Dog/9.png", 1)]
        );
    }
}

#[test]
fn test_split_is_optional() {
    let tree = [
        ("train/Dog/1.png", png()),
        ("train/Dog/2.png", png()),
        ("train/Cat/1.png", png()),
        ("train/Cat/2.png", png()),
    ];
    for result in load_both(&tree) {
        let data = result.unwrap();
        assert_eq!(data.train.len(), 4);
        assert!(data.test.is_empty());
    }
}

#[test]
fn one_top_level_folder_is_kept_in_names() {
    let flat = [
        ("mydata/Cat/1.png", png()),
        ("mydata/Cat/2.png", png()),
        ("mydata/Dog/1.png", png()),
        ("mydata/Dog/2.png", png()),
        ("mydata/.DS_Store", vec![0, 0, 0, 1, 66, 117, 100, 49]),
    ];
    for result in load_both(&flat) {
        let data = result.unwrap();
        assert_eq!(data.classes, ["Cat", "Dog"]);
        assert_eq!(data.train[0].file, "mydata/Cat/1.png");
        assert_eq!(data.ignored, 1);
    }
    let split = [
        ("catanddog/train/Cat/1.png", png()),
        ("catanddog/train/Cat/2.png", png()),
        ("catanddog/train/Dog/1.png", png()),
        ("catanddog/train/Dog/2.png", png()),
        ("catanddog/test/Dog/1.png", png()),
        ("catanddog/extra.png", png()),
        ("catanddog/val/Dog/1.png", png()),
        ("catanddog/train/loose.png", png()),
    ];
    for result in load_both(&split) {
        let data = result.unwrap();
        assert_eq!(data.classes, ["Cat", "Dog"]);
        assert_eq!(data.train.len(), 4);
        assert_eq!(files(&data.test), [("catanddog/test/Dog/1.png", 1)]);
        let skipped: Vec<(&str, &str)> = data
            .skipped
            .iter()
            .map(|s| (s.file.as_str(), s.reason.as_str()))
            .collect();
        assert_eq!(
            skipped,
            [
                ("catanddog/extra.png", "outside train/ and test/"),
                ("catanddog/train/loose.png", "not inside a class folder"),
                ("catanddog/val/Dog/1.png", "outside train/ and test/"),
            ]
        );
    }
}

#[test]
fn images_are_recognised_by_content() {
    let tree = [
        ("Cat/png.jpg", png()),
        ("Cat/bmp.jpg", bmp()),
        ("Cat/no_extension", jpeg()),
        ("Cat/.DS_Store", vec![0, 0, 0, 1, 66, 117, 100, 49, 0, 0]),
        (
            "__MACOSX/Cat/._png.jpg",
            b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X".to_vec(),
        ),
        ("Cat/notes.txt", b"BM: the best photos are in Dog/".to_vec()),
        ("Cat/Thumbs.db", vec![0xD0, 0xCF, 0x11, 0xE0]),
        ("Cat/broken.jpg", truncated_jpeg()),
        ("Cat/fake.png", b"<html>not found</html>".to_vec()),
        ("Dog/1.jpg", jpeg()),
        ("Dog/2.jpg", jpeg()),
        ("root.jpg", jpeg()),
        ("README.md", b"# my photos".to_vec()),
    ];
    for result in load_both(&tree) {
        let data = result.unwrap();
        assert_eq!(data.classes, ["Cat", "Dog"]);
        assert_eq!(
            files(&data.train),
            [
                ("Cat/bmp.jpg", 0),
                ("Cat/no_extension", 0),
                ("Cat/png.jpg", 0),
                ("Dog/1.jpg", 1),
                ("Dog/2.jpg", 1),
            ]
        );
        // .DS_Store, ._png.jpg, notes.txt, Thumbs.db, README.md
        assert_eq!(data.ignored, 5);
        let skipped: Vec<&str> = data.skipped.iter().map(|s| s.file.as_str()).collect();
        assert_eq!(skipped, ["Cat/broken.jpg", "Cat/fake.png", "root.jpg"]);
        assert!(
            data.skipped[0].reason.contains("truncated"),
            "{:?}",
            data.skipped[0]
        );
        assert!(
            data.skipped[1].reason.contains("HTML"),
            "{:?}",
            data.skipped[1]
        );
        assert_eq!(data.skipped[2].reason, "not inside a class folder");
    }
}

#[test]
fn images_over_the_pixel_limit_are_named() {
    let tree = [
        ("Cat/1.png", png()),
        ("Cat/2.png", png()),
        ("Dog/1.png", png()),
        ("Dog/2.png", png()),
        ("Dog/big.png", {
            let img = RgbImage::new(40, 40);
            let mut out = Cursor::new(Vec::new());
            img.write_to(&mut out, ImageFormat::Png).unwrap();
            out.into_inner()
        }),
    ];
    let dir = folder(&tree);
    let limits = DatasetLimits {
        max_pixels: 1000,
        ..DatasetLimits::default()
    };
    let data = dataset::load(dir.path(), &limits, SIZE).unwrap();
    assert_eq!(data.train.len(), 4);
    assert_eq!(data.skipped.len(), 1);
    assert_eq!(data.skipped[0].file, "Dog/big.png");
    assert!(data.skipped[0].reason.contains("more than the limit"));
}

#[test]
fn a_single_class_is_refused() {
    let tree = [("Cat/1.png", png()), ("Cat/2.png", png())];
    for result in load_both(&tree) {
        let problems = problems(result);
        assert_eq!(problem_files(&problems), [None]);
        assert!(
            problems[0].message.contains("only one class folder (Cat)"),
            "{problems:?}"
        );
    }
}

#[test]
fn a_class_with_one_image_is_refused() {
    let tree = [
        ("train/Cat/1.png", png()),
        ("train/Cat/2.png", png()),
        ("train/Dog/1.png", png()),
    ];
    for result in load_both(&tree) {
        let problems = problems(result);
        assert_eq!(problem_files(&problems), [Some("train/Dog")]);
        assert!(problems[0].message.contains("only 1 usable image"));
    }
}

#[test]
fn an_empty_test_split_is_refused() {
    let tree = [
        ("train/Cat/1.png", png()),
        ("train/Cat/2.png", png()),
        ("train/Dog/1.png", png()),
        ("train/Dog/2.png", png()),
        ("test/Dog/notes.txt", b"todo".to_vec()),
    ];
    for result in load_both(&tree) {
        let problems = problems(result);
        assert_eq!(problem_files(&problems), [Some("test")]);
        assert!(problems[0].message.contains("no usable image"));
    }
}

#[test]
fn a_data_set_without_images_is_refused() {
    for result in load_both(&[("notes.txt", b"hello".to_vec())]) {
        let problems = problems(result);
        assert_eq!(problem_files(&problems), [None]);
        assert!(problems[0].message.contains("no class folders"));
    }
    let tree = [("Cat/a.txt", b"a".to_vec()), ("Dog/b.txt", b"b".to_vec())];
    for result in load_both(&tree) {
        let problems = problems(result);
        assert_eq!(problem_files(&problems), [None]);
        assert_eq!(problems[0].message, "no usable image found");
    }
}

#[test]
fn all_problems_are_reported_together() {
    let tree = [
        ("data/train/Cat/1.png", png()),
        ("data/train/Cat/2.jpg", truncated_jpeg()),
        ("data/test/Bird/1.png", png()),
        ("data/test/Cat/notes.txt", b"todo".to_vec()),
    ];
    for result in load_both(&tree) {
        let problems = problems(result);
        assert_eq!(
            problem_files(&problems),
            [
                Some("data/train"),
                Some("data/train/Cat"),
                Some("data/test/Bird"),
                Some("data/test"),
            ],
            "{problems:?}"
        );
        assert!(problems[0].message.contains("only one class folder"));
        // The user learns why the class came out short.
        assert!(
            problems[1]
                .message
                .contains("1 more could not be used, e.g. data/train/Cat/2.jpg"),
            "{}",
            problems[1].message
        );
        assert!(problems[2].message.contains("not a class of train/"));
        let all = DatasetError::Invalid(problems).to_string();
        assert!(all.contains("data/test/Bird: is not a class"), "{all}");
    }
}

#[test]
fn a_test_folder_without_train_is_refused() {
    let tree = [("test/Cat/1.png", png()), ("test/Dog/1.png", png())];
    for result in load_both(&tree) {
        let problems = problems(result);
        assert_eq!(problem_files(&problems)[0], Some("test"));
        assert!(problems[0].message.contains("no train folder"));
    }
}

fn unsafe_entry(bytes: &[u8]) -> (String, String) {
    let (_dir, path) = zip_file(bytes);
    match load(&path) {
        Err(DatasetError::Unsafe { entry, reason }) => (entry, reason),
        other => panic!("expected Unsafe, got {:?}", other.map(|d| d.classes)),
    }
}

fn good_tree_and(name: &str) -> Vec<u8> {
    zip_bytes(&[
        ("Cat/1.png", png()),
        ("Cat/2.png", png()),
        (name, png()),
        ("Dog/1.png", png()),
        ("Dog/2.png", png()),
    ])
}

#[test]
fn zip_slip_and_absolute_names_are_refused() {
    for (name, reason) in [
        ("../evil.png", "goes up a folder"),
        ("Cat/../../evil.png", "goes up a folder"),
        ("/etc/evil.png", "absolute path"),
        ("C:\\evil.png", "absolute path"),
        ("C:/evil.png", "absolute path"),
        ("\\\\server\\share\\evil.png", "absolute path"),
        ("Cat\\evil.png", "backslash"),
    ] {
        let (entry, why) = unsafe_entry(&good_tree_and(name));
        assert_eq!(entry, name);
        assert!(why.contains(reason), "{name}: {why}");
    }
}

#[test]
fn nul_in_a_name_is_refused() {
    // The writer refuses such names, so one of the same length is patched in the bytes.
    let mut bytes = good_tree_and("Cat/evilXpng");
    let at: Vec<usize> = bytes
        .windows(12)
        .enumerate()
        .filter(|(_, w)| *w == b"Cat/evilXpng")
        .map(|(i, _)| i + 8)
        .collect();
    assert_eq!(at.len(), 2, "local and central headers");
    for i in at {
        bytes[i] = 0;
    }
    let (_, why) = unsafe_entry(&bytes);
    assert!(why.contains("NUL"), "{why}");
}

#[test]
fn symlink_entries_are_refused() {
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    zip.start_file("Cat/1.png", SimpleFileOptions::default())
        .unwrap();
    zip.write_all(&png()).unwrap();
    // `unix_permissions` keeps only the 0o777 bits, so the link type goes in the external
    // attributes directly (Unix mode in the high 16 bits).
    let link = SimpleFileOptions::default().external_attributes(0o120777 << 16);
    zip.start_file("Cat/2.png", link).unwrap();
    zip.write_all(b"/etc/passwd").unwrap();
    let bytes = zip.finish().unwrap().into_inner();
    let (entry, why) = unsafe_entry(&bytes);
    assert_eq!(entry, "Cat/2.png");
    assert!(why.contains("symbolic link"), "{why}");

    // The writer's own symlink entries too.
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    zip.add_symlink("Dog/1.png", "../../secret", SimpleFileOptions::default())
        .unwrap();
    let (entry, _) = unsafe_entry(&zip.finish().unwrap().into_inner());
    assert_eq!(entry, "Dog/1.png");
}

#[test]
fn encrypted_entries_are_refused() {
    // The `zip` crate writes encrypted entries only with its `aes-crypto` feature, which this
    // crate does not enable. The flag is what a reader goes by, so set general purpose bit 0
    // ("encrypted") in the local header (offset 6) and central header (offset 8) of a stored
    // entry; that is what ZipCrypto writers produce apart from the scrambled data.
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    zip.start_file("Cat/secret.png", stored).unwrap();
    zip.write_all(&png()).unwrap();
    let mut bytes = zip.finish().unwrap().into_inner();
    let mut patched = 0;
    for (signature, flags_at) in [(b"PK\x03\x04", 6), (b"PK\x01\x02", 8)] {
        for i in 0..bytes.len() - 4 {
            if &bytes[i..i + 4] == signature {
                bytes[i + flags_at] |= 1;
                patched += 1;
            }
        }
    }
    assert_eq!(patched, 2);
    let (entry, why) = unsafe_entry(&bytes);
    assert_eq!(entry, "Cat/secret.png");
    assert!(why.contains("encrypted"), "{why}");
}

#[test]
fn too_many_entries_are_refused() {
    let tree: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("{}/{i}.png", ["Cat", "Dog"][i % 2]), png()))
        .collect();
    let tree: Vec<(&str, Vec<u8>)> = tree.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let limits = DatasetLimits {
        max_entries: 5,
        ..DatasetLimits::default()
    };
    let dir = folder(&tree);
    let (_zdir, zip) = zip_file(&zip_bytes(&tree));
    for path in [dir.path(), zip.as_path()] {
        let err = dataset::load(path, &limits, SIZE).unwrap_err();
        assert!(matches!(err, DatasetError::TooLarge(_)), "{err}");
    }
    // At the limit is fine (the folder walk counts the two class folders as entries too).
    let limits = DatasetLimits {
        max_entries: 8,
        ..DatasetLimits::default()
    };
    dataset::load(dir.path(), &limits, SIZE).unwrap();
    dataset::load(&zip, &limits, SIZE).unwrap();
}

#[test]
fn zip_bombs_are_refused() {
    let zeros = vec![0u8; 50 << 20];
    let bomb = zip_bytes(&[
        ("Cat/1.png", png()),
        ("Cat/2.png", png()),
        ("Dog/1.png", png()),
        ("Dog/2.png", zeros),
    ]);
    assert!(
        bomb.len() < 1 << 20,
        "50 MB of zeros compress to {} bytes",
        bomb.len()
    );
    let limits = DatasetLimits {
        max_total_bytes: 1 << 20,
        ..DatasetLimits::default()
    };
    let (_dir, path) = zip_file(&bomb);
    let err = dataset::load(&path, &limits, SIZE).unwrap_err();
    assert!(matches!(err, DatasetError::TooLarge(_)), "{err}");

    // Same limit on a folder.
    let dir = folder(&[("Cat/1.png", png()), ("Dog/big.bin", vec![7; 2 << 20])]);
    let err = dataset::load(dir.path(), &limits, SIZE).unwrap_err();
    assert!(matches!(err, DatasetError::TooLarge(_)), "{err}");
}

#[test]
fn a_bomb_lying_about_its_size_is_not_read_past_its_claim() {
    // 50 MB of zeros whose headers claim 100 bytes: the sum of claims passes, the bytes do not.
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    for name in ["Cat/1.png", "Cat/2.png", "Dog/1.png"] {
        zip.start_file(name, options).unwrap();
        zip.write_all(&png()).unwrap();
    }
    zip.start_file("Dog/2.png", options).unwrap();
    zip.write_all(&vec![0u8; 50 << 20]).unwrap();
    let mut bytes = zip.finish().unwrap().into_inner();
    let size = (50u32 << 20).to_le_bytes();
    let mut patched = 0;
    for i in 0..bytes.len() - 4 {
        // The uncompressed size sits at offset 22 of a local header and 24 of a central one.
        let at = match &bytes[i..i + 4] {
            b"PK\x03\x04" => i + 22,
            b"PK\x01\x02" => i + 24,
            _ => continue,
        };
        if bytes[at..at + 4] == size {
            bytes[at..at + 4].copy_from_slice(&100u32.to_le_bytes());
            patched += 1;
        }
    }
    assert_eq!(patched, 2);
    let limits = DatasetLimits {
        max_total_bytes: 1 << 20,
        ..DatasetLimits::default()
    };
    let (_dir, path) = zip_file(&bytes);
    match dataset::load(&path, &limits, SIZE) {
        // The zip reader stops at the claimed size, so the entry is unreadable, or our own cap
        // on the bytes read stops it: either way the 50 MB never arrive.
        Err(DatasetError::TooLarge(_)) => {}
        Err(DatasetError::Invalid(problems)) => {
            assert_eq!(problem_files(&problems), [Some("Dog")], "{problems:?}");
            assert!(problems[0].message.contains("Dog/2.png"), "{problems:?}");
        }
        other => panic!(
            "expected the lying entry refused, got {:?}",
            other.map(|d| d.classes)
        ),
    }
}

#[test]
fn other_files_are_not_zips() {
    let mut noise = vec![0u8; 4096];
    let mut x: u32 = 12345;
    for b in &mut noise {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    for (bytes, says) in [
        (noise, "no zip structure"),
        (Vec::new(), "empty"),
        (vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0], "gzip"),
        (png(), "no zip structure"),
    ] {
        let (_dir, path) = zip_file(&bytes);
        match load(&path) {
            Err(DatasetError::NotAZip(reason)) => assert!(reason.contains(says), "{reason}"),
            other => panic!("expected NotAZip, got {:?}", other.map(|d| d.classes)),
        }
    }
    let err = load(Path::new("/nonexistent/cnnserve/data")).unwrap_err();
    assert!(matches!(err, DatasetError::Io { .. }), "{err}");
}

#[test]
fn zips_are_read_from_memory_too() {
    let bytes = good_tree_and("Cat/3.png");
    let data = dataset::load_zip(Cursor::new(bytes), &DatasetLimits::default(), SIZE).unwrap();
    assert_eq!(data.classes, ["Cat", "Dog"]);
    assert_eq!(data.train.len(), 5);
}

#[cfg(unix)]
#[test]
fn folder_symlinks_are_not_followed() {
    let outside = folder(&[
        ("secret.png", png()),
        ("more/1.png", png()),
        ("more/2.png", png()),
    ]);
    let dir = folder(&[
        ("Cat/1.png", png()),
        ("Cat/2.png", png()),
        ("Dog/1.png", png()),
        ("Dog/2.png", png()),
    ]);
    std::os::unix::fs::symlink(
        outside.path().join("secret.png"),
        dir.path().join("Cat/3.png"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path().join("more"), dir.path().join("Bird")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("more"), dir.path().join(".hidden")).unwrap();
    let data = load(dir.path()).unwrap();
    assert_eq!(data.classes, ["Cat", "Dog"]);
    assert_eq!(data.train.len(), 4);
    let skipped: Vec<&str> = data.skipped.iter().map(|s| s.file.as_str()).collect();
    assert_eq!(skipped, ["Bird", "Cat/3.png"]);
    assert!(data.skipped[0].reason.contains("symbolic link"));
    assert_eq!(data.ignored, 1);
}

/// `$CNNSERVE_DATA/catanddog`, else `../shared/data/catanddog` beside the checkout: the course's
/// cat/dog set, or the stand-in `scripts/make-fixtures.py --data` makes with the same names and
/// counts (the message of a missing one says how to get either).
fn catanddog() -> PathBuf {
    common::data_dir().join("catanddog")
}

fn check_catanddog(data: &Dataset, prefix: &str) {
    assert_eq!(data.classes, ["Cat", "Dog"]);
    assert_eq!(data.counts(&data.train), [266, 263]);
    assert_eq!(data.counts(&data.test), [6, 6]);
    assert!(data.skipped.is_empty(), "{:?}", data.skipped);
    assert_eq!(data.ignored, 0);
    for s in data.train.iter().chain(&data.test) {
        assert_eq!(s.image.dimensions(), (256, 256), "{}", s.file);
    }
    // The five BMP files named .jpg are in (the generated stand-in has them under the same names).
    for bmp in [
        "train/Cat/23.jpg",
        "train/Cat/7642.jpg",
        "train/Cat/7647.jpg",
        "train/Dog/50.jpg",
        "train/Dog/1017.jpg",
    ] {
        let name = format!("{prefix}{bmp}");
        assert!(data.train.iter().any(|s| s.file == name), "{name} missing");
    }
    let names: Vec<&str> = data.train.iter().map(|s| s.file.as_str()).collect();
    assert!(
        names.windows(2).all(|w| w[0] < w[1]),
        "train is sorted by path"
    );
}

#[test]
fn the_real_data_set_from_a_folder_and_a_zip() {
    let dir = catanddog();
    let limits = DatasetLimits::default();
    let start = Instant::now();
    let data = dataset::load(&dir, &limits, (256, 256)).unwrap();
    eprintln!("catanddog folder: {:.2?}", start.elapsed());
    check_catanddog(&data, "");

    // Zipped the way a user would: everything under the data set's own folder.
    let tmp = tempfile::tempdir().unwrap();
    let zip_path = tmp.path().join("catanddog.zip");
    let mut zip = ZipWriter::new(std::fs::File::create(&zip_path).unwrap());
    let options = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    let mut files = Vec::new();
    let mut pending = vec![dir.clone()];
    while let Some(d) = pending.pop() {
        for item in std::fs::read_dir(d).unwrap() {
            let path = item.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    for path in &files {
        let rel = path
            .strip_prefix(&dir)
            .unwrap()
            .to_str()
            .unwrap()
            .replace('\\', "/");
        zip.start_file(format!("catanddog/{rel}"), options).unwrap();
        zip.write_all(&std::fs::read(path).unwrap()).unwrap();
    }
    zip.finish().unwrap();
    let start = Instant::now();
    let zipped = dataset::load(&zip_path, &limits, (256, 256)).unwrap();
    eprintln!("catanddog zip: {:.2?}", start.elapsed());
    check_catanddog(&zipped, "catanddog/");
    for (a, b) in data.train.iter().zip(&zipped.train) {
        assert_eq!(format!("catanddog/{}", a.file), b.file);
        assert!(a.image == b.image, "{}", a.file);
    }
}
