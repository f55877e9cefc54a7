//! Replays the synthetic traces of `examples/traces/` (made by `scripts/gen-traces.py`) through
//! the autoscaler's decision, as the library and as the `simulate-autoscaling` CLI, with the
//! example deployment `examples/deployments/llama-8b-autoscaling.yaml` (queueDepth, target 16,
//! 1..8 replicas, windows 30 s up and 300 s down, 2 replicas at start).
//!
//! The figures quoted in docs/autoscaling.md are printed here:
//! `cargo test -p tessera-operator --test autoscale_traces -- --nocapture --test-threads 1`.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use tessera_operator::api::AutoscalingSpec;
use tessera_operator::autoscale::decide::Params;
use tessera_operator::simulate_cmd::{
    Step, TraceRow, changes, direction_changes, parse_trace, simulate,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deployment() -> PathBuf {
    root().join("examples/deployments/llama-8b-autoscaling.yaml")
}

fn trace_path(name: &str) -> PathBuf {
    root().join(format!("examples/traces/{name}.csv"))
}

fn spec() -> (AutoscalingSpec, u32) {
    let mds = tessera_operator::plan_cmd::load_deployments(&[deployment()]).expect("example");
    let md = &mds[0];
    (
        md.spec.autoscaling.clone().expect("autoscaling"),
        md.spec.replicas as u32,
    )
}

fn trace(name: &str) -> Vec<TraceRow> {
    let p = trace_path(name);
    let text = std::fs::read_to_string(&p).expect("trace");
    parse_trace(&text, name).expect("valid trace")
}

fn replay(name: &str, capacity: Option<u32>) -> Vec<Step> {
    let (sp, start) = spec();
    simulate(&sp, start, &trace(name), capacity, &Params::default())
}

/// Replicas over time as `t:replicas` at every change, plus the counts.
fn summary(name: &str, steps: &[Step]) -> String {
    let mut s = format!("{name}: start {}", steps[0].previous);
    for st in steps.iter().filter(|s| s.replicas != s.previous) {
        s.push_str(&format!(", {}s->{}", st.t, st.replicas));
    }
    let lo = steps.iter().map(|s| s.replicas).min().unwrap_or(0);
    let hi = steps.iter().map(|s| s.replicas).max().unwrap_or(0);
    format!(
        "{s}; range {lo}..{hi}; {} changes, {} direction changes",
        changes(steps),
        direction_changes(steps)
    )
}

fn assert_bounded(steps: &[Step]) {
    for s in steps {
        assert!(
            (1..=8).contains(&s.replicas),
            "t={}: {} replicas",
            s.t,
            s.replicas
        );
    }
}

/// Seconds from `from` until replicas first reach `target`.
fn time_to(steps: &[Step], from: f64, target: u32) -> Option<f64> {
    steps
        .iter()
        .find(|s| s.t >= from && s.replicas >= target)
        .map(|s| s.t - from)
}

#[test]
fn steady_load_never_scales() {
    let steps = replay("steady", None);
    println!("{}", summary("steady", &steps));
    assert_bounded(&steps);
    assert_eq!(changes(&steps), 0);
    assert!(steps.iter().all(|s| s.replicas == 2));
}

#[test]
fn ramp_follows_up_without_going_back() {
    let steps = replay("ramp", None);
    println!("{}", summary("ramp", &steps));
    assert_bounded(&steps);
    assert_eq!(direction_changes(&steps), 0);
    assert!(steps.windows(2).all(|w| w[1].replicas >= w[0].replicas));
    // 128 requests at target 16 need 8 replicas; the ramp tops out at t=1200 s.
    let t = time_to(&steps, 1200.0, 8).expect("reaches 8");
    println!("ramp: 8 replicas {t} s after the ramp tops out");
    assert!(t <= 60.0, "{t} s");
}

#[test]
fn step_reaches_its_target_quickly_and_stays() {
    let steps = replay("step", None);
    println!("{}", summary("step", &steps));
    assert_bounded(&steps);
    // 96 requests at target 16: 6 replicas. Up window 30 s, one decision every 15 s.
    let t = time_to(&steps, 300.0, 6).expect("reaches 6");
    println!("step: time to target (6 replicas) after the step at t=300 s: {t} s");
    assert!(t <= 45.0, "{t} s");
    assert!(changes(&steps) <= 2, "{}", changes(&steps));
    assert_eq!(direction_changes(&steps), 0);
}

#[test]
fn a_spike_scales_up_once_and_down_once() {
    let steps = replay("spike", None);
    println!("{}", summary("spike", &steps));
    assert_bounded(&steps);
    assert!(changes(&steps) <= 2, "{}", summary("spike", &steps));
    // Down only after the 300 s window past the spike (t=600..630).
    for s in steps.iter().filter(|s| s.replicas < s.previous) {
        assert!(s.t >= 615.0 + 300.0, "scaled down at t={}", s.t);
    }
    assert!(steps.last().expect("rows").replicas <= 3);
}

#[test]
fn flapping_load_does_not_flap_replicas() {
    let steps = replay("flapping", None);
    println!("{}", summary("flapping", &steps));
    assert_bounded(&steps);
    assert!(changes(&steps) <= 2, "{}", summary("flapping", &steps));
    assert_eq!(direction_changes(&steps), 0);
}

#[test]
fn diurnal_load_is_followed_with_few_changes() {
    let steps = replay("diurnal", None);
    println!("{}", summary("diurnal", &steps));
    assert_bounded(&steps);
    // Two compressed days: one way up and one way down per day.
    assert!(
        direction_changes(&steps) <= 4,
        "{}",
        summary("diurnal", &steps)
    );
    assert!(changes(&steps) <= 30, "{}", summary("diurnal", &steps));
    // Enough replicas at each peak (t=3600 s and 10800 s: 120 requests, 7.5 replicas' worth).
    for peak in [3600.0, 10800.0] {
        let s = steps.iter().find(|s| s.t >= peak).expect("peak row");
        assert!(s.replicas >= 7, "t={}: {} replicas", s.t, s.replicas);
    }
    // And few at each trough (t=0, 7200 s, 14385 s: 8 requests).
    assert!(steps.last().expect("rows").replicas <= 2);
}

#[test]
fn missing_samples_hold_the_replicas() {
    let steps = replay("missing", None);
    println!("{}", summary("missing", &steps));
    assert_bounded(&steps);
    let gap: Vec<&Step> = steps.iter().filter(|s| s.demand.is_none()).collect();
    assert_eq!(gap.len(), 40);
    for s in &gap {
        assert_eq!(s.replicas, s.previous, "t={}: changed without metrics", s.t);
        assert_eq!(s.reason, "MetricsMissing");
        assert!(s.message.contains("holding"), "{}", s.message);
    }
    // After the gap the low load scales down only once the 300 s window has passed.
    for s in steps.iter().filter(|s| s.replicas < s.previous) {
        assert!(s.t >= 1185.0 + 300.0, "scaled down at t={}", s.t);
    }
    assert_eq!(steps.last().expect("rows").replicas, 2);
}

#[test]
fn capacity_caps_the_replicas_and_says_so() {
    let steps = replay("capacity-capped", Some(5));
    println!("{}", summary("capacity-capped --capacity 5", &steps));
    assert!(steps.iter().all(|s| s.replicas <= 5));
    let limited: Vec<&Step> = steps.iter().filter(|s| s.capacity_limited).collect();
    assert!(!limited.is_empty());
    let last = steps.last().expect("rows");
    assert_eq!(last.replicas, 5);
    assert_eq!(last.reason, "CapacityLimited");
    assert!(
        last.message.contains("wanted 8 replicas, 5 fit"),
        "{}",
        last.message
    );
    // Without the cap the same trace goes to maxReplicas.
    let free = replay("capacity-capped", None);
    assert_eq!(free.last().expect("rows").replicas, 8);
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tessera-operator"))
        .args(args)
        .output()
        .expect("run tessera-operator")
}

#[test]
fn the_cli_replays_the_same_decisions() {
    for (name, cap) in [
        ("step", None),
        ("missing", None),
        ("capacity-capped", Some("5")),
    ] {
        let dep = deployment();
        let tr = trace_path(name);
        let mut args = vec![
            "simulate-autoscaling",
            "-f",
            dep.to_str().expect("utf-8"),
            "--trace",
            tr.to_str().expect("utf-8"),
            "-o",
            "json",
        ];
        if let Some(c) = cap {
            args.extend(["--capacity", c]);
        }
        let out = cli(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("utf-8");
        let rows: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect();
        let lib = replay(name, cap.map(|c| c.parse().expect("number")));
        assert_eq!(rows.len(), lib.len());
        for (r, s) in rows.iter().zip(&lib) {
            assert_eq!(r["t"].as_f64(), Some(s.t));
            assert_eq!(r["replicas"].as_u64(), Some(u64::from(s.replicas)));
            assert_eq!(r["reason"].as_str(), Some(s.reason));
            assert_eq!(r["demand"].as_f64(), s.demand);
        }
    }
    // The table ends with a summary.
    let dep = deployment();
    let tr = trace_path("flapping");
    let out = cli(&[
        "simulate-autoscaling",
        "-f",
        dep.to_str().expect("utf-8"),
        "--trace",
        tr.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(text.starts_with(&format!("{:>8}", "T")), "{text}");
    assert!(text.contains("120 rows; replicas 2 at start"), "{text}");
}

#[test]
fn the_cli_explains_a_bad_trace() {
    let dir = tempfile::tempdir().expect("dir");
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "t,demand\n0,10\n15,lots\n").expect("write");
    let dep = deployment();
    let out = cli(&[
        "simulate-autoscaling",
        "-f",
        dep.to_str().expect("utf-8"),
        "--trace",
        bad.to_str().expect("utf-8"),
    ]);
    drop(dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3") && err.contains("\"lots\"") && err.contains("must be a number"),
        "{err}"
    );
}
