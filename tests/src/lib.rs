//! Shared helpers for the cross-crate tests: paths to the repository's examples and fixtures.

use std::path::PathBuf;

pub mod recording_api;

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the workspace")
        .to_path_buf()
}
