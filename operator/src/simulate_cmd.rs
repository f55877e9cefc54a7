//! `tessera-operator simulate-autoscaling`: replay a load trace through the autoscaler's own
//! decision code, offline, to tune a ModelDeployment's `spec.autoscaling`.
//!
//! The trace is CSV with the header `t,demand`: `t` in seconds (increasing), `demand` the
//! deployment's total load in the metric's unit, empty for a missing sample. Every row is one
//! decision at time `t` (the operator decides every 15 s by default). The per-replica value the
//! decision sees is `demand / current replicas`, the same on every replica:
//!
//! | metric | demand is |
//! |---|---|
//! | `queueDepth` | waiting + running requests over all replicas |
//! | `kvCacheUtilization` | the sum of the replicas' KV-cache use (fractions), e.g. 2.4 |
//! | `tokensPerSecond` | generated tokens/s of the whole deployment |
//! | `gpuUtilization` | the sum of the replicas' GPU utilisation (fractions) |
//!
//! New replicas are assumed to serve at once (no start-up delay). `--capacity N` caps the
//! replicas that can be placed, as the planner would in a full cluster.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::api::{AutoscalingSpec, ModelDeployment};
use crate::autoscale::decide::{Decision, History, Input, Params, ReplicaSample, decide};

/// Output format of `simulate-autoscaling`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A table for people, with a summary.
    Table,
    /// One JSON object per trace row, one per line.
    Json,
}

/// Flags of `tessera-operator simulate-autoscaling`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The ModelDeployment (one, with `spec.autoscaling`).
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// The load trace: CSV with header `t,demand`.
    #[arg(long, value_name = "TRACE.csv")]
    pub trace: PathBuf,
    /// Most replicas the cluster can place.
    #[arg(long, value_name = "N")]
    pub capacity: Option<u32>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// One trace row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TraceRow {
    pub t: f64,
    /// `None`: a missing sample.
    pub demand: Option<f64>,
}

/// One row of the result.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub t: f64,
    pub demand: Option<f64>,
    /// The value each replica reported (`demand / previous`).
    pub per_replica: Option<f64>,
    /// Replicas before the decision.
    pub previous: u32,
    /// Replicas after the decision.
    pub replicas: u32,
    pub reason: &'static str,
    pub message: String,
    pub capacity_limited: bool,
    /// What the decision wanted before the capacity limit.
    pub wanted: u32,
}

/// Parse a trace. Errors name the line, the value, the rule and the fix.
pub fn parse_trace(text: &str, source: &str) -> Result<Vec<TraceRow>, String> {
    let mut rows = Vec::new();
    let mut header_seen = false;
    let mut last_t: Option<f64> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim().trim_start_matches('\u{feff}');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if !header_seen {
            if cells != ["t", "demand"] {
                return Err(format!(
                    "{source}: line {n}: header {line:?}: the first line must be exactly \"t,demand\"; add that header"
                ));
            }
            header_seen = true;
            continue;
        }
        if cells.len() != 2 {
            return Err(format!(
                "{source}: line {n}: {line:?}: expected 2 columns (t,demand), got {}; write one time and one demand per line, demand empty for a missing sample",
                cells.len()
            ));
        }
        let t: f64 = cells[0]
            .parse()
            .ok()
            .filter(|t: &f64| t.is_finite() && *t >= 0.0)
            .ok_or_else(|| {
                format!(
                    "{source}: line {n}: t {:?}: must be a number of seconds >= 0; fix the time",
                    cells[0]
                )
            })?;
        if let Some(prev) = last_t
            && t <= prev
        {
            return Err(format!(
                "{source}: line {n}: t {t}: must be greater than the previous row's {prev}; sort the rows by time and drop duplicates"
            ));
        }
        last_t = Some(t);
        let demand = if cells[1].is_empty() {
            None
        } else {
            Some(
                cells[1]
                    .parse::<f64>()
                    .ok()
                    .filter(|d| d.is_finite() && *d >= 0.0)
                    .ok_or_else(|| {
                        format!(
                            "{source}: line {n}: demand {:?}: must be a number >= 0, or empty for a missing sample; fix the value or leave it empty",
                            cells[1]
                        )
                    })?,
            )
        };
        rows.push(TraceRow { t, demand });
    }
    if !header_seen {
        return Err(format!(
            "{source}: empty trace: expected the header \"t,demand\" and at least one row"
        ));
    }
    if rows.is_empty() {
        return Err(format!(
            "{source}: no rows after the header; add rows such as \"0,12\""
        ));
    }
    Ok(rows)
}

/// Replay a trace through [`decide`], starting from `start` replicas.
pub fn simulate(
    spec: &AutoscalingSpec,
    start: u32,
    trace: &[TraceRow],
    capacity: Option<u32>,
    params: &Params,
) -> Vec<Step> {
    let mut history = History::default();
    let mut current = start;
    let mut out = Vec::with_capacity(trace.len());
    for row in trace {
        let per_replica = row.demand.map(|d| d / f64::from(current.max(1)));
        let samples: Vec<ReplicaSample> = match per_replica {
            Some(v) => (0..current.max(1))
                .map(|_| ReplicaSample::of(spec.metric, v))
                .collect(),
            None => Vec::new(),
        };
        let d: Decision = decide(
            &Input {
                spec,
                current,
                samples: &samples,
                capacity,
                now_s: row.t,
            },
            &history,
            params,
        );
        history.commit(spec, params, &d, row.t);
        out.push(Step {
            t: row.t,
            demand: row.demand,
            per_replica,
            previous: current,
            replicas: d.replicas,
            reason: d.reason.as_str(),
            message: d.message.clone(),
            capacity_limited: d.capacity_limited,
            wanted: d.wanted,
        });
        current = d.replicas;
    }
    out
}

/// Number of times the replicas changed.
pub fn changes(steps: &[Step]) -> usize {
    steps.iter().filter(|s| s.replicas != s.previous).count()
}

/// Number of times the direction of change flipped (up then down, or down then up).
pub fn direction_changes(steps: &[Step]) -> usize {
    let mut last: Option<bool> = None;
    let mut flips = 0;
    for s in steps.iter().filter(|s| s.replicas != s.previous) {
        let up = s.replicas > s.previous;
        if last.is_some_and(|l| l != up) {
            flips += 1;
        }
        last = Some(up);
    }
    flips
}

fn load_spec(path: &Path) -> Result<(ModelDeployment, AutoscalingSpec), String> {
    let mut mds = crate::plan_cmd::load_deployments(&[path.to_path_buf()])?;
    if mds.len() != 1 {
        return Err(format!(
            "{}: holds {} ModelDeployments; simulate-autoscaling takes a file with exactly one",
            path.display(),
            mds.len()
        ));
    }
    let md = mds.remove(0);
    let Some(a) = md.spec.autoscaling.clone() else {
        return Err(format!(
            "{}: spec.autoscaling is not set; add spec.autoscaling (minReplicas, maxReplicas, metric, target) to simulate it",
            path.display()
        ));
    };
    Ok((md, a))
}

fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v == v.trunc() && v.abs() < 1e12 => format!("{v:.0}"),
        Some(v) => format!("{v:.3}"),
    }
}

/// Run and render; the error says what is wrong and how to fix it.
pub fn run(args: &SimulateArgs) -> Result<String, String> {
    let (md, spec) = load_spec(&args.file)?;
    let text = std::fs::read_to_string(&args.trace)
        .map_err(|e| format!("{}: cannot read: {e}", args.trace.display()))?;
    let trace = parse_trace(&text, &args.trace.display().to_string())?;
    if !spec.enabled {
        eprintln!(
            "note: {}: spec.autoscaling.enabled is false, so the operator would leave replicas alone; simulating as if it were true",
            args.file.display()
        );
    }
    let start = md.spec.replicas.max(0) as u32;
    let steps = simulate(&spec, start, &trace, args.capacity, &Params::default());
    let mut out = String::new();
    match args.output {
        OutputFormat::Json => {
            for s in &steps {
                out.push_str(&serde_json::to_string(s).map_err(|e| e.to_string())?);
                out.push('\n');
            }
        }
        OutputFormat::Table => {
            let _ = writeln!(
                out,
                "{:>8}  {:>10}  {:>11}  {:>8}  {:<20}  MESSAGE",
                "T", "DEMAND", "PER-REPLICA", "REPLICAS", "REASON"
            );
            for s in &steps {
                let _ = writeln!(
                    out,
                    "{:>8}  {:>10}  {:>11}  {:>8}  {:<20}  {}",
                    fmt_num(Some(s.t)),
                    fmt_num(s.demand),
                    fmt_num(s.per_replica),
                    s.replicas,
                    s.reason,
                    s.message
                );
            }
            let lo = steps.iter().map(|s| s.replicas).min().unwrap_or(0);
            let hi = steps.iter().map(|s| s.replicas).max().unwrap_or(0);
            let _ = writeln!(
                out,
                "\n{} rows; replicas {start} at start, {} at the end, between {lo} and {hi}; {} changes, {} direction changes; capacity-limited rows: {}",
                steps.len(),
                steps.last().map_or(start, |s| s.replicas),
                changes(&steps),
                direction_changes(&steps),
                steps.iter().filter(|s| s.capacity_limited).count()
            );
        }
    }
    Ok(out)
}

/// Entry point of the subcommand.
pub fn main(args: &SimulateArgs) -> ExitCode {
    match run(args) {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            if let Err(e) = out.write_all(text.as_bytes()) {
                eprintln!("error: writing to stdout: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_errors_name_line_value_rule_and_fix() {
        let e = parse_trace("t,demand\n0,1\n15,abc\n", "x.csv").expect_err("bad");
        assert!(
            e.contains("line 3") && e.contains("\"abc\"") && e.contains("leave it empty"),
            "{e}"
        );
        let e = parse_trace("time,load\n", "x.csv").expect_err("bad header");
        assert!(e.contains("line 1") && e.contains("t,demand"), "{e}");
        let e = parse_trace("t,demand\n10,1\n5,1\n", "x.csv").expect_err("order");
        assert!(e.contains("line 3") && e.contains("sort"), "{e}");
        let e = parse_trace("t,demand\n0,-2\n", "x.csv").expect_err("negative");
        assert!(e.contains(">= 0"), "{e}");
        let rows = parse_trace("# c\nt,demand\n0,1.5\n15,\n", "x.csv").expect("ok");
        assert_eq!(
            rows,
            vec![
                TraceRow {
                    t: 0.0,
                    demand: Some(1.5)
                },
                TraceRow {
                    t: 15.0,
                    demand: None
                }
            ]
        );
    }
}
