//! A telemetry backend read from a JSON fixture: a [`Snapshot`] as `tessera-worker telemetry`
//! prints it. Used by the tests (HGX, PCIe and NVLink-bridge node shapes) and for demos on
//! machines without GPUs (`--fake FILE`).

use std::path::{Path, PathBuf};

use super::{Snapshot, Telemetry};

/// Serves the same snapshot every time, with the topology recomputed from its GPUs.
#[derive(Clone, Debug)]
pub struct FakeTelemetry {
    path: PathBuf,
    snapshot: Snapshot,
}

impl FakeTelemetry {
    /// Load a fixture. The error names the file and what is wrong with it.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading telemetry fixture {}: {e}", path.display()))?;
        Self::from_json(path, &text)
    }

    /// Parse a fixture's text; `path` is only used in messages and `source`.
    pub fn from_json(path: &Path, text: &str) -> anyhow::Result<Self> {
        let mut snapshot: Snapshot = serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "telemetry fixture {} is not a snapshot: {e}",
                path.display()
            )
        })?;
        snapshot.source = format!("fake:{}", path.display());
        Ok(Self {
            path: path.to_owned(),
            snapshot: snapshot.with_topology(),
        })
    }

    /// The fixture's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Telemetry for FakeTelemetry {
    fn snapshot(&self) -> Snapshot {
        self.snapshot.clone()
    }
}
