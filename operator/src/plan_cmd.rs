//! `tessera-operator plan`: plan ModelDeployments against a cluster snapshot, offline.
//!
//! Inputs are what `kubectl get nodes -o yaml` and `kubectl get pods -A -o yaml` print
//! (Kubernetes `List`s or multi-document YAML; JSON works too) and ModelDeployment files or
//! directories. Every ModelDeployment is validated as the API server would (typed decode plus
//! the CRD's CEL rules). Output is a table for people or the JSON of `docs/plan-json.md`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use k8s_openapi::api::core::v1::{Node, Pod};
use serde::Deserialize;
use serde_json::Value;

use crate::api::{ModelDeployment, parse_model_deployment};
use crate::planner::catalog::Catalog;
use crate::planner::cost::CostConstants;
use crate::planner::inventory::Inventory;
use crate::planner::{Plan, PlanOptions, plan};

/// Output format of `plan`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A table for people.
    Table,
    /// The plan as JSON (docs/plan-json.md).
    Json,
    /// The child objects the controller would apply (ServiceAccounts, Services, Pods) as
    /// multi-document YAML, like `helm template`.
    Yaml,
}

/// Flags of `tessera-operator plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Nodes of the cluster (`kubectl get nodes -o yaml`).
    #[arg(long, value_name = "FILE")]
    pub nodes: PathBuf,
    /// Pods of the cluster (`kubectl get pods -A -o yaml`); their GPUs are not free.
    #[arg(long, value_name = "FILE")]
    pub pods: Option<PathBuf>,
    /// ModelDeployment files or directories (every *.yaml, *.yml and *.json in it, sorted).
    #[arg(short = 'f', long = "filename", value_name = "FILE_OR_DIR", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// Node label keys that describe the fabric, outermost first (zone, block, rack).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "topology.kubernetes.io/zone,tessera.dev/fabric.block,tessera.dev/fabric.rack"
    )]
    pub topology_keys: Vec<String>,
    /// GPU catalog overrides (YAML or JSON), merged over the built-in catalog.
    #[arg(long, value_name = "FILE")]
    pub catalog: Option<PathBuf>,
    /// Corrections measured on a fleet (YAML or JSON: `layouts` of GPU type, TP, PP, engine with
    /// measured/predicted ratios), applied to the predictions layouts are ranked by
    /// (docs/cost-model.md, "Calibration").
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// Inter-node fabric bandwidth per GPU per direction, GB/s.
    #[arg(long, default_value_t = 50.0)]
    pub fabric_gbps: f64,
    /// Output format: `table`, `json` (the plan) or `yaml` (the objects the controller would
    /// apply for these inputs, built by the controller's own reconcile code).
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Worker image for ModelDeployments that set no `spec.worker.image` (`-o yaml`).
    #[arg(long, default_value = concat!("tessera-worker:", env!("CARGO_PKG_VERSION")))]
    pub worker_image: String,
    /// Image of `engine: vllm` pods that set no image (`-o yaml`).
    #[arg(long, default_value = crate::build::DEFAULT_VLLM_IMAGE)]
    pub vllm_image: String,
    /// Image of `engine: sglang` pods that set no image (`-o yaml`).
    #[arg(long, default_value = crate::build::DEFAULT_SGLANG_IMAGE)]
    pub sglang_image: String,
    /// RDMA devices (NAME=COUNT) of the pods that move data between nodes, as the operator's
    /// `--rdma-resource` (`-o yaml`).
    #[arg(long = "rdma-resource", value_delimiter = ',')]
    pub rdma_resources: Vec<String>,
}

/// Run `plan`; prints the plan or the error and returns the exit code.
pub fn main(args: &PlanArgs) -> ExitCode {
    match run(args) {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            if let Err(e) = out.write_all(text.as_bytes()) {
                eprintln!("error: writing the plan to stdout: {e}");
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

/// Plan and render; the error names the file and the problem.
pub fn run(args: &PlanArgs) -> Result<String, String> {
    let catalog = load_catalog(args.catalog.as_deref())?;
    if !(args.fabric_gbps.is_finite() && args.fabric_gbps > 0.0) {
        return Err(format!(
            "--fabric-gbps must be a positive number, got {}",
            args.fabric_gbps
        ));
    }
    let nodes: Vec<Node> = load_kind(&args.nodes, "Node")?;
    let pods: Vec<Pod> = match &args.pods {
        Some(p) => load_kind(p, "Pod")?,
        None => Vec::new(),
    };
    let deployments = load_deployments(&args.files)?;
    let keys: Vec<String> = args
        .topology_keys
        .iter()
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .collect();
    let calibration = match &args.calibration {
        Some(path) => serde_yaml_ng::from_str(&read(path)?).map_err(|e| {
            format!(
                "{}: not a calibration file ({e}); expected `layouts:` entries with gpuType, tensorParallel, pipelineParallel, engine, decodeRatios and prefillRatios",
                path.display()
            )
        })?,
        None => Default::default(),
    };
    let opts = PlanOptions {
        constants: CostConstants {
            fabric_gbps: args.fabric_gbps,
            calibration,
            ..CostConstants::default()
        },
        ..PlanOptions::default()
    };
    let plan_of = |catalog: &Catalog, keys: &[String]| {
        plan(
            &Inventory::from_nodes(&nodes, &pods, catalog, keys),
            &deployments,
            &[],
            &opts,
        )
    };
    match args.output {
        OutputFormat::Table => Ok(render_table(&plan_of(&catalog, &keys))),
        OutputFormat::Json => {
            let mut s = serde_json::to_string_pretty(&plan_of(&catalog, &keys))
                .map_err(|e| e.to_string())?;
            s.push('\n');
            Ok(s)
        }
        OutputFormat::Yaml => {
            let cfg = crate::controller::reconcile::Config {
                topology_keys: keys,
                catalog,
                plan: opts,
                build: crate::build::BuildOptions {
                    default_worker_image: args.worker_image.clone(),
                    default_vllm_image: args.vllm_image.clone(),
                    default_sglang_image: args.sglang_image.clone(),
                    network_policies: None,
                    // Printed manifests carry no secret: the operator derives them in the
                    // cluster from its own key.
                    group_key: None,
                    rdma: crate::build::RdmaOptions::parse(&args.rdma_resources)?,
                },
                ..crate::controller::reconcile::Config::default()
            };
            render_children(&nodes, &pods, &deployments, &cfg)
        }
    }
}

/// The objects the controller would apply for these inputs: every deployment reconciled from
/// scratch by the controller's own pure reconcile, highest priority first, each seeing the pods
/// of those before it (as the cluster would once they are applied). Incarnation ids are derived
/// from the deployment and replica, so the output is reproducible. Files carry no uid, so the
/// objects carry no owner references; the controller adds them in the cluster.
///
/// A deployment the planner disaggregates (`serving.disaggregation`) is rendered as the
/// controller runs it: both pools' worker pods, their Services and the router in front. Where
/// the pools cannot run (the tessera engine, a vLLM router without an image) the header says
/// why (the `Disaggregated` condition) and the aggregated objects follow.
fn render_children(
    nodes: &[Node],
    pods: &[Pod],
    deployments: &[ModelDeployment],
    cfg: &crate::controller::reconcile::Config,
) -> Result<String, String> {
    use crate::controller::reconcile::{Observed, reconcile};
    use k8s_openapi::jiff::Timestamp;

    let mut ordered: Vec<ModelDeployment> = deployments.to_vec();
    for md in &mut ordered {
        if md.metadata.namespace.is_none() {
            md.metadata.namespace = Some("default".into());
        }
    }
    ordered.sort_by_key(|md| {
        (
            std::cmp::Reverse(md.spec.priority),
            md.metadata.namespace.clone(),
            md.metadata.name.clone(),
        )
    });
    let mut cluster_pods: Vec<std::sync::Arc<Pod>> = pods.iter().cloned().map(Into::into).collect();
    let mut objects: Vec<Value> = Vec::new();
    let mut accounts = std::collections::BTreeSet::new();
    let mut header = String::from(
        "# Objects tessera-operator would apply for these inputs (tessera-operator plan -o yaml).\n",
    );
    let now = Timestamp::now();
    for md in &ordered {
        let ns = md.metadata.namespace.clone().unwrap_or_default();
        let name = md.metadata.name.clone().unwrap_or_default();
        let obs = Observed {
            md,
            pods: &[],
            services: &[],
            routers: &[],
            nodes,
            other_pods: &cluster_pods,
            reserved: &[],
            now,
        };
        let actions = reconcile(&obs, cfg);
        let status = actions.status.unwrap_or_default();
        let count = |role: &str| {
            status
                .placements
                .iter()
                .filter(|r| r.role.as_deref() == Some(role))
                .count()
        };
        if status.placements.iter().any(|p| p.role.is_some()) {
            let _ = writeln!(
                header,
                "# {ns}/{name}: disaggregated, {} prefill and {} decode of {} replicas placed, {} pods{}",
                count("prefill"),
                count("decode"),
                status.pools.iter().map(|p| p.replicas).sum::<i32>(),
                actions.apply_pods.len(),
                if actions.apply_router.is_some() {
                    " and a router"
                } else {
                    ""
                }
            );
        } else {
            let _ = writeln!(
                header,
                "# {ns}/{name}: {} of {} replicas placed, {} pods",
                status.placements.len(),
                md.spec.replicas,
                actions.apply_pods.len()
            );
        }
        for c in status.conditions.iter().filter(|c| {
            (c.type_ == "Placed"
                || c.type_ == "Disaggregated" && c.reason != "AggregatedPredictedBetter")
                && c.status != "True"
        }) {
            let _ = writeln!(header, "#   {}: {}", c.reason, c.message.replace('\n', " "));
        }
        if !actions.apply_pods.is_empty() && accounts.insert(ns.clone()) {
            objects.push(to_value(&crate::build::worker_service_account(md))?);
        }
        for svc in &actions.apply_services {
            objects.push(to_value(svc)?);
        }
        if !actions.apply_pods.is_empty() {
            objects.push(to_value(&crate::build::disruption_budget(md))?);
        }
        if let Some(router) = &actions.apply_router {
            objects.push(to_value(router)?);
        }
        for pod in &actions.apply_pods {
            objects.push(to_value(pod)?);
        }
        cluster_pods.extend(actions.apply_pods.into_iter().map(Into::into));
    }
    let mut out = header;
    for o in &objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(o).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// The built-in GPU catalog with the overrides of `path` (`--catalog FILE`) merged in.
pub fn load_catalog(path: Option<&Path>) -> Result<Catalog, String> {
    let mut catalog = Catalog::builtin();
    if let Some(path) = path {
        catalog
            .merge_str(&read(path)?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(catalog)
}

fn to_value<T: serde::Serialize>(o: &T) -> Result<Value, String> {
    serde_json::to_value(o).map_err(|e| format!("serialising an object: {e}"))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

/// Every object in a file: multi-document YAML (or JSON), with `List`s flattened.
pub fn read_objects(path: &Path) -> Result<Vec<Value>, String> {
    let text = read(path)?;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let v = Value::deserialize(doc).map_err(|e| {
            format!(
                "{}: document {}: not valid YAML or JSON: {e}",
                path.display(),
                i + 1
            )
        })?;
        match v {
            Value::Null => {}
            Value::Object(ref m)
                if m.get("kind")
                    .and_then(Value::as_str)
                    .is_some_and(|k| k.ends_with("List")) =>
            {
                match m.get("items") {
                    Some(Value::Array(items)) => out.extend(items.iter().cloned()),
                    Some(Value::Null) | None => {}
                    Some(_) => {
                        return Err(format!(
                            "{}: document {}: items of a List must be an array",
                            path.display(),
                            i + 1
                        ));
                    }
                }
            }
            Value::Object(_) => out.push(v),
            other => {
                return Err(format!(
                    "{}: document {}: expected a Kubernetes object, got {}",
                    path.display(),
                    i + 1,
                    kind_of_json(&other)
                ));
            }
        }
    }
    Ok(out)
}

fn kind_of_json(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn object_name(v: &Value) -> String {
    v.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_owned()
}

fn load_kind<T: serde::de::DeserializeOwned>(path: &Path, kind: &str) -> Result<Vec<T>, String> {
    let mut out = Vec::new();
    for v in read_objects(path)? {
        let got = v.get("kind").and_then(Value::as_str).unwrap_or("");
        if got != kind {
            return Err(format!(
                "{}: {} {:?} is not a {kind}; expected the output of kubectl get {}s -o yaml",
                path.display(),
                if got.is_empty() {
                    "object without kind"
                } else {
                    got
                },
                object_name(&v),
                kind.to_ascii_lowercase()
            ));
        }
        let name = object_name(&v);
        out.push(
            serde_json::from_value(v)
                .map_err(|e| format!("{}: {kind} {name:?}: {e}", path.display()))?,
        );
    }
    Ok(out)
}

fn is_manifest(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// ModelDeployments from files and directories, validated like the API server does.
pub fn load_deployments(paths: &[PathBuf]) -> Result<Vec<ModelDeployment>, String> {
    let mut files = Vec::new();
    for p in paths {
        let meta =
            std::fs::metadata(p).map_err(|e| format!("{}: cannot read: {e}", p.display()))?;
        if meta.is_dir() {
            let mut in_dir: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("{}: cannot read directory: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && is_manifest(f))
                .collect();
            in_dir.sort();
            if in_dir.is_empty() {
                return Err(format!(
                    "{}: directory has no *.yaml, *.yml or *.json files",
                    p.display()
                ));
            }
            files.extend(in_dir);
        } else {
            files.push(p.clone());
        }
    }
    let mut out = Vec::new();
    for f in &files {
        for v in read_objects(f)? {
            let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
            if kind != "ModelDeployment" {
                return Err(format!(
                    "{}: {} {:?} is not a ModelDeployment; -f takes ModelDeployment files or directories",
                    f.display(),
                    if kind.is_empty() {
                        "object without kind"
                    } else {
                        kind
                    },
                    object_name(&v)
                ));
            }
            let md = parse_model_deployment(&v).map_err(|e| format!("{}: {e}", f.display()))?;
            out.push(md);
        }
    }
    if out.is_empty() {
        return Err(format!(
            "no ModelDeployment found in {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(out)
}

fn short_type(product: &str) -> String {
    Catalog::builtin()
        .lookup(product)
        .map_or_else(|| product.to_owned(), |g| g.name.clone())
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut s = String::new();
    for r in rows {
        let mut line = String::from("  ");
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}  ", w = widths[i]);
            }
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

/// The plan as a table for people.
pub fn render_table(p: &Plan) -> String {
    let mut s = String::new();
    for d in &p.deployments {
        let _ = writeln!(
            s,
            "{}/{}  priority {}  {}/{} replicas placed",
            d.namespace,
            d.name,
            d.priority,
            d.placed.len(),
            d.replicas
        );
        match &d.choice.chosen {
            Some(c) => {
                let _ = writeln!(
                    s,
                    "  choice: {} {}: {}",
                    short_type(&c.gpu_type),
                    layout_label(c),
                    d.choice.reason
                );
            }
            None => {
                let _ = writeln!(s, "  choice: none: {}", d.choice.reason);
            }
        }
        for a in &d.choice.alternatives {
            let _ = writeln!(
                s,
                "  alternative: {} {}: {}",
                short_type(&a.gpu_type),
                layout_label(a),
                a.note.as_deref().unwrap_or("")
            );
        }
        if let Some(x) = &d.disaggregation {
            let _ = writeln!(s, "  disaggregation: {}", x.reason);
            for p in &x.pools {
                let layout = crate::planner::cost::Layout::from_api(
                    p.tensor_parallel,
                    p.pipeline_parallel,
                    p.expert_parallel,
                    p.data_parallel_attention,
                )
                .label();
                let _ = writeln!(
                    s,
                    "  pool {}: {} {} x{}, {:.2} requests/s per replica{}{}",
                    p.role,
                    short_type(&p.gpu_type),
                    layout,
                    p.replicas,
                    p.requests_per_second_per_replica,
                    p.time_to_first_token_seconds
                        .map(|t| format!(
                            ", TTFT {t:.3} s with the KV transfer{}",
                            p.kv_transfer_link
                                .as_deref()
                                .map(|l| match l {
                                    "fabric" => " over the fabric".to_owned(),
                                    l => format!(" over {l} inside a node"),
                                })
                                .unwrap_or_default()
                        ))
                        .unwrap_or_default(),
                    p.inter_token_latency_seconds
                        .map(|t| format!(
                            ", ITL {:.0} ms at batch {}",
                            t * 1e3,
                            p.batch.unwrap_or(0)
                        ))
                        .unwrap_or_default()
                );
            }
        }
        if d.choice.chosen.is_some() {
            for r in &d.choice.rejected {
                let _ = writeln!(s, "  rejected: {r}");
            }
        }
        if !d.placed.is_empty() {
            let moe = d.placed.iter().any(|r| r.expert_parallel.is_some());
            let mut rows = vec![
                [
                    "REPLICA",
                    "GPU",
                    "TP",
                    "PP",
                    "NODES (node:gpus per stage)",
                    "DECODE TOK/S",
                    "PREFILL TOK/S",
                    "TTFT",
                    "ALL-REDUCE GB/S",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for r in &d.placed {
                let nodes: Vec<String> = r
                    .stages
                    .iter()
                    .map(|st| format!("s{}={}:{}", st.stage, st.node, st.gpus))
                    .collect();
                let mut rep = r.replica.to_string();
                if let Some(role) = &r.role {
                    rep.push_str(&format!(" ({role})"));
                }
                if r.kept {
                    rep.push_str(" (kept)");
                }
                if r.note.is_some() {
                    rep.push_str(" (fallback)");
                }
                rows.push(vec![
                    rep,
                    r.gpu_type.clone(),
                    r.tensor_parallel.to_string(),
                    r.pipeline_parallel.to_string(),
                    nodes.join(" "),
                    format!("{:.0}", r.predicted.decode_tokens_per_second),
                    format!("{:.0}", r.predicted.prefill_tokens_per_second),
                    format!("{:.3} s", r.predicted.time_to_first_token_seconds),
                    if r.predicted.all_reduce_g_bps > 0.0 {
                        format!("{:.0}", r.predicted.all_reduce_g_bps)
                    } else {
                        "-".into()
                    },
                ]);
            }
            if moe {
                // Expert-parallel replicas: the EP degree, attention, and the all-to-all.
                for (i, row) in rows.iter_mut().enumerate() {
                    let r = i.checked_sub(1).map(|k| &d.placed[k]);
                    row.insert(
                        4,
                        r.map_or("EP".into(), |r| match r.expert_parallel {
                            Some(ep) if r.data_parallel_attention => format!("{ep} (DP attn)"),
                            Some(ep) => ep.to_string(),
                            None => "-".into(),
                        }),
                    );
                    row.push(r.map_or("ALL-TO-ALL GB/S".into(), |r| {
                        r.predicted
                            .all_to_all_g_bps
                            .map_or("-".into(), |g| format!("{g:.0}"))
                    }));
                }
            }
            s.push_str(&table(&rows));
            for r in &d.placed {
                if let Some(n) = &r.note {
                    let _ = writeln!(s, "  replica {}: {n}", r.replica);
                }
            }
        }
        for u in &d.unplaced {
            let _ = writeln!(s, "  unplaced replica {}: {}", u.replica, u.reason);
        }
        s.push('\n');
    }
    if !p.warnings.is_empty() {
        s.push_str("warnings:\n");
        for w in &p.warnings {
            let _ = writeln!(s, "  {w}");
        }
    }
    s
}

/// `TP=8 PP=1`, `TP=8 EP=8`, `EP=16 DP-attention` for a layout in a plan.
fn layout_label(l: &crate::api::LayoutPrediction) -> String {
    crate::planner::cost::Layout::from_api(
        l.tensor_parallel,
        l.pipeline_parallel,
        l.expert_parallel,
        l.data_parallel_attention,
    )
    .label()
}
