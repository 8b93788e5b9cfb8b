//! cnnserve: torchvision's VGG and GoogLeNet classifiers in one Rust binary.
//!
//! # Layout
//!
//! Data flows one way; a module only calls the ones below it.
//!
//! - [`models`]: the networks, in candle, keyed exactly as torchvision's state_dicts. Knows candle
//!   and nothing else: no files, no threads, no HTTP.
//! - [`weights`]: weight files (safetensors, torch `.pth` in both formats) → checked tensors →
//!   a built [`models::Network`].
//! - [`atomic`]: crash-safe file writes, used for every model and state file we write.
//! - [`cli`]: the command line (`clap`), and the subcommands that run without a server.

pub mod atomic;
pub mod cli;
pub mod models;
pub mod preprocess;
pub mod weights;
