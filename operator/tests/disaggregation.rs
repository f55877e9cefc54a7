//! Prefill/decode disaggregation as the planner predicts it: SLO-meeting output tokens/s per GPU
//! of the best aggregated layout against the best prefill/decode pair, on mixed H800/H20 and
//! H100/H20 clusters and single-type ones, for short and long prompts
//! (`planner::disagg::decide`, the code `plan` and the controller run).
//!
//! The table is docs/disaggregation-goodput.md (regenerate with
//! `UPDATE_GOODPUT_TABLE=1 cargo test -p tessera-operator --test disaggregation`; the test fails
//! when it is stale). Figures and the method: docs/planner.md, "Prefill/decode disaggregation".

mod common;

use serde_json::json;
use tessera_operator::api::{ModelDeployment, parse_model_deployment};
use tessera_operator::planner::catalog::Catalog;
use tessera_operator::planner::choose;
use tessera_operator::planner::cost::CostConstants;
use tessera_operator::planner::disagg::{self, Decision};
use tessera_operator::planner::inventory::{DEFAULT_TOPOLOGY_KEYS, Eligibility, Inventory};
use tessera_operator::planner::synthetic::node_json;
use tessera_operator::planner::{PlanOptions, plan};

/// 8-GPU nodes of the given synthetic products (0 H100, 1 H800, 2 H20), 8 of each.
fn cluster(products: &[usize]) -> Inventory {
    let mut nodes = Vec::new();
    for &p in products {
        for i in 0..8 {
            let v = node_json(&format!("n{p}-{i}"), p, 8, 0, p as u32, (p * 8 + i) as u32);
            nodes.push(serde_json::from_value(v).expect("node"));
        }
    }
    let keys: Vec<String> = DEFAULT_TOPOLOGY_KEYS
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    Inventory::from_nodes(&nodes, &[], &Catalog::builtin(), &keys)
}

/// DeepSeek-V3 (MoE, 37.6B active, MLA) in FP8: the architecture of
/// examples/deployments/deepseek-v3.yaml.
fn deepseek() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/deployments/deepseek-v3.yaml"
    );
    let md: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).expect("example")).expect("yaml");
    md["spec"]["model"]["architecture"].clone()
}

/// Llama 3.3 70B in FP8 served by SGLang, with an SLO of 2 s to the first token and 50 ms
/// between tokens, `Auto` disaggregation.
fn deployment(input: i32, output: i32) -> ModelDeployment {
    model_deployment(None, input, output)
}

/// `deployment` with another architecture.
fn model_deployment(arch: Option<serde_json::Value>, input: i32, output: i32) -> ModelDeployment {
    let mut v = json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "llama-70b", "namespace": "bench"},
        "spec": {
            "model": {"uri": "pvc://models/llama-3.3-70b-fp8", "architecture": {
                "parameters": 70553706496i64, "layers": 80, "hiddenSize": 8192,
                "attentionHeads": 64, "kvHeads": 8, "intermediateSize": 28672,
                "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 1}},
            "engine": {"name": "sglang"},
            "serving": {
                "maxConcurrency": 16, "contextLength": 16384, "kvCacheDtype": "fp8",
                "workload": {"inputTokens": input, "outputTokens": output},
                "slo": {"timeToFirstTokenSeconds": 2.0, "interTokenLatencySeconds": 0.05},
                "disaggregation": "Auto"
            }
        }
    });
    if let Some(a) = arch {
        v["spec"]["model"]["architecture"] = a;
    }
    parse_model_deployment(&v).expect("valid deployment")
}

struct Case {
    model: &'static str,
    cluster: &'static str,
    workload: &'static str,
    decision: Decision,
    labels: Vec<String>,
}

fn decide(
    arch: Option<serde_json::Value>,
    products: &[usize],
    input: i32,
    output: i32,
) -> (Decision, Vec<String>) {
    let inv = cluster(products);
    let md = model_deployment(arch, input, output);
    let c = CostConstants::default();
    let elig = Eligibility::compute(&inv, &md.spec.placement);
    let stats = choose::type_stats(&inv, &elig);
    let choice = choose::choose(&md.spec, &inv, &stats, &elig, &c);
    let labels = choice.candidates.iter().map(|x| x.label(&inv)).collect();
    (
        disagg::decide(&md.spec, &inv, &stats, &choice, &c).expect("a verdict"),
        labels,
    )
}

fn cases() -> Vec<Case> {
    let clusters: [(&str, &[usize]); 5] = [
        ("H800 + H20", &[1, 2]),
        ("H100 + H20", &[0, 2]),
        ("H100", &[0]),
        ("H800", &[1]),
        ("H20", &[2]),
    ];
    let workloads = [("short 512/256", 512, 256), ("long 8192/256", 8192, 256)];
    let mut out = Vec::new();
    for (model, arch) in [("Llama 3.3 70B", None), ("DeepSeek-V3", Some(deepseek()))] {
        for (name, products) in clusters {
            // DeepSeek-V3 needs two 8-GPU nodes of 80 GB per replica: H800 and H20 clusters.
            if arch.is_some() && products.contains(&0) {
                continue;
            }
            for (w, input, output) in workloads {
                let (decision, labels) = decide(arch.clone(), products, input, output);
                out.push(Case {
                    model,
                    cluster: name,
                    workload: w,
                    decision,
                    labels,
                });
            }
        }
    }
    out
}

fn agg(c: &Case) -> f64 {
    c.decision.aggregated.as_ref().map_or(0.0, |a| a.2)
}

fn pd(c: &Case) -> f64 {
    c.decision
        .pair
        .as_ref()
        .map_or(0.0, |p| p.2.output_tokens_per_second_per_gpu)
}

#[test]
fn goodput_table_and_the_lessons() {
    let cases = cases();
    let mut table = String::from(
        "# Prefill/decode disaggregation: predicted goodput per GPU\n\n\
         Generated by `operator/tests/disaggregation.rs` (regenerate with\n\
         `UPDATE_GOODPUT_TABLE=1 cargo test -p tessera-operator --test disaggregation`); the\n\
         method is in [planner.md](planner.md#prefilldecode-disaggregation). Llama 3.3 70B and\n\
         DeepSeek-V3 in FP8 (FP8 KV cache) on SGLang, SLO 2 s to the first token and 50 ms\n\
         between tokens, 8 nodes of 8 GPUs per type. Output tokens/s per GPU that meet the SLO; \"unit\" is the\n\
         prefill:decode replica ratio; TTFT includes the KV transfer over the 50 GB/s fabric.\n\n\
         | model | cluster | workload | best aggregated | tok/s/GPU | best prefill + decode pools | tok/s/GPU | TTFT | ITL | gain | Auto chooses |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in &cases {
        let a = c
            .decision
            .aggregated
            .as_ref()
            .map_or("none meets the SLO".to_owned(), |(i, p, _)| {
                format!("{} (batch {})", c.labels[*i], p.batch)
            });
        let (p, ttft, itl) = c.decision.pair.as_ref().map_or(
            (
                "none meets the SLO".to_owned(),
                String::new(),
                String::new(),
            ),
            |(i, j, x)| {
                (
                    format!(
                        "{} x{} + {} x{} (decode batch {})",
                        c.labels[*i],
                        x.prefill_replicas,
                        c.labels[*j],
                        x.decode_replicas,
                        x.decode_batch
                    ),
                    format!("{:.2} s", x.time_to_first_token_seconds),
                    format!("{:.0} ms", x.inter_token_latency_seconds * 1e3),
                )
            },
        );
        let gain = if agg(c) > 0.0 {
            format!("{:+.0}%", (pd(c) / agg(c) - 1.0) * 100.0)
        } else {
            "-".into()
        };
        table.push_str(&format!(
            "| {} | {} | {} | {a} | {:.0} | {p} | {:.0} | {ttft} | {itl} | {gain} | {} |\n",
            c.model,
            c.cluster,
            c.workload,
            agg(c),
            pd(c),
            if c.decision.disaggregate {
                "disaggregated"
            } else {
                "aggregated"
            }
        ));
    }
    print!("{table}");
    common::generated_doc(
        "disaggregation-goodput.md",
        &table,
        "UPDATE_GOODPUT_TABLE",
        "cargo test -p tessera-operator --test disaggregation",
    );
    let find_model = |m: &str, cl: &str, w: &str| {
        cases
            .iter()
            .find(|c| c.model == m && c.cluster == cl && c.workload.starts_with(w))
            .unwrap()
    };
    let find = |cl: &str, w: &str| find_model("Llama 3.3 70B", cl, w);
    // Long prompts stretch every aggregated decode step: disaggregation pays on every cluster,
    // and more than for short prompts.
    for cl in ["H800 + H20", "H100 + H20", "H100", "H800", "H20"] {
        let (long, short) = (find(cl, "long"), find(cl, "short"));
        assert!(long.decision.disaggregate, "{cl}: {}", long.decision.reason);
        assert!(
            pd(long) / agg(long).max(1e-9) > pd(short) / agg(short).max(1e-9),
            "{cl}: long {} vs {}, short {} vs {}",
            pd(long),
            agg(long),
            pd(short),
            agg(short)
        );
    }
    // On H800 + H20 with long prompts, prefill runs on the H800s (7x H20's compute).
    let mixed = find("H800 + H20", "long");
    let (i, _, _) = mixed.decision.pair.as_ref().unwrap();
    assert!(
        mixed.labels[*i].starts_with("H800"),
        "{}",
        mixed.decision.reason
    );
    // Auto disaggregates exactly where the pair gains more than the margin (10%): short
    // prompts stay aggregated, the gain there is within a few percent.
    let margin = CostConstants::default().disaggregation_margin;
    for c in &cases {
        assert_eq!(
            c.decision.disaggregate,
            pd(c) > agg(c) * (1.0 + margin),
            "{}",
            c.decision.reason
        );
    }
    for cl in ["H800 + H20", "H100", "H800", "H20"] {
        assert!(!find(cl, "short").decision.disaggregate);
    }
    // DeepSeek-V3 on H800 + H20 with long prompts: prefill on the H800s, and the decode pool on
    // the H20s once the prefill pool needs every H800 (4.0 TB/s of HBM and 96 GB hold a large
    // decode batch of a model with 37.6B active parameters).
    let ds = find_model("DeepSeek-V3", "H800 + H20", "long");
    let (i, j, _) = ds.decision.pair.as_ref().expect("pair");
    assert!(ds.decision.disaggregate, "{}", ds.decision.reason);
    assert!(ds.labels[*i].starts_with("H800"), "{}", ds.decision.reason);
    assert!(ds.labels[*j].starts_with("H20"), "{}", ds.decision.reason);
}

#[test]
fn plan_places_both_pools_as_gangs_with_roles() {
    let inv = cluster(&[1, 2]);
    let md = deployment(8192, 256);
    let p = plan(
        &inv,
        std::slice::from_ref(&md),
        &[],
        &PlanOptions::default(),
    );
    let d = &p.deployments[0];
    let x = d.disaggregation.as_ref().expect("verdict");
    assert!(x.disaggregated, "{}", x.reason);
    assert!(x.reason.contains("KV transfer"), "{}", x.reason);
    let (pre, dec) = (&x.pools[0], &x.pools[1]);
    assert_eq!(
        (pre.role.as_str(), dec.role.as_str()),
        ("prefill", "decode")
    );
    // Every replica of both pools is placed, with its pool's layout and role, on its nodes.
    assert!(d.unplaced.is_empty(), "{:?}", d.unplaced);
    assert_eq!(d.placed.len() as i32, pre.replicas + dec.replicas);
    for r in &d.placed {
        let pool = if r.role.as_deref() == Some("prefill") {
            pre
        } else {
            dec
        };
        assert_eq!(r.gpu_type, pool.gpu_type);
        assert_eq!(r.tensor_parallel, pool.tensor_parallel);
        assert!(r.stages.iter().all(|s| pool.nodes.contains(&s.node)));
    }
    // Off: one aggregated pool, no verdict.
    let mut off = md;
    off.spec.serving.disaggregation = tessera_operator::api::Disaggregation::Off;
    let p = plan(
        &inv,
        std::slice::from_ref(&off),
        &[],
        &PlanOptions::default(),
    );
    assert!(p.deployments[0].disaggregation.is_none());
    assert!(p.deployments[0].placed.iter().all(|r| r.role.is_none()));
}

/// `racks` racks of `per_rack` 8-GPU H800 nodes, one block; `used` GPUs of the first node of
/// the last rack held by another pod.
fn h800_racks(racks: u32, per_rack: u32, used: u32) -> Inventory {
    let mut nodes: Vec<k8s_openapi::api::core::v1::Node> = Vec::new();
    for rack in 0..racks {
        for i in 0..per_rack {
            let v = node_json(&format!("r{rack}-{i}"), 1, 8, 0, 0, rack);
            nodes.push(serde_json::from_value(v).expect("node"));
        }
    }
    let other: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "other", "namespace": "x"},
        "spec": {"nodeName": format!("r{}-0", racks - 1), "containers": [{"name": "c",
            "resources": {"limits": {"nvidia.com/gpu": used.to_string()}}}]},
        "status": {"phase": "Running"}
    }))
    .expect("pod");
    let keys: Vec<String> = DEFAULT_TOPOLOGY_KEYS
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    Inventory::from_nodes(&nodes, &[other], &Catalog::builtin(), &keys)
}

#[test]
fn a_unit_of_the_pools_is_placed_inside_one_rack_when_it_has_room() {
    // The KV cache of every request crosses from a unit's prefill replicas to its decode
    // replicas, so a unit stays inside the rack (the innermost topology key) of its first
    // replica. Here best fit alone would split it: its first replica takes the tight 2 GPUs left
    // on r1-0, and every next one the emptiest-first order of rack 0.
    let inv = h800_racks(2, 6, 6);
    let md = deployment(8192, 256);
    let p = plan(
        &inv,
        std::slice::from_ref(&md),
        &[],
        &PlanOptions::default(),
    );
    let d = &p.deployments[0];
    let x = d.disaggregation.as_ref().expect("verdict");
    assert!(x.disaggregated, "{}", x.reason);
    assert!(d.unplaced.is_empty(), "{:?}", d.unplaced);
    let placed: Vec<(i32, Vec<String>)> = d
        .placed
        .iter()
        .map(|r| (r.replica, r.stages.iter().map(|s| s.node.clone()).collect()))
        .collect();
    let racks: std::collections::BTreeSet<&str> = placed
        .iter()
        .flat_map(|(_, nodes)| nodes.iter().map(|n| n.split('-').next().unwrap()))
        .collect();
    assert_eq!(
        racks.into_iter().collect::<Vec<_>>(),
        vec!["r1"],
        "{placed:?} ({:?})",
        x.pools
    );
}

#[test]
fn each_pools_replicas_keep_their_indices_whatever_the_size_of_the_other_pool() {
    use tessera_operator::planner::{pool_indices, prefill_slot};
    for unit in [(1, 1), (3, 1), (1, 2), (10, 1), (2, 3)] {
        for pre in 0..9 {
            for dec in 0..9 {
                let at = pool_indices((pre, dec), unit);
                let roles: Vec<bool> = at
                    .iter()
                    .map(|&r| prefill_slot(r, unit.0, unit.1))
                    .collect();
                assert_eq!(at.len() as i32, pre + dec, "{unit:?} {pre}+{dec}: {at:?}");
                assert!(at.windows(2).all(|w| w[0] < w[1]), "distinct: {at:?}");
                assert_eq!(roles.iter().filter(|&&p| p).count() as i32, pre, "{at:?}");
                // One more prefill replica adds one prefill index and moves nothing.
                let grown = pool_indices((pre + 1, dec), unit);
                let added: Vec<i32> = grown.iter().copied().filter(|r| !at.contains(r)).collect();
                assert_eq!(added.len(), 1, "{unit:?} {pre}+{dec}");
                assert!(prefill_slot(added[0], unit.0, unit.1));
                assert!(at.iter().all(|r| grown.contains(r)));
                // Likewise one more decode replica.
                let grown = pool_indices((pre, dec + 1), unit);
                let added: Vec<i32> = grown.iter().copied().filter(|r| !at.contains(r)).collect();
                assert_eq!(added.len(), 1, "{unit:?} {pre}+{dec}");
                assert!(!prefill_slot(added[0], unit.0, unit.1));
                assert!(at.iter().all(|r| grown.contains(r)));
            }
        }
    }
    // Whole units are the interleaving the pools always had: 1:2, two units.
    assert_eq!(pool_indices((2, 4), (1, 2)), vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(pool_indices((2, 5), (1, 2)), vec![0, 1, 2, 3, 4, 5, 7]);
}

#[test]
fn a_pool_sized_on_its_own_keeps_every_placed_replica_and_adds_its_own() {
    let inv = cluster(&[1, 2]);
    let md = deployment(8192, 256);
    let opts = PlanOptions::default();
    let first = plan(&inv, std::slice::from_ref(&md), &[], &opts);
    let d = &first.deployments[0];
    let x = d.disaggregation.as_ref().expect("verdict");
    assert!(x.disaggregated, "{}", x.reason);
    let (pre, dec) = (x.pools[0].replicas, x.pools[1].replicas);
    let existing = first.existing();
    // Two more decode replicas, the prefill pool as planned. (The inventory has no pods: the
    // kept replicas' GPUs are taken again by the plan itself, as the controller's are.)
    let mut grown = md;
    grown.spec.pool_replicas = Some(tessera_operator::api::PoolReplicas {
        prefill: None,
        decode: Some(dec + 2),
    });
    let second = plan(&inv, std::slice::from_ref(&grown), &existing, &opts);
    let d2 = &second.deployments[0];
    assert!(d2.unplaced.is_empty(), "{:?}", d2.unplaced);
    let x2 = d2.disaggregation.as_ref().expect("verdict");
    assert_eq!((x2.pools[0].replicas, x2.pools[1].replicas), (pre, dec + 2));
    for r in &d.placed {
        let now = d2
            .placed
            .iter()
            .find(|p| p.replica == r.replica)
            .expect("kept");
        assert!(now.kept, "replica {} placed again", r.replica);
        assert_eq!(now.role, r.role);
    }
    let new: Vec<(i32, Option<&str>)> = d2
        .placed
        .iter()
        .filter(|p| !p.kept)
        .map(|p| (p.replica, p.role.as_deref()))
        .collect();
    assert_eq!(new.len(), 2, "{new:?}");
    assert!(
        new.iter().all(|(_, role)| *role == Some("decode")),
        "{new:?}"
    );
}

#[test]
fn a_ttft_budget_only_nvlink_meets_keeps_each_unit_on_one_node() {
    // Llama 3.3 70B, long prompts, on H800 alone. With a 2 s TTFT the best pair sends the KV
    // cache over the fabric (its unit is larger than a node). With a budget that leaves the
    // prefill only half of that transfer, only a unit inside one node's NVLink domain meets it.
    let (d, _) = decide(None, &[1], 8192, 256);
    let (_, _, x) = d.pair.expect("pair");
    assert_eq!(x.kv_link, disagg::KvLink::Fabric);
    let budget = x.time_to_first_token_seconds - x.kv_transfer_seconds / 2.0;
    let inv = cluster(&[1]);
    let mut md = deployment(8192, 256);
    md.spec
        .serving
        .slo
        .as_mut()
        .unwrap()
        .time_to_first_token_seconds = Some(budget);
    let opts = PlanOptions::default();
    let p = plan(&inv, std::slice::from_ref(&md), &[], &opts);
    let dp = &p.deployments[0];
    let v = dp.disaggregation.as_ref().expect("verdict");
    assert!(v.disaggregated, "{}", v.reason);
    assert!(
        v.reason.contains("over NVLink inside a node"),
        "{}",
        v.reason
    );
    let prefill = &v.pools[0];
    assert_eq!(prefill.kv_transfer_link.as_deref(), Some("NVLink"));
    assert!(prefill.time_to_first_token_seconds.unwrap() <= budget + 1e-3);
    // Every unit's replicas sit on one node.
    let per_unit = (v.pools[0].replicas_per_unit + v.pools[1].replicas_per_unit) as i32;
    let mut nodes: std::collections::BTreeMap<i32, std::collections::BTreeSet<String>> =
        Default::default();
    for r in &dp.placed {
        nodes
            .entry(r.replica / per_unit)
            .or_default()
            .extend(r.stages.iter().map(|s| s.node.clone()));
    }
    assert!(!nodes.is_empty());
    assert!(nodes.values().all(|n| n.len() == 1), "{nodes:?}");

    // A unit whose decode replica is kept on another node (say, placed before a node came
    // back): the status says so, with the fabric's longer time to first token.
    let decode = dp
        .placed
        .iter()
        .find(|r| r.role.as_deref() == Some("decode"))
        .expect("a decode replica");
    let home = decode.stages[0].node.clone();
    let away = inv
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| {
            dp.placed
                .iter()
                .all(|r| r.stages.iter().all(|s| &s.node != n))
        })
        .expect("an empty node");
    let mut existing = p.existing();
    for e in existing.iter_mut().filter(|e| e.replica == decode.replica) {
        for s in e.stages.iter_mut().filter(|s| s.node == home) {
            s.node = away.clone();
        }
    }
    let p2 = plan(&inv, std::slice::from_ref(&md), &existing, &opts);
    let v2 = p2.deployments[0].disaggregation.as_ref().expect("verdict");
    assert!(p2.deployments[0].placed.iter().all(|r| r.kept));
    let split = &v2.pools[0];
    assert_eq!(split.kv_transfer_link.as_deref(), Some("fabric"));
    assert!(
        split.time_to_first_token_seconds.unwrap() > prefill.time_to_first_token_seconds.unwrap(),
        "{split:?} vs {prefill:?}"
    );
}
