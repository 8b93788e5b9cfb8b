//! The command line: flags are documented here, once, and `--help` prints them.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand};

use crate::models::Arch;
use crate::weights;

#[derive(Debug, Parser)]
#[command(
    name = "cnnserve",
    version,
    about = "Serve and fine-tune torchvision image classifiers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true, env = "CNNSERVE_JSON_LOGS")]
    pub json_logs: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a model on already-normalized inputs and save the logits: the check of a conversion
    /// against PyTorch.
    Forward(ForwardArgs),
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// Architecture of the weights.
    #[arg(long, env = "CNNSERVE_MODEL")]
    pub model: Arch,
    /// Weights file: safetensors or torch .pth (zip or legacy), torchvision key names.
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

pub fn forward(args: &ForwardArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let network = weights::load_network(args.model, &args.weights, &device)
        .with_context(|| format!("loading {} as {}", args.weights.display(), args.model))?;
    let inputs = candle_core::safetensors::load(&args.input, &device)
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
            chunks.push(network.forward(&xs.narrow(0, start, len)?)?);
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
