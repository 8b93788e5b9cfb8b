//! Reads PyTorch `.pth` state_dict files (what `torch.save(model.state_dict())` writes) into named
//! candle tensors, in the dtype they were stored in.
//!
//! torch has written two layouts, and both are in circulation:
//! - the zip archive of torch >= 1.6: `<name>/data.pkl`, a pickle whose tensors point at storages
//!   through persistent ids, plus one raw little-endian `<name>/data/<key>` entry per storage;
//! - the legacy stream of torch < 1.6 (and of `_use_new_zipfile_serialization=False`): five
//!   pickles back to back (magic number, protocol version, sys info, the state_dict, the list of
//!   storage keys), then every storage's bytes behind an i64 element count.
//!
//! candle's `pickle` module reads only the zip layout, yet torchvision's own pretrained downloads
//! (`vgg11_bn-6002323d.pth`, `googlenet-1378be20.pth`) are legacy files. So this module carries a
//! small unpickler of its own and reads both layouts with it. That also buys what candle's reader
//! lacks for serving: tensors keep the file's order, int32/bool storages load, and a damaged or
//! unsupported file is a `WeightsError::Format` naming the problem instead of a skipped tensor.
//!
//! The layout is told from the first bytes of the file, never from its name.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::WeightsError;

/// `torch.serialization.MAGIC_NUMBER`, the first pickle of every legacy file.
const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;
/// `torch.serialization.PROTOCOL_VERSION`; it never changed while the legacy layout was current.
const LEGACY_PROTOCOL_VERSION: i128 = 1001;
/// PROTO 2, LONG1 of 10 bytes: how `torch.save` (pickle protocol 2) starts a legacy file.
const LEGACY_HEAD: &[u8] = &[0x80, 0x02, 0x8a, 0x0a];

/// Reads every tensor of a torch state_dict file, in its stored dtype, onto `device`.
///
/// Tensors come back in the order the state_dict holds them. A checkpoint that wraps the
/// state_dict as `{"state_dict": ...}`, `{"model_state_dict": ...}` or `{"model": ...}` is
/// unwrapped; entries of the state_dict that are not tensors are skipped.
pub fn read_pth(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>, WeightsError> {
    let io_error = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_error)?;
    let file_len = file.metadata().map_err(io_error)?.len();
    let mut head = Vec::with_capacity(512);
    (&mut file)
        .take(512)
        .read_to_end(&mut head)
        .map_err(io_error)?;
    let head = head.as_slice();
    file.seek(SeekFrom::Start(0)).map_err(io_error)?;
    let result = if head.is_empty() {
        Err(Fail::Format("the file is empty".into()))
    } else if head.starts_with(b"PK") {
        read_zip(file, file_len, device)
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Err(Fail::Format(
            "this is a tar archive, the layout of the earliest torch releases, which this \
             reader does not support; load it with torch and save its state_dict again"
                .into(),
        ))
    } else {
        read_legacy(file, file_len, head, device)
    };
    result.map_err(|fail| fail.into_weights_error(path))
}

/// torchvision download names carry a hash suffix: `vgg11_bn-6002323d.pth` → `vgg11_bn`,
/// `googlenet-1378be20.pth` → `googlenet`, `my_model.pth` → `my_model`. Only a suffix of `-` and
/// 8 or more hex digits is stripped.
pub fn model_name_from_file(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    split_hash_suffix(&stem).0.to_string()
}

/// `vgg11_bn-6002323d` → (`vgg11_bn`, Some(`6002323d`)); a stem without torchvision's hash
/// suffix comes back whole, with None.
pub fn split_hash_suffix(stem: &str) -> (&str, Option<&str>) {
    match stem.rsplit_once('-') {
        Some((name, hash))
            if !name.is_empty()
                && hash.len() >= 8
                && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            (name, Some(hash))
        }
        _ => (stem, None),
    }
}

/// Failures before the file's path is attached.
#[derive(Debug)]
enum Fail {
    Io(io::Error),
    /// Kept apart from `Format` only so that a short legacy file can be told from a non-torch one.
    Truncated(String),
    Format(String),
    Candle(candle_core::Error),
}

impl Fail {
    fn into_weights_error(self, path: &Path) -> WeightsError {
        match self {
            Fail::Io(source) => WeightsError::Io {
                path: path.to_path_buf(),
                source,
            },
            Fail::Truncated(reason) | Fail::Format(reason) => WeightsError::Format {
                path: path.to_path_buf(),
                reason,
            },
            Fail::Candle(e) => WeightsError::from(e),
        }
    }
}

/// Reads exactly `len` bytes, of which the file holds at most `room`. Checking `room` first
/// keeps a damaged length field from turning into a huge allocation.
fn read_vec(
    r: &mut impl Read,
    len: u64,
    room: u64,
    what: impl Fn() -> String,
) -> Result<Vec<u8>, Fail> {
    let truncated = |got: u64| {
        Fail::Truncated(format!(
            "the file is truncated: it ends inside {} ({got} of {len} bytes present)",
            what()
        ))
    };
    if len > room {
        return Err(truncated(room));
    }
    let capacity = usize::try_from(len)
        .map_err(|_| Fail::Format(format!("{} is too large for this machine", what())))?;
    let mut bytes = Vec::with_capacity(capacity);
    let got = r.take(len).read_to_end(&mut bytes).map_err(Fail::Io)?;
    if (got as u64) < len {
        return Err(truncated(got as u64));
    }
    Ok(bytes)
}

fn not_a_torch_file(head: &[u8]) -> Fail {
    let shown: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Fail::Format(format!(
        "not a PyTorch .pth file: it is neither a zip archive (torch >= 1.6) nor a legacy \
         torch.save stream (torch < 1.6); it starts with the bytes [{}]",
        shown.join(" ")
    ))
}

// ---------------------------------------------------------------------------------------------
// Legacy layout
// ---------------------------------------------------------------------------------------------

fn read_legacy(
    file: File,
    file_len: u64,
    head: &[u8],
    device: &Device,
) -> Result<Vec<(String, Tensor)>, Fail> {
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut offset = 0u64;

    // The magic pickle is 15 bytes; the cap keeps a random file from being parsed at length.
    let magic = match unpickle(&mut (&mut r).take(64), "the magic-number pickle", offset) {
        Ok(p) if p.value == Value::Int(LEGACY_MAGIC) => p,
        Err(Fail::Io(e)) => return Err(Fail::Io(e)),
        // Only a short file can end inside the 15-byte magic pickle; a long one hit the cap.
        Err(Fail::Truncated(m))
            if head.len() < 64
                && (head.starts_with(LEGACY_HEAD) || LEGACY_HEAD.starts_with(head)) =>
        {
            return Err(Fail::Truncated(m))
        }
        _ => return Err(not_a_torch_file(head)),
    };
    offset += magic.len;

    let version = unpickle(&mut r, "the protocol-version pickle", offset)?;
    offset += version.len;
    if version.value.as_int() != Some(LEGACY_PROTOCOL_VERSION) {
        return Err(Fail::Format(format!(
            "legacy torch file with protocol version {}, but only {LEGACY_PROTOCOL_VERSION} exists",
            version.value.describe()
        )));
    }

    let sys_info = unpickle(&mut r, "the sys-info pickle", offset)?;
    offset += sys_info.len;
    if let Value::Dict(items) = &sys_info.value {
        let little = items
            .iter()
            .find(|(k, _)| k.as_str() == Some("little_endian"))
            .map(|(_, v)| v);
        if matches!(little, Some(Value::Bool(false))) {
            return Err(Fail::Format(
                "the file was written on a big-endian machine, which this reader does not support"
                    .into(),
            ));
        }
    }

    let state = unpickle(&mut r, "the state_dict pickle", offset)?;
    offset += state.len;
    let key_list = unpickle(&mut r, "the storage-key list", offset)?;
    offset += key_list.len;

    let storages = storage_table(&state.persistent_ids)?;
    let specs = tensor_specs(state.value)?;
    let users = users_by_storage(&specs);

    let keys: Vec<String> = match &key_list.value {
        Value::List(items) | Value::Tuple(items) => items
            .iter()
            .map(|k| k.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| Fail::Format("the storage-key list holds a non-string key".into()))?,
        other => {
            return Err(Fail::Format(format!(
                "expected the list of storage keys after the state_dict, found {}",
                other.describe()
            )))
        }
    };

    let mut tensors: Vec<Option<Tensor>> = specs.iter().map(|_| None).collect();
    for key in &keys {
        let storage = storages.get(key).ok_or_else(|| {
            Fail::Format(format!(
                "the storage-key list names storage {key}, which nothing in the file refers to"
            ))
        })?;
        let header = read_vec(&mut r, 8, file_len.saturating_sub(offset), || {
            format!("the element count of storage {key} (byte {offset})")
        })?;
        offset += 8;
        let count = i64::from_le_bytes(header.try_into().expect("read_vec returned 8 bytes"));
        if u64::try_from(count).ok() != Some(storage.numel) {
            return Err(Fail::Format(format!(
                "storage {key} is declared with {} elements but its data header says {count}; \
                 the file is damaged",
                storage.numel
            )));
        }
        let elem_size = storage
            .elem_size
            .ok_or_else(|| unknown_storage(&storage.class))?;
        let nbytes = storage
            .numel
            .checked_mul(elem_size as u64)
            .ok_or_else(|| Fail::Format(format!("storage {key} claims an impossible size")))?;
        match users.get(key.as_str()) {
            // A checkpoint may hold storages outside the state_dict (optimizer state); skip them.
            None => {
                let skipped =
                    io::copy(&mut (&mut r).take(nbytes), &mut io::sink()).map_err(Fail::Io)?;
                if skipped < nbytes {
                    return Err(Fail::Truncated(format!(
                        "the file is truncated: it ends inside the data of storage {key} \
                         ({skipped} of {nbytes} bytes present)"
                    )));
                }
            }
            Some(indices) => {
                let bytes = read_vec(&mut r, nbytes, file_len.saturating_sub(offset), || {
                    format!("the data of storage {key} (starting at byte {offset})")
                })?;
                for &i in indices {
                    tensors[i] = Some(tensor_from_storage(&bytes, &specs[i], device)?);
                }
            }
        }
        offset += nbytes;
    }
    collect_tensors(specs, tensors)
}

// ---------------------------------------------------------------------------------------------
// Zip layout
// ---------------------------------------------------------------------------------------------

fn zip_fail(e: zip::result::ZipError) -> Fail {
    match e {
        zip::result::ZipError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Fail::Truncated(format!("the file is a truncated zip archive ({e})"))
        }
        zip::result::ZipError::Io(e) => Fail::Io(e),
        other => Fail::Format(format!(
            "the file starts like a zip archive but cannot be read as one (truncated or damaged?): \
             {other}"
        )),
    }
}

/// `file_len` bounds the up-front allocation, since the entry's declared size may be damaged.
fn read_zip_entry<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    file_len: u64,
) -> Result<Vec<u8>, Fail> {
    let mut entry = zip.by_name(name).map_err(|e| match e {
        zip::result::ZipError::FileNotFound => {
            Fail::Format(format!("the zip archive lacks the entry {name}"))
        }
        other => zip_fail(other),
    })?;
    let size = entry.size();
    let mut bytes = Vec::with_capacity(usize::try_from(size.min(file_len)).unwrap_or(0));
    entry.read_to_end(&mut bytes).map_err(|e| match e.kind() {
        // The zip crate reports a bad CRC or a short entry as an io::Error; both mean a damaged file.
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => {
            Fail::Format(format!("the zip entry {name} is damaged: {e}"))
        }
        _ => Fail::Io(e),
    })?;
    Ok(bytes)
}

fn read_zip(file: File, file_len: u64, device: &Device) -> Result<Vec<(String, Tensor)>, Fail> {
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(zip_fail)?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<Result<_, _>>()
        .map_err(zip_fail)?;

    // torch.save puts everything under one top-level folder named after the file it first wrote.
    let pickles: Vec<&String> = names
        .iter()
        .filter(|n| {
            n.as_str() == "data.pkl" || (n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        })
        .collect();
    let pkl = match pickles.as_slice() {
        [one] => (*one).clone(),
        [] => {
            return Err(Fail::Format(
                "a zip archive without data.pkl: not a file written by torch.save".into(),
            ))
        }
        many => {
            let many: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
            return Err(Fail::Format(format!(
                "a zip archive with several data.pkl ({}); torch.save writes one",
                many.join(", ")
            )));
        }
    };
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    if names.iter().any(|n| n == &format!("{prefix}constants.pkl")) {
        return Err(Fail::Format(
            "this is a TorchScript archive (torch.jit.save), not a state_dict; \
             save `model.state_dict()` with torch.save instead"
                .into(),
        ));
    }
    let byteorder = format!("{prefix}byteorder");
    if names.contains(&byteorder) {
        let order = read_zip_entry(&mut zip, &byteorder, file_len)?;
        if order.trim_ascii() != b"little" {
            return Err(Fail::Format(format!(
                "the storages are stored in `{}` byte order; only little-endian is supported",
                String::from_utf8_lossy(&order).trim()
            )));
        }
    }

    let pickle_bytes = read_zip_entry(&mut zip, &pkl, file_len)?;
    let state = unpickle(&mut pickle_bytes.as_slice(), &pkl, 0)?;
    let specs = tensor_specs(state.value)?;

    let mut tensors: Vec<Option<Tensor>> = specs.iter().map(|_| None).collect();
    let users = users_by_storage(&specs);
    // Storages in first-use order, so that a failure reports the earliest tensor at fault.
    let mut done = HashSet::new();
    for key in specs.iter().map(|spec| spec.key.as_str()) {
        if !done.insert(key) {
            continue;
        }
        let bytes = read_zip_entry(&mut zip, &format!("{prefix}data/{key}"), file_len)?;
        for &i in &users[key] {
            tensors[i] = Some(tensor_from_storage(&bytes, &specs[i], device)?);
        }
    }
    collect_tensors(specs, tensors)
}

// ---------------------------------------------------------------------------------------------
// From pickled objects to tensors
// ---------------------------------------------------------------------------------------------

/// One tensor of the state_dict, as its pickle describes it.
#[derive(Debug)]
struct TensorSpec {
    name: String,
    /// The root storage key: the zip entry name, or the legacy data section's key.
    key: String,
    dtype: DType,
    /// In elements of `dtype`, from the start of the root storage.
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// A storage as its persistent id declares it.
#[derive(Debug)]
struct StorageDecl {
    class: String,
    numel: u64,
    elem_size: Option<usize>,
}

/// torch storage class → (the candle dtype, if candle has one; the element size in bytes).
fn storage_kind(class: &str) -> Option<(Option<DType>, usize)> {
    Some(match class {
        "FloatStorage" => (Some(DType::F32), 4),
        "DoubleStorage" => (Some(DType::F64), 8),
        "HalfStorage" => (Some(DType::F16), 2),
        "BFloat16Storage" => (Some(DType::BF16), 2),
        "LongStorage" => (Some(DType::I64), 8),
        "IntStorage" => (Some(DType::I32), 4),
        "ShortStorage" => (Some(DType::I16), 2),
        "ByteStorage" => (Some(DType::U8), 1),
        // torch bools are one byte holding 0 or 1; candle has no bool and uses u8 for masks.
        "BoolStorage" => (Some(DType::U8), 1),
        "UInt32Storage" => (Some(DType::U32), 4),
        "UntypedStorage" => (Some(DType::U8), 1),
        // Both are OCP e4m3fn: safetensors' F8_E4M3 is torch.float8_e4m3fn and candle maps it so.
        "Float8_e4m3fnStorage" => (Some(DType::F8E4M3), 1),
        // Known to torch, absent from candle: still needed to skip them in a legacy stream.
        "CharStorage"
        | "QInt8Storage"
        | "QUInt8Storage"
        | "QUInt4x2Storage"
        | "QUInt2x4Storage"
        | "Float8_e5m2Storage"
        | "Float8_e4m3fnuzStorage"
        | "Float8_e5m2fnuzStorage" => (None, 1),
        "UInt16Storage" | "ComplexHalfStorage" => (None, 2),
        "QInt32Storage" => (None, 4),
        "UInt64Storage" | "ComplexFloatStorage" => (None, 8),
        "ComplexDoubleStorage" => (None, 16),
        _ => return None,
    })
}

fn unknown_storage(class: &str) -> Fail {
    Fail::Format(format!("unknown torch storage type torch.{class}"))
}

/// A storage persistent id: `('storage', torch.XStorage, key, location, numel)` in zip files,
/// with a sixth `view_metadata` (None, or `(view_key, offset, size)`) in legacy ones.
struct StoragePid<'a> {
    class: &'a str,
    key: &'a str,
    numel: u64,
    /// Elements between the root storage's start and this storage view's start.
    view_offset: u64,
}

fn parse_storage_pid(pid: &Value) -> Result<Option<StoragePid<'_>>, String> {
    let Value::Tuple(items) = pid else {
        return Err(format!("unexpected persistent id {}", pid.describe()));
    };
    if items.first().and_then(Value::as_str) != Some("storage") {
        return Ok(None);
    }
    let malformed = || format!("malformed storage reference {}", pid.describe());
    if items.len() != 5 && items.len() != 6 {
        return Err(malformed());
    }
    let class = match &items[1] {
        Value::Global { module, name } if module.starts_with("torch") => name.as_str(),
        _ => return Err(malformed()),
    };
    let key = items[2].as_str().ok_or_else(malformed)?;
    let numel = items[4].as_u64().ok_or_else(malformed)?;
    let view_offset = match items.get(5) {
        None | Some(Value::None) => 0,
        Some(Value::Tuple(view)) if view.len() == 3 => view[1].as_u64().ok_or_else(malformed)?,
        Some(_) => return Err(malformed()),
    };
    Ok(Some(StoragePid {
        class,
        key,
        numel,
        view_offset,
    }))
}

fn storage_table(pids: &[Value]) -> Result<HashMap<String, StorageDecl>, Fail> {
    let mut table = HashMap::new();
    for pid in pids {
        let Some(pid) = parse_storage_pid(pid).map_err(Fail::Format)? else {
            continue;
        };
        // torch's own loader keeps the first declaration of a key; so do we.
        table
            .entry(pid.key.to_owned())
            .or_insert_with(|| StorageDecl {
                class: pid.class.to_owned(),
                numel: pid.numel,
                elem_size: storage_kind(pid.class).map(|(_, size)| size),
            });
    }
    Ok(table)
}

fn is_tensor(value: &Value) -> bool {
    match value {
        Value::Call { func, .. } => matches!(
            func.as_ref(),
            Value::Global { module, name }
                if (module == "torch._utils" || module == "torch._tensor")
                    && name.starts_with("_rebuild_")
        ),
        _ => false,
    }
}

fn dict_has_tensors(value: &Value) -> bool {
    matches!(value, Value::Dict(items) if items.iter().any(|(_, v)| is_tensor(v)))
}

/// The dict of tensors inside the unpickled root object.
fn select_state_dict(root: Value) -> Result<Vec<(Value, Value)>, Fail> {
    let items = match root {
        Value::Dict(items) => items,
        object @ (Value::Call { .. } | Value::Build { .. }) => {
            return Err(Fail::Format(format!(
                "the file holds a pickled {} object, not a state_dict (was it saved with \
                 torch.save(model)? save model.state_dict() instead)",
                object.class_path().unwrap_or_else(|| "Python".into())
            )))
        }
        other => {
            return Err(Fail::Format(format!(
                "the file holds {}, not a state_dict (a dict of tensors)",
                other.describe()
            )))
        }
    };
    if items.iter().any(|(_, v)| is_tensor(v)) {
        return Ok(items);
    }
    for wrapper in ["state_dict", "model_state_dict", "model"] {
        let found = items
            .iter()
            .position(|(k, v)| k.as_str() == Some(wrapper) && dict_has_tensors(v));
        if let Some(i) = found {
            let (_, inner) = items.into_iter().nth(i).expect("position is in range");
            let Value::Dict(inner) = inner else {
                unreachable!("dict_has_tensors matched a dict")
            };
            return Ok(inner);
        }
    }
    let keys: Vec<String> = items
        .iter()
        .take(12)
        .map(|(k, _)| {
            k.as_str()
                .map_or_else(|| k.describe(), |s| format!("{s:?}"))
        })
        .collect();
    Err(Fail::Format(format!(
        "the file holds a dict without tensors (keys: {}{}); expected a state_dict, or a \
         checkpoint with one under \"state_dict\", \"model_state_dict\" or \"model\"",
        keys.join(", "),
        if items.len() > keys.len() {
            ", …"
        } else {
            ""
        }
    )))
}

fn tensor_specs(root: Value) -> Result<Vec<TensorSpec>, Fail> {
    let items = select_state_dict(root)?;
    let mut specs: Vec<TensorSpec> = Vec::with_capacity(items.len());
    let mut index: HashMap<String, usize> = HashMap::new();
    for (key, value) in items {
        if !is_tensor(&value) {
            // e.g. `_extra_state` or a checkpoint's bookkeeping next to the tensors.
            continue;
        }
        let Some(name) = key.as_str().map(str::to_owned) else {
            return Err(Fail::Format(format!(
                "the state_dict has a tensor under the non-string key {}",
                key.describe()
            )));
        };
        let spec = parse_tensor(&name, value).map_err(Fail::Format)?;
        // A pickled dict keeps the last value set for a key, as Python would.
        match index.get(&name) {
            Some(&i) => specs[i] = spec,
            None => {
                index.insert(name, specs.len());
                specs.push(spec);
            }
        }
    }
    if specs.is_empty() {
        return Err(Fail::Format("the state_dict holds no tensors".into()));
    }
    Ok(specs)
}

fn dims(value: &Value) -> Option<Vec<usize>> {
    match value {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|v| v.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect(),
        // torch.Size(tuple), should a writer keep the class.
        Value::Call { args, .. } => match args.as_ref() {
            Value::Tuple(inner) if inner.len() == 1 => dims(&inner[0]),
            _ => None,
        },
        _ => None,
    }
}

fn parse_tensor(name: &str, value: Value) -> Result<TensorSpec, String> {
    let Value::Call { func, args } = value else {
        return Err(format!("tensor `{name}` is not a tensor"));
    };
    let (module, function) = match *func {
        Value::Global { module, name } => (module, name),
        other => return Err(format!("tensor `{name}` is built by {}", other.describe())),
    };
    let Value::Tuple(mut args) = *args else {
        return Err(format!(
            "tensor `{name}`: {module}.{function} without an argument tuple"
        ));
    };
    match (module.as_str(), function.as_str()) {
        // nn.Parameter(data, requires_grad, backward_hooks[, state]): the data is the tensor.
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state")
            if !args.is_empty() =>
        {
            parse_tensor(name, args.swap_remove(0))
        }
        // Tensor subclasses: (func, type, args, state), and func(*args) is the plain tensor.
        ("torch._tensor", "_rebuild_from_type_v2") if args.len() >= 3 => {
            let inner_args = args.swap_remove(2);
            let inner_func = args.swap_remove(0);
            parse_tensor(
                name,
                Value::Call {
                    func: Box::new(inner_func),
                    args: Box::new(inner_args),
                },
            )
        }
        // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata]);
        // torch before 1.0 wrote `_rebuild_tensor` with the first four only.
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") if args.len() >= 4 => {
            let malformed = |what: &str| {
                format!("tensor `{name}` has a malformed {what} in {module}.{function}")
            };
            let pid = match &args[0] {
                Value::PersistentId(pid) => pid,
                _ => return Err(malformed("storage")),
            };
            let storage = parse_storage_pid(pid)
                .map_err(|e| format!("tensor `{name}`: {e}"))?
                .ok_or_else(|| malformed("storage"))?;
            let (dtype, _) = storage_kind(storage.class).ok_or_else(|| {
                format!(
                    "tensor `{name}` uses unknown torch storage type torch.{}",
                    storage.class
                )
            })?;
            let dtype = dtype.ok_or_else(|| {
                format!(
                    "tensor `{name}` is a torch.{} tensor, a type candle has no dtype for",
                    storage.class
                )
            })?;
            let storage_offset = args[1]
                .as_u64()
                .ok_or_else(|| malformed("storage offset"))?;
            let shape = dims(&args[2]).ok_or_else(|| malformed("size"))?;
            let stride = dims(&args[3]).ok_or_else(|| malformed("stride"))?;
            if shape.len() != stride.len() {
                return Err(malformed("stride (its rank differs from the size's)"));
            }
            let offset = storage
                .view_offset
                .checked_add(storage_offset)
                .and_then(|o| usize::try_from(o).ok())
                .ok_or_else(|| malformed("storage offset"))?;
            Ok(TensorSpec {
                name: name.to_owned(),
                key: storage.key.to_owned(),
                dtype,
                offset,
                shape,
                stride,
            })
        }
        _ => Err(format!(
            "tensor `{name}` is stored with {module}.{function}, which this reader does not \
             support (only dense tensors are: not quantized, sparse or other special tensors)"
        )),
    }
}

fn users_by_storage(specs: &[TensorSpec]) -> HashMap<&str, Vec<usize>> {
    let mut users: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, spec) in specs.iter().enumerate() {
        users.entry(spec.key.as_str()).or_default().push(i);
    }
    users
}

fn collect_tensors(
    specs: Vec<TensorSpec>,
    tensors: Vec<Option<Tensor>>,
) -> Result<Vec<(String, Tensor)>, Fail> {
    specs
        .into_iter()
        .zip(tensors)
        .map(|(spec, tensor)| match tensor {
            Some(t) => Ok((spec.name, t)),
            None => Err(Fail::Format(format!(
                "the data of storage {} (tensor `{}`) is missing from the file",
                spec.key, spec.name
            ))),
        })
        .collect()
}

/// Copies one tensor out of its storage's bytes, honouring offset and strides.
fn tensor_from_storage(bytes: &[u8], spec: &TensorSpec, device: &Device) -> Result<Tensor, Fail> {
    let elem = spec.dtype.size_in_bytes();
    let available = bytes.len() / elem;
    let out_of_range = || {
        Fail::Format(format!(
            "tensor `{}` (shape {:?}, stride {:?}, offset {}) reaches past the end of its \
             storage {}, which holds {available} elements",
            spec.name, spec.shape, spec.stride, spec.offset, spec.key
        ))
    };
    let numel = spec
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(out_of_range)?;
    if numel == 0 {
        return Tensor::zeros(spec.shape.as_slice(), spec.dtype, device).map_err(Fail::Candle);
    }
    let last = spec
        .shape
        .iter()
        .zip(&spec.stride)
        .try_fold(spec.offset, |acc, (&d, &s)| {
            acc.checked_add((d - 1).checked_mul(s)?)
        })
        .ok_or_else(out_of_range)?;
    if last >= available {
        return Err(out_of_range());
    }

    let contiguous = {
        let mut expected = 1usize;
        let mut ok = true;
        for (&d, &s) in spec.shape.iter().zip(&spec.stride).rev() {
            if d != 1 && s != expected {
                ok = false;
                break;
            }
            expected *= d;
        }
        ok
    };
    let data: std::borrow::Cow<'_, [u8]> = if contiguous {
        bytes[spec.offset * elem..(spec.offset + numel) * elem].into()
    } else {
        // Byte-wise gather: dtype-agnostic, and a state_dict rarely holds such views at all.
        let mut out = Vec::with_capacity(numel * elem);
        let mut index = vec![0usize; spec.shape.len()];
        for _ in 0..numel {
            let at = spec.offset
                + index
                    .iter()
                    .zip(&spec.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            out.extend_from_slice(&bytes[at * elem..(at + 1) * elem]);
            for axis in (0..index.len()).rev() {
                index[axis] += 1;
                if index[axis] < spec.shape[axis] {
                    break;
                }
                index[axis] = 0;
            }
        }
        out.into()
    };
    Tensor::from_raw_buffer(&data, spec.dtype, &spec.shape, device).map_err(Fail::Candle)
}

// ---------------------------------------------------------------------------------------------
// Unpickler
// ---------------------------------------------------------------------------------------------

/// The Python objects a torch pickle can hold, as far as reading tensors needs them.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i128),
    /// An integer wider than 128 bits: never part of a tensor, so only its presence is kept.
    BigInt,
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    /// Lists, sets and frozensets.
    List(Vec<Value>),
    /// Insertion-ordered, like Python's dict and OrderedDict.
    Dict(Vec<(Value, Value)>),
    Global {
        module: String,
        name: String,
    },
    /// `func(*args)` from REDUCE, NEWOBJ, INST or OBJ; nothing is ever called.
    Call {
        func: Box<Value>,
        args: Box<Value>,
    },
    /// `obj.__setstate__(state)` from BUILD.
    Build {
        obj: Box<Value>,
        state: Box<Value>,
    },
    PersistentId(Box<Value>),
}

impl Value {
    fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            // Python 2 pickles hold str keys as bytes.
            Value::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    fn as_int(&self) -> Option<i128> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    fn as_u64(&self) -> Option<u64> {
        self.as_int().and_then(|i| u64::try_from(i).ok())
    }

    fn class_path(&self) -> Option<String> {
        match self {
            Value::Global { module, name } => Some(format!("{module}.{name}")),
            Value::Call { func, .. } => func.class_path(),
            Value::Build { obj, .. } => obj.class_path(),
            _ => None,
        }
    }

    /// A short description for error messages, which must not dump a whole state_dict.
    fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => if *b { "True" } else { "False" }.into(),
            Value::Int(i) => i.to_string(),
            Value::BigInt => "a very large integer".into(),
            Value::Float(f) => f.to_string(),
            Value::Str(s) if s.len() <= 60 => format!("{s:?}"),
            Value::Str(_) => "a long string".into(),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Tuple(items) if items.len() <= 6 => format!(
                "({})",
                items
                    .iter()
                    .map(Value::describe)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Value::Tuple(items) => format!("a tuple of {} items", items.len()),
            Value::List(items) => format!("a list of {} items", items.len()),
            Value::Dict(items) => format!("a dict of {} items", items.len()),
            Value::Global { module, name } => format!("{module}.{name}"),
            Value::Call { func, .. } => match func.as_ref() {
                Value::Global { module, name } => format!("a {module}.{name} object"),
                _ => "a constructed object".into(),
            },
            Value::Build { obj, .. } => obj.describe(),
            Value::PersistentId(pid) => format!("persistent id {}", pid.describe()),
        }
    }
}

/// One unpickled object, the storage references it made, and its length in bytes.
struct Unpickled {
    value: Value,
    persistent_ids: Vec<Value>,
    len: u64,
}

/// A stack entry remembers its memo slot, so that filling a memoized dict or list after BINPUT
/// also fills what a later BINGET returns (Python shares the object; here values are copies).
struct Slot {
    value: Value,
    memo: Option<u32>,
}

struct Unpickler<'r, R> {
    r: &'r mut R,
    what: &'r str,
    /// Where the pickle starts in the file, for error messages.
    base: u64,
    pos: u64,
    stack: Vec<Slot>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    persistent_ids: Vec<Value>,
}

fn unpickle<R: Read>(r: &mut R, what: &str, base: u64) -> Result<Unpickled, Fail> {
    let mut u = Unpickler {
        r,
        what,
        base,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        persistent_ids: Vec::new(),
    };
    let value = u.run()?;
    Ok(Unpickled {
        value,
        persistent_ids: u.persistent_ids,
        len: u.pos,
    })
}

fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "?",
    }
}

/// Two's-complement little-endian, as LONG1 and LONG4 store integers.
fn decode_long(bytes: &[u8]) -> Value {
    if bytes.len() > 16 {
        return Value::BigInt;
    }
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let mut buf = if negative { [0xffu8; 16] } else { [0u8; 16] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i128::from_le_bytes(buf))
}

impl<R: Read> Unpickler<'_, R> {
    fn truncated(&self) -> Fail {
        Fail::Truncated(format!(
            "the file is truncated: it ends inside {} (at byte {})",
            self.what,
            self.base + self.pos
        ))
    }

    fn malformed(&self, at: u64, op: u8, msg: &str) -> Fail {
        Fail::Format(format!(
            "{} is malformed at byte {} ({}): {msg}",
            self.what,
            self.base + at,
            opcode_name(op)
        ))
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), Fail> {
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(self.truncated()),
            Err(e) => Err(Fail::Io(e)),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Fail> {
        let mut buf = [0u8; N];
        self.fill(&mut buf)?;
        Ok(buf)
    }

    fn byte(&mut self) -> Result<u8, Fail> {
        Ok(self.array::<1>()?[0])
    }

    fn bytes(&mut self, len: u64) -> Result<Vec<u8>, Fail> {
        let mut out = Vec::with_capacity(len.min(1 << 20) as usize);
        let got = (&mut *self.r)
            .take(len)
            .read_to_end(&mut out)
            .map_err(Fail::Io)?;
        self.pos += got as u64;
        if (got as u64) < len {
            return Err(self.truncated());
        }
        Ok(out)
    }

    /// The newline-terminated argument of the text opcodes (protocol 0 and GLOBAL).
    fn line(&mut self, at: u64, op: u8) -> Result<String, Fail> {
        let mut out = Vec::new();
        loop {
            match self.byte()? {
                b'\n' => break,
                b => out.push(b),
            }
            if out.len() > 1 << 16 {
                return Err(self.malformed(at, op, "argument line longer than 64 KiB"));
            }
        }
        if out.last() == Some(&b'\r') {
            out.pop();
        }
        String::from_utf8(out).map_err(|_| self.malformed(at, op, "argument is not UTF-8"))
    }

    fn string(&mut self, len: u64, at: u64, op: u8) -> Result<Value, Fail> {
        let bytes = self.bytes(len)?;
        String::from_utf8(bytes)
            .map(Value::Str)
            .map_err(|_| self.malformed(at, op, "string is not UTF-8"))
    }

    fn push(&mut self, value: Value) {
        self.stack.push(Slot { value, memo: None });
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop_slot(&mut self, at: u64, op: u8) -> Result<Slot, Fail> {
        if self.stack.len() <= self.floor() {
            return Err(self.malformed(at, op, "stack underflow"));
        }
        Ok(self.stack.pop().expect("checked non-empty"))
    }

    fn pop(&mut self, at: u64, op: u8) -> Result<Value, Fail> {
        Ok(self.pop_slot(at, op)?.value)
    }

    fn pop_mark(&mut self, at: u64, op: u8) -> Result<Vec<Value>, Fail> {
        let Some(mark) = self.marks.pop() else {
            return Err(self.malformed(at, op, "no MARK to pop to"));
        };
        Ok(self.stack.drain(mark..).map(|s| s.value).collect())
    }

    fn top(&mut self, at: u64, op: u8) -> Result<&mut Slot, Fail> {
        if self.stack.len() <= self.floor() {
            return Err(self.malformed(at, op, "stack underflow"));
        }
        Ok(self.stack.last_mut().expect("checked non-empty"))
    }

    /// After the object on top was filled in place, refresh its memo copy.
    fn sync_memo(&mut self) {
        if let Some(slot) = self.stack.last() {
            if let Some(id) = slot.memo {
                self.memo.insert(id, slot.value.clone());
            }
        }
    }

    fn memo_put(&mut self, id: u32, at: u64, op: u8) -> Result<(), Fail> {
        let slot = self.top(at, op)?;
        slot.memo = Some(id);
        let value = slot.value.clone();
        self.memo.insert(id, value);
        Ok(())
    }

    fn memo_get(&mut self, id: u32, at: u64, op: u8) -> Result<(), Fail> {
        let value =
            self.memo.get(&id).cloned().ok_or_else(|| {
                self.malformed(at, op, &format!("memo entry {id} was never stored"))
            })?;
        self.stack.push(Slot {
            value,
            memo: Some(id),
        });
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>, at: u64, op: u8) -> Result<(), Fail> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed(at, op, "odd number of keys and values"));
        }
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut items = items.into_iter();
        while let (Some(k), Some(v)) = (items.next(), items.next()) {
            pairs.push((k, v));
        }
        let slot = self.top(at, op)?;
        match &mut slot.value {
            Value::Dict(d) => d.extend(pairs),
            // A dict subclass is rebuilt by its class, then filled: keep its items.
            Value::Call { .. } => slot.value = Value::Dict(pairs),
            _ => return Err(self.malformed(at, op, "setting items on a non-dict")),
        }
        self.sync_memo();
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>, at: u64, op: u8) -> Result<(), Fail> {
        let slot = self.top(at, op)?;
        match &mut slot.value {
            Value::List(l) => l.extend(items),
            Value::Call { .. } => slot.value = Value::List(items),
            _ => return Err(self.malformed(at, op, "appending to a non-list")),
        }
        self.sync_memo();
        Ok(())
    }

    fn call(&mut self, func: Value, args: Value) {
        let is_ordered_dict = matches!(
            &func,
            Value::Global { module, name } if module == "collections" && name == "OrderedDict"
        );
        if is_ordered_dict && args == Value::Tuple(vec![]) {
            self.push(Value::Dict(Vec::new()));
        } else {
            self.push(Value::Call {
                func: Box::new(func),
                args: Box::new(args),
            });
        }
    }

    fn unsupported(&self, at: u64, op: u8) -> Fail {
        Fail::Format(format!(
            "{} uses pickle opcode {} (0x{op:02x}) at byte {}, which this reader does not \
             support",
            self.what,
            opcode_name(op),
            self.base + at
        ))
    }

    fn run(&mut self) -> Result<Value, Fail> {
        loop {
            let at = self.pos;
            let op = self.byte()?;
            match op {
                0x80 => {
                    let version = self.byte()?;
                    if version > 5 {
                        return Err(self.malformed(at, op, &format!("pickle protocol {version}")));
                    }
                }
                // Framing (protocol 4) only helps unbuffered readers; the opcodes follow as usual.
                0x95 => {
                    self.array::<8>()?;
                }
                b'.' => return self.pop(at, op),

                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Value::Int(v.into()))
                }
                b'K' => {
                    let v = self.byte()?;
                    self.push(Value::Int(v.into()))
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Value::Int(v.into()))
                }
                0x8a => {
                    let n = self.byte()?;
                    let bytes = self.bytes(n.into())?;
                    self.push(decode_long(&bytes))
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.array()?);
                    let n =
                        u64::try_from(n).map_err(|_| self.malformed(at, op, "negative length"))?;
                    let bytes = self.bytes(n)?;
                    self.push(decode_long(&bytes))
                }
                b'I' | b'L' => {
                    let line = self.line(at, op)?;
                    let value = match line.as_str() {
                        // Protocol 0 spells booleans as INT 01 / INT 00.
                        "01" if op == b'I' => Value::Bool(true),
                        "00" if op == b'I' => Value::Bool(false),
                        text => match text.trim_end_matches('L').parse::<i128>() {
                            Ok(i) => Value::Int(i),
                            Err(_)
                                if text
                                    .bytes()
                                    .all(|b| b.is_ascii_digit() || b == b'-' || b == b'L') =>
                            {
                                Value::BigInt
                            }
                            Err(_) => return Err(self.malformed(at, op, "not an integer")),
                        },
                    };
                    self.push(value)
                }
                b'G' => {
                    // Unlike everything else in pickle, BINFLOAT is big-endian.
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Value::Float(v))
                }
                b'F' => {
                    let line = self.line(at, op)?;
                    let v = line
                        .parse::<f64>()
                        .map_err(|_| self.malformed(at, op, "not a float"))?;
                    self.push(Value::Float(v))
                }

                b'X' => {
                    let n = u32::from_le_bytes(self.array()?);
                    let v = self.string(n.into(), at, op)?;
                    self.push(v)
                }
                0x8c => {
                    let n = self.byte()?;
                    let v = self.string(n.into(), at, op)?;
                    self.push(v)
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.array()?);
                    let v = self.string(n, at, op)?;
                    self.push(v)
                }
                // raw-unicode-escape; the escapes only matter for non-ASCII names.
                b'V' => {
                    let line = self.line(at, op)?;
                    self.push(Value::Str(line))
                }
                b'T' => {
                    let n = i32::from_le_bytes(self.array()?);
                    let n =
                        u64::try_from(n).map_err(|_| self.malformed(at, op, "negative length"))?;
                    let v = self.bytes(n)?;
                    self.push(Value::Bytes(v))
                }
                b'U' | b'C' => {
                    let n = self.byte()?;
                    let v = self.bytes(n.into())?;
                    self.push(Value::Bytes(v))
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.array()?);
                    let v = self.bytes(n.into())?;
                    self.push(Value::Bytes(v))
                }
                0x8e | 0x96 => {
                    let n = u64::from_le_bytes(self.array()?);
                    let v = self.bytes(n)?;
                    self.push(Value::Bytes(v))
                }
                b'S' => {
                    let line = self.line(at, op)?;
                    let quoted = line.trim();
                    let inner = quoted
                        .strip_prefix('\'')
                        .and_then(|s| s.strip_suffix('\''))
                        .or_else(|| quoted.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                        .ok_or_else(|| self.malformed(at, op, "unquoted string"))?;
                    self.push(Value::Bytes(inner.as_bytes().to_vec()))
                }

                b')' => self.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark(at, op)?;
                    self.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop(at, op)?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(items))
                }
                b']' | 0x8f => self.push(Value::List(Vec::new())),
                b'l' | 0x91 => {
                    let items = self.pop_mark(at, op)?;
                    self.push(Value::List(items))
                }
                b'a' => {
                    let v = self.pop(at, op)?;
                    self.append(vec![v], at, op)?
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark(at, op)?;
                    self.append(items, at, op)?
                }
                b'}' => self.push(Value::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark(at, op)?;
                    self.push(Value::Dict(Vec::new()));
                    self.set_items(items, at, op)?
                }
                b's' => {
                    let v = self.pop(at, op)?;
                    let k = self.pop(at, op)?;
                    self.set_items(vec![k, v], at, op)?
                }
                b'u' => {
                    let items = self.pop_mark(at, op)?;
                    self.set_items(items, at, op)?
                }

                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    // POP also discards a MARK left on top, as Python's does.
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop(at, op)?;
                    }
                }
                b'1' => {
                    self.pop_mark(at, op)?;
                }
                b'2' => {
                    let value = self.top(at, op)?.value.clone();
                    self.push(value)
                }

                b'p' => {
                    let line = self.line(at, op)?;
                    let id = line
                        .parse()
                        .map_err(|_| self.malformed(at, op, "bad memo index"))?;
                    self.memo_put(id, at, op)?
                }
                b'q' => {
                    let id = self.byte()?;
                    self.memo_put(id.into(), at, op)?
                }
                b'r' => {
                    let id = u32::from_le_bytes(self.array()?);
                    self.memo_put(id, at, op)?
                }
                0x94 => {
                    let id = u32::try_from(self.memo.len())
                        .map_err(|_| self.malformed(at, op, "memo overflow"))?;
                    self.memo_put(id, at, op)?
                }
                b'g' => {
                    let line = self.line(at, op)?;
                    let id = line
                        .parse()
                        .map_err(|_| self.malformed(at, op, "bad memo index"))?;
                    self.memo_get(id, at, op)?
                }
                b'h' => {
                    let id = self.byte()?;
                    self.memo_get(id.into(), at, op)?
                }
                b'j' => {
                    let id = u32::from_le_bytes(self.array()?);
                    self.memo_get(id, at, op)?
                }

                b'c' => {
                    let module = self.line(at, op)?;
                    let name = self.line(at, op)?;
                    self.push(Value::Global { module, name })
                }
                0x93 => {
                    let name = self.pop(at, op)?;
                    let module = self.pop(at, op)?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => {
                            self.push(Value::Global { module, name })
                        }
                        _ => return Err(self.malformed(at, op, "module or name is not a string")),
                    }
                }
                b'R' | 0x81 => {
                    let args = self.pop(at, op)?;
                    let func = self.pop(at, op)?;
                    self.call(func, args)
                }
                0x92 => {
                    let _kwargs = self.pop(at, op)?;
                    let args = self.pop(at, op)?;
                    let func = self.pop(at, op)?;
                    self.call(func, args)
                }
                b'i' => {
                    let module = self.line(at, op)?;
                    let name = self.line(at, op)?;
                    let args = self.pop_mark(at, op)?;
                    self.call(Value::Global { module, name }, Value::Tuple(args))
                }
                b'o' => {
                    let mut items = self.pop_mark(at, op)?;
                    if items.is_empty() {
                        return Err(self.malformed(at, op, "no class to instantiate"));
                    }
                    let func = items.remove(0);
                    self.call(func, Value::Tuple(items))
                }
                b'b' => {
                    let state = self.pop(at, op)?;
                    let slot = self.top(at, op)?;
                    // An OrderedDict's state holds attributes such as a state_dict's
                    // `_metadata`, not items: the dict is already complete.
                    if !matches!(slot.value, Value::Dict(_)) {
                        let obj = std::mem::replace(&mut slot.value, Value::None);
                        slot.value = Value::Build {
                            obj: Box::new(obj),
                            state: Box::new(state),
                        };
                        self.sync_memo();
                    }
                }
                b'P' => {
                    let line = self.line(at, op)?;
                    let pid = Value::Str(line);
                    self.persistent_ids.push(pid.clone());
                    self.push(Value::PersistentId(Box::new(pid)))
                }
                b'Q' => {
                    let pid = self.pop(at, op)?;
                    self.persistent_ids.push(pid.clone());
                    self.push(Value::PersistentId(Box::new(pid)))
                }

                0x82..=0x84 | 0x97 | 0x98 => return Err(self.unsupported(at, op)),
                _ => {
                    return Err(Fail::Format(format!(
                        "{} holds the byte 0x{op:02x} at byte {}, which is no pickle opcode: \
                         the file is damaged or not a torch file",
                        self.what,
                        self.base + at
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Value, Fail> {
        unpickle(&mut &bytes[..], "the test pickle", 0).map(|u| u.value)
    }

    #[test]
    fn decodes_torch_magic_number_and_negative_longs() {
        let mut magic = vec![0x80, 0x02, 0x8a, 0x0a];
        magic.extend_from_slice(&LEGACY_MAGIC.to_le_bytes()[..10]);
        magic.push(b'.');
        assert_eq!(parse(&magic).unwrap(), Value::Int(LEGACY_MAGIC));
        assert_eq!(parse(&[0x8a, 0x01, 0xff, b'.']).unwrap(), Value::Int(-1));
        assert_eq!(
            parse(&[0x8a, 0x02, 0x00, 0x80, b'.']).unwrap(),
            Value::Int(-32768)
        );
        assert_eq!(parse(&[0x8a, 0x00, b'.']).unwrap(), Value::Int(0));
        let mut wide = vec![0x8a, 20];
        wide.extend([0x11; 20]);
        wide.push(b'.');
        assert_eq!(parse(&wide).unwrap(), Value::BigInt);
    }

    #[test]
    fn memo_sees_items_set_after_binput() {
        // d = {}; d["a"] = 1; (d, d)  — the second d comes from the memo.
        let bytes = [
            0x80, 2, b'}', b'q', 0, b'X', 1, 0, 0, 0, b'a', b'K', 1, b's', b'h', 0, 0x86, b'.',
        ];
        let dict = Value::Dict(vec![(Value::Str("a".into()), Value::Int(1))]);
        assert_eq!(
            parse(&bytes).unwrap(),
            Value::Tuple(vec![dict.clone(), dict])
        );
    }

    #[test]
    fn ordered_dict_with_metadata_stays_a_dict() {
        // OrderedDict() with one item, then BUILD with {"_metadata": {}} as state.
        let mut bytes = vec![0x80, 2];
        bytes.extend_from_slice(b"ccollections\nOrderedDict\n)R");
        bytes.extend_from_slice(&[b'X', 1, 0, 0, 0, b'k', b'N', b's']);
        bytes.extend_from_slice(&[b'}', b'X', 9, 0, 0, 0]);
        bytes.extend_from_slice(b"_metadata}sb.");
        assert_eq!(
            parse(&bytes).unwrap(),
            Value::Dict(vec![(Value::Str("k".into()), Value::None)])
        );
    }

    #[test]
    fn keeps_item_order_across_setitems() {
        let bytes = [
            b'}', b'(', b'K', 3, b'N', b'K', 1, b'N', b'K', 2, b'N', b'u', b'.',
        ];
        let Value::Dict(items) = parse(&bytes).unwrap() else {
            panic!("not a dict")
        };
        let keys: Vec<_> = items.iter().map(|(k, _)| k.as_int().unwrap()).collect();
        assert_eq!(keys, [3, 1, 2]);
    }

    #[test]
    fn bad_input_is_a_format_error_not_a_panic() {
        for (bytes, expected) in [
            (&b"\x80\x02K"[..], "truncated"),
            (&b"\x80\x02t."[..], "no MARK"),
            (&b"\x80\x02."[..], "stack underflow"),
            (&b"\x80\x02h\x05."[..], "memo entry 5"),
            (&b"\x80\x02\x82\x01."[..], "EXT1"),
            (&b"\x80\x02\xff"[..], "0xff"),
            (&b"\x80\x02X\xff\xff\xff\xff"[..], "truncated"),
            (&b"\x80\x02K\x01K\x02K\x03s."[..], "non-dict"),
        ] {
            let reason = match parse(bytes) {
                Err(Fail::Format(m) | Fail::Truncated(m)) => m,
                other => panic!("{bytes:?} gave {other:?}"),
            };
            assert!(reason.contains(expected), "{bytes:?}: {reason}");
        }
    }

    #[test]
    fn legacy_storage_views_add_their_offset() {
        let global = |module: &str, name: &str| Value::Global {
            module: module.into(),
            name: name.into(),
        };
        let pid = Value::Tuple(vec![
            Value::Str("storage".into()),
            global("torch", "FloatStorage"),
            Value::Str("root".into()),
            Value::Str("cpu".into()),
            Value::Int(10),
            Value::Tuple(vec![
                Value::Str("view".into()),
                Value::Int(2),
                Value::Int(4),
            ]),
        ]);
        let tensor = Value::Call {
            func: Box::new(global("torch._utils", "_rebuild_tensor_v2")),
            args: Box::new(Value::Tuple(vec![
                Value::PersistentId(Box::new(pid)),
                Value::Int(1),
                Value::Tuple(vec![Value::Int(2)]),
                Value::Tuple(vec![Value::Int(1)]),
                Value::Bool(false),
                Value::None,
            ])),
        };
        let spec = parse_tensor("w", tensor).unwrap();
        assert_eq!((spec.key.as_str(), spec.offset), ("root", 3));
        assert_eq!(
            (spec.dtype, spec.shape, spec.stride),
            (DType::F32, vec![2], vec![1])
        );
    }

    #[test]
    fn gathers_strided_views() {
        // The GPU in a CUDA build on a machine with one, else the CPU.
        let device = Device::cuda_if_available(0).unwrap();
        let storage: Vec<u8> = (0..6u32).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let spec = TensorSpec {
            name: "t".into(),
            key: "0".into(),
            dtype: DType::F32,
            offset: 0,
            shape: vec![3, 2],
            stride: vec![1, 3],
        };
        let t = tensor_from_storage(&storage, &spec, &device).unwrap();
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
        );
        let too_far = TensorSpec { offset: 1, ..spec };
        let reason = match tensor_from_storage(&storage, &too_far, &device) {
            Err(Fail::Format(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(reason.contains("past the end"), "{reason}");
    }

    #[test]
    fn model_names() {
        for (file, name) in [
            ("vgg11_bn-6002323d.pth", "vgg11_bn"),
            ("googlenet-1378be20.pth", "googlenet"),
            ("/models/my_model.pth", "my_model"),
            ("resnet-abc123.pth", "resnet-abc123"),
            ("net-1234567g.pth", "net-1234567g"),
            ("-6002323d.pth", "-6002323d"),
            (
                "efficientnet_b0_rwightman-7f5810bcABCD.pth",
                "efficientnet_b0_rwightman",
            ),
        ] {
            assert_eq!(model_name_from_file(Path::new(file)), name, "{file}");
        }
    }
}
