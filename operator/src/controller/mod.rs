//! The controller (`tessera-operator run`): a thin pipeline around the pure [`reconcile`]:
//! observe → validate → plan → build → apply (server-side apply) → status.

pub mod cache;
pub mod expect;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod run;
