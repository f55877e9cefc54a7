//! Telemetry with the fake backend on four node shapes, the node agent's labels, the dcgm-style
//! metrics (parsed with a Prometheus text-format parser) and the CLI without a GPU.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use tessera_worker::agent::{self, node_labels, up_to_date};
use tessera_worker::telemetry::nvml::Unavailable;
use tessera_worker::telemetry::{Snapshot, Telemetry, fake::FakeTelemetry, metrics, server};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.json"))
}

fn snapshot(name: &str) -> Snapshot {
    FakeTelemetry::from_file(&fixture(name))
        .expect("fixture loads")
        .snapshot()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Kubernetes label value syntax: at most 63 characters, `[A-Za-z0-9._-]`, alphanumeric at
/// both ends (or empty).
fn valid_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && (v.is_empty()
            || (v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.ends_with(|c: char| c.is_ascii_alphanumeric())))
}

#[test]
fn h100_hgx_is_one_nvswitch_domain() {
    let s = snapshot("h100-hgx");
    assert_eq!(s.topology.domains, vec![(0..8).collect::<Vec<u32>>()]);
    // 18 links x 25 GB/s per direction (NVLink 4 default, speed not reported in the fixture).
    assert_eq!(s.topology.min_nvlink_gbps(), 450.0);
    assert_eq!(
        node_labels(&s),
        labels(&[
            ("tessera.dev/gpu.product", "NVIDIA-H100-80GB-HBM3"),
            ("tessera.dev/gpu.count", "8"),
            ("tessera.dev/gpu.memory-mib", "81559"),
            ("tessera.dev/nvlink.domains", "0-7"),
            ("tessera.dev/nvlink.gbps", "450"),
        ])
    );
}

#[test]
fn h800_has_the_cut_nvlink() {
    let s = snapshot("h800-hgx");
    assert_eq!(s.topology.domains.len(), 1);
    // 8 active links x 25 GB/s = 200 GB/s per direction (400 bidirectional, the H800 spec).
    assert_eq!(
        node_labels(&s)["tessera.dev/nvlink.gbps"],
        "200",
        "{:?}",
        s.topology
    );
    assert_eq!(node_labels(&s)["tessera.dev/gpu.product"], "NVIDIA-H800");
}

#[test]
fn l40s_pcie_has_no_nvlink() {
    let s = snapshot("l40s-pcie");
    assert_eq!(s.topology.domains, vec![vec![0], vec![1], vec![2], vec![3]]);
    let l = node_labels(&s);
    assert_eq!(l["tessera.dev/nvlink.domains"], "0.1.2.3");
    assert_eq!(l["tessera.dev/nvlink.gbps"], "0");
    assert_eq!(l["tessera.dev/gpu.count"], "4");
}

#[test]
fn two_bridge_islands_are_two_domains() {
    let s = snapshot("a100-bridge-2x4");
    assert_eq!(s.topology.domains, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
    let l = node_labels(&s);
    assert_eq!(l["tessera.dev/nvlink.domains"], "0-3.4-7");
    // 3 peers x 4 links x 25 GB/s (NVLink 3).
    assert_eq!(l["tessera.dev/nvlink.gbps"], "300");
}

#[test]
fn every_label_and_annotation_is_valid() {
    for shape in ["h100-hgx", "h800-hgx", "l40s-pcie", "a100-bridge-2x4"] {
        let s = snapshot(shape);
        for (k, v) in node_labels(&s) {
            assert!(k.starts_with("tessera.dev/") && k.len() <= 63 + 12, "{k}");
            assert!(valid_label_value(&v), "{shape}: {k}={v:?}");
        }
        let ann = agent::topology_annotation(&s).expect("annotation");
        let parsed: serde_json::Value = serde_json::from_str(&ann).expect("annotation is JSON");
        assert_eq!(parsed["gpus"].as_array().map(Vec::len), Some(s.gpus.len()));
        assert!(
            ann.len() < 256 * 1024,
            "annotations are limited to 256 KiB in total"
        );
    }
}

#[test]
fn the_agent_writes_nothing_when_the_node_is_up_to_date() {
    let s = snapshot("h100-hgx");
    let body = agent::apply_body("h100-1", &s);
    let node: Node = serde_json::from_value(body).expect("the apply body is a Node");
    assert!(up_to_date(&node, &s));
    // A changed measurement makes it stale.
    let s800 = snapshot("h800-hgx");
    assert!(!up_to_date(&node, &s800));
    // A node that lost its GPUs but still carries our labels is stale too.
    assert!(!up_to_date(&node, &Snapshot::unavailable("none", "gone")));
}

#[test]
fn metrics_use_dcgm_names_and_parse() {
    let s = snapshot("h100-hgx");
    let text = metrics::render(&s, "h100-1");
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text parses");
    let find = |name: &str, gpu: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get("gpu") == Some(gpu))
            .unwrap_or_else(|| panic!("{name} for gpu {gpu} missing in:\n{text}"))
    };
    let util = find("DCGM_FI_DEV_GPU_UTIL", "3");
    assert_eq!(util.labels.get("UUID"), Some(s.gpus[3].uuid.as_str()));
    assert_eq!(util.labels.get("modelName"), Some("NVIDIA H100 80GB HBM3"));
    assert_eq!(util.labels.get("Hostname"), Some("h100-1"));
    assert!(matches!(util.value, prometheus_parse::Value::Gauge(v) if v == 40.0));
    for name in [
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_FB_FREE",
        "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_SM_CLOCK",
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
    ] {
        find(name, "0");
    }
    let up = scrape
        .samples
        .iter()
        .find(|s| s.metric == "tessera_nvml_up")
        .expect("tessera_nvml_up");
    assert!(matches!(up.value, prometheus_parse::Value::Gauge(v) if v == 1.0));
}

#[tokio::test]
async fn without_nvml_metrics_say_nvml_up_0_and_health_is_ok() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let backend: Arc<dyn Telemetry> = Arc::new(Unavailable {
        reason: "no driver".into(),
    });
    let app = server::router(backend, "cpu-1".into());
    let resp = app
        .clone()
        .oneshot(
            axum::http::Request::get("/metrics")
                .body(axum::body::Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8(body.to_vec()).expect("utf-8");
    assert!(text.contains("\ntessera_nvml_up 0\n"), "{text}");
    assert!(
        !text.contains("DCGM_FI_"),
        "no GPU series without GPUs: {text}"
    );
    let resp = app
        .oneshot(
            axum::http::Request::get("/healthz")
                .body(axum::body::Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
}

#[test]
fn telemetry_cli_answers_cleanly_without_a_gpu() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera-worker"))
        .arg("telemetry")
        .env("LD_LIBRARY_PATH", "/nonexistent")
        .output()
        .expect("runs");
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    if v["available"] == serde_json::json!(false) {
        assert!(
            v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("NVML could not be initialised")),
            "{v}"
        );
    } else {
        // On a GPU machine the same command reports real GPUs.
        assert!(!v["gpus"].as_array().expect("gpus").is_empty(), "{v}");
    }
}

#[test]
fn telemetry_cli_reads_fixtures_and_names_bad_ones() {
    let bin = env!("CARGO_BIN_EXE_tessera-worker");
    let out = std::process::Command::new(bin)
        .args(["telemetry", "--labels", "--fake"])
        .arg(fixture("l40s-pcie"))
        .output()
        .expect("runs");
    assert!(out.status.success());
    let v: BTreeMap<String, String> = serde_json::from_slice(&out.stdout).expect("JSON labels");
    assert_eq!(v["tessera.dev/gpu.product"], "NVIDIA-L40S");

    let dir = tempfile::tempdir().expect("tmp dir");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"gpus\": 3}").expect("write");
    let out = std::process::Command::new(bin)
        .args(["telemetry", "--fake"])
        .arg(&bad)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.json") && err.contains("is not a snapshot"),
        "{err}"
    );
}
