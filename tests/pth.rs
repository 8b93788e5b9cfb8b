//! `.pth` reading, checked against torch's own output (the shared fixtures) and against files
//! built byte by byte here, since torch is not available to write dtypes and views the fixtures
//! lack.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use cnnserve::weights::pth::{model_name_from_file, read_pth};
use cnnserve::weights::WeightsError;

fn fixtures() -> PathBuf {
    let dir = std::env::var_os("CNNSERVE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    assert!(
        dir.join("googlenet").is_dir(),
        "reference fixtures not found: looked for {}/googlenet. Set CNNSERVE_FIXTURES to the \
         folder that holds googlenet/ (the shared fixtures made with PyTorch); without our shared \
         folder, make them with `python3 scripts/make-fixtures.py DIR` (PyTorch, torchvision)",
        dir.display()
    );
    dir
}

/// Element bit patterns, so that "equal" means bit-for-bit, and -0.0 differs from 0.0.
fn bits(t: &Tensor) -> Vec<u64> {
    let flat = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits().into())
            .collect(),
        DType::F64 => flat
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect(),
        DType::I64 => flat
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&v| v as u64)
            .collect(),
        DType::U8 => flat
            .to_vec1::<u8>()
            .unwrap()
            .iter()
            .map(|&v| v.into())
            .collect(),
        // Widening f16/bf16 to f32 is exact, so the f32 bits identify the value.
        DType::F16 | DType::BF16 => bits(&flat.to_dtype(DType::F32).unwrap()),
        other => panic!("no comparison written for {other:?}"),
    }
}

fn assert_same_tensors(pth: &[(String, Tensor)], reference: &HashMap<String, Tensor>) {
    let pth_names: BTreeSet<&str> = pth.iter().map(|(n, _)| n.as_str()).collect();
    let ref_names: BTreeSet<&str> = reference.keys().map(String::as_str).collect();
    assert_eq!(pth_names.len(), pth.len(), "duplicate tensor names");
    assert_eq!(
        pth_names,
        ref_names,
        "only in .pth: {:?}; only in safetensors: {:?}",
        pth_names.difference(&ref_names).collect::<Vec<_>>(),
        ref_names.difference(&pth_names).collect::<Vec<_>>()
    );
    for (name, tensor) in pth {
        let expected = &reference[name];
        assert_eq!(tensor.dtype(), expected.dtype(), "{name}: dtype");
        assert_eq!(tensor.dims(), expected.dims(), "{name}: shape");
        assert!(bits(tensor) == bits(expected), "{name}: values differ");
    }
}

#[test]
fn legacy_googlenet_equals_safetensors() {
    let dir = fixtures().join("googlenet");
    let pth = read_pth(&dir.join("weights.pth"), &Device::Cpu).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("weights.safetensors"), &Device::Cpu).unwrap();
    assert_same_tensors(&pth, &reference);
    let scalar = pth
        .iter()
        .find(|(n, _)| n == "conv1.bn.num_batches_tracked")
        .map(|(_, t)| t)
        .expect("BatchNorm counters load");
    assert_eq!((scalar.dtype(), scalar.dims()), (DType::I64, &[][..]));
    assert!(pth.iter().any(|(n, _)| n.starts_with("aux2.")));
}

#[test]
fn zip_subset_equals_safetensors_and_candles_reader() {
    let dir = fixtures().join("googlenet");
    let path = dir.join("subset_zip.pth");
    let pth = read_pth(&path, &Device::Cpu).unwrap();
    assert_eq!(pth.len(), 12);
    let reference =
        candle_core::safetensors::load(dir.join("subset_zip.safetensors"), &Device::Cpu).unwrap();
    assert_same_tensors(&pth, &reference);
    // candle reads this layout too; both readers must agree.
    let candle: HashMap<String, Tensor> = candle_core::pickle::read_all(&path)
        .unwrap()
        .into_iter()
        .collect();
    assert_same_tensors(&pth, &candle);
}

// ---------------------------------------------------------------------------------------------
// Files built by hand
// ---------------------------------------------------------------------------------------------

/// Just enough of a protocol-2 pickle writer to write what torch.save writes.
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Self {
        Pickle(vec![0x80, 2])
    }
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn int(&mut self, v: i64) -> &mut Self {
        if (0..256).contains(&v) {
            self.op(&[b'K', v as u8])
        } else if let Ok(v) = i32::try_from(v) {
            self.op(b"J").op(&v.to_le_bytes())
        } else {
            self.op(&[0x8a, 8]).op(&v.to_le_bytes())
        }
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.op(b"X")
            .op(&(s.len() as u32).to_le_bytes())
            .op(s.as_bytes())
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn ints(&mut self, values: &[usize]) -> &mut Self {
        self.op(b"(");
        for &v in values {
            self.int(v as i64);
        }
        self.op(b"t")
    }
    fn finish(&mut self) -> Vec<u8> {
        self.op(b".");
        std::mem::take(&mut self.0)
    }
}

struct Storage {
    key: &'static str,
    class: &'static str,
    elem_size: usize,
    bytes: Vec<u8>,
}

struct TensorRef {
    name: &'static str,
    storage: usize,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.
fn write_tensor(p: &mut Pickle, t: &TensorRef, storages: &[Storage], legacy: bool) {
    let s = &storages[t.storage];
    p.global("torch._utils", "_rebuild_tensor_v2").op(b"((");
    p.str("storage")
        .global("torch", s.class)
        .str(s.key)
        .str("cpu")
        .int((s.bytes.len() / s.elem_size) as i64);
    if legacy {
        p.op(b"N");
    }
    p.op(b"tQ").int(t.offset as i64);
    p.ints(&t.shape).ints(&t.stride);
    p.op(&[0x89]).global("collections", "OrderedDict").op(b")R");
    p.op(b"tR");
}

/// A state_dict as an OrderedDict, with the `_metadata` attribute real state_dicts carry,
/// optionally wrapped as `{wrapper: state_dict, "epoch": 3}`.
fn state_dict_pickle(
    tensors: &[TensorRef],
    storages: &[Storage],
    legacy: bool,
    wrapper: Option<&str>,
) -> Vec<u8> {
    let mut p = Pickle::new();
    if let Some(w) = wrapper {
        p.op(b"}(").str("epoch").int(3).str(w);
    }
    p.global("collections", "OrderedDict").op(b")Rq\x00(");
    for t in tensors {
        p.str(t.name);
        write_tensor(&mut p, t, storages, legacy);
    }
    p.op(b"u}").str("_metadata").op(b"}sb");
    if wrapper.is_some() {
        p.op(b"u");
    }
    p.finish()
}

fn legacy_bytes(tensors: &[TensorRef], storages: &[Storage], wrapper: Option<&str>) -> Vec<u8> {
    legacy_file(
        &state_dict_pickle(tensors, storages, true, wrapper),
        storages,
    )
}

/// A legacy torch.save stream around the given object pickle.
fn legacy_file(object_pickle: &[u8], storages: &[Storage]) -> Vec<u8> {
    let mut out = vec![0x80, 0x02, 0x8a, 0x0a];
    out.extend_from_slice(&0x1950a86a20f9469cfc6c_u128.to_le_bytes()[..10]);
    out.push(b'.');
    out.extend(Pickle::new().int(1001).finish());
    out.extend(
        Pickle::new()
            .op(b"}(")
            .str("protocol_version")
            .int(1001)
            .str("little_endian")
            .op(&[0x88])
            .str("type_sizes")
            .op(b"}(")
            .str("short")
            .int(2)
            .str("int")
            .int(4)
            .str("long")
            .int(4)
            .op(b"uu")
            .finish(),
    );
    out.extend_from_slice(object_pickle);
    let mut keys = Pickle::new();
    keys.op(b"](");
    for s in storages {
        keys.str(s.key);
    }
    out.extend(keys.op(b"e").finish());
    for s in storages {
        out.extend_from_slice(&((s.bytes.len() / s.elem_size) as i64).to_le_bytes());
        out.extend_from_slice(&s.bytes);
    }
    out
}

fn zip_bytes(tensors: &[TensorRef], storages: &[Storage], wrapper: Option<&str>) -> Vec<u8> {
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let mut entry = |name: &str, bytes: &[u8]| {
        zip.start_file(format!("archive/{name}"), options).unwrap();
        zip.write_all(bytes).unwrap();
    };
    entry(
        "data.pkl",
        &state_dict_pickle(tensors, storages, false, wrapper),
    );
    entry("byteorder", b"little");
    for s in storages {
        entry(&format!("data/{}", s.key), &s.bytes);
    }
    entry("version", b"3\n");
    zip.finish().unwrap().into_inner()
}

fn write_temp(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn le<T: Copy, const N: usize>(values: &[T], to_bytes: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| to_bytes(v)).collect()
}

/// f16 and bf16 storages, five tensors sharing one f32 storage at different offsets (one of them
/// a transposed view, one a scalar), an i64 scalar and an f64 vector.
fn sample() -> (Vec<TensorRef>, Vec<Storage>) {
    let storages = vec![
        Storage {
            key: "h",
            class: "HalfStorage",
            elem_size: 2,
            // 1.0, -2.0, 0.5, 65504 (the largest f16)
            bytes: le(&[0x3C00u16, 0xC000, 0x3800, 0x7BFF], u16::to_le_bytes),
        },
        Storage {
            key: "b",
            class: "BFloat16Storage",
            elem_size: 2,
            // 1.0, -2.0, 0.5, 3.140625
            bytes: le(&[0x3F80u16, 0xC000, 0x3F00, 0x4049], u16::to_le_bytes),
        },
        Storage {
            key: "s",
            class: "FloatStorage",
            elem_size: 4,
            bytes: le(
                &[0f32, 1., 2., 3., 4., 5., 6., 7., 8., 9.],
                f32::to_le_bytes,
            ),
        },
        Storage {
            key: "n",
            class: "LongStorage",
            elem_size: 8,
            bytes: le(&[-7i64], i64::to_le_bytes),
        },
        Storage {
            key: "d",
            class: "DoubleStorage",
            elem_size: 8,
            bytes: le(&[1.5f64, -0.25], f64::to_le_bytes),
        },
    ];
    let t = |name, storage, offset, shape: &[usize], stride: &[usize]| TensorRef {
        name,
        storage,
        offset,
        shape: shape.to_vec(),
        stride: stride.to_vec(),
    };
    let tensors = vec![
        t("half", 0, 0, &[2, 2], &[2, 1]),
        t("bf16", 1, 0, &[4], &[1]),
        t("shared.b", 2, 4, &[3], &[1]),
        t("shared.a", 2, 0, &[2, 2], &[2, 1]),
        t("shared.transposed", 2, 0, &[2, 2], &[1, 2]),
        t("shared.scalar", 2, 9, &[], &[]),
        t("bn.num_batches_tracked", 3, 0, &[], &[]),
        t("double", 4, 0, &[2], &[1]),
    ];
    (tensors, storages)
}

fn check_sample(loaded: &[(String, Tensor)], what: &str) {
    let names: Vec<&str> = loaded.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "half",
            "bf16",
            "shared.b",
            "shared.a",
            "shared.transposed",
            "shared.scalar",
            "bn.num_batches_tracked",
            "double"
        ],
        "{what}: names in file order"
    );
    let get = |name: &str| &loaded.iter().find(|(n, _)| n == name).unwrap().1;
    let f32s = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };

    let half = get("half");
    assert_eq!(
        (half.dtype(), half.dims()),
        (DType::F16, &[2, 2][..]),
        "{what}"
    );
    assert_eq!(f32s(half), [1.0, -2.0, 0.5, 65504.0], "{what}: f16 values");
    let bf16 = get("bf16");
    assert_eq!(
        (bf16.dtype(), bf16.dims()),
        (DType::BF16, &[4][..]),
        "{what}"
    );
    assert_eq!(
        f32s(bf16),
        [1.0, -2.0, 0.5, 3.140625],
        "{what}: bf16 values"
    );

    assert_eq!(
        get("shared.a").to_vec2::<f32>().unwrap(),
        [[0., 1.], [2., 3.]],
        "{what}"
    );
    assert_eq!(
        get("shared.b").to_vec1::<f32>().unwrap(),
        [4., 5., 6.],
        "{what}: offset 4"
    );
    assert_eq!(
        get("shared.transposed").to_vec2::<f32>().unwrap(),
        [[0., 2.], [1., 3.]],
        "{what}: strides (1, 2)"
    );
    let scalar = get("shared.scalar");
    assert_eq!(scalar.dims(), &[] as &[usize], "{what}");
    assert_eq!(
        scalar.to_scalar::<f32>().unwrap(),
        9.0,
        "{what}: scalar at offset 9"
    );

    let counter = get("bn.num_batches_tracked");
    assert_eq!(
        (counter.dtype(), counter.dims()),
        (DType::I64, &[][..]),
        "{what}"
    );
    assert_eq!(counter.to_scalar::<i64>().unwrap(), -7, "{what}");
    let double = get("double");
    assert_eq!(double.dtype(), DType::F64, "{what}");
    assert_eq!(double.to_vec1::<f64>().unwrap(), [1.5, -0.25], "{what}");
}

#[test]
fn hand_built_files_half_bfloat16_offsets_and_views() {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, storages) = sample();
    let legacy = write_temp(&dir, "legacy.pth", &legacy_bytes(&tensors, &storages, None));
    check_sample(&read_pth(&legacy, &Device::Cpu).unwrap(), "legacy");
    // The name says nothing: the layout is found from the content.
    let zip = write_temp(
        &dir,
        "legacy.pth.zip-ish",
        &zip_bytes(&tensors, &storages, None),
    );
    check_sample(&read_pth(&zip, &Device::Cpu).unwrap(), "zip");
}

#[test]
fn unwraps_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, storages) = sample();
    for (i, wrapper) in ["state_dict", "model", "model_state_dict"]
        .iter()
        .enumerate()
    {
        let bytes = legacy_bytes(&tensors, &storages, Some(wrapper));
        let path = write_temp(&dir, &format!("legacy{i}.pth"), &bytes);
        check_sample(&read_pth(&path, &Device::Cpu).unwrap(), wrapper);
        let bytes = zip_bytes(&tensors, &storages, Some(wrapper));
        let path = write_temp(&dir, &format!("zip{i}.pth"), &bytes);
        check_sample(&read_pth(&path, &Device::Cpu).unwrap(), wrapper);
    }
}

// ---------------------------------------------------------------------------------------------
// Damaged and unsupported files
// ---------------------------------------------------------------------------------------------

fn format_reason(path: &Path) -> String {
    match read_pth(path, &Device::Cpu) {
        Err(WeightsError::Format { path: p, reason }) => {
            assert_eq!(p, path);
            reason
        }
        Err(other) => panic!("{}: expected a Format error, got {other:?}", path.display()),
        Ok(t) => panic!(
            "{}: read {} tensors from a bad file",
            path.display(),
            t.len()
        ),
    }
}

#[test]
fn truncated_fixtures_are_format_errors() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("googlenet");
    let legacy = std::fs::read(src.join("weights.pth")).unwrap();
    let n = legacy.len();
    // Inside each of the five pickles, at the start of the data, inside a storage header,
    // inside the data and one byte short.
    for cut in [
        0,
        3,
        10,
        18,
        100,
        1_000,
        54_900,
        54_926,
        54_930,
        n / 2,
        n - 1,
    ] {
        let path = write_temp(&dir, "cut.pth", &legacy[..cut]);
        let reason = format_reason(&path);
        let expected = if cut == 0 { "empty" } else { "truncated" };
        assert!(reason.contains(expected), "cut at {cut}: {reason}");
    }
    let zip = std::fs::read(src.join("subset_zip.pth")).unwrap();
    for cut in [10, zip.len() / 2, zip.len() - 1] {
        let path = write_temp(&dir, "cut_zip.pth", &zip[..cut]);
        let reason = format_reason(&path);
        assert!(reason.contains("zip"), "zip cut at {cut}: {reason}");
    }
}

#[test]
fn random_and_foreign_files_are_format_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = 0x2545F4914F6CDD1Du64;
    let random: Vec<u8> = (0..100_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let reason = format_reason(&write_temp(&dir, "random.pth", &random));
    assert!(reason.contains("not a PyTorch .pth file"), "{reason}");
    // Random bytes behind a legacy header, and behind a zip header.
    for (i, head) in [&[0x80, 0x02, 0x8a, 0x0a][..], b"\x80\x02", b"PK\x03\x04"]
        .iter()
        .enumerate()
    {
        let mut bytes = head.to_vec();
        bytes.extend_from_slice(&random);
        format_reason(&write_temp(&dir, &format!("garbage{i}.pth"), &bytes));
    }
    let reason = format_reason(&write_temp(&dir, "text.pth", b"hello, I am not a model\n"));
    assert!(reason.contains("not a PyTorch .pth file"), "{reason}");

    // A plain pickle of something else (the list [1]) is not a torch file either.
    let reason = format_reason(&write_temp(&dir, "list.pth", b"\x80\x02]K\x01a."));
    assert!(reason.contains("not a PyTorch .pth file"), "{reason}");

    // Missing files are I/O errors, not format errors.
    match read_pth(&dir.path().join("absent.pth"), &Device::Cpu) {
        Err(WeightsError::Io { .. }) => {}
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn unsupported_content_is_a_format_error() {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, mut storages) = sample();

    // A storage type torch never had.
    storages[3].class = "WeirdStorage";
    let bytes = legacy_bytes(&tensors, &storages, None);
    let reason = format_reason(&write_temp(&dir, "weird.pth", &bytes));
    assert!(reason.contains("torch.WeirdStorage"), "{reason}");

    // One torch has but candle lacks.
    storages[3].class = "ComplexFloatStorage";
    let bytes = zip_bytes(&tensors, &storages, None);
    let reason = format_reason(&write_temp(&dir, "complex.pth", &bytes));
    assert!(
        reason.contains("bn.num_batches_tracked") && reason.contains("ComplexFloat"),
        "{reason}"
    );

    // A tensor that reaches past its storage.
    let (mut tensors, storages) = sample();
    tensors[2].offset = 8;
    let bytes = legacy_bytes(&tensors, &storages, None);
    let reason = format_reason(&write_temp(&dir, "overrun.pth", &bytes));
    assert!(
        reason.contains("shared.b") && reason.contains("past the end"),
        "{reason}"
    );

    // A pickle opcode the reader does not implement (EXT1, the copyreg extension registry),
    // right after the state_dict pickle's PROTO.
    let (tensors, storages) = sample();
    let mut sd = state_dict_pickle(&tensors, &storages, true, None);
    sd.splice(2..2, [0x82, 0x01]);
    let reason = format_reason(&write_temp(&dir, "ext1.pth", &legacy_file(&sd, &storages)));
    assert!(reason.contains("EXT1"), "{reason}");

    // A dict with no tensors, and a pickled whole model.
    let mut p = Pickle::new();
    let sd = p.op(b"}(").str("epoch").int(3).op(b"u").finish();
    let reason = format_reason(&write_temp(&dir, "epoch.pth", &legacy_file(&sd, &[])));
    assert!(
        reason.contains("without tensors") && reason.contains("\"epoch\""),
        "{reason}"
    );
    let mut p = Pickle::new();
    let model = p
        .global("torchvision.models.googlenet", "GoogLeNet")
        .op(b")")
        .op(&[0x81])
        .op(b"}b")
        .finish();
    let reason = format_reason(&write_temp(&dir, "model.pth", &legacy_file(&model, &[])));
    assert!(
        reason.contains("torchvision.models.googlenet.GoogLeNet"),
        "{reason}"
    );
}

#[test]
fn model_names_drop_the_hash_suffix() {
    for (file, name) in [
        ("vgg11_bn-6002323d.pth", "vgg11_bn"),
        ("googlenet-1378be20.pth", "googlenet"),
        ("my_model.pth", "my_model"),
        ("/somewhere/else/vgg11_bn-6002323d.pth", "vgg11_bn"),
        ("resnet18-f37072fd.pth", "resnet18"),
        ("model-v2.pth", "model-v2"),
        ("net-1234567.pth", "net-1234567"),
        ("net-123456789abcdef0.pth", "net"),
        ("net-12345z78.pth", "net-12345z78"),
    ] {
        assert_eq!(model_name_from_file(Path::new(file)), name, "{file}");
    }
}
