//! `tessera-worker serve`: one rank of a replica, configured from the `TESSERA_*` environment the
//! operator sets (docs/contract.md).
//!
//! World 1 runs alone. Otherwise the rank joins its group ([`crate::dist::join`]), loads its
//! shard of its pipeline stage's layers (global rank `g` is TP rank `g % TP` of stage `g / TP`),
//! and then rank 0 (the leader) serves the OpenAI API while every other rank executes the
//! leader's steps ([`crate::dist::follow`]). A pod with several local ranks starts one child
//! process per rank (the same supervisor as `tessera-worker local`). An http(s) model is
//! downloaded once into `TESSERA_MODEL_PATH` (resumable, checked against
//! `TESSERA_MODEL_SHA256`).
//!
//! With `TESSERA_PD_ROLE` the replica is one half of a prefill/decode deployment: a prefill
//! replica sends KV caches ([`crate::dist::kv`]), every rank of a decode replica listens for
//! them on `TESSERA_KV_PORT`, and the leader serves the internal hand-over endpoints
//! ([`crate::server::pd`]) to the router in front.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::dist::{self, GroupConfig, GroupHealth, Role};
use crate::engine::Engine;
use crate::engine::device::{self, Device, DeviceFacts, DeviceRequest};
use crate::engine::runner::{Runner, Step};
use crate::engine::scheduler::{Scheduler, SchedulerConfig};
use crate::fetch;
use crate::server::pd::{PdConfig, PdRole};
use crate::server::{self, Readiness, ServerConfig, ServerMetrics};

/// The environment variables `serve` reads. The names of the operator's contract equal
/// `tessera_operator::build::env`; the worker-only knobs below them are optional.
pub mod env {
    pub const INCARNATION: &str = "TESSERA_INCARNATION";
    pub const STAGE: &str = "TESSERA_STAGE";
    pub const TP: &str = "TESSERA_TP";
    pub const PP: &str = "TESSERA_PP";
    pub const WORLD_SIZE: &str = "TESSERA_WORLD_SIZE";
    pub const RANK_OFFSET: &str = "TESSERA_RANK_OFFSET";
    pub const LOCAL_RANKS: &str = "TESSERA_LOCAL_RANKS";
    pub const LEADER_ADDRESS: &str = "TESSERA_LEADER_ADDRESS";
    pub const RENDEZVOUS_PORT: &str = "TESSERA_RENDEZVOUS_PORT";
    pub const PORT: &str = "TESSERA_PORT";
    pub const MODEL_URI: &str = "TESSERA_MODEL_URI";
    pub const MODEL_PATH: &str = "TESSERA_MODEL_PATH";
    pub const MODEL_SHA256: &str = "TESSERA_MODEL_SHA256";
    pub const SERVED_MODEL_NAME: &str = "TESSERA_SERVED_MODEL_NAME";
    pub const MAX_CONCURRENCY: &str = "TESSERA_MAX_CONCURRENCY";
    pub const CONTEXT_LENGTH: &str = "TESSERA_CONTEXT_LENGTH";

    /// Worker-only: CPU threads of this rank (0 or unset: every core).
    pub const THREADS: &str = "TESSERA_THREADS";
    /// Worker-only: the address the API listens on (default 0.0.0.0).
    pub const HOST: &str = "TESSERA_HOST";
    /// Worker-only: seconds without a heartbeat (or all-reduce data) before a rank is lost.
    pub const STALL_TIMEOUT_SECS: &str = "TESSERA_STALL_TIMEOUT_SECS";
    /// Worker-only: seconds the ranks wait for each other at rendezvous.
    pub const RENDEZVOUS_TIMEOUT_SECS: &str = "TESSERA_RENDEZVOUS_TIMEOUT_SECS";
    /// Worker-only: `auto` (default: CUDA when built with it and a GPU is visible), `cpu`,
    /// `cuda`.
    pub const DEVICE: &str = "TESSERA_DEVICE";
    /// The group's shared secret: joiners prove they hold it (an HMAC over the leader's
    /// challenge). The operator derives one per incarnation; unset: no secret.
    pub const GROUP_SECRET: &str = "TESSERA_GROUP_SECRET";
    /// Worker-only: the GPU this rank takes among those the pod sees (default 0; the
    /// supervisor of a pod with several local ranks gives rank i GPU i).
    pub const GPU_ORDINAL: &str = "TESSERA_GPU_ORDINAL";
    /// Worker-only: `prefill` or `decode` makes the replica one half of a prefill/decode
    /// deployment (unset: it serves requests whole).
    pub const PD_ROLE: &str = "TESSERA_PD_ROLE";
    /// Worker-only, decode replicas: the port every rank receives KV caches on (on
    /// `TESSERA_HOST`).
    pub const KV_PORT: &str = "TESSERA_KV_PORT";

    /// The variables `serve` requires: the rest have defaults.
    pub const REQUIRED: &[&str] = &[TP, PORT, MODEL_PATH];
    /// Required as well when the world has more than one rank.
    pub const REQUIRED_IN_A_GROUP: &[&str] = &[INCARNATION, LEADER_ADDRESS, RANK_OFFSET];
}

/// Defaults of the optional settings.
pub const DEFAULT_RENDEZVOUS_PORT: u16 = 29500;
pub const DEFAULT_PORT: u16 = 8000;
pub const DEFAULT_MAX_CONCURRENCY: usize = 8;
pub const DEFAULT_CONTEXT_LENGTH: usize = 4096;
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest request body the API accepts.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// Everything `serve` needs, read and checked from the environment.
#[derive(Clone, Debug, PartialEq)]
pub struct ServeConfig {
    pub tp: usize,
    pub pp: usize,
    pub world: usize,
    pub rank_offset: usize,
    pub local_ranks: usize,
    /// The leader's host (from `TESSERA_LEADER_ADDRESS`); empty for a world of 1.
    pub leader_host: String,
    pub rendezvous_port: u16,
    pub port: u16,
    pub host: String,
    pub model_path: PathBuf,
    pub model_uri: Option<String>,
    pub model_sha256: Option<String>,
    pub served_model_name: String,
    pub max_concurrency: usize,
    pub context_length: usize,
    pub incarnation: String,
    pub threads: usize,
    pub stall_timeout: Duration,
    pub rendezvous_timeout: Duration,
    /// `TESSERA_DEVICE`.
    pub device: DeviceRequest,
    /// `TESSERA_GPU_ORDINAL`.
    pub gpu_ordinal: usize,
    /// `TESSERA_GROUP_SECRET` (empty: none).
    pub group_secret: Vec<u8>,
    /// `TESSERA_PD_ROLE` (None: aggregated serving).
    pub pd_role: Option<PdRole>,
    /// `TESSERA_KV_PORT` (decode replicas).
    pub kv_port: Option<u16>,
}

fn invalid(var: &str, value: &str, rule: &str, fix: &str) -> anyhow::Error {
    anyhow::anyhow!("{var}={value:?} is invalid: {rule}; {fix}")
}

fn missing(var: &str, rule: &str, fix: &str) -> anyhow::Error {
    anyhow::anyhow!("{var} is not set: {rule}; {fix}")
}

struct Env<F: Fn(&str) -> Option<String>>(F);

impl<F: Fn(&str) -> Option<String>> Env<F> {
    fn get(&self, var: &str) -> Option<String> {
        (self.0)(var)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// An integer in `min..=max`; `default` when unset (None: required).
    fn int(
        &self,
        var: &str,
        default: Option<usize>,
        min: usize,
        max: usize,
        what: &str,
    ) -> anyhow::Result<usize> {
        let rule = format!("it must be an integer from {min} to {max} ({what})");
        match self.get(var) {
            None => default.ok_or_else(|| {
                missing(
                    var,
                    &rule,
                    "set it (the operator sets it on every worker pod)",
                )
            }),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(invalid(
                    var,
                    &v,
                    &rule,
                    &format!("set it to a value in range, e.g. {var}={min}"),
                )),
            },
        }
    }

    fn secs(&self, var: &str, default: Duration) -> anyhow::Result<Duration> {
        match self.get(var) {
            None => Ok(default),
            Some(v) => match v.parse::<f64>() {
                Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
                _ => Err(invalid(
                    var,
                    &v,
                    "it must be a number of seconds above 0 and at most 86400",
                    &format!("unset it for the default of {} s", default.as_secs()),
                )),
            },
        }
    }
}

impl ServeConfig {
    /// Read the process environment.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Read from `get` (a variable's value, `None` when unset). Errors name the variable, the
    /// value, the rule and the fix.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let e = Env(get);
        let tp = e.int(env::TP, None, 1, 512, "the tensor-parallel degree")?;
        let pp = e.int(env::PP, Some(1), 1, 512, "the pipeline-parallel degree")?;
        let world = e.int(
            env::WORLD_SIZE,
            Some(tp * pp),
            1,
            512 * 512,
            "the number of ranks, TESSERA_TP x TESSERA_PP",
        )?;
        if world != tp * pp {
            bail!(invalid(
                env::WORLD_SIZE,
                &world.to_string(),
                &format!("it must equal TESSERA_TP x TESSERA_PP = {tp} x {pp}"),
                &format!("set it to {} or unset it", tp * pp)
            ));
        }
        let in_group = world > 1;
        let rank_offset = e.int(
            env::RANK_OFFSET,
            (!in_group).then_some(0),
            0,
            world - 1,
            "the global rank of this pod's first rank, below TESSERA_WORLD_SIZE",
        )?;
        let local_ranks = e.int(
            env::LOCAL_RANKS,
            Some(1),
            1,
            world - rank_offset,
            "the ranks in this pod; TESSERA_RANK_OFFSET + TESSERA_LOCAL_RANKS <= TESSERA_WORLD_SIZE",
        )?;
        // Every rank of a pod belongs to one stage: global rank g is TP rank g % TP of stage
        // g / TP.
        let stage = rank_offset / tp;
        if (rank_offset + local_ranks - 1) / tp != stage {
            bail!(invalid(
                env::LOCAL_RANKS,
                &local_ranks.to_string(),
                &format!(
                    "ranks {rank_offset}..{} would span pipeline stages {stage} and {} (TESSERA_TP={tp} ranks per stage)",
                    rank_offset + local_ranks,
                    (rank_offset + local_ranks - 1) / tp
                ),
                "give a pod ranks of one stage only"
            ));
        }
        if let Some(v) = e.get(env::STAGE)
            && v.parse::<usize>().ok() != Some(stage)
        {
            bail!(invalid(
                env::STAGE,
                &v,
                &format!(
                    "TESSERA_RANK_OFFSET={rank_offset} with TESSERA_TP={tp} is in stage {stage} (rank / TP)"
                ),
                &format!("set it to {stage} or unset it")
            ));
        }
        let rendezvous_from_env = match e.get(env::RENDEZVOUS_PORT) {
            None => None,
            Some(v) => Some(v.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                invalid(
                    env::RENDEZVOUS_PORT,
                    &v,
                    "it must be a TCP port from 1 to 65535",
                    "set it to the leader's rendezvous port (29500)",
                )
            })?),
        };
        let (leader_host, rendezvous_port) = match e.get(env::LEADER_ADDRESS) {
            None if in_group => bail!(missing(
                env::LEADER_ADDRESS,
                "a group of more than one rank needs the leader's HOST:PORT",
                "set it to rank 0's rendezvous address, e.g. NAME-r0-INC-s0.NAME-workers.NAMESPACE.svc:29500"
            )),
            None => (
                String::new(),
                rendezvous_from_env.unwrap_or(DEFAULT_RENDEZVOUS_PORT),
            ),
            Some(v) => {
                let (host, port) = split_host_port(&v).ok_or_else(|| {
                    invalid(
                        env::LEADER_ADDRESS,
                        &v,
                        "it must be HOST or HOST:PORT with a port from 1 to 65535",
                        "set it to rank 0's rendezvous address",
                    )
                })?;
                let port = match (port, rendezvous_from_env) {
                    (Some(a), Some(b)) if a != b => bail!(invalid(
                        env::RENDEZVOUS_PORT,
                        &b.to_string(),
                        &format!("it must equal the port of TESSERA_LEADER_ADDRESS={v:?}"),
                        "make both name the same port"
                    )),
                    (Some(a), _) => a,
                    (None, Some(b)) => b,
                    (None, None) => DEFAULT_RENDEZVOUS_PORT,
                };
                (host, port)
            }
        };
        let port = match e.get(env::PORT) {
            None => bail!(missing(
                env::PORT,
                "the OpenAI API port (1 to 65535)",
                "set it to the serving port, e.g. TESSERA_PORT=8000"
            )),
            Some(v) => v.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                invalid(
                    env::PORT,
                    &v,
                    "it must be a TCP port from 1 to 65535",
                    "set it to the serving port, e.g. TESSERA_PORT=8000",
                )
            })?,
        };
        let model_uri = e.get(env::MODEL_URI);
        let is_http = model_uri
            .as_deref()
            .is_some_and(|u| u.starts_with("http://") || u.starts_with("https://"));
        if let Some(u) = &model_uri
            && !is_http
            && !u.starts_with("file://")
            && !u.starts_with("pvc://")
            && !u.starts_with('/')
        {
            bail!(invalid(
                env::MODEL_URI,
                u,
                "it must be an http(s)://, file://, pvc:// URI or an absolute path",
                "fix spec.model.uri"
            ));
        }
        let model_path = match e.get(env::MODEL_PATH) {
            Some(p) => PathBuf::from(p),
            None => match model_uri.as_deref() {
                Some(u) if u.starts_with("file://") => PathBuf::from(&u["file://".len()..]),
                Some(u) if u.starts_with('/') => PathBuf::from(u),
                _ => bail!(missing(
                    env::MODEL_PATH,
                    "the path of the model file (the download destination for an http(s) model)",
                    "set it to the GGUF file's path inside the pod"
                )),
            },
        };
        let model_sha256 = match e.get(env::MODEL_SHA256) {
            None => None,
            Some(v) => {
                let h = v.strip_prefix("sha256:").unwrap_or(&v).to_ascii_lowercase();
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    bail!(invalid(
                        env::MODEL_SHA256,
                        &v,
                        "it must be 64 hexadecimal digits (a SHA-256 digest)",
                        "set it to the output of `sha256sum MODEL` or unset it"
                    ));
                }
                Some(h)
            }
        };
        let served_model_name = e.get(env::SERVED_MODEL_NAME).unwrap_or_else(|| {
            model_path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        });
        let max_concurrency = e.int(
            env::MAX_CONCURRENCY,
            Some(DEFAULT_MAX_CONCURRENCY),
            1,
            4096,
            "concurrent sequences in the KV cache",
        )?;
        let context_length = e.int(
            env::CONTEXT_LENGTH,
            Some(DEFAULT_CONTEXT_LENGTH),
            16,
            1 << 20,
            "tokens per sequence (prompt and completion)",
        )?;
        let incarnation = match e.get(env::INCARNATION) {
            Some(v) => v,
            None if in_group => bail!(missing(
                env::INCARNATION,
                "a group of more than one rank needs the replica's incarnation id (ranks of other incarnations are refused)",
                "set it to the pod's tessera.dev/incarnation label"
            )),
            None => "single".into(),
        };
        let threads = e.int(
            env::THREADS,
            Some(0),
            0,
            4096,
            "CPU threads of this rank, 0 for every core",
        )?;
        let host = e.get(env::HOST).unwrap_or_else(|| "0.0.0.0".into());
        let device = match e.get(env::DEVICE) {
            None => DeviceRequest::Auto,
            Some(v) => DeviceRequest::parse(&v).ok_or_else(|| {
                invalid(
                    env::DEVICE,
                    &v,
                    "it must be auto, cpu or cuda",
                    "leave it unset (auto: the GPU when there is one)",
                )
            })?,
        };
        let gpu_ordinal = e.int(
            env::GPU_ORDINAL,
            Some(0),
            0,
            1023,
            "the GPU this rank takes among those visible",
        )?;
        let pd_role = match e.get(env::PD_ROLE) {
            None => None,
            Some(v) => Some(PdRole::parse(&v).ok_or_else(|| {
                invalid(
                    env::PD_ROLE,
                    &v,
                    "it must be prefill or decode",
                    "unset it to serve requests whole",
                )
            })?),
        };
        if pd_role.is_some() && pp > 1 {
            bail!(invalid(
                env::PD_ROLE,
                pd_role.map_or("", |r| r.name()),
                &format!(
                    "prefill/decode disaggregation does not support pipeline stages (TESSERA_PP={pp})"
                ),
                "set TESSERA_PP=1 or unset TESSERA_PD_ROLE"
            ));
        }
        let kv_port = match e.get(env::KV_PORT) {
            None if pd_role == Some(PdRole::Decode) => bail!(missing(
                env::KV_PORT,
                "every rank of a decode replica (TESSERA_PD_ROLE=decode) receives KV caches on a port of its own",
                "set it to a free TCP port, e.g. TESSERA_KV_PORT=29600"
            )),
            None => None,
            Some(v) => Some(v.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                invalid(
                    env::KV_PORT,
                    &v,
                    "it must be a TCP port from 1 to 65535",
                    "set it to a free port, e.g. TESSERA_KV_PORT=29600",
                )
            })?),
        };
        Ok(Self {
            tp,
            pp,
            world,
            rank_offset,
            local_ranks,
            leader_host,
            rendezvous_port,
            port,
            host,
            model_path,
            model_uri,
            model_sha256,
            served_model_name,
            max_concurrency,
            context_length,
            incarnation,
            threads,
            stall_timeout: e.secs(env::STALL_TIMEOUT_SECS, DEFAULT_STALL_TIMEOUT)?,
            rendezvous_timeout: e.secs(env::RENDEZVOUS_TIMEOUT_SECS, DEFAULT_RENDEZVOUS_TIMEOUT)?,
            device,
            gpu_ordinal,
            group_secret: e.get(env::GROUP_SECRET).unwrap_or_default().into_bytes(),
            pd_role,
            kv_port,
        })
    }

    /// The group settings of this rank (a pod with one local rank).
    pub fn group_config(&self) -> GroupConfig {
        GroupConfig {
            rank: self.rank_offset,
            world: self.world,
            pp: self.pp,
            leader_host: self.leader_host.clone(),
            port: self.rendezvous_port,
            group_id: self.incarnation.clone(),
            connect_deadline: self.rendezvous_timeout,
            stall_timeout: self.stall_timeout,
            secret: self.group_secret.clone(),
        }
    }

    /// The model URI when it is an http(s) URL.
    pub fn http_uri(&self) -> Option<&str> {
        self.model_uri
            .as_deref()
            .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
    }
}

/// `HOST`, `HOST:PORT` or `[V6]:PORT`.
fn split_host_port(v: &str) -> Option<(String, Option<u16>)> {
    let parse_port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0);
    if let Some(rest) = v.strip_prefix('[') {
        let (host, tail) = rest.split_once(']')?;
        return match tail.strip_prefix(':') {
            Some(p) => Some((host.to_owned(), Some(parse_port(p)?))),
            None if tail.is_empty() => Some((host.to_owned(), None)),
            None => None,
        };
    }
    match v.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.contains(':') => {
            Some((h.to_owned(), Some(parse_port(p)?)))
        }
        Some(_) => None,
        None => Some((v.to_owned(), None)),
    }
}

/// The model file or directory, fetching it first when the URI is http(s) and it is not there
/// yet ([`fetch::fetch_model`]: a file already there is used only when it matches the checksum).
pub fn ensure_model(cfg: &ServeConfig) -> anyhow::Result<PathBuf> {
    if let Some(url) = cfg.http_uri() {
        fetch::fetch_model(
            url,
            &cfg.model_path,
            cfg.model_sha256.as_deref(),
            fetch::DownloadOptions::default(),
        )?;
    }
    if !cfg.model_path.is_file() && !cfg.model_path.is_dir() {
        bail!(invalid(
            env::MODEL_PATH,
            &cfg.model_path.display().to_string(),
            "no model file or directory there",
            "point it at the GGUF file or safetensors model directory (mounted volume) or give an http(s) TESSERA_MODEL_URI to download"
        ));
    }
    Ok(cfg.model_path.clone())
}

/// KV-cache bytes one sequence of `context_length` tokens needs on this rank's shard.
pub fn kv_budget_per_sequence(engine: &Engine, context_length: usize) -> usize {
    let per_token = engine.model.kv_bytes_per_token();
    per_token
        * context_length
            .min(engine.model.config.context_length)
            .max(1)
}

/// `tessera-worker serve`.
pub fn run() -> anyhow::Result<()> {
    let cfg = ServeConfig::from_env()?;
    let path = ensure_model(&cfg)?;
    if cfg.local_ranks > 1 {
        return crate::local::supervise_pod(&cfg);
    }
    let rank = cfg.rank_offset;
    tracing::info!(
        rank,
        world = cfg.world,
        tp = cfg.tp,
        pp = cfg.pp,
        model = %path.display(),
        "starting rank {rank} of {}",
        cfg.world
    );
    let (device, why) = device::choose(cfg.device, &DeviceFacts::probe(), cfg.gpu_ordinal, cfg.pp)?;
    tracing::info!(rank, ?device, "running the model on {device:?}: {why}");
    let granted = std::env::var("NVIDIA_VISIBLE_DEVICES").unwrap_or_default();
    if device == Device::Cpu
        && cfg.device == DeviceRequest::Auto
        && !matches!(granted.as_str(), "" | "void" | "none")
    {
        tracing::warn!(
            rank,
            "this pod was given GPUs (NVIDIA_VISIBLE_DEVICES={granted}) but runs the model on the CPU ({why}); use the CUDA worker image (worker.image), or set TESSERA_DEVICE=cpu to silence this"
        );
    }
    if let Some(role) = cfg.pd_role
        && device != Device::Cpu
    {
        bail!(invalid(
            env::PD_ROLE,
            role.name(),
            "prefill/decode disaggregation runs on the CPU engine only (the KV cache would have to leave the GPU)",
            "set TESSERA_DEVICE=cpu, or unset TESSERA_PD_ROLE"
        ));
    }
    if cfg.world == 1 {
        let engine = Engine::open(&path, cfg.threads)?;
        let budget = kv_budget_per_sequence(&engine, cfg.context_length);
        let runner = with_pd(Runner::new(engine, budget, None), &cfg)?;
        let runner = on_device(runner, device, &cfg)?;
        return lead(&cfg, runner, GroupHealth::single());
    }
    check_layout(&cfg, &path)?;
    let group = dist::join(&cfg.group_config())
        .with_context(|| format!("rank {rank} joining its group (TESSERA_LEADER_ADDRESS, TESSERA_RENDEZVOUS_PORT, TESSERA_INCARNATION)"))?;
    let health = group.health.clone();
    let (stage, pipe) = (group.stage, group.pipe);
    let engine =
        Engine::open_stage(&path, cfg.threads, group.collective, stage).with_context(|| {
            format!(
                "rank {rank} loading its shard of stage {} (TESSERA_TP={}, TESSERA_PP={})",
                stage.index, cfg.tp, cfg.pp
            )
        })?;
    tracing::info!(
        rank,
        stage = stage.index,
        "holding layers {:?} of {}",
        stage.layers(engine.model.config.n_layers),
        engine.model.config.n_layers
    );
    let budget = kv_budget_per_sequence(&engine, cfg.context_length);
    match group.role {
        Role::Leader(broadcast) => lead(
            &cfg,
            on_device(
                with_pd(
                    Runner::new(engine, budget, Some(broadcast)).with_pipe(pipe),
                    &cfg,
                )?,
                device,
                &cfg,
            )?,
            health,
        ),
        Role::Follower(mut source) => {
            let mut runner = on_device(
                with_pd(Runner::new(engine, budget, None).with_pipe(pipe), &cfg)?,
                device,
                &cfg,
            )?;
            keep_following_on_signals(rank)?;
            tracing::info!(rank, "following the leader's steps");
            dist::follow(&mut runner, source.as_mut())?;
            tracing::info!(rank, "the leader closed the group; exiting");
            Ok(())
        }
    }
}

/// Give the runner its KV transport when the replica is half of a prefill/decode deployment:
/// a prefill rank sends with the group secret; a decode rank listens on `TESSERA_KV_PORT`
/// (every rank of the replica, before the leader serves) and installs what arrives.
fn with_pd(runner: Runner, cfg: &ServeConfig) -> anyhow::Result<Runner> {
    use crate::dist::kv::{self, Inbox, KvIdentity, KvReceiver, KvShape, TcpKvTransport};
    match cfg.pd_role {
        None => Ok(runner),
        Some(PdRole::Prefill) => {
            Ok(runner.with_kv(Box::new(TcpKvTransport::sender(cfg.group_secret.clone()))))
        }
        Some(PdRole::Decode) => {
            let port = cfg.kv_port.context("TESSERA_KV_PORT is required")?;
            let model = &runner.engine.model;
            let per_token = model.kv_bytes_per_token().max(1);
            let shape = KvShape {
                layers: model.layers.len(),
                kv_dim: model.kv_dim(),
                max_tokens: (runner.kv_budget_bytes / per_token)
                    .min(model.config.context_length)
                    .max(1),
            };
            // Room for twice the scheduler's whole KV budget of hand-overs waiting to be
            // installed (requests queued behind the running ones).
            let max_bytes = runner
                .kv_budget_bytes
                .saturating_mul(cfg.max_concurrency)
                .saturating_mul(2);
            let inbox = Arc::new(Inbox::new(max_bytes, kv::KV_INBOX_TTL));
            let id = KvIdentity {
                group_id: cfg.incarnation.clone(),
                world: cfg.world,
                rank: cfg.rank_offset,
                secret: cfg.group_secret.clone(),
            };
            let receiver = KvReceiver::listen((cfg.host.as_str(), port), id, shape, inbox)
                .with_context(|| {
                    format!(
                        "rank {} of a decode replica (TESSERA_KV_PORT={port}, TESSERA_HOST={})",
                        cfg.rank_offset, cfg.host
                    )
                })?;
            tracing::info!(
                rank = cfg.rank_offset,
                "receiving KV caches on {}",
                receiver.local_addr()
            );
            Ok(runner.with_kv(Box::new(TcpKvTransport::receiver(Arc::clone(
                receiver.inbox(),
            )))))
        }
    }
}

/// Move the runner's forward passes to the GPU when `device` says so: the shard loaded on the
/// CPU is uploaded to GPU `TESSERA_GPU_ORDINAL`; a group of several ranks first sets up NCCL
/// over the rank group (every rank calls this at the same point, before serving or following)
/// with a watchdog that ends the process when a reduction hangs.
fn on_device(runner: Runner, device: Device, cfg: &ServeConfig) -> anyhow::Result<Runner> {
    if device == Device::Cpu {
        return Ok(runner);
    }
    #[cfg(feature = "cuda")]
    {
        use crate::cuda::{CudaDevice, llama::CudaLlama, nccl::NcclCollective};
        let rank = cfg.rank_offset;
        let dev = CudaDevice::new(cfg.gpu_ordinal)?;
        let group = runner.engine.collective.as_ref();
        let nccl = if group.world() > 1 {
            let timeout = (cfg.stall_timeout * 12).max(Duration::from_secs(60));
            let watchdog = crate::watchdog::Watchdog::start(
                timeout,
                Duration::from_secs(1),
                move |what, age| {
                    dist::exit_process(&format!(
                        "rank {rank}: {what} has not completed after {:.0} s (a rank is gone or wedged)",
                        age.as_secs_f64()
                    ));
                },
            );
            let c = NcclCollective::init_over(group, std::sync::Arc::clone(&dev.stream))
                .with_context(|| format!("rank {rank} setting up NCCL over its rank group"))?;
            Some(c.with_watchdog(watchdog))
        } else {
            None
        };
        let model = CudaLlama::upload(&runner.engine.model, dev, nccl).with_context(|| {
            format!("rank {rank} uploading its shard to GPU {}", cfg.gpu_ordinal)
        })?;
        tracing::info!(
            rank,
            gpu = model.device_name(),
            "{:.1} MiB of f16 weights on GPU {}",
            model.device_weight_bytes() as f64 / (1 << 20) as f64,
            cfg.gpu_ordinal
        );
        runner.with_cuda(model)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (runner, cfg);
        bail!("the CUDA engine is not in this build (cargo feature `cuda`)")
    }
}

/// Whether the model splits into `TESSERA_TP` x `TESSERA_PP` (checked before joining, so every
/// rank says so at once instead of the group forming and then failing).
pub fn check_layout(cfg: &ServeConfig, path: &Path) -> anyhow::Result<()> {
    let file = crate::model::source::open(path)?;
    let config = crate::model::llama::LlamaConfig::from_gguf(&file.metadata().gguf)?;
    drop(file);
    config
        .check_shard(crate::model::parallel::Shard::new(0, cfg.tp)?)
        .with_context(|| format!("{}={}", env::TP, cfg.tp))?;
    config
        .check_stage(crate::model::parallel::Stage::new(0, cfg.pp)?)
        .with_context(|| format!("{}={}", env::PP, cfg.pp))?;
    Ok(())
}

/// A follower does not stop on SIGTERM or SIGINT: the leader drains its requests in flight, which
/// needs every rank, and then closes the group, which ends the follower (exit 0). A leader that
/// never does is caught by the watchdog; Kubernetes kills the pod after its grace period.
fn keep_following_on_signals(rank: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal handler")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            runtime.block_on(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    let _ = ready_tx.send(false);
                    return;
                };
                let _ = ready_tx.send(true);
                loop {
                    let name = tokio::select! {
                        _ = term.recv() => "SIGTERM",
                        _ = int.recv() => "SIGINT",
                    };
                    tracing::info!(
                        rank,
                        "{name}: waiting for the leader to drain and close the group"
                    );
                }
            });
        })?;
    anyhow::ensure!(
        ready_rx.recv().unwrap_or(false),
        "installing the SIGTERM/SIGINT handlers"
    );
    Ok(())
}

/// A probe step through every rank: one token forward, then release.
pub fn probe(runner: &mut Runner) -> anyhow::Result<()> {
    const PROBE_SEQ: u64 = u64::MAX;
    let token = runner.engine.tokenizer.bos.unwrap_or(0);
    let t = Instant::now();
    runner
        .run(&Step::Forward {
            seq: PROBE_SEQ,
            tokens: vec![token],
        })
        .context("the probe step failed")?;
    runner.run(&Step::Release { seq: PROBE_SEQ })?;
    tracing::info!(
        "probe step passed in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// The leader (or a single rank): probe, then serve the API until SIGTERM/SIGINT, draining.
fn lead(cfg: &ServeConfig, mut runner: Runner, health: GroupHealth) -> anyhow::Result<()> {
    probe(&mut runner)?;
    serve_api(cfg, runner, health)
}

/// The scheduler's limits from the environment: `TESSERA_MAX_CONCURRENCY` sequences at once,
/// each up to `TESSERA_CONTEXT_LENGTH` tokens of KV cache.
pub fn scheduler_config(cfg: &ServeConfig, per_sequence_bytes: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_running: cfg.max_concurrency,
        max_waiting: cfg.max_concurrency * 8,
        kv_budget_bytes: per_sequence_bytes.saturating_mul(cfg.max_concurrency),
        ..SchedulerConfig::default()
    }
}

fn serve_api(cfg: &ServeConfig, runner: Runner, health: GroupHealth) -> anyhow::Result<()> {
    let metrics = Arc::new(ServerMetrics::new());
    // GPU gauges (dcgm-exporter names) in the same /metrics; without NVML one warning and
    // `tessera_nvml_up 0`, and the worker keeps serving.
    let hostname = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    metrics.set_gpu_telemetry(Arc::from(crate::telemetry::nvml::detect()), hostname);
    let sched = scheduler_config(cfg, runner.kv_budget_bytes);
    let handle = Scheduler::spawn(runner, sched, Arc::clone(&metrics))?;
    let readiness: Readiness = {
        let (health, handle) = (health, handle.clone());
        Arc::new(move || {
            health.check()?;
            match handle.failure() {
                Some(why) => Err(why),
                None => Ok(()),
            }
        })
    };
    let app = server::router(
        ServerConfig {
            max_body_bytes: MAX_BODY_BYTES,
            readiness,
            pd: cfg.pd_role.map(|role| PdConfig {
                role,
                token: server::pd::internal_token(&cfg.group_secret),
            }),
            ..ServerConfig::new(cfg.served_model_name.clone())
        },
        handle.clone(),
        metrics,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let served = handle.clone();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| {
                format!(
                    "listening on {addr} (TESSERA_PORT={}, TESSERA_HOST={})",
                    cfg.port, cfg.host
                )
            })?;
        tracing::info!(
            model = %cfg.served_model_name,
            tp = cfg.tp,
            "serving the OpenAI API on http://{}",
            listener.local_addr()?
        );
        server::serve(listener, app, served.clone(), server::shutdown_signal()).await?;
        // Drained: stop the scheduler, which drops the runner and closes the group cleanly.
        served.shutdown();
        anyhow::Ok(())
    })?;
    if let Some(why) = handle.failure() {
        bail!(dist::GroupError(why));
    }
    tracing::info!("stopped");
    Ok(())
}
