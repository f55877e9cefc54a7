//! Write the planner benchmark's synthetic cluster and fleet as files, to time the `plan` CLI
//! end to end (YAML parsing included) on the same inputs the criterion benchmark uses.
//!
//! Run: `cargo run --release -p tessera-operator --example synthetic_cluster -- DIR [NODES] [DEPLOYMENTS]`
//! then `tessera-operator plan --nodes DIR/nodes.yaml -f DIR/deployments.yaml`.

use std::io::Write;
use std::path::PathBuf;

use serde_json::json;
use tessera_operator::planner::synthetic::{self, Rng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or("usage: synthetic_cluster DIR [NODES] [DEPLOYMENTS]")?,
    );
    let nodes: usize = args.next().map_or(Ok(10_000), |s| s.parse())?;
    let deployments: usize = args.next().map_or(Ok(1_000), |s| s.parse())?;
    std::fs::create_dir_all(&dir)?;
    // The same seed as the criterion benchmark's fleet.
    let mut rng = Rng::new(7);
    let list = json!({"apiVersion": "v1", "kind": "List", "items": synthetic::cluster_json(nodes)});
    std::fs::write(dir.join("nodes.yaml"), serde_yaml_ng::to_string(&list)?)?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("deployments.yaml"))?);
    for i in 0..deployments {
        let mut md = synthetic::deployment_json(i, &mut rng);
        md["apiVersion"] = json!("tessera.dev/v1alpha1");
        md["kind"] = json!("ModelDeployment");
        writeln!(f, "---\n{}", serde_yaml_ng::to_string(&md)?)?;
    }
    f.flush()?;
    eprintln!(
        "wrote {0}/nodes.yaml ({nodes} nodes) and {0}/deployments.yaml ({deployments} deployments)",
        dir.display()
    );
    Ok(())
}
