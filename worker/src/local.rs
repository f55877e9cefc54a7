//! `tessera-worker local`: every rank of one replica as a separate local process (`serve` with
//! the env contract, ranks on 127.0.0.1, a free rendezvous port), the API on 127.0.0.1:PORT from
//! rank 0. The same supervisor runs the ranks of a pod with several local ranks.
//!
//! The supervisor prefixes each rank's log lines with its rank, forwards SIGTERM and SIGINT to
//! every rank (which drain and exit), and when a rank exits on its own it gives the others a few
//! seconds to exit by themselves (the group watchdog makes them), kills what is left and exits
//! non-zero naming the rank.
//!
//! With `--prefill N --decode M` it starts N prefill and M decode replicas (each a group of
//! `--tp` ranks on ports of their own, `TESSERA_PD_ROLE` set) and serves the OpenAI API from the
//! prefill/decode [`router`](crate::router) in this process. A replica whose rank exits is
//! stopped and leaves the router's rotation; when no replica of a role is left, the router
//! drains, the other replicas are stopped and `local` exits non-zero naming the replica.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use crate::engine::device::DeviceRequest;
use crate::engine::runner::KvTarget;
use crate::router::{ReplicaSpec, RouterConfig, RouterLimits};
use crate::serve::{ServeConfig, env};
use crate::server::pd::PdRole;

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
    /// Prefill/decode disaggregation: (prefill replicas, decode replicas), each of `tp`
    /// ranks, behind the router; `None`: one replica serving requests whole.
    pub disaggregated: Option<(usize, usize)>,
}

/// One rank to start: its global rank and its environment overrides.
struct RankSpec {
    rank: usize,
    env: Vec<(String, String)>,
}

/// What every rank of one replica started by `local` is told.
struct ReplicaEnv<'a> {
    model: &'a Path,
    served: &'a str,
    tp: usize,
    pp: usize,
    rendezvous: u16,
    port: u16,
    incarnation: String,
    threads: usize,
    device: &'static str,
    secret: &'a str,
}

impl ReplicaEnv<'_> {
    /// The environment of global rank `rank` (the env contract of `serve`).
    fn rank(&self, rank: usize) -> Vec<(String, String)> {
        let inherit =
            |var: &str, default: &str| std::env::var(var).unwrap_or_else(|_| default.to_owned());
        vec![
            (env::TP.into(), self.tp.to_string()),
            (env::PP.into(), self.pp.to_string()),
            (env::STAGE.into(), (rank / self.tp).to_string()),
            (env::WORLD_SIZE.into(), (self.tp * self.pp).to_string()),
            (env::RANK_OFFSET.into(), rank.to_string()),
            (env::LOCAL_RANKS.into(), "1".into()),
            (
                env::LEADER_ADDRESS.into(),
                format!("127.0.0.1:{}", self.rendezvous),
            ),
            (env::RENDEZVOUS_PORT.into(), self.rendezvous.to_string()),
            (env::PORT.into(), self.port.to_string()),
            (env::HOST.into(), "127.0.0.1".into()),
            (env::MODEL_PATH.into(), self.model.display().to_string()),
            (
                env::MODEL_URI.into(),
                format!("file://{}", self.model.display()),
            ),
            (env::SERVED_MODEL_NAME.into(), self.served.to_owned()),
            (env::INCARNATION.into(), self.incarnation.clone()),
            (env::THREADS.into(), self.threads.to_string()),
            (env::DEVICE.into(), self.device.into()),
            (env::GROUP_SECRET.into(), self.secret.to_owned()),
            (env::GPU_ORDINAL.into(), rank.to_string()),
            (
                env::RENDEZVOUS_TIMEOUT_SECS.into(),
                inherit(env::RENDEZVOUS_TIMEOUT_SECS, "120"),
            ),
        ]
    }
}

/// `n` distinct free TCP ports on 127.0.0.1 (all held open while choosing, so no two are the
/// same; another program may still take one before the ranks bind it).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("finding free ports on 127.0.0.1")?;
    held.iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect::<std::io::Result<Vec<u16>>>()
        .context("finding free ports on 127.0.0.1")
}

/// `tessera-worker local`.
pub fn run(args: &LocalArgs) -> anyhow::Result<()> {
    if args.pp == 0 {
        bail!("--pp 0: the pipeline-parallel degree must be at least 1");
    }
    if args.tp == 0 {
        bail!("--tp 0: the tensor-parallel degree must be at least 1");
    }
    if let Some((prefill, decode)) = args.disaggregated {
        if prefill == 0 || decode == 0 {
            bail!(
                "--prefill {prefill} --decode {decode}: a disaggregated deployment needs at least one prefill and one decode replica"
            );
        }
        if args.pp != 1 {
            bail!(
                "--pp {} with --prefill/--decode: prefill/decode disaggregation does not support pipeline stages; use --pp 1 (each replica may still use --tp)",
                args.pp
            );
        }
        if args.device == DeviceRequest::Cuda {
            bail!(
                "--device cuda with --prefill/--decode: prefill/decode disaggregation runs on the CPU engine only (the KV cache would have to leave the GPU); use --device cpu"
            );
        }
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
    if let Some((prefill, decode)) = args.disaggregated {
        return run_disaggregated(args, &model, prefill, decode);
    }
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
    let served = served_name(&model);
    // A secret of this run's own: only its ranks can join the group.
    let secret = new_secret()?;
    let replica = ReplicaEnv {
        model: &model,
        served: &served,
        tp: args.tp,
        pp: args.pp,
        rendezvous,
        port: args.port,
        incarnation,
        threads,
        device: args.device.name(),
        secret: &secret,
    };
    let specs = (0..world)
        .map(|rank| RankSpec {
            rank,
            env: replica.rank(rank),
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

/// A fresh random group secret (hex) for the ranks this run starts.
fn new_secret() -> anyhow::Result<String> {
    Ok(crate::hex(
        &crate::dist::wire::nonce().context("reading /dev/urandom for the group secret")?,
    ))
}

/// The served model name: `TESSERA_SERVED_MODEL_NAME`, else the model file's stem.
fn served_name(model: &Path) -> String {
    std::env::var(env::SERVED_MODEL_NAME).unwrap_or_else(|_| {
        model
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned())
    })
}

/// One replica of a disaggregated deployment: its name (`prefill-0`), role and ranks.
struct PdGroup {
    name: String,
    role: PdRole,
    ranks: Vec<RankSpec>,
}

/// `tessera-worker local --prefill N --decode M`: N + M replicas of `--tp` ranks each, and the
/// router on `--port`.
fn run_disaggregated(
    args: &LocalArgs,
    model: &Path,
    prefill: usize,
    decode: usize,
) -> anyhow::Result<()> {
    let replicas = prefill + decode;
    let ranks = replicas * args.tp;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.threads.unwrap_or((cores / ranks).max(1));
    let served = served_name(model);
    // One secret for the whole deployment: it authenticates each group's ranks, the KV
    // transfers between replicas and the router's internal calls.
    let secret = new_secret()?;
    let run_id = format!(
        "local-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    // Per replica: rendezvous and API ports; per decode rank: a KV port.
    let mut ports = free_ports(2 * replicas + decode * args.tp)?.into_iter();
    let mut groups = Vec::new();
    let mut router = RouterConfig {
        prefill: Vec::new(),
        decode: Vec::new(),
        secret: secret.clone().into_bytes(),
        limits: RouterLimits::default(),
    };
    for (role, count) in [(PdRole::Prefill, prefill), (PdRole::Decode, decode)] {
        for index in 0..count {
            let name = format!("{}-{index}", role.name());
            let (rendezvous, port) = (
                ports.next().context("free port")?,
                ports.next().context("free port")?,
            );
            let replica = ReplicaEnv {
                model,
                served: &served,
                tp: args.tp,
                pp: 1,
                rendezvous,
                port,
                incarnation: format!("{run_id}-{name}"),
                threads,
                device: "cpu",
                secret: &secret,
            };
            let kv_ports: Vec<u16> = match role {
                PdRole::Prefill => Vec::new(),
                PdRole::Decode => (0..args.tp)
                    .map(|_| ports.next().context("free port"))
                    .collect::<anyhow::Result<_>>()?,
            };
            let ranks = (0..args.tp)
                .map(|rank| {
                    let mut env = replica.rank(rank);
                    env.push((env::PD_ROLE.into(), role.name().into()));
                    if let Some(p) = kv_ports.get(rank) {
                        env.push((env::KV_PORT.into(), p.to_string()));
                    }
                    RankSpec { rank, env }
                })
                .collect();
            let spec = ReplicaSpec {
                name: name.clone(),
                api: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                kv: (role == PdRole::Decode).then(|| KvTarget {
                    group_id: replica.incarnation.clone(),
                    addrs: kv_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
                }),
            };
            match role {
                PdRole::Prefill => router.prefill.push(spec),
                PdRole::Decode => router.decode.push(spec),
            }
            groups.push(PdGroup { name, role, ranks });
        }
    }
    let listener = std::net::TcpListener::bind(("127.0.0.1", args.port))
        .with_context(|| format!("listening on 127.0.0.1:{} (--port)", args.port))?;
    listener.set_nonblocking(true)?;
    tracing::info!(
        prefill,
        decode,
        tp = args.tp,
        threads_per_rank = threads,
        "starting {prefill} prefill and {decode} decode replicas of {} ranks each; the API will be on http://127.0.0.1:{}",
        args.tp,
        args.port
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(supervise_disaggregated(groups, router, listener))
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

/// Start `tessera-worker serve` with `env` as a child that dies with this process; its log
/// lines go to stderr behind `prefix`, and its exit status to `exits` with `key`. With
/// `own_group` the child gets a process group of its own, so that a terminal's Ctrl-C reaches
/// only this supervisor, which stops the children in order. Returns its pid.
fn spawn_rank<K: Send + 'static>(
    exe: &Path,
    env: Vec<(String, String)>,
    prefix: String,
    key: K,
    exits: mpsc::UnboundedSender<(K, std::process::ExitStatus)>,
    own_group: bool,
) -> anyhow::Result<u32> {
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("serve")
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl and setpgid in the child before exec; both async-signal-safe, neither
    // touches memory.
    unsafe {
        cmd.pre_exec(move || {
            // The rank dies with the supervisor, even when the supervisor is killed.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if own_group {
                libc::setpgid(0, 0);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{prefix}{line}");
            }
        });
    }
    tokio::spawn(async move {
        let status = child.wait().await;
        if let Ok(st) = status {
            let _ = exits.send((key, st));
        }
        // Keep the child handle alive until it has exited (kill_on_drop).
        drop(child);
    });
    Ok(pid)
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
        let rank = spec.rank;
        let pid = spawn_rank(
            &exe,
            spec.env,
            format!("rank {rank} | "),
            rank,
            tx.clone(),
            false,
        )
        .with_context(|| format!("starting rank {rank}"))?;
        tracing::info!(rank, pid, "started rank {rank}");
        pids.push((rank, pid));
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

/// Run the replicas of a disaggregated deployment and the router until SIGTERM/SIGINT (the
/// router drains, then every rank is stopped) or until no replica of a role is left (exit
/// non-zero naming the last one lost). A replica whose rank exits is stopped (its other ranks
/// get [`FOLLOW_EXIT_GRACE`] to exit by themselves) and the router takes it out of rotation.
async fn supervise_disaggregated(
    groups: Vec<PdGroup>,
    router: RouterConfig,
    listener: std::net::TcpListener,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let (tx, mut rx) = mpsc::unbounded_channel::<((usize, usize), std::process::ExitStatus)>();
    // Per group: its live ranks and their pids.
    let mut alive: Vec<Vec<(usize, u32)>> = Vec::with_capacity(groups.len());
    for (g, group) in groups.iter().enumerate() {
        let mut pids = Vec::new();
        for spec in &group.ranks {
            let (name, rank) = (&group.name, spec.rank);
            let pid = spawn_rank(
                &exe,
                spec.env.clone(),
                format!("{name} rank {rank} | "),
                (g, rank),
                tx.clone(),
                true,
            )
            .with_context(|| format!("starting {name} rank {rank}"))?;
            tracing::info!(replica = %name, rank, pid, "started {name} rank {rank}");
            pids.push((rank, pid));
        }
        alive.push(pids);
    }
    drop(tx);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let mut router_task = tokio::spawn(crate::router::serve(listener, router, async move {
        let _ = stop_rx.await;
    }));
    let mut router_done = false;
    let mut dead: Vec<bool> = vec![false; groups.len()];
    let mut kill_at: Vec<(tokio::time::Instant, usize)> = Vec::new();
    let outcome: Result<&'static str, String> = loop {
        let next_kill = kill_at
            .iter()
            .map(|(t, _)| *t)
            .min()
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = sigterm.recv() => break Ok("SIGTERM"),
            _ = sigint.recv() => break Ok("SIGINT"),
            Some(((g, rank), st)) = rx.recv() => {
                alive[g].retain(|(r, _)| *r != rank);
                let (name, role) = (&groups[g].name, groups[g].role);
                if dead[g] {
                    tracing::info!("{name} rank {rank} exited ({st})");
                } else {
                    dead[g] = true;
                    tracing::error!(
                        "{name} rank {rank} exited ({st}); {name} cannot continue, stopping it"
                    );
                    kill_at.push((tokio::time::Instant::now() + FOLLOW_EXIT_GRACE, g));
                }
                let left = groups
                    .iter()
                    .zip(&dead)
                    .filter(|(other, d)| other.role == role && !**d)
                    .count();
                if left == 0 {
                    break Err(format!(
                        "{name} rank {rank} exited ({st}); no {} replica is left, so the deployment was stopped",
                        role.name()
                    ));
                }
            }
            () = tokio::time::sleep_until(next_kill) => {
                let now = tokio::time::Instant::now();
                for (_, g) in kill_at.iter().filter(|(t, _)| *t <= now) {
                    for (rank, pid) in &alive[*g] {
                        tracing::warn!("{} rank {rank} is still running; killing it", groups[*g].name);
                        signal_pid(*pid, libc::SIGKILL);
                    }
                }
                kill_at.retain(|(t, _)| *t > now);
            }
            served = &mut router_task => {
                router_done = true;
                break Err(match served {
                    Ok(Ok(())) => "the router stopped".to_owned(),
                    Ok(Err(e)) => format!("the router failed: {e:#}"),
                    Err(e) => format!("the router failed: {e}"),
                });
            }
        }
    };
    // The router drains first (in flight: up to the drain timeout when stopping on a signal,
    // a short grace when a role is gone, since nothing can complete without it).
    let _ = stop_tx.send(());
    if !router_done {
        let grace = if outcome.is_ok() {
            DRAIN_TIMEOUT
        } else {
            FOLLOW_EXIT_GRACE
        };
        if tokio::time::timeout(grace, &mut router_task).await.is_err() {
            tracing::warn!(
                "the router did not drain within {} s; stopping anyway",
                grace.as_secs()
            );
            router_task.abort();
        }
    }
    match &outcome {
        Ok(name) => tracing::info!("{name}: stopping every replica"),
        Err(why) => tracing::error!("{why}"),
    }
    let mut failed = Vec::new();
    for pid in alive.iter().flatten().map(|(_, pid)| *pid) {
        signal_pid(pid, libc::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while alive.iter().any(|a| !a.is_empty()) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(((g, rank), st))) => {
                alive[g].retain(|(r, _)| *r != rank);
                if !st.success() && !dead[g] {
                    failed.push(format!("{} rank {rank} ({st})", groups[g].name));
                }
            }
            Ok(None) => break,
            Err(_) => {
                for (g, ranks) in alive.iter().enumerate() {
                    for (rank, pid) in ranks {
                        tracing::warn!(
                            "{} rank {rank} did not stop in time; killing it",
                            groups[g].name
                        );
                        signal_pid(*pid, libc::SIGKILL);
                    }
                }
                break;
            }
        }
    }
    match outcome {
        Err(why) => bail!(why),
        Ok(_) if failed.is_empty() => {
            tracing::info!("every replica stopped");
            Ok(())
        }
        Ok(_) => bail!(
            "ranks exited with errors while stopping: {}",
            failed.join(", ")
        ),
    }
}
