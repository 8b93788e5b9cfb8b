//! Shared by the integration tests: where the PyTorch fixtures live, and comparisons.
#![allow(dead_code)] // each test binary uses its own part of this

pub mod binary;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::Tensor;

/// `$CNNSERVE_FIXTURES`, else `../shared/fixtures` beside the checkout. Missing fixtures fail the
/// test with instructions: a parity test that cannot find its reference must not pass quietly.
pub fn fixtures() -> PathBuf {
    let dir = match std::env::var_os("CNNSERVE_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    };
    assert!(
        dir.join("googlenet/weights.safetensors").is_file(),
        "PyTorch fixtures not found in {}: set CNNSERVE_FIXTURES to their folder (it holds \
         vgg11_bn/, googlenet/ and preprocess/). {MAKE_FIXTURES}",
        dir.display()
    );
    absolute(dir)
}

/// The folder without `..` or links: Chromium refuses to upload a file whose path names a parent
/// folder, and messages read better with one plain path.
fn absolute(dir: PathBuf) -> PathBuf {
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

/// How to make the fixtures and the data set elsewhere, for the messages of missing ones.
pub const MAKE_FIXTURES: &str = "Without our shared folder, make them with PyTorch: \
     `python3 scripts/make-fixtures.py DIR --data DATA_DIR` (pip install torch torchvision \
     safetensors pillow numpy scikit-image; about a minute), then set CNNSERVE_FIXTURES=DIR \
     CNNSERVE_DATA=DATA_DIR";

/// Where the real cat/dog set comes from, for the messages of a missing one.
pub const GET_CATANDDOG: &str = "The real set is the course's, chap06/data/catanddog in \
     https://github.com/gilbutITbook/080289: clone that repository and set CNNSERVE_DATA to its \
     chap06/data. Or make a stand-in with the same names and counts: \
     `python3 scripts/make-fixtures.py FIXTURES_DIR --data DATA_DIR`";

/// `$CNNSERVE_DATA`, else `../shared/data` beside the checkout: the folder holding `catanddog/`.
pub fn data_dir() -> PathBuf {
    let dir = match std::env::var_os("CNNSERVE_DATA") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
    };
    assert!(
        dir.join("catanddog/train").is_dir(),
        "the cat/dog data set is not in {}: set CNNSERVE_DATA to the folder holding catanddog/. \
         {GET_CATANDDOG}",
        dir.display()
    );
    absolute(dir)
}

/// vgg11_bn's weights ship gzipped (531 MB unpacked); unpack once into the target dir, where the
/// next build finds them, and check their digest: the one in `vgg11_bn/weights.safetensors.sha256`
/// where the fixtures have that file (`scripts/make-fixtures.py` writes it), else the one the shared
/// fixtures' README gives. The unpacked file is named after that digest, so fixtures from elsewhere
/// (another `CNNSERVE_FIXTURES`) never reuse another set's weights.
pub fn vgg11_bn_weights() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let fixtures = fixtures();
    let expected = vgg11_bn_digest(&fixtures);
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    let out = out_dir.join(format!("vgg11_bn-{}.safetensors", &expected[..16]));
    if out.is_file() {
        return out;
    }
    let gz = fixtures.join("vgg11_bn/weights.safetensors.gz");
    std::fs::create_dir_all(&out_dir).unwrap();
    let tmp = out_dir.join(format!("vgg11_bn.safetensors.tmp-{}", std::process::id()));
    {
        use sha2::Digest;
        let mut reader = flate2::read::GzDecoder::new(std::io::BufReader::new(
            std::fs::File::open(&gz).unwrap_or_else(|e| panic!("{}: {e}", gz.display())),
        ));
        let mut writer = std::io::BufWriter::new(std::fs::File::create(&tmp).unwrap());
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut reader, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            std::io::Write::write_all(&mut writer, &buf[..n]).unwrap();
        }
        std::io::Write::flush(&mut writer).unwrap();
        let digest = format!("{:x}", hasher.finalize());
        if !digest.starts_with(&expected) {
            let _ = std::fs::remove_file(&tmp);
            panic!(
                "unpacked {} has sha256 {digest}, expected one starting {expected}",
                gz.display()
            );
        }
    }
    std::fs::rename(&tmp, &out).unwrap();
    out
}

/// The digest (or its first 16 hex digits) that vgg11_bn's unpacked weights must have.
fn vgg11_bn_digest(fixtures: &Path) -> String {
    let file = fixtures.join("vgg11_bn/weights.safetensors.sha256");
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            let digest = text
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
            assert!(
                digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
                "{} holds no sha256: {text:?}",
                file.display()
            );
            digest
        }
        // The shared fixtures' README: "sha256 starts fad28f07ab23d268".
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "fad28f07ab23d268".to_string(),
        Err(e) => panic!("{}: {e}", file.display()),
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A small PNG of one of two visibly different kinds (warm stripes, a cool blob), with noise.
pub fn picture(class: usize, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let img = image::RgbImage::from_fn(96, 80, |x, y| {
        let noise: i32 = rng.random_range(-30..30);
        let v = |base: i32| (base + noise).clamp(0, 255) as u8;
        if class == 0 {
            image::Rgb([v(if (x / 8) % 2 == 0 { 220 } else { 120 }), v(90), v(40)])
        } else {
            let d = ((x as i32 - 48).pow(2) + (y as i32 - 40).pow(2)) as f32;
            image::Rgb([v(30), v(60), v(if d.sqrt() < 25.0 { 230 } else { 60 })])
        }
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// `train/{stripes,blobs}/*.png` (`per_class` each) and 2 test pictures per class, plus junk.
pub fn dataset_zip(per_class: usize) -> Vec<u8> {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    for (c, class) in ["stripes", "blobs"].iter().enumerate() {
        for i in 0..per_class {
            zip.start_file(format!("shapes/train/{class}/{i}.png"), options)
                .unwrap();
            zip.write_all(&picture(c, (i * 2 + c) as u64)).unwrap();
        }
        for i in 0..2 {
            zip.start_file(format!("shapes/test/{class}/t{i}.png"), options)
                .unwrap();
            zip.write_all(&picture(c, 1000 + (i * 2 + c) as u64))
                .unwrap();
        }
    }
    zip.start_file("__MACOSX/shapes/._junk", options).unwrap();
    zip.write_all(b"resource fork").unwrap();
    zip.start_file("shapes/train/stripes/broken.png", options)
        .unwrap();
    zip.write_all(&picture(0, 5)[..100]).unwrap();
    zip.finish().unwrap().into_inner()
}

/// A weights dir holding the fixture GoogLeNet (a link to it), as each server or replica of a test
/// gets its own.
pub fn googlenet_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        fixtures().join("googlenet/weights.safetensors"),
        dir.path().join("googlenet.safetensors"),
    )
    .unwrap();
    dir
}

/// `$CNNSERVE_TEST_POSTGRES`: a PostgreSQL server URL whose user may create databases
/// (`scripts/test.sh` starts one). Tests that need it fail without it, and say how to get one.
pub fn postgres_server() -> String {
    std::env::var("CNNSERVE_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "CNNSERVE_TEST_POSTGRES is not set: run the tests through scripts/test.sh, which \
             starts a throwaway PostgreSQL (Debian's postgresql package), or point it at a \
             server, e.g. postgres://postgres@127.0.0.1:5432/postgres"
        )
    })
}

/// A new, empty database on [`postgres_server`]: its URL.
pub fn fresh_postgres() -> String {
    let server = postgres_server();
    let name = format!("t_{}", uuid_like());
    let config: tokio_postgres::Config = server.parse().expect("CNNSERVE_TEST_POSTGRES is a URL");
    // A thread of its own: callers may be inside a runtime, which may not block or drop one.
    std::thread::scope(|s| {
        s.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (client, connection) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .unwrap_or_else(|e| panic!("cannot connect to {server}: {e}"));
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap();
            })
        })
        .join()
        .unwrap()
    });
    let (base, _) = server.rsplit_once('/').expect("a URL with a database");
    format!("{base}/{name}")
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{}_{}_{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The job database the job tests use: SQLite in `dir` (`None`, the default), or a fresh
/// PostgreSQL database when `CNNSERVE_TEST_JOB_DATABASE=postgres` (scripts/test.sh runs the job
/// tests both ways). A test's weights dir keeps its database across the test's restarts.
pub fn job_database(dir: &Path) -> Option<String> {
    match std::env::var("CNNSERVE_TEST_JOB_DATABASE").as_deref() {
        Ok("postgres") => {
            let remembered = dir.join(".test-database-url");
            if let Ok(url) = std::fs::read_to_string(&remembered) {
                return Some(url);
            }
            let url = fresh_postgres();
            std::fs::write(&remembered, &url).unwrap();
            Some(url)
        }
        Ok("sqlite") | Err(_) => None,
        Ok(other) => panic!("CNNSERVE_TEST_JOB_DATABASE must be sqlite or postgres, not {other}"),
    }
}

/// `$CNNSERVE_TEST_S3`: the endpoint of an S3-protocol server (`scripts/test.sh` starts moto's)
/// with a bucket `cnnserve-test`; the AWS variables the model store reads are set from it.
pub fn s3_endpoint() -> String {
    let endpoint = std::env::var("CNNSERVE_TEST_S3").unwrap_or_else(|_| {
        panic!(
            "CNNSERVE_TEST_S3 is not set: run the tests through scripts/test.sh, which starts an \
             S3-protocol server (moto) with a bucket cnnserve-test, or point it at one"
        )
    });
    for (k, v) in [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ] {
        if std::env::var_os(k).is_none() {
            // Test set-up: every test sets the same values.
            std::env::set_var(k, v);
        }
    }
    endpoint
}

/// A model store location under a fresh prefix of the test bucket.
pub fn fresh_s3_store() -> String {
    s3_endpoint();
    format!("s3://cnnserve-test/{}", uuid_like())
}
