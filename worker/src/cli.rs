//! Command-line surface of `tessera-worker`.

use clap::{Parser, Subcommand};

/// Tessera's worker: one tensor-parallel rank of an LLM replica, the node topology agent, or a
/// one-shot GPU telemetry probe.
#[derive(Debug, Parser)]
#[command(name = "tessera-worker", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve one rank of a replica, configured from the TESSERA_* environment the operator sets.
    Serve,
    /// Start every rank of a replica as local processes and serve the OpenAI API on 127.0.0.1
    /// (with --prefill/--decode: prefill and decode replicas behind a router).
    Local {
        /// Path to a GGUF or safetensors model.
        #[arg(long)]
        model: std::path::PathBuf,
        /// Tensor-parallel degree.
        #[arg(long, default_value_t = 1)]
        tp: u32,
        /// Pipeline-parallel degree.
        #[arg(long, default_value_t = 1)]
        pp: u32,
        /// Port for the OpenAI-compatible API.
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// CPU threads per rank (default: the cores divided among the ranks).
        #[arg(long)]
        threads: Option<usize>,
        /// Where the ranks run the model: `auto` takes the GPUs when this binary was built
        /// with CUDA and they are visible (rank i on GPU i), `cpu` or `cuda` force one.
        #[arg(long, env = "TESSERA_DEVICE", value_enum, default_value_t = crate::engine::device::DeviceRequest::Auto)]
        device: crate::engine::device::DeviceRequest,
        /// Prefill/decode disaggregation: this many prefill replicas (of --tp ranks each)
        /// behind a router on --port (default 1 when --decode is given).
        #[arg(long)]
        prefill: Option<u32>,
        /// Prefill/decode disaggregation: this many decode replicas (of --tp ranks each;
        /// default 1 when --prefill is given).
        #[arg(long)]
        decode: Option<u32>,
    },
    /// Generate text from a prompt on this machine's CPU (one rank), printing the text and, on
    /// stderr, prompt and decode speed.
    Generate(GenerateArgs),
    /// Run as the node agent (DaemonSet): publish GPU and NVLink topology as Node labels and
    /// serve the node's GPU metrics.
    Agent(crate::agent::AgentArgs),
    /// Download a model before an engine starts (the init container of vLLM and SGLang pods):
    /// one file, resumed after interruptions and checked against --sha256, or a Hugging Face
    /// model directory when the URI ends in `/` (config.json, the tokenizer files the server
    /// has, and the safetensors weights its index names). Run again, it fetches only what is
    /// missing.
    Fetch {
        /// http(s) URL of the model file, or of the model directory (ending in `/`).
        #[arg(long, env = "TESSERA_MODEL_URI")]
        uri: String,
        /// Where to put it: the file's path, or the directory to fill.
        #[arg(long, env = "TESSERA_MODEL_PATH")]
        dest: std::path::PathBuf,
        /// Lowercase hex SHA-256 of the file (not for a directory).
        #[arg(long, env = "TESSERA_MODEL_SHA256")]
        sha256: Option<String>,
    },
    /// Print one GPU telemetry snapshot as JSON. Exits 0 without GPUs too; the JSON then says
    /// `"available": false` and why.
    Telemetry {
        /// Read the snapshot from this JSON fixture instead of NVML.
        #[arg(long)]
        fake: Option<std::path::PathBuf>,
        /// Print the labels the node agent would publish instead of the snapshot.
        #[arg(long)]
        labels: bool,
    },
}

impl Command {
    /// The subcommand's name as typed on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Serve => "serve",
            Command::Local { .. } => "local",
            Command::Generate(_) => "generate",
            Command::Agent(_) => "agent",
            Command::Telemetry { .. } => "telemetry",
            Command::Fetch { .. } => "fetch",
        }
    }
}

/// Arguments of `tessera-worker generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Path to a GGUF or safetensors model.
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// The prompt (a user message with --chat).
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (none by default).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Top-k filter (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Top-p (nucleus) filter (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Random seed for sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop sequences (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens, up to --max-tokens (for benchmarks: every
    /// run decodes the same number of tokens).
    #[arg(long)]
    pub ignore_eos: bool,
    /// CPU threads (0: all available).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// KV-cache budget for the sequence, in MiB.
    #[arg(long, default_value_t = 512)]
    pub kv_cache_mib: usize,
    /// Where to run the model (built with `--features cuda` only).
    #[cfg(feature = "cuda")]
    #[arg(long, env = "TESSERA_DEVICE", value_enum, default_value_t = crate::cuda::Device::Cpu)]
    pub device: crate::cuda::Device,
}
