//! `tessera-operator scrape`: read one running replica leader's `/metrics` through the
//! autoscaler's own scrape code (HTTP GET, the engine's series, the tokens/s rate over two
//! scrapes) and print the sample and the decision the autoscaler would take for a
//! ModelDeployment. For checking an engine's metrics against a live server (scripts/engine-check.sh
//! does it against a real vLLM) and for debugging a deployment that does not scale.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use crate::autoscale::decide::{Decision, History, Input, Params, ReplicaSample, decide};
use crate::autoscale::scrape::{self, LeaderMetrics};

/// Flags of `tessera-operator scrape`.
#[derive(Debug, Args)]
pub struct ScrapeArgs {
    /// The ModelDeployment (one, with `spec.autoscaling`): its engine names the series, its
    /// autoscaling spec drives the decision.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// Address of the replica leader's HTTP port (`/metrics` is read there).
    #[arg(long, value_name = "HOST:PORT")]
    pub leader: SocketAddr,
    /// Replicas the deployment has now.
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// Seconds between the two scrapes (the tokens/s rate needs two).
    #[arg(long, default_value_t = 2.0)]
    pub interval_seconds: f64,
    /// Timeout of each scrape, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub timeout_seconds: f64,
}

/// What `scrape` prints (one JSON object).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScrapeReport {
    pub engine: &'static str,
    pub leader: String,
    /// The series as read on the second scrape.
    pub metrics: LeaderMetrics,
    /// The decision's per-replica sample.
    pub sample: ReplicaSample,
    /// The autoscaler's decision for `--replicas` replicas, every one loaded like this one.
    pub decision: Decision,
}

/// Scrape and decide; the error says what failed and how to fix it.
pub async fn run(args: &ScrapeArgs) -> Result<ScrapeReport, String> {
    let mut mds = crate::plan_cmd::load_deployments(std::slice::from_ref(&args.file))?;
    if mds.len() != 1 {
        return Err(format!(
            "{}: holds {} ModelDeployments; scrape takes a file with exactly one",
            args.file.display(),
            mds.len()
        ));
    }
    let md = mds.remove(0);
    let Some(spec) = md.spec.autoscaling.clone() else {
        return Err(format!(
            "{}: spec.autoscaling is not set; add it (minReplicas, maxReplicas, metric, target) to see a decision",
            args.file.display()
        ));
    };
    let engine = md.spec.engine.name;
    let timeout = Duration::from_secs_f64(args.timeout_seconds.max(0.1));
    let get = |n: u32| async move {
        scrape::fetch(args.leader, timeout)
            .await
            .map(|text| LeaderMetrics::from_engine_text(engine, &text))
            .map_err(|e| {
                format!(
                    "scrape {n} of http://{}/metrics failed: {e}; is the engine serving there?",
                    args.leader
                )
            })
    };
    let first = get(1).await?;
    let interval = Duration::from_secs_f64(args.interval_seconds.max(0.0));
    tokio::time::sleep(interval).await;
    let second = get(2).await?;
    let previous = first
        .generated_tokens_total
        .map(|v| (v, interval.as_secs_f64()));
    let sample = second.sample(previous);
    let samples = vec![sample.clone(); args.replicas.max(1) as usize];
    let decision = decide(
        &Input {
            spec: &spec,
            current: args.replicas,
            samples: &samples,
            capacity: None,
            now_s: 0.0,
        },
        &History::default(),
        &Params::default(),
    );
    Ok(ScrapeReport {
        engine: engine.as_str(),
        leader: args.leader.to_string(),
        metrics: second,
        sample,
        decision,
    })
}

/// Run `scrape`; prints the report as JSON, or the error.
pub fn main(args: &ScrapeArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(report) => match serde_json::to_string_pretty(&report) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
