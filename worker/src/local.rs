//! `tessera-worker local`: every rank of one replica as a separate local process (`serve` with
//! the env contract, ranks on 127.0.0.1, a free rendezvous port), the API on 127.0.0.1:PORT from
//! rank 0. The same supervisor runs the ranks of a pod with several local ranks.
//!
//! The supervisor prefixes each rank's log lines with its rank, forwards SIGTERM and SIGINT to
//! every rank (which drain and exit), and when a rank exits on its own it gives the others a few
//! seconds to exit by themselves (the group watchdog makes them), kills what is left and exits
//! non-zero naming the rank.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use crate::serve::{ServeConfig, env};

/// How long the other ranks get to exit by themselves after one exited.
pub const FOLLOW_EXIT_GRACE: Duration = Duration::from_secs(10);
/// How long ranks get to drain after SIGTERM before they are killed.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Arguments of `tessera-worker local`.
#[derive(Clone, Debug)]
pub struct LocalArgs {
    pub model: PathBuf,
    pub tp: usize,
    pub pp: usize,
    pub port: u16,
    /// CPU threads per rank (None: the machine's cores divided among the ranks).
    pub threads: Option<usize>,
    /// Where the ranks run the model (rank `i` takes GPU `i` on CUDA).
    pub device: crate::engine::device::DeviceRequest,
}

/// One rank to start: its global rank and its environment overrides.
struct RankSpec {
    rank: usize,
    env: Vec<(String, String)>,
}

/// `tessera-worker local`.
pub fn run(args: &LocalArgs) -> anyhow::Result<()> {
    if args.pp == 0 {
        bail!("--pp 0: the pipeline-parallel degree must be at least 1");
    }
    if args.tp == 0 {
        bail!("--tp 0: the tensor-parallel degree must be at least 1");
    }
    let model = std::path::absolute(&args.model)
        .with_context(|| format!("--model {}", args.model.display()))?;
    let file = crate::model::source::open(&model)?;
    let config = crate::model::llama::LlamaConfig::from_gguf(&file.metadata().gguf)?;
    config
        .check_shard(crate::model::parallel::Shard::new(0, args.tp)?)
        .with_context(|| format!("--tp {}", args.tp))?;
    config
        .check_stage(crate::model::parallel::Stage::new(0, args.pp)?)
        .with_context(|| format!("--pp {}", args.pp))?;
    drop(file);
    let world = args.tp * args.pp;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.threads.unwrap_or((cores / world).max(1));
    let rendezvous = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free rendezvous port on 127.0.0.1")?
        .port();
    let incarnation = format!(
        "local-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let served = std::env::var(env::SERVED_MODEL_NAME).unwrap_or_else(|_| {
        model
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned())
    });
    let inherit = |var: &str, default: String| std::env::var(var).unwrap_or(default);
    // A secret of this run's own: only its ranks can join the group.
    let secret = crate::hex(
        &crate::dist::wire::nonce().context("reading /dev/urandom for the group secret")?,
    );
    let specs = (0..world)
        .map(|rank| RankSpec {
            rank,
            env: vec![
                (env::TP.into(), args.tp.to_string()),
                (env::PP.into(), args.pp.to_string()),
                (env::STAGE.into(), (rank / args.tp).to_string()),
                (env::WORLD_SIZE.into(), world.to_string()),
                (env::RANK_OFFSET.into(), rank.to_string()),
                (env::LOCAL_RANKS.into(), "1".into()),
                (
                    env::LEADER_ADDRESS.into(),
                    format!("127.0.0.1:{rendezvous}"),
                ),
                (env::RENDEZVOUS_PORT.into(), rendezvous.to_string()),
                (env::PORT.into(), args.port.to_string()),
                (env::HOST.into(), "127.0.0.1".into()),
                (env::MODEL_PATH.into(), model.display().to_string()),
                (env::MODEL_URI.into(), format!("file://{}", model.display())),
                (env::SERVED_MODEL_NAME.into(), served.clone()),
                (env::INCARNATION.into(), incarnation.clone()),
                (env::THREADS.into(), threads.to_string()),
                (env::DEVICE.into(), args.device.name().into()),
                (env::GROUP_SECRET.into(), secret.clone()),
                (env::GPU_ORDINAL.into(), rank.to_string()),
                (
                    env::RENDEZVOUS_TIMEOUT_SECS.into(),
                    inherit(env::RENDEZVOUS_TIMEOUT_SECS, "120".into()),
                ),
            ],
        })
        .collect();
    tracing::info!(
        tp = args.tp,
        pp = args.pp,
        threads_per_rank = threads,
        "starting {world} ranks; the API will be on http://127.0.0.1:{}",
        args.port
    );
    supervise(specs)
}

/// `serve` in a pod with several local ranks: one child process per rank.
pub fn supervise_pod(cfg: &ServeConfig) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if cfg.threads == 0 {
        (cores / cfg.local_ranks).max(1)
    } else {
        cfg.threads
    };
    let specs = (0..cfg.local_ranks)
        .map(|i| RankSpec {
            rank: cfg.rank_offset + i,
            env: vec![
                (env::RANK_OFFSET.into(), (cfg.rank_offset + i).to_string()),
                (env::LOCAL_RANKS.into(), "1".into()),
                (env::THREADS.into(), threads.to_string()),
                // The pod's GPUs, one per local rank.
                (env::GPU_ORDINAL.into(), i.to_string()),
            ],
        })
        .collect();
    supervise(specs)
}

#[derive(Debug)]
enum Event {
    Signal(&'static str),
    Exited(usize, std::process::ExitStatus),
}

fn signal_pid(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) on a child's pid; no memory is involved.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn supervise(specs: Vec<RankSpec>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(supervise_async(specs))
}

async fn supervise_async(specs: Vec<RankSpec>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let exe = std::env::current_exe().context("finding this executable")?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, std::process::ExitStatus)>();
    let mut pids: Vec<(usize, u32)> = Vec::new();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let world = specs.len();
    for spec in specs {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("serve")
            .envs(spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl in the child before exec; async-signal-safe, touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                // The rank dies with the supervisor, even when the supervisor is killed.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting rank {}", spec.rank))?;
        let rank = spec.rank;
        let pid = child.id().unwrap_or(0);
        tracing::info!(rank, pid, "started rank {rank}");
        pids.push((rank, pid));
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("rank {rank} | {line}");
                }
            });
        }
        let tx = tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            if let Ok(st) = status {
                let _ = tx.send((rank, st));
            }
            // Keep the child handle alive until it has exited (kill_on_drop).
            drop(child);
        });
    }
    drop(tx);
    let event = tokio::select! {
        _ = sigterm.recv() => Event::Signal("SIGTERM"),
        _ = sigint.recv() => Event::Signal("SIGINT"),
        Some((rank, st)) = rx.recv() => Event::Exited(rank, st),
    };
    let mut alive: Vec<(usize, u32)> = pids.clone();
    match event {
        Event::Signal(name) => {
            tracing::info!("{name}: stopping every rank (they drain first)");
            for (_, pid) in &alive {
                signal_pid(*pid, libc::SIGTERM);
            }
            let mut failed = Vec::new();
            let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
            while !alive.is_empty() {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some((rank, st))) => {
                        alive.retain(|(r, _)| *r != rank);
                        if !st.success() {
                            failed.push(format!("rank {rank} ({st})"));
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        for (rank, pid) in &alive {
                            tracing::warn!(rank, "rank {rank} did not drain in time; killing it");
                            signal_pid(*pid, libc::SIGKILL);
                        }
                        break;
                    }
                }
            }
            if failed.is_empty() {
                tracing::info!("every rank stopped");
                Ok(())
            } else {
                bail!(
                    "ranks exited with errors while stopping: {}",
                    failed.join(", ")
                )
            }
        }
        Event::Exited(rank, st) => {
            alive.retain(|(r, _)| *r != rank);
            tracing::error!(
                "rank {rank} exited ({st}); the group of {world} ranks cannot continue, stopping it"
            );
            let deadline = tokio::time::Instant::now() + FOLLOW_EXIT_GRACE;
            while !alive.is_empty() {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some((r, s))) => {
                        tracing::info!("rank {r} exited ({s})");
                        alive.retain(|(x, _)| *x != r);
                    }
                    Ok(None) => break,
                    Err(_) => {
                        for (r, pid) in &alive {
                            tracing::warn!("rank {r} is still running; killing it");
                            signal_pid(*pid, libc::SIGKILL);
                        }
                        break;
                    }
                }
            }
            bail!("rank {rank} exited ({st}); the group was stopped")
        }
    }
}
