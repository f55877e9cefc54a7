//! Autoscaling on load, within what the cluster can place (`docs/autoscaling.md`).
//!
//! - [`decide`]: the pure per-deployment decision (HPA-style target tracking with tolerance,
//!   stabilization windows, a scale-up rate limit, min/max and capacity);
//! - [`arbitrate`]: the pure split of free GPUs between deployments that want more;
//! - [`pass`]: one pure pass over many deployments (decide, capacity from the planner,
//!   arbitrate, decide within limits) and the `ScalingLimited` condition;
//! - [`scrape`]: parsing a worker's `/metrics` and a bounded HTTP GET;
//! - [`runner`]: the task in `tessera-operator run` that scrapes, decides and writes the scale
//!   subresource.

pub mod arbitrate;
pub mod decide;
pub mod pass;
pub mod runner;
pub mod scrape;

pub use decide::{Decision, History, Input, Params, Reason, ReplicaSample, decide};
