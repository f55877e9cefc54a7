//! `tessera-operator plan` end to end: the README command on the example cluster, JSON output,
//! and bad input (clear message naming the file, non-zero exit, never a panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera-operator"))
        .arg("plan")
        .args(args)
        .current_dir(root())
        .output()
        .expect("runs")
}

fn tmp(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-plan-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn fails_with(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "missing {n:?} in: {err}");
    }
}

#[test]
fn readme_command_prints_a_plan() {
    let out = plan(&[
        "--nodes",
        "examples/cluster.yaml",
        "-f",
        "examples/deployments",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("inference/llama-405b"), "{text}");
    assert!(text.contains("inference/llama-70b"), "{text}");
    assert!(text.contains("choice: H100 TP=8 PP=2"), "{text}");
    assert!(!text.contains("unplaced"), "{text}");
}

#[test]
fn json_output_is_the_documented_shape() {
    let out = plan(&[
        "--nodes",
        "examples/cluster.yaml",
        "-f",
        "examples/deployments/llama-405b.yaml",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = &v["deployments"][0];
    assert_eq!(d["namespace"], "inference");
    assert_eq!(d["name"], "llama-405b");
    let r = &d["placed"][0];
    assert_eq!(r["replica"], 0);
    assert_eq!(r["gpuType"], "NVIDIA-H100-80GB-HBM3");
    assert_eq!(r["tensorParallel"], 8);
    assert!(r["pipelineParallel"].as_i64().unwrap() >= 2);
    assert_eq!(r["stages"][0]["stage"], 0);
    assert_eq!(r["stages"][0]["gpus"], 8);
    for k in [
        "decodeTokensPerSecond",
        "prefillTokensPerSecond",
        "timeToFirstTokenSeconds",
        "allReduceGBps",
    ] {
        assert!(r["predicted"][k].as_f64().unwrap() > 0.0, "{k}");
    }
    assert!(d["unplaced"].as_array().unwrap().is_empty());
    assert!(d["choice"]["chosen"]["gpuType"].is_string());
    assert!(v["warnings"].is_array());
}

#[test]
fn missing_file() {
    fails_with(
        &plan(&[
            "--nodes",
            "no/such/nodes.yaml",
            "-f",
            "examples/deployments",
        ]),
        &["no/such/nodes.yaml", "cannot read"],
    );
    fails_with(
        &plan(&["--nodes", "examples/cluster.yaml", "-f", "no/such/dir"]),
        &["no/such/dir", "cannot read"],
    );
}

#[test]
fn invalid_yaml() {
    let p = tmp("bad.yaml", "kind: List\nitems: [\n");
    fails_with(
        &plan(&["--nodes", p.to_str().unwrap(), "-f", "examples/deployments"]),
        &["bad.yaml", "not valid YAML"],
    );
}

#[test]
fn wrong_kind() {
    fails_with(
        &plan(&[
            "--nodes",
            "examples/deployments/llama-70b.yaml",
            "-f",
            "examples/deployments",
        ]),
        &["llama-70b.yaml", "ModelDeployment", "is not a Node"],
    );
    fails_with(
        &plan(&[
            "--nodes",
            "examples/cluster.yaml",
            "-f",
            "examples/cluster.yaml",
        ]),
        &["cluster.yaml", "is not a ModelDeployment"],
    );
}

#[test]
fn invalid_model_deployment_gets_the_api_server_message() {
    let text = std::fs::read_to_string(root().join("examples/deployments/llama-70b.yaml"))
        .unwrap()
        .replace("tensor: auto", "tensor: 3");
    let p = tmp("tp3.yaml", &text);
    fails_with(
        &plan(&[
            "--nodes",
            "examples/cluster.yaml",
            "-f",
            p.to_str().unwrap(),
        ]),
        &["tp3.yaml", "spec.parallelism.tensor", "llama-70b"],
    );
    let unknown = tmp(
        "unknown.yaml",
        &std::fs::read_to_string(root().join("examples/deployments/llama-70b.yaml"))
            .unwrap()
            .replace("priority: 100", "priority: 100\n  bogus: 1"),
    );
    fails_with(
        &plan(&[
            "--nodes",
            "examples/cluster.yaml",
            "-f",
            unknown.to_str().unwrap(),
        ]),
        &["unknown.yaml", "bogus"],
    );
}

#[test]
fn empty_inputs() {
    let p = tmp("empty.yaml", "# nothing\n");
    fails_with(
        &plan(&[
            "--nodes",
            "examples/cluster.yaml",
            "-f",
            p.to_str().unwrap(),
        ]),
        &["no ModelDeployment found", "empty.yaml"],
    );
    let scalar = tmp("scalar.yaml", "42\n");
    fails_with(
        &plan(&[
            "--nodes",
            scalar.to_str().unwrap(),
            "-f",
            "examples/deployments",
        ]),
        &["scalar.yaml", "expected a Kubernetes object"],
    );
    let badcat = tmp("catalog.yaml", "- name: NEWGPU\n");
    fails_with(
        &plan(&[
            "--nodes",
            "examples/cluster.yaml",
            "-f",
            "examples/deployments",
            "--catalog",
            badcat.to_str().unwrap(),
        ]),
        &["catalog.yaml", "NEWGPU"],
    );
}

#[test]
fn pods_file_consumes_gpus() {
    let pods = tmp(
        "pods.yaml",
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: busy, namespace: x}\n  spec:\n    nodeName: l40s-1\n    containers:\n    - name: c\n      resources: {limits: {nvidia.com/gpu: \"4\"}}\n  status: {phase: Running}\n",
    );
    let out = plan(&[
        "--nodes",
        "examples/cluster.yaml",
        "--pods",
        pods.to_str().unwrap(),
        "-f",
        "examples/deployments/smollm2-135m.yaml",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for r in v["deployments"][0]["placed"].as_array().unwrap() {
        assert_ne!(r["stages"][0]["node"], "l40s-1");
    }
}
