//! An ImageFolder data set from a folder or a zip: classes, images, and what was left out.
//!
//! Uploads are hostile until proven otherwise: a zip is checked entry by entry before anything
//! is decompressed (names that could escape a folder, links, encryption, entry and size limits
//! measured on the bytes actually read), a folder is walked without following links, and files
//! are recognised by their content because real data sets carry BMPs named `.jpg`.
//!
//! Everything wrong with the data set's shape is reported at once ([`DatasetError::Invalid`]):
//! the user fixes their folder once, not once per error.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex, PoisonError};

use image::RgbImage;
use serde::{Deserialize, Serialize};
use zip::result::ZipError;
use zip::ZipArchive;

use crate::preprocess::{decode_rgb, resize_bilinear};

/// One usable image, already resized to the recipe's input size.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Path inside the data set, `/`-separated, as the user wrote it, e.g. `train/Cat/12.jpg`;
    /// a top-level folder wrapping the data set is kept (`catanddog/train/Cat/12.jpg`), so the
    /// user can find the file. For a folder, paths are relative to that folder.
    pub file: String,
    pub label: usize,
    pub image: RgbImage,
}

/// A file left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Skipped {
    pub file: String,
    pub reason: String,
}

/// A rule the data set breaks, with the file or folder it concerns when there is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub message: String,
}

#[derive(Debug)]
pub struct Dataset {
    /// Folder names, sorted as torchvision's ImageFolder sorts them; a label indexes this.
    pub classes: Vec<String>,
    pub train: Vec<Sample>,
    /// The optional `test/` split.
    pub test: Vec<Sample>,
    /// Files that look like images (by content or by extension) but were not used, with the
    /// reason: undecodable, over the pixel limit, outside a class folder, a symbolic link.
    pub skipped: Vec<Skipped>,
    /// Files that are not images at all (`__MACOSX/`, `.DS_Store`, text…): counted, not listed.
    pub ignored: usize,
}

impl Dataset {
    /// Images per class in `samples`.
    pub fn counts(&self, samples: &[Sample]) -> Vec<usize> {
        class_counts(self.classes.len(), samples)
    }
}

/// Images per class among `samples`, for `classes` classes.
pub fn class_counts<'a>(
    classes: usize,
    samples: impl IntoIterator<Item = &'a Sample>,
) -> Vec<usize> {
    let mut counts = vec![0; classes];
    for s in samples {
        counts[s.label] += 1;
    }
    counts
}

/// Caps on what an upload may make us read.
#[derive(Debug, Clone)]
pub struct DatasetLimits {
    /// Zip entries, or files and folders below a folder, junk included.
    pub max_entries: usize,
    /// Uncompressed bytes, checked on the sizes declared and again on the bytes read.
    pub max_total_bytes: u64,
    /// Per image, `width × height` from its header.
    pub max_pixels: u64,
}

impl Default for DatasetLimits {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_total_bytes: 4 << 30,
            max_pixels: crate::preprocess::DEFAULT_MAX_PIXELS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a zip archive: {0}")]
    NotAZip(String),
    #[error("refused zip entry `{entry}`: {reason}")]
    Unsafe { entry: String, reason: String },
    #[error("data set too large: {0}")]
    TooLarge(String),
    #[error("the data set cannot be used: {}", .0.iter().map(|p| match &p.file {
        Some(f) => format!("{f}: {}", p.message),
        None => p.message.clone(),
    }).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Problem>),
}

/// Reads an ImageFolder data set from a folder or a zip archive, decoding every image and
/// resizing it to `size` (width, height) with [`resize_bilinear`].
///
/// A folder and a zip are told apart by the file system, a zip by its content (never by its
/// extension). The recipe's `Resize((256, 256))` comes first in its transform chain, so storing
/// images already resized loses nothing.
///
/// Layouts: `<class>/…`, or `train/<class>/…` with an optional `test/<class>/…`, either of them
/// possibly wrapped in one top-level folder. [`Sample::file`] and every other path reported
/// keep that top-level folder, as the user wrote it, so that they can find the file they named.
pub fn load(
    path: &Path,
    limits: &DatasetLimits,
    size: (u32, u32),
) -> Result<Dataset, DatasetError> {
    let io = |source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.is_dir() {
        let entries = walk_folder(path, limits)?;
        let mut source = FolderSource;
        return assemble(entries, &mut source, limits, size);
    }
    if !meta.is_file() {
        return Err(DatasetError::NotAZip(
            "expected a zip file or a folder, found a special file".into(),
        ));
    }
    let file = File::open(path).map_err(io)?;
    load_zip(BufReader::new(file), limits, size).map_err(|e| match e {
        // Errors from the archive reader carry no path; the file is the only one it read.
        DatasetError::Io { source, .. } => io(source),
        other => other,
    })
}

/// [`load`] for a zip archive already open, in memory (`std::io::Cursor`) or elsewhere.
///
/// Every entry is checked before anything is decompressed, so an unsafe archive is refused as a
/// whole rather than half-read.
pub fn load_zip<R: Read + Seek>(
    reader: R,
    limits: &DatasetLimits,
    size: (u32, u32),
) -> Result<Dataset, DatasetError> {
    let mut reader = reader;
    // Kept to tell the user what they sent instead, should it not be a zip.
    let mut head = Vec::with_capacity(512);
    reader
        .by_ref()
        .take(512)
        .read_to_end(&mut head)
        .map_err(archive_io)?;
    reader.seek(SeekFrom::Start(0)).map_err(archive_io)?;
    let archive = match ZipArchive::new(reader) {
        Ok(archive) => archive,
        Err(ZipError::Io(e)) if e.kind() != io::ErrorKind::UnexpectedEof => {
            return Err(archive_io(e))
        }
        Err(e) => return Err(DatasetError::NotAZip(not_a_zip_reason(&head, &e))),
    };
    let entries = zip_entries(&archive, limits)?;
    let mut source = ZipSource { archive };
    assemble(entries, &mut source, limits, size)
}

fn archive_io(source: io::Error) -> DatasetError {
    DatasetError::Io {
        path: PathBuf::from("(zip archive)"),
        source,
    }
}

/// Users send whatever their system's "compress" produced; name it so they know what to redo.
fn not_a_zip_reason(head: &[u8], err: &ZipError) -> String {
    let what = if head.is_empty() {
        "the file is empty"
    } else if head.starts_with(&[0x1f, 0x8b]) {
        "this is a gzip file (.tar.gz?)"
    } else if head.starts_with(b"Rar!") {
        "this is a RAR archive"
    } else if head.starts_with(b"7z\xBC\xAF\x27\x1C") {
        "this is a 7-Zip archive"
    } else if head.get(257..262) == Some(b"ustar") {
        "this is a tar archive"
    } else if head.starts_with(b"PK") {
        return format!("the zip archive is damaged ({err}); create it again");
    } else {
        "no zip structure found"
    };
    format!("{what}; send the data set as a .zip file")
}

/// One file or folder of the data set, before anything is read.
struct Entry {
    /// Path components, without empty or `.` ones.
    parts: Vec<String>,
    is_dir: bool,
    /// Uncompressed size as declared (zip header or file metadata): a first check only.
    size: u64,
    kind: EntryKind,
}

enum EntryKind {
    Dir,
    Zip(usize),
    File(PathBuf),
    Symlink,
    Special,
}

impl Entry {
    fn path(&self) -> String {
        self.parts.join("/")
    }
}

fn components(name: &str) -> Vec<String> {
    name.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_owned)
        .collect()
}

/// Lists the archive and refuses it outright if any entry could escape an extraction folder,
/// hide its content, or exceed the limits: a server should not half-process such an upload.
fn zip_entries<R: Read + Seek>(
    archive: &ZipArchive<R>,
    limits: &DatasetLimits,
) -> Result<Vec<Entry>, DatasetError> {
    if archive.len() > limits.max_entries {
        return Err(DatasetError::TooLarge(format!(
            "the archive has {} entries, more than the limit of {}",
            archive.len(),
            limits.max_entries
        )));
    }
    let mut declared: u64 = 0;
    let mut entries = Vec::with_capacity(archive.len());
    for index in 0..archive.len() {
        let entry = archive.by_index_data(index).map_err(|e| {
            DatasetError::NotAZip(format!("the zip archive is damaged ({e}); create it again"))
        })?;
        let raw = entry.name_raw();
        let unsafe_entry = |reason: &str| DatasetError::Unsafe {
            entry: String::from_utf8_lossy(raw).into_owned(),
            reason: reason.to_owned(),
        };
        if raw.contains(&0) {
            return Err(unsafe_entry("the name contains a NUL byte"));
        }
        let name = entry
            .name()
            .map_err(|_| unsafe_entry("the name is not valid text"))?
            .into_owned();
        if let Some(reason) = unsafe_name(&name) {
            return Err(unsafe_entry(reason));
        }
        if entry.encrypted() {
            return Err(unsafe_entry(
                "it is encrypted (password-protected); zip the data set again without a password",
            ));
        }
        // Mode bits only mean something for archives made on Unix; `unix_mode` knows that.
        if entry.unix_mode().is_some_and(|m| m & S_IFMT == S_IFLNK) {
            return Err(unsafe_entry("it is a symbolic link"));
        }
        declared = declared.saturating_add(entry.size());
        let parts = components(&name);
        if parts.is_empty() {
            continue;
        }
        let is_dir = entry.is_dir();
        entries.push(Entry {
            parts,
            is_dir,
            size: entry.size(),
            kind: if is_dir {
                EntryKind::Dir
            } else {
                EntryKind::Zip(index)
            },
        });
    }
    check_declared(declared, limits)?;
    Ok(entries)
}

const S_IFMT: u32 = 0o170000;
const S_IFLNK: u32 = 0o120000;

/// Why a zip entry name is refused: anything that could address a file outside the folder it
/// would be extracted to, on any system the archive might be unpacked on later.
fn unsafe_name(name: &str) -> Option<&'static str> {
    let bytes = name.as_bytes();
    if name.starts_with('/') || name.starts_with('\\') {
        return Some("the name is an absolute path");
    }
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return Some("the name is an absolute path (drive letter)");
    }
    if name.contains('\\') {
        return Some("the name contains a backslash (zip names use /)");
    }
    if name.split('/').any(|c| c == "..") {
        return Some("the name goes up a folder (..)");
    }
    None
}

fn check_declared(declared: u64, limits: &DatasetLimits) -> Result<(), DatasetError> {
    if declared > limits.max_total_bytes {
        return Err(DatasetError::TooLarge(format!(
            "the files add up to {declared} bytes, more than the limit of {} bytes",
            limits.max_total_bytes
        )));
    }
    Ok(())
}

fn too_many_bytes(limits: &DatasetLimits) -> DatasetError {
    DatasetError::TooLarge(format!(
        "the files hold more than the limit of {} bytes",
        limits.max_total_bytes
    ))
}

/// Lists a folder without following symbolic links, so that a data set cannot make us read
/// files outside it.
fn walk_folder(root: &Path, limits: &DatasetLimits) -> Result<Vec<Entry>, DatasetError> {
    let mut entries = Vec::new();
    let mut declared: u64 = 0;
    let mut pending = vec![(root.to_path_buf(), Vec::<String>::new())];
    while let Some((dir, parts)) = pending.pop() {
        let io = |source| DatasetError::Io {
            path: dir.clone(),
            source,
        };
        for item in std::fs::read_dir(&dir).map_err(io)? {
            let item = item.map_err(io)?;
            // Checked as we go: a folder with millions of files must not be listed in full first.
            if entries.len() >= limits.max_entries {
                return Err(DatasetError::TooLarge(format!(
                    "the folder has more than {} files and folders",
                    limits.max_entries
                )));
            }
            let file_type = item.file_type().map_err(io)?;
            let mut item_parts = parts.clone();
            item_parts.push(item.file_name().to_string_lossy().into_owned());
            let (kind, size) = if file_type.is_dir() {
                pending.push((item.path(), item_parts.clone()));
                (EntryKind::Dir, 0)
            } else if file_type.is_symlink() {
                (EntryKind::Symlink, 0)
            } else if file_type.is_file() {
                let size = item.metadata().map_err(io)?.len();
                (EntryKind::File(item.path()), size)
            } else {
                (EntryKind::Special, 0)
            };
            declared = declared.saturating_add(size);
            entries.push(Entry {
                parts: item_parts,
                is_dir: matches!(kind, EntryKind::Dir),
                size,
                kind,
            });
        }
    }
    check_declared(declared, limits)?;
    Ok(entries)
}

/// Where entry bytes come from. `Ok(Err(reason))` is a file that cannot be read (it is skipped);
/// `Err` stops everything.
trait Source {
    fn read(
        &mut self,
        entry: &Entry,
        budget: &mut u64,
        limits: &DatasetLimits,
    ) -> Result<Result<Vec<u8>, String>, DatasetError>;
}

struct ZipSource<R> {
    archive: ZipArchive<R>,
}

impl<R: Read + Seek> Source for ZipSource<R> {
    fn read(
        &mut self,
        entry: &Entry,
        budget: &mut u64,
        limits: &DatasetLimits,
    ) -> Result<Result<Vec<u8>, String>, DatasetError> {
        let EntryKind::Zip(index) = entry.kind else {
            unreachable!("a zip source only lists zip entries")
        };
        // Unsupported compression methods and damaged entries cost the user this file only.
        let file = match self.archive.by_index(index) {
            Ok(file) => file,
            Err(e) => return Ok(Err(format!("cannot be read from the zip: {e}"))),
        };
        Ok(read_capped(file, entry.size, budget, limits)?
            .map_err(|e| format!("cannot be read from the zip: {e}")))
    }
}

struct FolderSource;

impl Source for FolderSource {
    fn read(
        &mut self,
        entry: &Entry,
        budget: &mut u64,
        limits: &DatasetLimits,
    ) -> Result<Result<Vec<u8>, String>, DatasetError> {
        let EntryKind::File(path) = &entry.kind else {
            unreachable!("only regular files are read")
        };
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) => return Ok(Err(format!("cannot be read: {e}"))),
        };
        Ok(read_capped(file, entry.size, budget, limits)?
            .map_err(|e| format!("cannot be read: {e}")))
    }
}

/// Reads `reader` to its end, charging what it yields to `budget`. Headers can lie (a zip bomb
/// declares a small size), so the cap is on the bytes that actually come out: reading one byte
/// past the budget proves it exceeded.
fn read_capped(
    reader: impl Read,
    declared: u64,
    budget: &mut u64,
    limits: &DatasetLimits,
) -> Result<io::Result<Vec<u8>>, DatasetError> {
    // The declared size is only a hint for the allocation, so it is capped too.
    let hint = declared.min(*budget).min(64 << 20);
    let mut bytes = Vec::with_capacity(hint as usize);
    let result = reader
        .take(budget.saturating_add(1))
        .read_to_end(&mut bytes);
    let read = bytes.len() as u64;
    if read > *budget {
        return Err(too_many_bytes(limits));
    }
    *budget -= read;
    Ok(result.map(|_| bytes))
}

/// Files that are never part of a data set: macOS resource forks and `.DS_Store`, dotfiles and
/// dot-folders (`.git`), Windows thumbnails caches.
fn is_junk(parts: &[String]) -> bool {
    parts.iter().any(|c| c.starts_with('.') || c == "__MACOSX")
        || parts.last().is_some_and(|name| {
            name.eq_ignore_ascii_case("Thumbs.db") || name.eq_ignore_ascii_case("desktop.ini")
        })
}

fn is_split(name: &str, split: &str) -> bool {
    name.eq_ignore_ascii_case(split)
}

/// What to do with a file once read.
#[derive(Debug, Clone, Copy)]
enum Role {
    Use {
        test: bool,
        label: usize,
    },
    /// An image here is not part of any class; the reason tells the user where it should be.
    Misplaced(&'static str),
}

const NOT_IN_CLASS: &str = "not inside a class folder";
const OUTSIDE_SPLITS: &str = "outside train/ and test/";

/// The data set's shape, worked out from names alone.
struct Layout {
    /// The top-level folder wrapping everything, if there is one.
    prefix: Option<String>,
    /// `train` and `test` as the user spelled them, in the split layout.
    split: Option<(Option<String>, Option<String>)>,
    classes: Vec<String>,
    /// Test class folders with no train counterpart.
    unknown_test: Vec<String>,
}

impl Layout {
    fn of(entries: &[Entry]) -> Layout {
        let useful: Vec<&Entry> = entries.iter().filter(|e| !is_junk(&e.parts)).collect();
        let is_folder = |e: &Entry, depth: usize| e.parts.len() > depth + 1 || e.is_dir;

        let firsts: BTreeSet<&str> = useful.iter().map(|e| e.parts[0].as_str()).collect();
        let prefix = match firsts.iter().next() {
            Some(&top)
                if firsts.len() == 1
                    && !is_split(top, "train")
                    && !is_split(top, "test")
                    && useful.iter().all(|e| is_folder(e, 0))
                    && useful.iter().any(|e| e.parts.len() > 1 && is_folder(e, 1)) =>
            {
                Some(top.to_owned())
            }
            _ => None,
        };
        let skip = usize::from(prefix.is_some());

        let split_dir = |split: &str| {
            useful
                .iter()
                .filter(|e| e.parts.len() > skip && is_folder(e, skip))
                .map(|e| &e.parts[skip])
                .filter(|name| is_split(name, split))
                .min()
                .cloned()
        };
        let (train, test) = (split_dir("train"), split_dir("test"));
        let class_names = |depth: usize, within: Option<&str>| -> BTreeSet<String> {
            useful
                .iter()
                .filter(|e| e.parts.len() > skip + depth && is_folder(e, skip + depth))
                .filter(|e| within.is_none_or(|s| is_split(&e.parts[skip], s)))
                .map(|e| e.parts[skip + depth].clone())
                .collect()
        };
        if train.is_none() && test.is_none() {
            return Layout {
                prefix,
                split: None,
                classes: class_names(0, None).into_iter().collect(),
                unknown_test: Vec::new(),
            };
        }
        let classes: Vec<String> = class_names(1, Some("train")).into_iter().collect();
        let unknown_test = class_names(1, Some("test"))
            .into_iter()
            .filter(|c| classes.binary_search(c).is_err())
            .collect();
        Layout {
            prefix,
            split: Some((train, test)),
            classes,
            unknown_test,
        }
    }

    /// The role of a file, or `None` for one not to be read at all.
    fn role(&self, parts: &[String]) -> Option<Role> {
        let rel = &parts[usize::from(self.prefix.is_some())..];
        let label = |name: &String| self.classes.binary_search(name).ok();
        if self.split.is_none() {
            if rel.len() < 2 {
                return Some(Role::Misplaced(NOT_IN_CLASS));
            }
            return Some(Role::Use {
                test: false,
                label: label(&rel[0])?,
            });
        }
        let test = match rel {
            [dir, _, ..] if is_split(dir, "train") => false,
            [dir, _, ..] if is_split(dir, "test") => true,
            _ => return Some(Role::Misplaced(OUTSIDE_SPLITS)),
        };
        if rel.len() < 3 {
            return Some(Role::Misplaced(NOT_IN_CLASS));
        }
        // A test class unknown to train is reported as a problem; its files are not read.
        Some(Role::Use {
            test,
            label: label(&rel[1])?,
        })
    }

    /// A folder path as the user sees it: top-level folder, then `parts`.
    fn display(&self, parts: &[&str]) -> Option<String> {
        let all: Vec<&str> = self
            .prefix
            .as_deref()
            .into_iter()
            .chain(parts.iter().copied())
            .collect();
        (!all.is_empty()).then(|| all.join("/"))
    }
}

/// What reading and decoding one file gave.
enum Outcome {
    Image(RgbImage),
    Skipped(String),
    Ignored,
}

/// Image file names, for files whose content is not recognised: a user who named a file
/// `.jpg` meant it as an image and should hear why it was not used.
const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "jpe", "jfif", "png", "bmp", "dib", "gif", "webp", "tif", "tiff", "heic",
    "heif", "avif",
];

fn looks_like_image(name: &str, bytes: &[u8]) -> bool {
    has_image_signature(bytes)
        || name
            .rsplit_once('.')
            .is_some_and(|(_, ext)| IMAGE_EXTENSIONS.iter().any(|x| ext.eq_ignore_ascii_case(x)))
}

/// Our own signatures rather than `image::guess_format`: that one takes any text starting with
/// "BM" for a BMP and "P1".."P7" for a PNM, and would turn notes into "corrupt images". TIFF and
/// HEIC/AVIF count as images so that their (unsupported) files are named, not silently ignored.
fn has_image_signature(b: &[u8]) -> bool {
    let bmp = b.len() >= 18
        && b.starts_with(b"BM")
        && b[6..10] == [0; 4]
        && matches!(
            u32::from_le_bytes([b[14], b[15], b[16], b[17]]),
            12 | 16 | 40 | 52 | 56 | 64 | 108 | 124
        );
    let heif = b.get(4..8) == Some(b"ftyp")
        && matches!(
            b.get(8..12),
            Some(b"heic" | b"heix" | b"hevc" | b"mif1" | b"msf1" | b"avif" | b"avis")
        );
    bmp || heif
        || b.starts_with(&[0xFF, 0xD8, 0xFF])
        || b.starts_with(b"\x89PNG\r\n\x1a\n")
        || b.starts_with(b"GIF87a")
        || b.starts_with(b"GIF89a")
        || (b.starts_with(b"RIFF") && b.get(8..12) == Some(b"WEBP"))
        || b.starts_with(b"II*\0")
        || b.starts_with(b"MM\0*")
}

fn examine(
    name: &str,
    role: Role,
    bytes: &[u8],
    limits: &DatasetLimits,
    size: (u32, u32),
) -> Outcome {
    if !looks_like_image(name, bytes) {
        return Outcome::Ignored;
    }
    if let Role::Misplaced(reason) = role {
        return Outcome::Skipped(reason.to_owned());
    }
    match decode_rgb(bytes, limits.max_pixels) {
        Ok(img) if img.dimensions() == size => Outcome::Image(img),
        Ok(img) => Outcome::Image(resize_bilinear(&img, size.0, size.1)),
        Err(e) => Outcome::Skipped(e.to_string()),
    }
}

/// Reads the files one after the other (a zip archive is one stream) while worker threads
/// decode and resize, which is where the time goes. The channel is bounded so that at most a
/// few files' bytes wait in memory.
fn decode_all(
    entries: &[Entry],
    jobs: Vec<(usize, Role)>,
    source: &mut dyn Source,
    limits: &DatasetLimits,
    size: (u32, u32),
) -> Result<Vec<(usize, Role, Outcome)>, DatasetError> {
    let workers = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .clamp(1, 8)
        .min(jobs.len().max(1));
    let mut budget = limits.max_total_bytes;
    let (tx, rx) = mpsc::sync_channel::<(usize, Role, Vec<u8>)>(workers * 2);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        let Ok((index, role, bytes)) = next else {
                            break;
                        };
                        let name = entries[index].parts.last().map_or("", String::as_str);
                        // decode_rgb already contains decoder panics; this covers the rest, so
                        // that a worker never dies and leaves the reader blocked on the channel.
                        let outcome =
                            std::panic::catch_unwind(|| examine(name, role, &bytes, limits, size))
                                .unwrap_or_else(|_| {
                                    Outcome::Skipped("the image could not be processed".into())
                                });
                        done.push((index, role, outcome));
                    }
                    done
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        let mut failure = None;
        for (index, role) in jobs {
            match source.read(&entries[index], &mut budget, limits) {
                Ok(Ok(bytes)) => {
                    if tx.send((index, role, bytes)).is_err() {
                        break;
                    }
                }
                Ok(Err(reason)) => outcomes.push((index, role, Outcome::Skipped(reason))),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        for handle in handles {
            outcomes.extend(
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(outcomes),
        }
    })
}

fn assemble(
    entries: Vec<Entry>,
    source: &mut dyn Source,
    limits: &DatasetLimits,
    size: (u32, u32),
) -> Result<Dataset, DatasetError> {
    let layout = Layout::of(&entries);
    let mut ignored = 0;
    let mut skipped = Vec::new();
    let mut jobs = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        if entry.is_dir {
            continue;
        }
        if is_junk(&entry.parts) {
            ignored += 1;
            continue;
        }
        let reason = match entry.kind {
            EntryKind::Symlink => "a symbolic link: links are not followed",
            EntryKind::Special => "not a regular file",
            _ => {
                jobs.extend(layout.role(&entry.parts).map(|role| (index, role)));
                continue;
            }
        };
        skipped.push(Skipped {
            file: entry.path(),
            reason: reason.into(),
        });
    }

    let classes = layout.classes.len();
    let (mut train, mut test) = (Vec::new(), Vec::new());
    // Per split and class: files that were meant as images but could not be used, and one of
    // them, to explain a class that ends up too small.
    let mut failed: Vec<Vec<(usize, Option<Skipped>)>> = vec![vec![(0, None); classes]; 2];
    for (index, role, outcome) in decode_all(&entries, jobs, source, limits, size)? {
        let file = entries[index].path();
        match (outcome, role) {
            (Outcome::Ignored, _) => ignored += 1,
            (
                Outcome::Image(image),
                Role::Use {
                    test: is_test,
                    label,
                },
            ) => {
                let sample = Sample { file, label, image };
                if is_test { &mut test } else { &mut train }.push(sample);
            }
            (Outcome::Image(_), Role::Misplaced(_)) => {
                unreachable!("misplaced files are not decoded")
            }
            (Outcome::Skipped(reason), role) => {
                let skip = Skipped { file, reason };
                if let Role::Use {
                    test: is_test,
                    label,
                } = role
                {
                    let slot = &mut failed[usize::from(is_test)][label];
                    slot.0 += 1;
                    if slot.1.as_ref().is_none_or(|s| skip.file < s.file) {
                        slot.1 = Some(skip.clone());
                    }
                }
                skipped.push(skip);
            }
        }
    }
    train.sort_by(|a, b| a.file.cmp(&b.file));
    test.sort_by(|a, b| a.file.cmp(&b.file));
    skipped.sort_by(|a, b| a.file.cmp(&b.file));

    let data = Dataset {
        classes: layout.classes.clone(),
        train,
        test,
        skipped,
        ignored,
    };
    let problems = problems(&layout, &data, &failed[0]);
    if problems.is_empty() {
        Ok(data)
    } else {
        Err(DatasetError::Invalid(problems))
    }
}

/// Every rule the data set breaks, in a stable order.
fn problems(
    layout: &Layout,
    data: &Dataset,
    train_failed: &[(usize, Option<Skipped>)],
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let problem = |file: Option<String>, message: String| Problem { file, message };
    let train_name = layout
        .split
        .as_ref()
        .and_then(|(train, _)| train.as_deref());
    let has_train = layout.split.is_none() || train_name.is_some();
    let train_folder = |class: Option<&str>| {
        let parts: Vec<&str> = train_name.into_iter().chain(class).collect();
        layout.display(&parts)
    };
    let example = if layout.split.is_some() {
        "train/Cat/1.jpg and train/Dog/1.jpg"
    } else {
        "Cat/1.jpg and Dog/1.jpg"
    };
    if !has_train {
        let test = layout.split.as_ref().and_then(|(_, test)| test.as_deref());
        problems.push(problem(
            test.and_then(|t| layout.display(&[t])),
            "there is a test folder but no train folder next to it".into(),
        ));
    } else {
        match data.classes.as_slice() {
            [] => problems.push(problem(
                train_folder(None),
                format!("no class folders found: put the images in one folder per class, e.g. {example}"),
            )),
            [only] => problems.push(problem(
                train_folder(None),
                format!("only one class folder ({only}): at least 2 classes are needed"),
            )),
            _ => {}
        }
    }
    if has_train && !data.classes.is_empty() {
        if data.train.is_empty() {
            // One problem rather than one per class: the whole split is empty.
            problems.push(problem(train_folder(None), "no usable image found".into()));
        } else {
            let counts = data.counts(&data.train);
            for (label, class) in data.classes.iter().enumerate() {
                let have = match counts[label] {
                    0 => "has no usable image",
                    1 => "has only 1 usable image",
                    _ => continue,
                };
                let why = match &train_failed[label] {
                    (failed, Some(first)) => format!(
                        " ({failed} more could not be used, e.g. {}: {})",
                        first.file, first.reason
                    ),
                    _ => String::new(),
                };
                problems.push(problem(
                    train_folder(Some(class)),
                    format!("{have}{why}; each class needs at least 2"),
                ));
            }
        }
    }
    if let Some((train, Some(test))) = &layout.split {
        let known = data.classes.join(", ");
        for class in &layout.unknown_test {
            let message = match train {
                Some(train) if !known.is_empty() => {
                    format!("is not a class of {train}/ (its classes: {known})")
                }
                _ => "has no matching class folder in train/".to_owned(),
            };
            problems.push(problem(layout.display(&[test, class]), message));
        }
        if data.test.is_empty() {
            problems.push(problem(
                layout.display(&[test]),
                "has no usable image: add images in one folder per class, or remove the folder"
                    .into(),
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(names: &[&str]) -> Vec<Entry> {
        names
            .iter()
            .map(|name| {
                let is_dir = name.ends_with('/');
                Entry {
                    parts: components(name),
                    is_dir,
                    size: 0,
                    kind: if is_dir {
                        EntryKind::Dir
                    } else {
                        EntryKind::Symlink
                    },
                }
            })
            .collect()
    }

    #[test]
    fn reads_are_capped_on_the_bytes_that_come_out() {
        let limits = DatasetLimits::default();
        let mut budget = 100;
        let bytes = read_capped(&[7u8; 60][..], 1, &mut budget, &limits)
            .unwrap()
            .unwrap();
        assert_eq!((bytes.len(), budget), (60, 40));
        // A declared size of 1 does not matter: the 41st byte does.
        let err = read_capped(&[7u8; 41][..], 1, &mut budget, &limits).unwrap_err();
        assert!(matches!(err, DatasetError::TooLarge(_)));
        let mut budget = 41;
        read_capped(&[7u8; 41][..], 1, &mut budget, &limits)
            .unwrap()
            .unwrap();
        assert_eq!(budget, 0);
    }

    #[test]
    fn unsafe_names() {
        for name in ["../a", "a/../../b", "/a", "\\a", "C:/a", "c:a", "a\\b"] {
            assert!(unsafe_name(name).is_some(), "{name}");
        }
        for name in ["a/b.jpg", "my..photo.jpg", "a/..b/c", "./a/b", "a//b"] {
            assert_eq!(unsafe_name(name), None, "{name}");
        }
    }

    #[test]
    fn signatures_are_not_fooled_by_text() {
        assert!(!has_image_signature(b"BMW photos, see folder Dog"));
        assert!(!has_image_signature(
            b"P6 is a PPM header and a line of text"
        ));
        assert!(has_image_signature(b"\0\0\0\x18ftypheic\0\0\0\0"));
        assert!(looks_like_image("x.JPG", b"not really"));
        assert!(!looks_like_image("x.txt", b"text"));
    }

    #[test]
    fn layouts() {
        let l = Layout::of(&entries(&["train/Cat/1", "train/Dog/1", "test/Cat/1"]));
        assert_eq!((l.prefix.as_deref(), l.classes.len()), (None, 2));
        assert!(l.split.is_some());
        // A lone `train/` is the split layout, not a wrapper.
        let l = Layout::of(&entries(&["train/Cat/1", "train/Dog/1"]));
        assert_eq!(l.prefix, None);
        assert_eq!(l.classes, ["Cat", "Dog"]);
        // Junk beside the wrapper does not hide it; spelling of train/ is the user's.
        let l = Layout::of(&entries(&[
            "__MACOSX/x/._1",
            "d/Train/Cat/1",
            "d/Train/Dog/",
        ]));
        assert_eq!(l.prefix.as_deref(), Some("d"));
        assert_eq!(l.split, Some((Some("Train".into()), None)));
        assert_eq!(l.classes, ["Cat", "Dog"]);
        // A single class folder stays a class (and is reported as one class).
        let l = Layout::of(&entries(&["Cat/1", "Cat/2"]));
        assert_eq!((l.prefix, l.classes), (None, vec!["Cat".to_owned()]));
        // Empty folders are classes too, as in ImageFolder.
        let l = Layout::of(&entries(&["Cat/1", "Dog/"]));
        assert_eq!(l.classes, ["Cat", "Dog"]);
        assert_eq!(
            l.role(&components("Cat/1")).map(|r| format!("{r:?}")),
            Some("Use { test: false, label: 0 }".into())
        );
    }
}
