//! `tessera-worker`: the process that runs in every Tessera worker pod, and the node agent.
//!
//! - [`telemetry`]: GPU snapshots from NVML (or JSON fixtures), NVLink topology, dcgm-style
//!   metrics.
//! - [`agent`]: the DaemonSet that publishes GPU and NVLink topology as Node labels. It is the
//!   only module with a Kubernetes client; the inference path never uses it.
//! - [`cli`]: the command-line surface.
//! - [`kernels`], [`model`], [`tokenizer`], [`engine`]: the CPU inference core (quantised
//!   kernels, the Llama decoder, the GGUF tokenizer, sampling and generation).
//! - [`server`]: the OpenAI-compatible HTTP API, health, readiness and serving metrics over the
//!   continuous-batching [`engine::scheduler`].
//! - [`dist`]: the tensor-parallel rank group over TCP (rendezvous, all-reduce, steps, watchdog)
//!   and the KV hand-over between replicas; `serve` and `local`: one rank from the operator's
//!   environment, every rank on one machine.
//! - [`router`]: prefill/decode disaggregation's front, which splits each request between a
//!   prefill replica and a decode replica.
//! - `cuda` (only with `--features cuda`): the GPU path (cuBLAS, NVRTC kernels, NCCL).

pub mod agent;
pub mod cli;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dist;
pub mod engine;
pub mod fetch;
pub mod kernels;
pub mod local;
pub mod logging;
pub mod model;
pub mod router;
pub mod serve;
pub mod server;
pub mod telemetry;
pub mod tokenizer;
pub mod watchdog;

/// Lowercase hexadecimal of `bytes` (digests, MACs, secrets).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
