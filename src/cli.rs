//! The command line: flags are documented here, once, and `--help` prints them.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand};

use crate::jobs::Role;
use crate::models::{Arch, Precision};
use crate::weights;

/// A parser for a type of the lower layers (which know no clap) from its names: `--help` and
/// clap's errors list them.
fn named<T>(
    names: impl IntoIterator<Item = &'static str>,
) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: std::str::FromStr + Clone + Send + Sync + 'static,
    T::Err: std::fmt::Debug,
{
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(names)
        .map(|name| name.parse::<T>().expect("every listed name parses"))
}

fn arch_parser() -> impl clap::builder::TypedValueParser<Value = Arch> {
    named(Arch::ALL.map(Arch::name))
}

#[derive(Debug, Parser)]
#[command(
    name = "cnnserve",
    version,
    about = "Serve and fine-tune torchvision image classifiers",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// With no subcommand, cnnserve serves: these are `serve`'s flags.
    #[command(flatten)]
    pub serve: ServeArgs,

    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true, env = "CNNSERVE_JSON_LOGS")]
    pub json_logs: bool,
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Serve the models of a weights dir over HTTP (what a bare `cnnserve` does).
    Serve(ServeArgs),
    /// Run a model on already-normalized inputs and save the logits: the check of a conversion
    /// against PyTorch.
    Forward(ForwardArgs),
    /// Classify image files and print the most probable classes.
    Predict(PredictArgs),
    /// Train a new classifier head on an ImageFolder data set (folder or zip) in the terminal.
    Finetune(FinetuneArgs),
    /// Time the forward pass on random inputs: one JSON line per batch size (load time excluded).
    Bench(BenchArgs),
    /// Exit 0 when a server answers `/ping`, 1 otherwise: a container's HEALTHCHECK.
    Healthcheck(HealthcheckArgs),
    /// Download torchvision's official weights into the weights dir, check them against the
    /// sha256 prefix in their file name, and keep them as `<arch>.safetensors`.
    FetchWeights(FetchWeightsArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "CNNSERVE_ADDR")]
    pub addr: std::net::SocketAddr,
    /// Address of the gRPC server (the Open Inference Protocol, h2c); empty turns it off.
    #[arg(long, default_value = "127.0.0.1:8081", env = "CNNSERVE_GRPC_ADDR", value_parser = parse_grpc_addr)]
    pub grpc_addr: GrpcAddr,
    /// Folder of models: every `<name>.safetensors` / `<name>.pth` is served as model `<name>`.
    #[arg(long, default_value = "weights", env = "CNNSERVE_WEIGHTS_DIR")]
    pub weights_dir: PathBuf,
    /// Model used when a request names none; downloaded from torchvision when missing (unless --offline).
    #[arg(long, default_value = "vgg11_bn", env = "CNNSERVE_DEFAULT_MODEL")]
    pub default_model: String,
    /// `cpu`, or `cuda` / `cuda:N` in builds with the `cuda` feature.
    #[arg(long, default_value = "cpu", env = "CNNSERVE_DEVICE")]
    pub device: String,
    /// Most images in one forward pass.
    #[arg(long, default_value_t = 16, env = "CNNSERVE_MAX_BATCH_SIZE", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch_size: u32,
    /// Longest wait, in milliseconds, for more images to join a batch.
    #[arg(long, default_value_t = 5, env = "CNNSERVE_MAX_BATCH_DELAY_MS")]
    pub max_batch_delay_ms: u64,
    /// Requests in flight at once; one more is answered 429 at once.
    #[arg(long, default_value_t = 64, env = "CNNSERVE_MAX_CONCURRENT_REQUESTS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,
    /// Largest request body for /predict, e.g. 20MB, 512KiB or a number of bytes.
    #[arg(long, default_value = "20MB", env = "CNNSERVE_PAYLOAD_LIMIT", value_parser = parse_size)]
    pub payload_limit: u64,
    /// Largest image, in pixels (width × height), read from the header before decoding.
    #[arg(long, default_value_t = crate::preprocess::DEFAULT_MAX_PIXELS, env = "CNNSERVE_MAX_PIXELS")]
    pub max_pixels: u64,
    /// Pixels being decoded at once, over all requests (never below --max-pixels): a request
    /// that would go over is answered 429. Decoding takes ~3.5 bytes a pixel, so the default
    /// (200 megapixels) bounds it near 700 MB.
    #[arg(long, default_value_t = crate::engine::DEFAULT_PIXEL_BUDGET, env = "CNNSERVE_MAX_INFLIGHT_PIXELS")]
    pub max_inflight_pixels: u64,
    /// Seconds a client may take to send its request headers before the connection is closed.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600), env = "CNNSERVE_HEADER_TIMEOUT")]
    pub header_timeout: u64,
    /// Seconds a request body may send nothing (uploads that keep sending are never cut).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600), env = "CNNSERVE_BODY_TIMEOUT")]
    pub body_timeout: u64,
    /// Never download: serve whatever the weights dir holds.
    #[arg(long, env = "CNNSERVE_OFFLINE")]
    pub offline: bool,
    /// Where a missing default model's torchvision weights are downloaded from (as
    /// `cnnserve fetch-weights` does): a base URL holding torchvision's file names, or one
    /// `<arch>-<sha256 prefix>.pth` URL.
    #[arg(long, default_value = weights::fetch::TORCHVISION_URL, env = "CNNSERVE_WEIGHTS_URL")]
    pub weights_url: String,
    /// Largest data set zip accepted by POST /finetune (streamed to disk as it arrives).
    #[arg(long, default_value = "1GiB", env = "CNNSERVE_MAX_DATASET_BYTES", value_parser = parse_size)]
    pub max_dataset_bytes: u64,
    /// Fine-tuning jobs that train at the same time; later ones wait in the queue.
    #[arg(long, default_value_t = 1, env = "CNNSERVE_MAX_CONCURRENT_JOBS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_jobs: u32,
    /// Threads one training may use (default: half the cores), so /predict stays responsive.
    #[arg(long, env = "CNNSERVE_TRAINING_THREADS")]
    pub training_threads: Option<usize>,
    /// Where jobs and the model registry live: sqlite:<path> (default: jobs.sqlite in the weights
    /// dir; one process) or postgres://user:password@host:port/database (replicas share it).
    #[arg(long, env = "CNNSERVE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Where fine-tuned heads, their metadata and uploads live: a folder (default: the weights
    /// dir) or s3://bucket/prefix (endpoint, region and credentials from AWS_ENDPOINT_URL,
    /// AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
    #[arg(long, env = "CNNSERVE_MODEL_STORE")]
    pub model_store: Option<String>,
    /// all: serve and train; api: serve and queue jobs, never train; worker: train, and answer
    /// only /health, /ping and /metrics. api and worker need a shared --database-url.
    #[arg(long, default_value_t = Role::All, env = "CNNSERVE_ROLE", value_parser = named::<Role>(Role::ALL.map(Role::name)))]
    pub role: Role,
    /// This replica's name in job claims (default: hostname:port); unique among replicas.
    #[arg(long, env = "CNNSERVE_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Seconds a replica's claim on a running job holds without a heartbeat; a replica that
    /// dies loses its job (failed) this long after.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600), env = "CNNSERVE_JOB_LEASE")]
    pub job_lease: u64,
    /// Arithmetic of the forward passes: f32 (exact; the CPU's only one in this build), or
    /// tf32 / bf16 / f16 where the device has them. A combination the device lacks stops the
    /// start with a message.
    #[arg(long, default_value_t = Precision::F32, env = "CNNSERVE_DTYPE", value_parser = named::<Precision>(Precision::ALL.map(Precision::name)))]
    pub dtype: Precision,
    #[command(flatten)]
    pub access: AccessArgs,
}

/// Who may call the API.
#[derive(Debug, Clone, Default, Args)]
pub struct AccessArgs {
    /// Require `Authorization: Bearer <KEY>` on every request but the page, its docs, health,
    /// ping and metrics. Prefer --api-key-file or the variable: a flag shows in `ps`.
    #[arg(
        long,
        env = "CNNSERVE_API_KEY",
        hide_env_values = true,
        conflicts_with = "api_key_file"
    )]
    pub api_key: Option<String>,
    /// As --api-key, with the key read from a file (surrounding whitespace ignored).
    #[arg(long, env = "CNNSERVE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// An origin whose pages may call the API from a browser (CORS), e.g.
    /// https://app.example.com; repeat for more, or `*` for any. Without it, none may.
    #[arg(long = "cors-allow-origin", env = "CNNSERVE_CORS_ALLOW_ORIGIN", value_delimiter = ',', value_parser = crate::server::auth::parse_origin)]
    pub cors_allow_origins: Vec<axum::http::HeaderValue>,
}

impl AccessArgs {
    /// The server's access settings; a key file that cannot be read or an empty key is an error.
    pub fn access(&self) -> anyhow::Result<crate::server::auth::Access> {
        use crate::server::auth::ApiKey;
        let api_key = match (&self.api_key, &self.api_key_file) {
            (Some(key), _) => {
                Some(ApiKey::new(key).map_err(|e| anyhow::anyhow!("--api-key: {e}"))?)
            }
            (None, Some(file)) => {
                let key = std::fs::read_to_string(file).map_err(|e| {
                    anyhow::anyhow!("cannot read the API key file {}: {e}", file.display())
                })?;
                Some(
                    ApiKey::new(&key)
                        .map_err(|e| anyhow::anyhow!("the API key file {}: {e}", file.display()))?,
                )
            }
            (None, None) => None,
        };
        Ok(crate::server::auth::Access {
            api_key,
            cors_allow_origins: self.cors_allow_origins.clone(),
        })
    }
}

/// `--grpc-addr`: where the gRPC server listens, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcAddr(pub Option<std::net::SocketAddr>);

/// An address such as `127.0.0.1:8081`, or empty for none.
pub fn parse_grpc_addr(s: &str) -> Result<GrpcAddr, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(GrpcAddr(None));
    }
    s.parse().map(|a| GrpcAddr(Some(a))).map_err(|e| {
        format!("`{s}` is not an address such as 0.0.0.0:8081 ({e}); an empty one turns gRPC off")
    })
}

/// `20MB`, `1GiB`, `512k`, `1000`: decimal and binary units, bytes when bare.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size: write e.g. 20MB, 512KiB or 1000"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit `{other}` in `{s}`")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// Architecture of the weights (taken from the metadata for a fine-tuned head, or from a
    /// torchvision file name such as vgg11_bn-6002323d.pth).
    #[arg(long, env = "CNNSERVE_MODEL", value_parser = arch_parser())]
    pub model: Option<Arch>,
    /// Weights file: safetensors or torch .pth (zip or legacy) with torchvision key names, or a
    /// fine-tuned head (its base model must sit in the same folder).
    #[arg(long)]
    pub weights: PathBuf,
    /// safetensors file whose 4-D f32 tensors [N, 3, H, W] are run; other tensors are skipped.
    #[arg(long)]
    pub input: PathBuf,
    /// safetensors file to write: logits [N, classes] under each input tensor's name.
    #[arg(long)]
    pub output: PathBuf,
    /// Device to run on: `cpu`, or `cuda` / `cuda:N` in builds with the `cuda` feature.
    #[arg(long, default_value = "cpu", env = "CNNSERVE_DEVICE")]
    pub device: String,
    /// Images per forward pass; larger inputs are split into chunks of this size.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,
    /// Arithmetic of the forward pass, as for `serve`: how far from f32 another dtype lands.
    #[arg(long, default_value_t = Precision::F32, env = "CNNSERVE_DTYPE", value_parser = named::<Precision>(Precision::ALL.map(Precision::name)))]
    pub dtype: Precision,
}

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Architecture of the weights (optional for fine-tuned heads and torchvision file names).
    #[arg(long, env = "CNNSERVE_MODEL", value_parser = arch_parser())]
    pub model: Option<Arch>,
    /// Weights file, as for `forward`.
    #[arg(long)]
    pub weights: PathBuf,
    /// Classes to print per image; 0 prints all.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Preprocessing; defaults to the model's own (imagenet for torchvision weights, the training
    /// transform for a fine-tuned head).
    #[arg(long)]
    pub transform: Option<crate::preprocess::Transform>,
    /// One JSON object per line: {"file", "predictions": [{"index", "label", "probability"}]}.
    #[arg(long)]
    pub json: bool,
    /// Largest image accepted, in pixels.
    #[arg(long, default_value_t = crate::preprocess::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Device, as for `serve`.
    #[arg(long, default_value = "cpu", env = "CNNSERVE_DEVICE")]
    pub device: String,
    /// Image files, decoded by content (a BMP named .jpg is fine).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// ImageFolder data set: a folder or a zip of `<class>/<image>` or `train/<class>/…` (+ `test/<class>/…`).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Architecture of the pretrained model to build on.
    #[arg(long, value_parser = arch_parser())]
    pub base_model: Arch,
    /// Its torchvision weights (safetensors or .pth).
    #[arg(long)]
    pub weights: PathBuf,
    /// Name of the new model (default `<base>-ft-<random>`).
    #[arg(long)]
    pub name: Option<String>,
    /// Where `<name>.safetensors` and `<name>.json` are written.
    #[arg(long, default_value = "weights", env = "CNNSERVE_WEIGHTS_DIR")]
    pub weights_dir: PathBuf,
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Share of each class held out for validation.
    #[arg(long, default_value_t = 0.1)]
    pub valid_ratio: f64,
    /// RandomRotation(5) + RandomHorizontalFlip(0.5) on training images.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub augment: bool,
    /// `head` (the last Linear) or `classifier` (VGG's three Linear layers).
    #[arg(long, default_value = "head", value_parser = named::<crate::models::TrainLayers>(crate::models::TrainLayers::ALL.map(|t| t.name())))]
    pub train_layers: crate::models::TrainLayers,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Largest image accepted, in pixels; larger ones are skipped and listed.
    #[arg(long, default_value_t = crate::preprocess::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Device, as for `serve`.
    #[arg(long, default_value = "cpu", env = "CNNSERVE_DEVICE")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The server's liveness URL.
    #[arg(
        long,
        default_value = "http://127.0.0.1:8080/ping",
        env = "CNNSERVE_HEALTHCHECK_URL"
    )]
    pub url: String,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct FetchWeightsArgs {
    /// What to fetch: `all` (vgg11_bn and googlenet) or architectures (vgg11, vgg11_bn, …,
    /// vgg19_bn, googlenet).
    #[arg(default_value = "all")]
    pub models: Vec<String>,
    /// Folder the safetensors files are written to (the server's weights dir).
    #[arg(long, default_value = "weights", env = "CNNSERVE_WEIGHTS_DIR")]
    pub weights_dir: PathBuf,
    /// Where torchvision's files are: a base URL holding them under torchvision's names, or the
    /// URL of one `<arch>-<sha256 prefix>.pth` file (a mirror) when fetching one architecture.
    #[arg(long, visible_alias = "url", default_value = weights::fetch::TORCHVISION_URL, env = "CNNSERVE_WEIGHTS_URL")]
    pub weights_url: String,
}

/// `cnnserve fetch-weights`.
pub fn fetch_weights(args: &FetchWeightsArgs) -> anyhow::Result<()> {
    let mut archs = Vec::new();
    for name in &args.models {
        let more = if name == "all" {
            vec![Arch::Vgg11Bn, Arch::Googlenet]
        } else {
            vec![name
                .parse::<Arch>()
                .map_err(|e| anyhow::anyhow!("{e}, or all"))?]
        };
        for arch in more {
            if !archs.contains(&arch) {
                archs.push(arch);
            }
        }
    }
    if archs.len() > 1 && args.weights_url.ends_with(".pth") {
        anyhow::bail!(
            "{} is one file: name the one architecture it holds (e.g. `cnnserve fetch-weights googlenet --url …`)",
            args.weights_url
        );
    }
    let dir = &args.weights_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the weights dir {}", dir.display()))?;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    for arch in archs {
        let target = weights::fetch::target_file(dir, arch);
        if target.is_file() {
            println!("{arch}: {} is already there", target.display());
            continue;
        }
        let path = weights::fetch::fetch_torchvision(arch, dir, &args.weights_url, progress)
            .with_context(|| format!("cannot fetch {arch}"))?;
        // A file whose hash matched its name but that is not `arch` is not kept.
        let identity = match weights::load_network_with_identity(arch, &path, &Device::Cpu) {
            Ok((_, identity)) => identity,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                anyhow::bail!("the file fetched for {arch} is not {arch}'s weights: {e}");
            }
        };
        println!(
            "{arch}: wrote {} (tensors sha256 {})",
            path.display(),
            &identity.tensors_sha256()?[..16]
        );
        let pth = dir.join(weights::fetch::torchvision_file(arch));
        if pth.is_file() {
            println!(
                "note: {} is served as `{arch}` now instead of {}; heads trained on either find it. You may delete the .pth.",
                path.display(),
                pth.display()
            );
        }
    }
    Ok(())
}

/// `cnnserve healthcheck`: Ok when `url` answers 200.
pub fn healthcheck(args: &HealthcheckArgs) -> anyhow::Result<()> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(args.timeout)))
        .build()
        .new_agent();
    match agent.get(&args.url).call() {
        Ok(_) => Ok(()),
        Err(e) => anyhow::bail!("{} did not answer: {e}", args.url),
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Architecture of the weights (optional for torchvision file names and fine-tuned heads).
    #[arg(long, env = "CNNSERVE_MODEL", value_parser = arch_parser())]
    pub model: Option<Arch>,
    /// Weights file, as for `forward`.
    #[arg(long)]
    pub weights: PathBuf,
    /// Batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8", value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: Vec<u32>,
    /// Input height and width.
    #[arg(long, default_value_t = 224, value_parser = clap::value_parser!(u32).range(32..=4096))]
    pub size: u32,
    /// Timed forward passes per batch size, after the warm-up.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub iters: u32,
    /// Untimed forward passes before the timed ones.
    #[arg(long, default_value_t = 3)]
    pub warmup: u32,
    /// Arithmetic of the forward pass.
    #[arg(long, default_value_t = Precision::F32, env = "CNNSERVE_DTYPE", value_parser = named::<Precision>(Precision::ALL.map(Precision::name)))]
    pub dtype: Precision,
    /// Device, as for `serve`.
    #[arg(long, default_value = "cpu", env = "CNNSERVE_DEVICE")]
    pub device: String,
}

/// The model of a command that runs one: `--weights`, `--model`, `--device` and `--dtype`.
fn open_model(
    weights: &std::path::Path,
    model: Option<Arch>,
    device: &str,
    dtype: Precision,
) -> anyhow::Result<crate::engine::Classifier> {
    let device = parse_device(device)?;
    dtype.check(&device).map_err(anyhow::Error::msg)?;
    dtype.enable();
    crate::engine::classifier::open(weights, model, &device, dtype.dtype())
        .with_context(|| format!("loading {}", weights.display()))
}

/// `cnnserve bench`: median, min and max milliseconds per forward pass of a batch.
pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    let classifier = open_model(&args.weights, args.model, &args.device, args.dtype)?;
    let size = args.size as usize;
    for &batch in &args.batch {
        let batch = batch as usize;
        let xs = Tensor::randn(0f32, 1.0, (batch, 3, size, size), classifier.device())?;
        // Reading the logits back waits for the device, so each timing covers the whole pass.
        let run = || -> anyhow::Result<()> {
            classifier
                .logits(&xs)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            Ok(())
        };
        for _ in 0..args.warmup {
            run()?;
        }
        let mut ms = Vec::with_capacity(args.iters as usize);
        for _ in 0..args.iters {
            let start = std::time::Instant::now();
            run()?;
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        let median = if ms.len() % 2 == 1 {
            ms[ms.len() / 2]
        } else {
            (ms[ms.len() / 2 - 1] + ms[ms.len() / 2]) / 2.0
        };
        let round = |x: f64| (x * 100.0).round() / 100.0;
        let line = serde_json::json!({
            "model": classifier.arch.name(),
            "batch": batch,
            "size": size,
            "dtype": args.dtype.name(),
            "device": args.device,
            "isa": if classifier.device().is_cpu() { crate::models::cpu::Isa::best().name() } else { "-" },
            "threads": rayon::current_num_threads(),
            "iters": args.iters,
            "ms_median": round(median),
            "ms_min": round(ms[0]),
            "ms_max": round(ms[ms.len() - 1]),
            "images_per_s": round(batch as f64 * 1e3 / median),
        });
        println!("{line}");
    }
    Ok(())
}

/// A fresh model name: `<base>-ft-<6 hex digits>`.
pub fn default_model_name(base: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{base}-ft-{}", &id[..6])
}

pub fn finetune(args: &FinetuneArgs) -> anyhow::Result<()> {
    use crate::train::{self, Event, Params};
    let params = Params {
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        valid_ratio: args.valid_ratio,
        augment: args.augment,
        train_layers: args.train_layers,
        seed: args.seed,
    };
    train::TrainError::check(args.base_model, &params)?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| default_model_name(args.base_model.name()));
    train::output::check_name(&name).map_err(anyhow::Error::msg)?;
    let device = parse_device(&args.device)?;

    eprintln!("reading {}", args.dataset.display());
    let limits = train::DatasetLimits {
        max_pixels: args.max_pixels,
        ..train::DatasetLimits::default()
    };
    let data = train::dataset::load(&args.dataset, &limits, (256, 256))?;
    eprintln!(
        "{} classes ({}), {} training and {} test images; {} files skipped, {} ignored",
        data.classes.len(),
        data.classes.join(", "),
        data.train.len(),
        data.test.len(),
        data.skipped.len(),
        data.ignored
    );
    for s in &data.skipped {
        eprintln!("  skipped {}: {}", s.file, s.reason);
    }
    let (network, base_identity) =
        weights::load_network_with_identity(args.base_model, &args.weights, &device)
            .with_context(|| format!("loading {}", args.weights.display()))?;

    let bar = indicatif::ProgressBar::new(params.epochs as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "epoch {msg} [{bar:30}] {pos}/{len} steps, {per_sec}, eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    // The table goes to stdout even when the bar is hidden (stderr not a terminal).
    println!(
        "{:>5}  {:>10}  {:>9}  {:>10}  {:>9}",
        "epoch", "train_loss", "train_acc", "valid_loss", "valid_acc"
    );
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let options = train::fit::FitOptions::default();
    let trained = train::fit::fit_with(
        &network,
        args.base_model,
        &data,
        &params,
        &options,
        &mut |event| match event {
            Event::Progress(p) => {
                bar.set_length(p.total as u64);
                bar.set_position(p.done as u64);
                bar.set_message(match p.phase {
                    train::fit::Phase::Training => format!("epoch {}/{}", p.epoch, p.epochs),
                    phase => format!("{phase:?}").to_lowercase(),
                });
            }
            Event::Epoch(m) => bar.suspend(|| {
                println!(
                    "{:>5}  {:>10.4}  {:>9.4}  {:>10.4}  {:>9.4}",
                    m.epoch, m.train_loss, m.train_acc, m.valid_loss, m.valid_acc
                )
            }),
        },
        &cancel,
    )?;
    bar.finish_and_clear();

    let e = &trained.evaluation;
    println!(
        "best epoch {} (lowest validation loss); on the {} split: loss {:.4}, accuracy {:.4}",
        trained.best_epoch, e.split, e.test_loss, e.test_acc
    );
    println!("confusion matrix (rows: true class, columns: predicted):");
    for (class, row) in data.classes.iter().zip(&e.confusion_matrix) {
        println!("  {class:>16} {row:?}");
    }
    for c in &e.per_class {
        println!(
            "  {:>16}: accuracy {:.4} of {}",
            c.class, c.accuracy, c.support
        );
    }
    std::fs::create_dir_all(&args.weights_dir)?;
    let saved = train::output::save(
        &trained,
        &name,
        &weights::pth::model_name_from_file(&args.weights),
        &base_identity,
        &params,
        &args.weights_dir,
    )?;
    println!(
        "wrote {} and {}",
        saved.weights.display(),
        saved.metadata.display()
    );
    let same_dir = |a: &std::path::Path, b: &std::path::Path| {
        a.canonicalize()
            .ok()
            .zip(b.canonicalize().ok())
            .is_some_and(|(a, b)| a == b)
    };
    let weights_parent = args
        .weights
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !same_dir(weights_parent, &args.weights_dir) {
        println!(
            "note: the server finds a head's base model by its sha256 in the weights dir: keep {} in {} to serve `{name}`",
            args.weights.display(),
            args.weights_dir.display()
        );
    }
    Ok(())
}

/// Prints predictions for each image; an unreadable image is reported and skipped, and makes the
/// command fail at the end.
pub fn predict(args: &PredictArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let classifier = open_model(&args.weights, args.model, &args.device, Precision::F32)?;
    let transform = args.transform.unwrap_or(classifier.transform);
    let mut failed = 0;
    let mut out = std::io::stdout().lock();
    for file in &args.images {
        let result = std::fs::read(file)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| Ok(crate::preprocess::decode_rgb(&bytes, args.max_pixels)?))
            .and_then(|image| {
                let xs = transform.apply(&image, classifier.device())?.unsqueeze(0)?;
                let probabilities = crate::models::layers::softmax(&classifier.logits(&xs)?)?;
                Ok(probabilities.squeeze(0)?.to_vec1::<f32>()?)
            });
        let probabilities = match result {
            Ok(p) => p,
            Err(e) => {
                failed += 1;
                eprintln!("{}: {}", file.display(), error_report(&e));
                continue;
            }
        };
        let top = crate::engine::top_k(&probabilities, &classifier.labels, args.top_k);
        if args.json {
            let line =
                serde_json::json!({ "file": file.display().to_string(), "predictions": top });
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{}", file.display())?;
            for p in top {
                writeln!(
                    out,
                    "  {:>7.3}%  {} ({})",
                    p.probability * 100.0,
                    p.label,
                    p.index
                )?;
            }
        }
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} images could not be classified",
        args.images.len()
    );
    Ok(())
}

/// An error and its causes on one line, outermost first, without the backtraces that anyhow and
/// candle capture when `RUST_BACKTRACE` is set.
pub fn error_report(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = match cause.downcast_ref::<candle_core::Error>() {
            Some(c) => crate::models::error_message(c),
            None => cause.to_string(),
        };
        // Wrappers that repeat their source's text (`#[error(transparent)]`) add nothing.
        if parts.last().is_none_or(|last| !last.ends_with(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// `cpu`, `cuda` or `cuda:N` → a candle device, with an error that says what to do otherwise.
pub fn parse_device(spec: &str) -> anyhow::Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => anyhow::bail!("unknown device `{spec}`: use cpu, cuda or cuda:N"),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        anyhow::bail!(
            "device `{spec}` asked for, but this cnnserve was built without CUDA: \
             rebuild with `cargo build --release --features cuda` (needs nvcc), or use --device cpu"
        );
    }
    Device::new_cuda(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))
}

/// Starts the server: checks there is something to serve, listens, then loads models in the
/// background (`/health` answers 503 until the first is ready).
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use crate::engine::{Engine, EngineConfig};
    use crate::server::{self, AppState, ServerConfig};

    let device = parse_device(&args.device)?;
    args.dtype.check(&device).map_err(anyhow::Error::msg)?;
    args.dtype.enable();
    let access = args.access.access()?;
    let api_key = access.api_key.is_some();
    let cors: Vec<&str> = args
        .access
        .cors_allow_origins
        .iter()
        .filter_map(|o| o.to_str().ok())
        .collect();
    let cors = cors.join(",");
    let dir = args.weights_dir.clone();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the weights dir {}", dir.display()))?;
    let found = crate::engine::scan(&dir)
        .with_context(|| format!("cannot read the weights dir {}", dir.display()))?;
    let has = |name: &str| {
        found.pretrained.iter().any(|(n, _, _)| n == name)
            || found.fine_tuned.iter().any(|(m, _)| m.name == name)
    };
    let nothing = found.pretrained.is_empty() && found.fine_tuned.is_empty();
    let to_fetch = match args.default_model.parse::<Arch>() {
        Ok(arch) if !has(&args.default_model) && !args.offline => Some(arch),
        _ => None,
    };
    if nothing && to_fetch.is_none() {
        anyhow::bail!(
            "nothing to serve: {dir} holds no model file. Either\n  \
             - put torchvision weights in it, e.g. {url}/{file} (or any <arch>.safetensors / \
             <arch>.pth with torchvision's keys; arch one of vgg11, vgg11_bn, …, googlenet), or\n  \
             - start without --offline and with --default-model set to an architecture, to \
             download it{default}.",
            dir = dir.display(),
            url = args.weights_url,
            file = weights::fetch::torchvision_file(Arch::Vgg11Bn),
            default = if args.offline {
                ""
            } else {
                " (the default model is not one)"
            },
        );
    }
    if !nothing && !has(&args.default_model) && to_fetch.is_none() {
        tracing::warn!(default_model = %args.default_model, "default model not in the weights dir; the first model loaded is the default");
    }

    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    let engine = Engine::new(
        EngineConfig {
            max_batch_size: args.max_batch_size as usize,
            max_batch_delay: std::time::Duration::from_millis(args.max_batch_delay_ms),
            max_concurrent_requests: args.max_concurrent_requests as usize,
            max_pixels: args.max_pixels,
            pixel_budget: args.max_inflight_pixels.max(args.max_pixels),
            device: device.clone(),
            dtype: args.dtype.dtype(),
        },
        metrics,
    );
    let state = AppState::new(
        engine.clone(),
        ServerConfig {
            weights_dir: dir.clone(),
            payload_limit: usize::try_from(args.payload_limit).unwrap_or(usize::MAX),
            device_name: args.device.clone(),
            max_dataset_bytes: args.max_dataset_bytes,
        },
        Some(args.default_model.clone()),
    )
    .with_access(access);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let replica = match &args.replica_id {
        Some(id) => id.clone(),
        None => format!("{}:{}", hostname(), listener.local_addr()?.port()),
    };
    let role = args.role;
    let config = crate::jobs::JobConfig {
        dir: dir.clone(),
        max_concurrent_jobs: args.max_concurrent_jobs as usize,
        training_threads: args.training_threads.unwrap_or(cores / 2).max(1),
        dataset_limits: crate::train::DatasetLimits {
            max_pixels: args.max_pixels,
            // A zip compresses photos little; more than 4x its size unpacked is a bomb.
            max_total_bytes: args.max_dataset_bytes.saturating_mul(4),
            ..crate::train::DatasetLimits::default()
        },
        database_url: args.database_url.clone(),
        model_store: args.model_store.clone(),
        train: role != Role::Api,
        serve: role != Role::Worker,
        replica: replica.clone(),
        lease: std::time::Duration::from_secs(args.job_lease),
    };
    let opened = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || crate::jobs::JobManager::open(config, engine)).await?
    };
    let jobs = opened.map_err(|e| {
        anyhow::anyhow!(
            "cannot open the job store: {}",
            error_report(&anyhow::Error::from(e))
        )
    })?;
    let (database, model_store) = jobs.describe_stores();
    let state = state.with_jobs(jobs.clone()).with_role(role.name());
    // A worker serves no model: no gRPC.
    let grpc_addr = if role == Role::Worker {
        None
    } else {
        args.grpc_addr.0
    };
    let grpc_listener = match grpc_addr {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen for gRPC on {addr} (--grpc-addr; an empty one turns gRPC off)")
        })?),
        None => None,
    };
    let grpc_addr = match &grpc_listener {
        Some(l) => l.local_addr()?.to_string(),
        None => "off".to_string(),
    };
    // Before anything says it listens: a SIGTERM from then on is a graceful stop.
    let signal = server::shutdown_signal();
    tracing::info!(addr = %listener.local_addr()?, grpc_addr = %grpc_addr, weights_dir = %dir.display(), role = role.name(), %replica, %database, %model_store, api_key, cors_allow_origins = %cors, "listening");
    // HTTP and gRPC stop on the same signal.
    let stop = tokio_util::sync::CancellationToken::new();
    let grpc = grpc_listener.map(|listener| {
        let (state, stopped) = (state.clone(), stop.clone().cancelled_owned());
        tokio::spawn(async move {
            if let Err(e) = server::grpc::serve(listener, state, stopped).await {
                tracing::error!(error = %e, "the gRPC server stopped");
            }
        })
    });

    let url = args.weights_url.clone();
    let starter = jobs.clone();
    // Every model found (and the one to download) is `loading` from the first request on.
    engine.expect(
        found
            .pretrained
            .iter()
            .map(|(name, arch, _)| (name.clone(), Some(*arch)))
            .chain(
                found
                    .fine_tuned
                    .iter()
                    .map(|(meta, _)| (meta.name.clone(), Some(meta.arch))),
            )
            .chain(to_fetch.map(|arch| (arch.name().to_string(), Some(arch)))),
    );
    tokio::task::spawn_blocking(move || {
        let mut fetch_error = None;
        if let Some(arch) = to_fetch {
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            if let Err(e) = weights::fetch::fetch_torchvision(arch, &dir, &url, progress) {
                tracing::error!(error = %e, "could not download the default model");
                fetch_error = Some((arch, e.to_string()));
            }
        }
        let report = engine.reload(&dir);
        if let Some((arch, error)) = fetch_error {
            let error = format!("could not download it: {error}");
            engine.mark_failed(arch.name(), Some(arch), error);
        }
        if report.loaded.is_empty() && report.unchanged.is_empty() {
            tracing::error!("no model could be loaded: see the warnings above");
        }
        // Every replica's pretrained weights must be the ones the others use; then the
        // registry's fine-tuned heads are served.
        if let Err(e) = starter.check_pretrained() {
            tracing::error!(error = %e, "cannot check the pretrained weights against the job store");
        }
        if let Err(e) = starter.sync_models() {
            tracing::error!(error = %e, "cannot load the registered models");
        }
        // Queued jobs (from before a restart, too) need their base models: start after loading.
        if let Err(e) = starter.start() {
            tracing::error!(error = %e, "cannot start the training threads");
        }
    });
    let stopper = jobs.clone();
    let stopping = stop.clone();
    let shutdown = async move {
        signal.await;
        stopping.cancel();
        stopper.shutdown();
    };
    let timeouts = server::IdleTimeouts {
        headers: std::time::Duration::from_secs(args.header_timeout),
        body: std::time::Duration::from_secs(args.body_timeout),
    };
    let served = server::serve_with(listener, state, timeouts, shutdown).await;
    stop.cancel();
    if let Some(grpc) = grpc {
        // Its calls in flight finish, as HTTP's did.
        let _ = grpc.await;
    }
    served?;
    let idle =
        tokio::task::spawn_blocking(move || jobs.wait_idle(std::time::Duration::from_secs(30)));
    if !idle.await.unwrap_or(false) {
        tracing::warn!("a training job did not stop in time");
    }
    Ok(())
}

/// This machine's name, for the default replica id.
fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "cnnserve".into())
}

pub fn forward(args: &ForwardArgs) -> anyhow::Result<()> {
    let classifier = open_model(&args.weights, args.model, &args.device, args.dtype)?;
    let inputs = candle_core::safetensors::load(&args.input, classifier.device())
        .with_context(|| format!("reading {}", args.input.display()))?;
    let mut outputs = HashMap::new();
    let mut names: Vec<&String> = inputs.keys().collect();
    names.sort();
    for name in names {
        let xs = &inputs[name];
        let runnable = xs.dtype() == DType::F32 && xs.rank() == 4 && xs.dim(1)? == 3;
        if !runnable {
            tracing::info!(tensor = %name, shape = ?xs.dims(), dtype = ?xs.dtype(), "skipped: not a f32 [N, 3, H, W] batch");
            continue;
        }
        let n = xs.dim(0)?;
        let mut chunks = Vec::new();
        for start in (0..n).step_by(usize::from(args.batch_size)) {
            let len = usize::from(args.batch_size).min(n - start);
            chunks.push(classifier.logits(&xs.narrow(0, start, len)?)?);
        }
        let logits = Tensor::cat(&chunks, 0)?;
        tracing::info!(tensor = %name, input = ?xs.dims(), logits = ?logits.dims(), "ran");
        outputs.insert(name.clone(), logits);
    }
    anyhow::ensure!(
        !outputs.is_empty(),
        "{} holds no f32 tensor of shape [N, 3, H, W]",
        args.input.display()
    );
    weights::save_safetensors(&outputs, &args.output)?;
    Ok(())
}
