//! `tessera-operator predict`: what the cost model expects of one layout for one workload,
//! without a cluster. The same model code the planner ranks layouts with
//! (`planner::cost::serve`), on nodes of one GPU type packed as the planner packs them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde_json::json;

use crate::api::{KvCacheDtype, ModelDeployment};
use crate::planner::cost::{CostConstants, Layout, RequestShape, Serving, packed_links, serve};

/// Output of `predict`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PredictFormat {
    Table,
    Json,
}

/// Flags of `tessera-operator predict`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("load").args(["concurrency", "max_throughput"])))]
pub struct PredictArgs {
    /// A ModelDeployment manifest: its model architecture and `serving.kvCacheDtype` are used.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// GPU type: a catalog name (H100, H800, H20, L40S, ...) or a node product string.
    #[arg(long)]
    pub gpu: String,
    /// Tensor-parallel degree.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub tp: u32,
    /// Pipeline-parallel degree.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub pp: u32,
    /// Expert-parallel degree of a mixture-of-experts model: 1 (experts sharded by TP) or the
    /// TP degree (each GPU of a stage holds whole experts; tokens reach them by all-to-all).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub ep: u32,
    /// Attention inside an expert-parallel stage: split by heads (`tensor`) or a share of the
    /// sequences per GPU (`data`, needs --ep).
    #[arg(long, value_enum, default_value_t = AttentionArg::Tensor)]
    pub attention: AttentionArg,
    /// Prompt tokens per request.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub input_tokens: u32,
    /// Output tokens per request.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub output_tokens: u32,
    /// Concurrent requests per replica (default: the manifest's serving.maxConcurrency).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: Option<u32>,
    /// Use the largest concurrency whose KV cache fits, as offline throughput benchmarks do.
    #[arg(long)]
    pub max_throughput: bool,
    /// KV-cache element type (default: the manifest's serving.kvCacheDtype).
    #[arg(long, value_enum)]
    pub kv_cache_dtype: Option<KvDtypeArg>,
    /// GPUs per node (a TP group larger than this crosses the fabric).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub gpus_per_node: u32,
    /// GPU catalog overrides (YAML or JSON, as for `plan --catalog`).
    #[arg(long, value_name = "FILE")]
    pub catalog: Option<PathBuf>,
    /// Inter-node fabric bandwidth per GPU per direction, GB/s.
    #[arg(long, default_value_t = 50.0)]
    pub fabric_gbps: f64,
    #[arg(short = 'o', long, value_enum, default_value_t = PredictFormat::Table)]
    pub output: PredictFormat,
}

/// `--attention`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttentionArg {
    Tensor,
    Data,
}

/// `--kv-cache-dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KvDtypeArg {
    Bf16,
    Fp8,
}

/// One prediction: the model, the GPU, the layout and what the cost model says.
#[derive(Clone, Debug)]
pub struct Prediction {
    pub gpu: String,
    pub layout: Layout,
    pub shape: RequestShape,
    pub serving: Serving,
}

/// Predict for a deployment's model (the planner's code, no cluster).
pub fn predict(md: &ModelDeployment, args: &PredictArgs) -> Result<Prediction, String> {
    let catalog = crate::plan_cmd::load_catalog(args.catalog.as_deref())?;
    let gpu = catalog
        .models
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(&args.gpu))
        .or_else(|| catalog.lookup(&args.gpu))
        .ok_or_else(|| {
            format!(
                "--gpu {}: not in the GPU catalog; known: {} (add one with --catalog FILE)",
                args.gpu,
                catalog
                    .models
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?
        .clone();
    let arch = &md.spec.model.architecture;
    let heads = arch.attention_heads.max(1) as u32;
    let kv = arch.kv_heads.max(1) as u32;
    let data_attention = args.attention == AttentionArg::Data;
    if args.ep > 1 || data_attention {
        let Some(experts) = arch.experts.filter(|_| arch.is_moe()) else {
            return Err(format!(
                "--ep {} / --attention {}: expert parallelism needs a mixture-of-experts model; set model.architecture.experts, expertsPerToken and expertIntermediateSize, or use --ep 1 --attention tensor",
                args.ep,
                if data_attention { "data" } else { "tensor" }
            ));
        };
        if args.ep != args.tp {
            return Err(format!(
                "--ep {}: the expert-parallel group is the stage's GPUs; use --ep {} (the --tp) or --ep 1",
                args.ep, args.tp
            ));
        }
        if data_attention && args.ep < 2 {
            return Err("--attention data needs --ep 2 or more (and --tp equal to it)".into());
        }
        if !(experts as u32).is_multiple_of(args.ep) {
            return Err(format!(
                "--ep {}: must divide the model's {experts} experts",
                args.ep
            ));
        }
    }
    if !data_attention && !crate::planner::choose::valid_tp(heads, kv, args.tp) {
        return Err(format!(
            "--tp {}: must divide the model's {heads} attention heads and divide or be a multiple of its {kv} KV heads",
            args.tp
        ));
    }
    if args.pp > arch.layers.max(1) as u32 {
        return Err(format!(
            "--pp {}: the model has {} layers",
            args.pp, arch.layers
        ));
    }
    let c = CostConstants {
        fabric_gbps: args.fabric_gbps,
        ..CostConstants::default()
    };
    let kv_bytes = match args.kv_cache_dtype {
        Some(KvDtypeArg::Fp8) => KvCacheDtype::Fp8.bytes(),
        Some(KvDtypeArg::Bf16) => KvCacheDtype::Bf16.bytes(),
        None => md.spec.serving.kv_cache_dtype.bytes(),
    };
    let shape = RequestShape {
        input_tokens: f64::from(args.input_tokens),
        output_tokens: f64::from(args.output_tokens),
    };
    let batch = if args.max_throughput {
        None
    } else {
        Some(
            args.concurrency
                .unwrap_or(md.spec.serving.max_concurrency.max(1) as u32),
        )
    };
    let layout = Layout {
        tp: args.tp,
        pp: args.pp,
        ep: args.ep,
        data_attention,
    };
    let links = packed_links(&gpu, args.tp, args.pp, args.gpus_per_node, &c);
    let serving = serve(arch, &gpu, layout, links, &c, shape, kv_bytes, batch);
    Ok(Prediction {
        gpu: gpu.name,
        layout,
        shape,
        serving,
    })
}

/// The prediction as a table.
pub fn table(md: &ModelDeployment, p: &Prediction) -> String {
    let s = &p.serving;
    let name = md.metadata.name.as_deref().unwrap_or("<unnamed>");
    let mut out = format!(
        "{name} on {} {} ({} GPUs), {} input + {} output tokens per request\n",
        p.gpu,
        p.layout.label(),
        p.layout.gpus(),
        p.shape.input_tokens,
        p.shape.output_tokens
    );
    let fit = if s.max_batch == 0 {
        "the weights alone do not fit".to_owned()
    } else if s.fits {
        format!("fits (up to {} concurrent requests)", s.max_batch)
    } else {
        format!(
            "does NOT fit at {} concurrent requests (at most {})",
            s.batch, s.max_batch
        )
    };
    let mut rows = vec![
        ("concurrency", s.batch.to_string()),
        (
            "memory",
            format!(
                "{:.1} of {:.1} GiB per GPU; {fit}",
                s.memory_per_gpu_gib, s.memory_budget_gib
            ),
        ),
        (
            "time to first token",
            format!("{:.1} ms", s.time_to_first_token_seconds * 1e3),
        ),
        (
            "inter-token latency",
            format!("{:.1} ms", s.inter_token_latency_seconds * 1e3),
        ),
        (
            "output tokens/s per replica",
            format!("{:.0}", s.output_tokens_per_second),
        ),
        (
            "output tokens/s per GPU",
            format!("{:.0}", s.output_tokens_per_second_per_gpu),
        ),
    ];
    if s.all_to_all_gbps > 0.0 {
        rows.push((
            "expert all-to-all",
            format!(
                "{:.0} us per MoE layer per decode step at {:.0} GB/s per GPU",
                s.all_to_all_seconds_per_layer * 1e6,
                s.all_to_all_gbps
            ),
        ));
    }
    if md.spec.model.architecture.is_moe() {
        rows.push((
            "active parameters",
            format!(
                "{:.1} B of {:.1} B",
                md.spec.model.architecture.active_parameters() as f64 / 1e9,
                md.spec.model.architecture.parameters as f64 / 1e9
            ),
        ));
    }
    for (k, v) in rows {
        out.push_str(&format!("  {k:<28} {v}\n"));
    }
    out
}

fn run(args: &PredictArgs) -> Result<String, String> {
    let mds = crate::plan_cmd::load_deployments(std::slice::from_ref(&args.file))?;
    let md = match mds.as_slice() {
        [one] => one,
        [] => return Err(format!("{}: no ModelDeployment", args.file.display())),
        _ => {
            return Err(format!(
                "{}: {} ModelDeployments; predict takes one",
                args.file.display(),
                mds.len()
            ));
        }
    };
    let p = predict(md, args)?;
    Ok(match args.output {
        PredictFormat::Table => table(md, &p),
        PredictFormat::Json => {
            let v = json!({
                "deployment": md.metadata.name,
                "gpu": p.gpu, "tensorParallel": p.layout.tp, "pipelineParallel": p.layout.pp,
                "expertParallel": p.layout.ep, "dataParallelAttention": p.layout.data_attention,
                "inputTokens": p.shape.input_tokens, "outputTokens": p.shape.output_tokens,
                "prediction": p.serving,
            });
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())? + "\n"
        }
    })
}

/// Entry point.
pub fn main(args: &PredictArgs) -> ExitCode {
    match run(args) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
