//! The cost model against published measurements (operator/tests/fixtures/
//! published_measurements.json: NVIDIA's TensorRT-LLM performance-overview tables, each row
//! with its source and exact configuration). Every offline max-throughput row of a dense model
//! in a precision the model represents is predicted with `predict`'s code
//! (`planner::cost::serve` at the largest concurrency that fits, on 8-GPU nodes) and compared
//! with the published output tokens/s.
//!
//! Figures (median and worst errors, rank correlation, per GPU type, the TP8/TP4 lessons):
//! `cargo test -p tessera-operator --test published -- --nocapture`; docs/cost-model.md has the
//! table and what the model still gets wrong.

mod common;

use std::collections::BTreeMap;

use serde_json::Value;
use tessera_operator::api::ModelArchitecture;
use tessera_operator::planner::catalog::{Catalog, GpuModel};
use tessera_operator::planner::cost::{CostConstants, Layout, RequestShape, packed_links, serve};

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/published_measurements.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

/// Architectures from the models' published configs (config.json on their model cards).
fn architecture(model: &str, parameters: f64) -> Option<ModelArchitecture> {
    let (layers, hidden, heads, kv, inter, vocab) = match model {
        "Llama 3.1 8B" => (32, 4096, 32, 8, 14336, 128_256),
        "Llama 3.1 70B" | "Llama 3.3 70B" => (80, 8192, 64, 8, 28672, 128_256),
        "Llama 3.1 405B" => (126, 16384, 128, 8, 53248, 128_256),
        "Mistral 7B" => (32, 4096, 32, 8, 14336, 32_768),
        _ => return None,
    };
    Some(ModelArchitecture {
        parameters: parameters as i64,
        layers,
        hidden_size: hidden,
        attention_heads: heads,
        kv_heads: kv,
        intermediate_size: inter,
        vocab_size: vocab,
        context_length: 131_072,
        bytes_per_parameter: 2.0,
        ..Default::default()
    })
}

/// The catalog entry of a published GPU label, if the catalog has that GPU.
fn gpu(catalog: &Catalog, label: &str) -> Option<GpuModel> {
    let name = match label {
        l if l.starts_with("H200") => "H200",
        l if l.starts_with("H100") => "H100",
        l if l.starts_with("A100") => "A100",
        l if l.starts_with("L40S") => "L40S",
        l if l.starts_with("B200") => "B200",
        l if l.starts_with("GH200") => "GH200",
        _ => return None,
    };
    catalog.models.iter().find(|m| m.name == name).cloned()
}

/// One predicted row of the fixture, dense or MoE.
struct Row {
    id: String,
    gpu: String,
    model: String,
    layout: Layout,
    input: u32,
    output: u32,
    published: f64,
    predicted: f64,
}

impl Row {
    fn error(&self) -> f64 {
        (self.predicted - self.published) / self.published
    }
}

/// The cost-model constants: the defaults, or with `PUBLISHED_CONSTANTS='{"mfu": 0.4}'` other
/// constants tried against the tables.
fn constants() -> CostConstants {
    match std::env::var("PUBLISHED_CONSTANTS") {
        Ok(over) => {
            let mut v = serde_json::to_value(CostConstants::default()).expect("json");
            let over: Value = serde_json::from_str(&over).expect("PUBLISHED_CONSTANTS is JSON");
            for (k, x) in over.as_object().expect("an object") {
                v[k] = x.clone();
            }
            serde_json::from_value(v).expect("constants")
        }
        Err(_) => CostConstants::default(),
    }
}

/// Predict every row the model can represent; the others with the reason.
fn predict_all() -> (Vec<Row>, BTreeMap<String, usize>) {
    let catalog = Catalog::builtin();
    let c = constants();
    let mut rows = Vec::new();
    let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
    let mut skip = |why: String| *skipped.entry(why).or_default() += 1;
    for r in fixture()["throughput"].as_array().expect("rows") {
        let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
        let n = |k: &str| r[k].as_f64();
        if s("mode") != "offline-max-throughput" {
            skip(format!(
                "{} rows (rate-limited online serving, not throughput)",
                s("mode")
            ));
            continue;
        }
        let bytes = match s("weights").as_str() {
            "fp8" => 1.0,
            "bf16" | "fp16" => 2.0,
            other => {
                skip(format!(
                    "{other} weights (no {other} compute in the GPU catalog)"
                ));
                continue;
            }
        };
        let Some(mut arch) = architecture(&s("model"), n("parameters").unwrap_or(0.0)) else {
            skip(format!("{} (architecture not in the test)", s("model")));
            continue;
        };
        arch.bytes_per_parameter = bytes;
        let Some(g) = gpu(&catalog, &s("gpu")) else {
            skip(format!("{} (not in the GPU catalog)", s("gpu")));
            continue;
        };
        let (Some(published), Some(tp), Some(pp), Some(input), Some(output)) = (
            n("output_tokens_per_s_total"),
            n("tp"),
            n("pp"),
            n("input_tokens"),
            n("output_tokens"),
        ) else {
            skip("incomplete rows".into());
            continue;
        };
        let (tp, pp) = (tp as u32, pp as u32);
        let kv_bytes = if s("kv_cache") == "fp8" { 1.0 } else { 2.0 };
        let links = packed_links(&g, tp, pp, 8, &c);
        let shape = RequestShape {
            input_tokens: input,
            output_tokens: output,
        };
        let p = serve(
            &arch,
            &g,
            Layout::dense(tp, pp),
            links,
            &c,
            shape,
            kv_bytes,
            None,
        );
        if p.max_batch == 0 {
            skip("layouts whose weights do not fit by the model".into());
            continue;
        }
        rows.push(Row {
            id: s("id"),
            gpu: g.name.clone(),
            model: s("model"),
            layout: Layout::dense(tp, pp),
            input: input as u32,
            output: output as u32,
            published,
            predicted: p.output_tokens_per_second,
        });
    }
    (rows, skipped)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Ranks (1-based, ties averaged).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for k in &idx[i..=j] {
            out[*k] = rank;
        }
        i = j + 1;
    }
    out
}

/// Spearman's rank correlation.
fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// Published and predicted TP=8 over TP=4 throughput of one model on one GPU, over the input
/// and output lengths both layouts were measured at.
fn tp8_over_tp4(rows: &[Row], gpu: &str, model: &str) -> Vec<(u32, u32, f64, f64)> {
    let mut out = Vec::new();
    for r8 in rows
        .iter()
        .filter(|r| r.gpu == gpu && r.model == model && r.layout.tp == 8)
    {
        if let Some(r4) = rows.iter().find(|r| {
            r.gpu == gpu
                && r.model == model
                && r.layout.tp == 4
                && r.input == r8.input
                && r.output == r8.output
        }) {
            out.push((
                r8.input,
                r8.output,
                r8.published / r4.published,
                r8.predicted / r4.predicted,
            ));
        }
    }
    out
}

#[test]
fn published_throughput_is_predicted_within_the_reported_error() {
    let (rows, skipped) = predict_all();
    let errors: Vec<f64> = rows.iter().map(|r| r.error().abs()).collect();
    let med = median(errors);
    let published: Vec<f64> = rows.iter().map(|r| r.published).collect();
    let predicted: Vec<f64> = rows.iter().map(|r| r.predicted).collect();
    let rho = spearman(&published, &predicted);
    println!(
        "{} rows predicted; median |error| {:.1}%; Spearman rank correlation {:.3}",
        rows.len(),
        med * 100.0,
        rho
    );
    let mut by_gpu: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for r in &rows {
        by_gpu.entry(&r.gpu).or_default().push(r.error());
    }
    for (g, e) in &by_gpu {
        let abs: Vec<f64> = e.iter().map(|x| x.abs()).collect();
        println!(
            "  {g:<6} {:3} rows  median |error| {:5.1}%  median signed {:+6.1}%",
            e.len(),
            median(abs) * 100.0,
            median(e.clone()) * 100.0
        );
    }
    let mut worst: Vec<&Row> = rows.iter().collect();
    worst.sort_by(|a, b| b.error().abs().total_cmp(&a.error().abs()));
    println!("worst rows:");
    for r in worst.iter().take(8) {
        println!(
            "  {:<58} published {:>9.0}  predicted {:>9.0}  {:+.0}%",
            r.id,
            r.published,
            r.predicted,
            r.error() * 100.0
        );
    }
    if std::env::var_os("PUBLISHED_ROWS").is_some() {
        for r in &rows {
            println!(
                "row {:<58} {:>9.0} {:>9.0} {:+5.0}%",
                r.id,
                r.published,
                r.predicted,
                r.error() * 100.0
            );
        }
    }
    for (why, n) in &skipped {
        println!("skipped {n:3}: {why}");
    }
    // The per-row table in docs (regenerated with UPDATE_VALIDATION_TABLE=1; it must match).
    let mut table = String::from(
        "# The cost model against published measurements, row by row\n\n\
         Generated by `operator/tests/published.rs` (regenerate with\n\
         `UPDATE_VALIDATION_TABLE=1 cargo test -p tessera-operator --test published`); the method,\n\
         the summary and what the model still gets wrong are in [cost-model.md](cost-model.md).\n\
         Output tokens/s of the whole replica at the largest concurrency that fits.\n\n\
         | row (source id) | GPU | model | TP | input/output | published | predicted | error |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {}/{} | {:.0} | {:.0} | {:+.0}% |\n",
            r.id,
            r.gpu,
            r.model,
            r.layout.tp,
            r.input,
            r.output,
            r.published,
            r.predicted,
            r.error() * 100.0
        ));
    }
    common::generated_doc(
        "cost-model-validation.md",
        &table,
        "UPDATE_VALIDATION_TABLE",
        "cargo test -p tessera-operator --test published",
    );
    let gpus = by_gpu.len();
    assert!(
        rows.len() >= 40 && gpus >= 4,
        "{} rows, {gpus} GPU types",
        rows.len()
    );
    // The targets: a median error of at most 15% and a rank correlation of at least 0.95
    // (reached: 10.6% and 0.985 with the default constants, docs/cost-model.md).
    assert!(med <= 0.15, "median |error| {:.1}%", med * 100.0);
    assert!(rho >= 0.95, "rank correlation {rho:.3}");
}

#[test]
fn the_bandwidth_lessons_are_right_in_direction_and_size() {
    let (rows, _) = predict_all();
    // 70B on PCIe L40S: TP=8 gains little over TP=4 (published 0.96-1.19x at 128/128 and
    // 128/2048, up to 1.40x at long outputs); on NVLink H100 it gains at least 1.3x.
    let l40s = tp8_over_tp4(&rows, "L40S", "Llama 3.1 70B");
    let h100 = tp8_over_tp4(&rows, "H100", "Llama 3.1 70B");
    println!("L40S 70B TP8/TP4 (input, output, published, predicted): {l40s:.2?}");
    println!("H100 70B TP8/TP4 (input, output, published, predicted): {h100:.2?}");
    assert!(!l40s.is_empty() && !h100.is_empty());
    let med_l40s = median(l40s.iter().map(|x| x.3).collect());
    let med_h100 = median(h100.iter().map(|x| x.3).collect());
    assert!(med_l40s < 1.3, "L40S TP8 over TP4 predicted {med_l40s:.2}");
    assert!(med_h100 >= 1.3, "H100 TP8 over TP4 predicted {med_h100:.2}");
    assert!(med_h100 > med_l40s + 0.2, "NVLink must gain more than PCIe");
}

/// Mixture-of-experts architectures from the models' published configs (config.json on their
/// model cards, cross-checked as recorded in the fixture's research notes): layers, hidden,
/// heads, KV heads, head width, dense FFN width, vocabulary, experts, experts per token,
/// shared experts, expert FFN width, dense layers, MLA latent rank.
fn moe_architecture(model: &str, parameters: f64) -> Option<ModelArchitecture> {
    #[allow(clippy::type_complexity)]
    let (
        layers,
        hidden,
        heads,
        kv,
        head_dim,
        inter,
        vocab,
        experts,
        topk,
        shared,
        einter,
        dense,
        mla,
    ): (
        i32,
        i32,
        i32,
        i32,
        Option<i32>,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        Option<i32>,
    ) = match model {
        "Mixtral 8x7B" => (
            32, 4096, 32, 8, None, 14336, 32_000, 8, 2, 0, 14336, 0, None,
        ),
        "Mixtral 8x22B" => (
            56, 6144, 48, 8, None, 16384, 32_768, 8, 2, 0, 16384, 0, None,
        ),
        "Qwen3-30B-A3B" => (
            48,
            2048,
            32,
            4,
            Some(128),
            6144,
            151_936,
            128,
            8,
            0,
            768,
            0,
            None,
        ),
        "Qwen3-235B-A22B" => (
            94,
            4096,
            64,
            4,
            Some(128),
            12288,
            151_936,
            128,
            8,
            0,
            1536,
            0,
            None,
        ),
        // Every layer MoE with a shared expert.
        "Llama 4 Scout 17B-16E" => (
            48,
            5120,
            40,
            8,
            Some(128),
            16384,
            202_048,
            16,
            1,
            1,
            8192,
            0,
            None,
        ),
        // MoE every second layer: 24 of the 48 are dense.
        "Llama 4 Maverick 17B-128E" => (
            48,
            5120,
            40,
            8,
            Some(128),
            16384,
            202_048,
            128,
            1,
            1,
            8192,
            24,
            None,
        ),
        "DeepSeek-R1" | "DeepSeek-R1-0528" | "DeepSeek-V3" => (
            61,
            7168,
            128,
            128,
            None,
            18432,
            129_280,
            256,
            8,
            1,
            2048,
            3,
            Some(512),
        ),
        _ => return None,
    };
    Some(ModelArchitecture {
        parameters: parameters as i64,
        layers,
        hidden_size: hidden,
        attention_heads: heads,
        kv_heads: kv,
        intermediate_size: inter,
        vocab_size: vocab,
        context_length: 131_072,
        bytes_per_parameter: 2.0,
        experts: Some(experts),
        experts_per_token: Some(topk),
        shared_experts: Some(shared),
        expert_intermediate_size: Some(einter),
        dense_layers: Some(dense),
        head_dim,
        kv_lora_rank: mla,
        qk_rope_head_dim: mla.map(|_| 64),
    })
}

/// Predict every MoE row the model can represent (offline max-throughput, FP8/BF16 weights, a
/// known architecture and GPU), in the row's layout: TP, or expert parallelism with
/// data-parallel attention where the row says so (TensorRT-LLM's "DEP" columns).
fn predict_moe() -> (Vec<Row>, BTreeMap<String, usize>) {
    let catalog = Catalog::builtin();
    let c = constants();
    let mut rows = Vec::new();
    let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
    let mut skip = |why: String| *skipped.entry(why).or_default() += 1;
    for r in fixture()["moe"].as_array().expect("rows") {
        let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
        let n = |k: &str| r[k].as_f64();
        if s("mode") != "offline-max-throughput" {
            skip(
                "online, prefill-only, decode-only or batch-1 rows (issue 17 and the serving \
                 benchmark model them; this test compares throughput)"
                    .into(),
            );
            continue;
        }
        let w = s("weights");
        let bytes = if w.starts_with("fp8") {
            1.0
        } else if w.starts_with("bf16") || w.starts_with("fp16") {
            2.0
        } else {
            skip("FP4/MXFP4 weights (no FP4 compute in the GPU catalog)".into());
            continue;
        };
        let Some(mut arch) = moe_architecture(&s("model"), n("parameters").unwrap_or(0.0)) else {
            skip(format!("{} (architecture not in the test)", s("model")));
            continue;
        };
        arch.bytes_per_parameter = bytes;
        let Some(g) = gpu(&catalog, &s("gpu")) else {
            skip(format!("{} (not in the GPU catalog)", s("gpu")));
            continue;
        };
        let gpus = n("gpus").unwrap_or(0.0);
        let published = n("output_tokens_per_s_total")
            .or_else(|| n("output_tokens_per_s_per_gpu").map(|x| x * gpus));
        let (Some(published), Some(tp), Some(input), Some(output)) =
            (published, n("tp"), n("input_tokens"), n("output_tokens"))
        else {
            skip("incomplete rows".into());
            continue;
        };
        let pp = n("pp").unwrap_or(1.0) as u32;
        let ep = n("ep").unwrap_or(1.0) as u32;
        let data = ep > 1
            && match &r["dp_attention"] {
                Value::Bool(b) => *b,
                Value::Number(x) => x.as_f64().unwrap_or(0.0) > 1.0,
                _ => false,
            };
        let layout = Layout {
            tp: tp as u32,
            pp,
            ep,
            data_attention: data,
        };
        let kv_bytes = if s("kv_cache").starts_with("fp8") {
            1.0
        } else {
            2.0
        };
        let links = packed_links(&g, layout.tp, pp, 8, &c);
        let shape = RequestShape {
            input_tokens: input,
            output_tokens: output,
        };
        let p = serve(&arch, &g, layout, links, &c, shape, kv_bytes, None);
        if p.max_batch == 0 {
            skip("layouts whose weights do not fit by the model".into());
            continue;
        }
        rows.push(Row {
            id: s("id"),
            gpu: g.name.clone(),
            model: s("model"),
            layout,
            input: input as u32,
            output: output as u32,
            published,
            predicted: p.output_tokens_per_second,
        });
    }
    (rows, skipped)
}

#[test]
fn published_moe_throughput_is_predicted_within_the_reported_error() {
    let (rows, skipped) = predict_moe();
    let errors: Vec<f64> = rows.iter().map(|r| r.error().abs()).collect();
    let med = median(errors);
    let published: Vec<f64> = rows.iter().map(|r| r.published).collect();
    let predicted: Vec<f64> = rows.iter().map(|r| r.predicted).collect();
    let rho = spearman(&published, &predicted);
    println!(
        "{} MoE rows predicted; median |error| {:.1}%; Spearman rank correlation {:.3}",
        rows.len(),
        med * 100.0,
        rho
    );
    let mut by_model: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in &rows {
        by_model
            .entry(format!("{} / {}", r.model, r.gpu))
            .or_default()
            .push(r.error());
    }
    for (m, e) in &by_model {
        let abs: Vec<f64> = e.iter().map(|x| x.abs()).collect();
        println!(
            "  {m:<36} {:3} rows  median |error| {:5.1}%  median signed {:+6.1}%",
            e.len(),
            median(abs) * 100.0,
            median(e.clone()) * 100.0
        );
    }
    for (why, n) in &skipped {
        println!("skipped {n:3}: {why}");
    }
    let mut table = String::from(
        "# The cost model against published mixture-of-experts measurements, row by row\n\n\
         Generated by `operator/tests/published.rs` (regenerate with\n\
         `UPDATE_VALIDATION_TABLE=1 cargo test -p tessera-operator --test published`); the method\n\
         and what the model cannot represent are in [cost-model.md](cost-model.md).\n\
         Output tokens/s of the whole replica at the largest concurrency that fits.\n\n\
         | row (source id) | GPU | model | layout | input/output | published | predicted | error |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {}/{} | {:.0} | {:.0} | {:+.0}% |\n",
            r.id,
            r.gpu,
            r.model,
            r.layout.label(),
            r.input,
            r.output,
            r.published,
            r.predicted,
            r.error() * 100.0
        ));
    }
    common::generated_doc(
        "cost-model-validation-moe.md",
        &table,
        "UPDATE_VALIDATION_TABLE",
        "cargo test -p tessera-operator --test published",
    );
    let models: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.model.as_str()).collect();
    let dep = rows.iter().filter(|r| r.layout.data_attention).count();
    assert!(
        rows.len() >= 60 && models.len() >= 5 && dep >= 8,
        "{} rows, {} models, {dep} expert-parallel rows",
        rows.len(),
        models.len()
    );
    // Reached with the default constants: 21.9% and 0.978 over 214 rows (docs/cost-model.md
    // says where it errs: TensorRT-LLM's Mixtral rows on Hopper and DeepSeek-R1 with
    // data-parallel attention are over-predicted).
    assert!(med <= 0.25, "median |error| {:.1}%", med * 100.0);
    assert!(rho >= 0.95, "rank correlation {rho:.3}");
}

#[test]
fn moe_on_h800_predicts_less_per_gpu_than_on_h100_for_the_same_layout() {
    // DeepSeek-V3 in FP8 with expert parallelism inside one node (TP=8 EP=8, two stages so
    // that it fits 80 GB GPUs): the same compute and HBM, so the cut NVLink (200 vs 450 GB/s
    // per direction) is the whole difference, through the dispatch and combine all-to-alls.
    let catalog = Catalog::builtin();
    let c = CostConstants::default();
    let mut arch = moe_architecture("DeepSeek-V3", 671e9).expect("arch");
    arch.bytes_per_parameter = 1.0;
    let shape = RequestShape {
        input_tokens: 2000.0,
        output_tokens: 500.0,
    };
    let layout = Layout {
        tp: 8,
        pp: 2,
        ep: 8,
        data_attention: false,
    };
    let at = |name: &str| {
        let g = catalog.lookup(name).expect("gpu").clone();
        let links = packed_links(&g, 8, 2, 8, &c);
        (
            serve(&arch, &g, layout, links, &c, shape, 1.0, Some(256)),
            links,
        )
    };
    let (h100, l100) = at("NVIDIA-H100-80GB-HBM3");
    let (h800, l800) = at("NVIDIA-H800");
    println!(
        "DeepSeek-V3 TP=8 EP=8 PP=2 at 256: H100 {:.0} tok/s/GPU (all-to-all {:.0} GB/s, {:.0} us/layer), H800 {:.0} ({:.0} GB/s, {:.0} us/layer)",
        h100.output_tokens_per_second_per_gpu,
        l100.ep.gbps,
        h100.all_to_all_seconds_per_layer * 1e6,
        h800.output_tokens_per_second_per_gpu,
        l800.ep.gbps,
        h800.all_to_all_seconds_per_layer * 1e6
    );
    assert!(l800.ep.gbps < l100.ep.gbps / 2.0);
    // Per layer: the bytes take 2.25x as long; the fixed 2 x 20 us per layer does not change.
    assert!(h800.all_to_all_seconds_per_layer > 1.25 * h100.all_to_all_seconds_per_layer);
    assert!(
        h800.output_tokens_per_second_per_gpu < 0.97 * h100.output_tokens_per_second_per_gpu,
        "H800 {h800:?} vs H100 {h100:?}"
    );
    // Prefill moves a whole prompt's routed tokens through the all-to-all: slower too.
    assert!(h800.time_to_first_token_seconds > h100.time_to_first_token_seconds);
}
