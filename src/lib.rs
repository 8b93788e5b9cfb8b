//! cnnserve: torchvision's VGG and GoogLeNet classifiers in one Rust binary.
//!
//! # Layout
//!
//! Data flows one way; a module only calls the ones below it.
//!
//! - [`models`]: the networks, in candle, keyed exactly as torchvision's state_dicts; on the CPU
//!   their backbones run through our own kernels ([`models::cpu`]: NHWC maps, packed weights, a
//!   microkernel per instruction set, Winograd). No files, no async, no HTTP.
//! - [`weights`]: weight files (safetensors, torch `.pth` in both formats) → checked tensors →
//!   a built [`models::Network`].
//! - [`preprocess`]: image bytes → RGB the way PIL decodes them → the tensor torchvision's
//!   transforms would make (PIL-exact antialiased bilinear resize).
//! - [`engine`]: the model registry and one batching worker thread per model; `predict` is async,
//!   the forward passes never run on the async runtime.
//! - [`train`]: fine-tuning a new head on a frozen network: data sets, augmentation, the loop,
//!   evaluation, and the files a fine-tuned model is saved as.
//! - [`jobs`]: fine-tuning jobs: claims, training threads in their own small thread pool, events
//!   for live progress; behind two seams that let replicas share them: [`jobs::store`] (jobs and
//!   the model registry: SQLite, or PostgreSQL with leases) and [`jobs::model_store`] (heads and
//!   uploads: a folder, or S3).
//! - [`server`]: HTTP (axum) and gRPC (tonic) over the engine; the one place that knows status
//!   codes, JSON shapes and protobuf. The Open Inference Protocol (KServe v2) is served over both:
//!   [`server::v2`] is its logic, [`server::kserve`] its HTTP form, [`server::grpc`] its gRPC one.
//! - [`metrics`]: the Prometheus registry the engine and the server write to.
//! - [`atomic`]: crash-safe file writes, used for every model and state file we write.
//! - [`crash`]: `CNNSERVE_CRASH_AT`, a test aid that kills the process at a chosen step.
//! - [`cli`]: the command line (`clap`), and the subcommands that run without a server.

pub mod atomic;
pub mod cli;
pub mod crash;
pub mod engine;
pub mod jobs;
pub mod metrics;
pub mod models;
pub mod preprocess;
pub mod server;
pub mod train;
pub mod weights;
