//! Tessera's operator: the `ModelDeployment` API, the bandwidth-aware planner and the
//! controller that turns plans into gangs of worker pods.
//!
//! Pure logic (API validation, inventory, planner, object building, autoscaling decisions)
//! takes plain data and returns plain data; only the controller talks to Kubernetes.

pub mod api;
pub mod autoscale;
pub mod build;
pub mod cli;
pub mod controller;
pub mod logging;
pub mod plan_cmd;
pub mod planner;
pub mod predict_cmd;
pub mod scrape_cmd;
pub mod simulate_cmd;
