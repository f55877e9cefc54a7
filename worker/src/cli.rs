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
    /// Start every rank of a replica as local processes and serve the OpenAI API on 127.0.0.1.
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
    },
    /// Run as the node agent (DaemonSet): publish GPU and NVLink topology as Node labels and
    /// serve the node's GPU metrics.
    Agent(crate::agent::AgentArgs),
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
            Command::Agent(_) => "agent",
            Command::Telemetry { .. } => "telemetry",
        }
    }
}
