//! `tessera-worker`: the process that runs in every Tessera worker pod.
//!
//! The inference core, the OpenAI-compatible API, telemetry and the node agent each have their
//! own issue; this crate currently carries the command-line surface so that the operator's
//! contract (subcommands, environment) has a fixed shape to build against.

pub mod cli;
