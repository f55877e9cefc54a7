//! `tessera-worker`: the process that runs in every Tessera worker pod, and the node agent.
//!
//! - [`telemetry`]: GPU snapshots from NVML (or JSON fixtures), NVLink topology, dcgm-style
//!   metrics.
//! - [`agent`]: the DaemonSet that publishes GPU and NVLink topology as Node labels. It is the
//!   only module with a Kubernetes client; the inference path never uses it.
//! - [`cli`]: the command-line surface.
//! - [`kernels`], [`model`], [`tokenizer`], [`engine`]: the CPU inference core (quantised
//!   kernels, the Llama decoder, the GGUF tokenizer, sampling and generation).

pub mod agent;
pub mod cli;
pub mod engine;
pub mod kernels;
pub mod logging;
pub mod model;
pub mod telemetry;
pub mod tokenizer;
