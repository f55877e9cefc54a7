//! Placement quality of the planner (docs/benchmarks.md, section "Planner").
//!
//! 1. Tessera vs a topology-blind baseline on heterogeneous clusters: predicted aggregate decode
//!    tokens/s of the replicas that serve, and the share of TP groups inside one NVLink domain.
//!    The baseline gets Tessera's chosen layout per deployment (so only placement differs) and
//!    places each stage as a pod the way the default scheduler does for LWS groups: the node of
//!    the right GPU type with the most free GPUs (LeastAllocated), GPU indices in device-plugin
//!    order, no gang semantics (a replica whose later stage finds no room holds its earlier
//!    stages' GPUs and serves nothing).
//! 2. Tessera vs an exhaustive optimum on small clusters (<= 8 nodes): every assignment of a
//!    feasible layout (or none) to every replica, checked by exact bin packing of TP groups into
//!    free NVLink domains (pipeline topology relaxed, so the optimum is an upper bound).
//!
//! Run: `cargo run --release -p tessera-operator --example placement_quality`

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{Value, json};
use tessera_operator::api::{ModelDeployment, parse_model_deployment};
use tessera_operator::planner::catalog::Catalog;
use tessera_operator::planner::choose::{self, Candidate};
use tessera_operator::planner::cost::{CostConstants, Link, Links, estimate};
use tessera_operator::planner::inventory::{DEFAULT_TOPOLOGY_KEYS, Eligibility, Inventory};
use tessera_operator::planner::synthetic::{self, Rng};
use tessera_operator::planner::{PlanOptions, plan};

fn keys() -> Vec<String> {
    DEFAULT_TOPOLOGY_KEYS
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

/// A heterogeneous cluster: 8-GPU SXM nodes, H800 nodes whose agent reports two NVLink islands
/// (`0-3.4-7`), 4-GPU L40S boxes; some GPUs already in use.
fn hetero_cluster(nodes: usize, rng: &mut Rng) -> (Vec<Node>, Vec<Pod>) {
    let mut ns = Vec::new();
    let mut pods = Vec::new();
    for i in 0..nodes {
        let product = rng.below(4) as usize;
        let gpus = if product == 3 { 4 } else { 8 };
        let rack = (i / 4) as u32;
        let mut v = synthetic::node_json(&format!("n{i:03}"), product, gpus, 0, rack / 4, rack);
        if product == 1 && rng.below(2) == 0 {
            v["metadata"]["labels"]["tessera.dev/nvlink.domains"] = json!("0-3.4-7");
        }
        ns.push(serde_json::from_value::<Node>(v).unwrap());
        let used = if rng.below(3) == 0 {
            rng.below(u64::from(gpus))
        } else {
            0
        };
        if used > 0 {
            pods.push(
                serde_json::from_value(json!({
                    "metadata": {"name": format!("busy-{i}"), "namespace": "x"},
                    "spec": {"nodeName": format!("n{i:03}"), "containers": [{"name": "c",
                        "resources": {"limits": {"nvidia.com/gpu": used.to_string()}}}]},
                    "status": {"phase": "Running"}
                }))
                .unwrap(),
            );
        }
    }
    (ns, pods)
}

fn fleet(count: usize, rng: &mut Rng, any_type: bool) -> Vec<ModelDeployment> {
    (0..count)
        .map(|i| {
            let mut v: Value = synthetic::deployment_json(i, rng);
            if any_type {
                v["spec"]["gpu"]["types"] = json!([]);
            }
            parse_model_deployment(&v).unwrap()
        })
        .collect()
}

struct Score {
    tokens: f64,
    /// GPUs held by partial gangs that serve nothing.
    stranded: u32,
    /// Multi-stage (PP > 1) replicas asked for and served.
    multi_stage: (usize, usize),
    tp_groups: usize,
    in_domain: usize,
    serving: usize,
    replicas: usize,
}

fn tessera(inv: &Inventory, fleet: &[ModelDeployment], first_choice_only: bool) -> Score {
    let opts = PlanOptions {
        first_choice_only,
        ..PlanOptions::default()
    };
    let p = plan(inv, fleet, &[], &opts);
    let mut s = Score {
        tokens: 0.0,
        stranded: 0,
        multi_stage: (0, 0),
        tp_groups: 0,
        in_domain: 0,
        serving: 0,
        replicas: fleet.iter().map(|d| d.spec.replicas as usize).sum(),
    };
    for d in &p.deployments {
        if d.choice
            .chosen
            .as_ref()
            .is_some_and(|c| c.pipeline_parallel > 1)
        {
            s.multi_stage.0 += d.replicas as usize;
            s.multi_stage.1 += d.placed.len();
        }
    }
    for d in &p.deployments {
        for r in &d.placed {
            s.serving += 1;
            s.tokens += r.predicted.decode_tokens_per_second;
            if r.tensor_parallel > 1 {
                for st in &r.stages {
                    s.tp_groups += 1;
                    let node = inv.nodes.iter().find(|n| n.name == st.node).unwrap();
                    // The prediction used NVLink only when the group sat inside one domain.
                    if node.nvlink_gbps > 0.0 && r.predicted.all_reduce_g_bps >= node.nvlink_gbps {
                        s.in_domain += 1;
                    }
                }
            }
        }
    }
    s
}

fn baseline(inv: &Inventory, fleet: &[ModelDeployment]) -> Score {
    let c = CostConstants::default();
    let mut free: Vec<Vec<u32>> = inv.nodes.iter().map(|n| n.free.clone()).collect();
    let mut s = Score {
        tokens: 0.0,
        stranded: 0,
        multi_stage: (0, 0),
        tp_groups: 0,
        in_domain: 0,
        serving: 0,
        replicas: 0,
    };
    let mut order: Vec<&ModelDeployment> = fleet.iter().collect();
    order.sort_by_key(|d| std::cmp::Reverse(d.spec.priority));
    for md in order {
        s.replicas += md.spec.replicas as usize;
        let elig = Eligibility::compute(inv, &md.spec.placement);
        let stats = choose::type_stats(inv, &elig);
        let choice = choose::choose(&md.spec, inv, &stats, &elig, &c);
        let Some(cand) = choice.candidates.first() else {
            continue;
        };
        for _ in 0..md.spec.replicas {
            let mut stages: Vec<(usize, bool)> = Vec::new();
            for _ in 0..cand.pp {
                // LeastAllocated: most free GPUs of the right type.
                let best = (0..inv.nodes.len())
                    .filter(|&i| inv.nodes[i].gpu_type == cand.gpu_type && elig.ok[i])
                    .filter(|&i| free[i].iter().sum::<u32>() >= cand.tp)
                    .max_by_key(|&i| (free[i].iter().sum::<u32>(), std::cmp::Reverse(i)));
                let Some(n) = best else { break };
                // Device plugin: lowest free GPU indices first.
                let mut need = cand.tp;
                let mut domains_used = 0;
                for f in free[n].iter_mut() {
                    if need == 0 {
                        break;
                    }
                    let k = (*f).min(need);
                    if k > 0 {
                        *f -= k;
                        need -= k;
                        domains_used += 1;
                    }
                }
                stages.push((n, domains_used == 1));
            }
            if cand.tp > 1 {
                s.tp_groups += stages.len();
                s.in_domain += stages
                    .iter()
                    .filter(|(n, one)| *one && inv.nodes[*n].nvlink_gbps > 0.0)
                    .count();
            }
            if cand.pp > 1 {
                s.multi_stage.0 += 1;
            }
            if stages.len() as u32 != cand.pp {
                // Partial gang: holds GPUs, serves nothing.
                s.stranded += cand.tp * stages.len() as u32;
                continue;
            }
            if cand.pp > 1 {
                s.multi_stage.1 += 1;
            }
            let model = &inv.types[cand.gpu_type].model;
            let tp_link = stages
                .iter()
                .map(|&(n, one)| {
                    if one && inv.nodes[n].nvlink_gbps > 0.0 {
                        Link {
                            gbps: inv.nodes[n].nvlink_gbps,
                            latency_s: c.nvlink_latency_s,
                        }
                    } else {
                        Link {
                            gbps: model.pcie_gbps,
                            latency_s: c.pcie_latency_s,
                        }
                    }
                })
                .min_by(|a, b| a.gbps.total_cmp(&b.gbps))
                .unwrap();
            let pp_link = Link {
                gbps: c.fabric_gbps,
                latency_s: c.fabric_latency_s,
            };
            let e = estimate(
                &md.spec.model.architecture,
                choose::workload(&md.spec),
                model,
                cand.tp,
                cand.pp,
                Links {
                    tp: tp_link,
                    pp: pp_link,
                    ep: tp_link,
                },
                &c,
            );
            s.serving += 1;
            s.tokens += e.decode_tokens_per_second;
        }
    }
    s
}

/// Exact packing of TP groups (per type) into free NVLink domains.
fn packs(items: &mut Vec<u32>, bins: &mut [u32]) -> bool {
    let Some(g) = items.pop() else { return true };
    let mut tried = Vec::new();
    for i in 0..bins.len() {
        if bins[i] >= g && !tried.contains(&bins[i]) {
            tried.push(bins[i]);
            bins[i] -= g;
            let ok = packs(items, bins);
            bins[i] += g;
            if ok {
                items.push(g);
                return true;
            }
        }
    }
    items.push(g);
    false
}

/// The best aggregate over every assignment of one of each replica's first `max_cands` ranked
/// layouts (or none).
fn optimum(inv: &Inventory, fleet: &[ModelDeployment], max_cands: usize) -> f64 {
    let c = CostConstants::default();
    let mut replicas: Vec<Vec<Candidate>> = Vec::new();
    for md in fleet {
        let elig = Eligibility::compute(inv, &md.spec.placement);
        let stats = choose::type_stats(inv, &elig);
        let choice = choose::choose(&md.spec, inv, &stats, &elig, &c);
        for _ in 0..md.spec.replicas {
            replicas.push(choice.candidates.iter().take(max_cands).cloned().collect());
        }
    }
    let mut bins: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    for n in &inv.nodes {
        bins.entry(n.gpu_type)
            .or_default()
            .extend(n.free.iter().copied().filter(|&f| f > 0));
    }
    let mut best = 0.0f64;
    let mut items: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    search(&replicas, 0, 0.0, &mut items, &bins, &mut best);
    best
}

fn search(
    reps: &[Vec<Candidate>],
    i: usize,
    acc: f64,
    items: &mut BTreeMap<usize, Vec<u32>>,
    bins: &BTreeMap<usize, Vec<u32>>,
    best: &mut f64,
) {
    if i == reps.len() {
        *best = best.max(acc);
        return;
    }
    // Bound: even if every remaining replica took its best layout.
    let rest: f64 = reps[i..]
        .iter()
        .map(|c| {
            c.iter()
                .map(|x| x.estimate.decode_tokens_per_second)
                .fold(0.0, f64::max)
        })
        .sum();
    if acc + rest <= *best {
        return;
    }
    for cand in &reps[i] {
        let list = items.entry(cand.gpu_type).or_default();
        let before = list.len();
        list.extend(std::iter::repeat_n(cand.tp, cand.pp as usize));
        let mut sorted = list.clone();
        sorted.sort_unstable();
        let mut b = bins.get(&cand.gpu_type).cloned().unwrap_or_default();
        if packs(&mut sorted, &mut b) {
            search(
                reps,
                i + 1,
                acc + cand.estimate.decode_tokens_per_second,
                items,
                bins,
                best,
            );
        }
        items.get_mut(&cand.gpu_type).unwrap().truncate(before);
    }
    search(reps, i + 1, acc, items, bins, best);
}

fn main() {
    let _ = Catalog::builtin();
    println!(
        "Tessera vs topology-blind baseline (same chosen layouts, no fallbacks on either side; predicted decode tokens/s of serving replicas)"
    );
    println!(
        "{:<28} {:>9} {:>14} {:>14} {:>8} {:>12} {:>12}",
        "cluster",
        "replicas",
        "tessera tok/s",
        "blind tok/s",
        "ratio",
        "tessera NVL%",
        "blind NVL%"
    );
    for (seed, nodes, deps) in [
        (1u64, 32usize, 24usize),
        (2, 64, 48),
        (3, 128, 96),
        (4, 256, 200),
    ] {
        let mut rng = Rng::new(seed);
        let (n, pods) = hetero_cluster(nodes, &mut rng);
        let inv = Inventory::from_nodes(&n, &pods, &Catalog::builtin(), &keys());
        let f = fleet(deps, &mut rng, false);
        let a = tessera(&inv, &f, true);
        let full = tessera(&inv, &f, false);
        let b = baseline(&inv, &f);
        let pct = |x: usize, of: usize| {
            if of == 0 {
                100.0
            } else {
                100.0 * x as f64 / of as f64
            }
        };
        println!(
            "{:<28} {:>9} {:>14.0} {:>14.0} {:>7.2}x {:>11.1}% {:>11.1}%",
            format!("seed {seed}: {nodes} nodes, {deps} deps"),
            a.replicas,
            a.tokens,
            b.tokens,
            a.tokens / b.tokens.max(1e-9),
            pct(a.in_domain, a.tp_groups),
            pct(b.in_domain, b.tp_groups),
        );
        println!(
            "{:<28} serving: tessera {}/{}, blind {}/{}; multi-stage served: tessera {}/{}, blind {}/{}; GPUs stranded in partial gangs: tessera {}, blind {}",
            "",
            a.serving,
            a.replicas,
            b.serving,
            b.replicas,
            a.multi_stage.1,
            a.multi_stage.0,
            b.multi_stage.1,
            b.multi_stage.0,
            a.stranded,
            b.stranded
        );
        println!(
            "{:<28} tessera with fallbacks (the default): {:.0} tok/s, {} serving",
            "", full.tokens, full.serving
        );
    }

    println!();
    println!("Tessera vs exact packing (small clusters, any GPU type)");
    println!(
        "  same-order optimum: replicas in Tessera's order (priority, creation, name); each takes its"
    );
    println!(
        "  first feasible layout (first choice only / any, in rank order) if an exact packing of every"
    );
    println!(
        "  accepted TP group into free NVLink domains exists (pipeline topology relaxed: an upper bound)."
    );
    println!(
        "  free opt.: the best aggregate over any subset of replicas and any of their 3 best layouts,"
    );
    println!(
        "  ignoring priority and order (what strict priority and FIFO cost in aggregate tokens/s)."
    );
    println!(
        "{:<6} {:>5} {:>8} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>9}",
        "seed",
        "nodes",
        "replicas",
        "first",
        "optimum",
        "gap",
        "fallback",
        "optimum",
        "gap",
        "free opt."
    );
    let mut worst = [0.0f64; 2];
    let mut total = [0.0f64; 2];
    let cases = 20;
    for seed in 100..100 + cases {
        let mut rng = Rng::new(seed);
        let nodes = 2 + rng.below(7) as usize; // 2..=8
        let (n, pods) = hetero_cluster(nodes, &mut rng);
        let inv = Inventory::from_nodes(&n, &pods, &Catalog::builtin(), &keys());
        let count = 2 + rng.below(2) as usize;
        let mut f = fleet(count, &mut rng, true);
        for d in &mut f {
            d.spec.replicas = d.spec.replicas.min(3);
            d.spec.placement.pipeline_topology_key = None;
        }
        let reps: i32 = f.iter().map(|d| d.spec.replicas).sum();
        let mut row = format!("{seed:<6} {nodes:>5} {reps:>8}");
        for (k, (first_only, cands)) in [(true, 1usize), (false, usize::MAX)]
            .into_iter()
            .enumerate()
        {
            let t = nominal_aggregate(&inv, &f, first_only);
            let opt = ordered_optimum(&inv, &f, cands).max(t);
            let gap = if opt > 0.0 {
                (opt - t) / opt * 100.0
            } else {
                0.0
            };
            worst[k] = worst[k].max(gap);
            total[k] += gap;
            row.push_str(&format!(" | {t:>9.0} {opt:>9.0} {gap:>5.2}%"));
        }
        row.push_str(&format!(" | {:>9.0}", optimum(&inv, &f, 3)));
        println!("{row}");
    }
    println!(
        "first choice: mean gap {:.2}%, worst {:.2}%; with fallbacks: mean gap {:.2}%, worst {:.2}% (over {cases} cases)",
        total[0] / cases as f64,
        worst[0],
        total[1] / cases as f64,
        worst[1]
    );
}

/// Replicas in Tessera's order; each takes the first of its `max_cands` best-ranked layouts
/// for which an exact packing of all accepted TP groups into free NVLink domains exists.
fn ordered_optimum(inv: &Inventory, fleet: &[ModelDeployment], max_cands: usize) -> f64 {
    let c = CostConstants::default();
    let mut order: Vec<&ModelDeployment> = fleet.iter().collect();
    order.sort_by_key(|d| {
        (
            std::cmp::Reverse(d.spec.priority),
            d.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string()),
            d.metadata.namespace.clone(),
            d.metadata.name.clone(),
        )
    });
    let mut bins: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    for n in &inv.nodes {
        bins.entry(n.gpu_type)
            .or_default()
            .extend(n.free.iter().copied().filter(|&f| f > 0));
    }
    let mut items: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    let mut total = 0.0;
    for md in order {
        let elig = Eligibility::compute(inv, &md.spec.placement);
        let stats = choose::type_stats(inv, &elig);
        let choice = choose::choose(&md.spec, inv, &stats, &elig, &c);
        for _ in 0..md.spec.replicas {
            for cand in choice.candidates.iter().take(max_cands) {
                let mut list = items.get(&cand.gpu_type).cloned().unwrap_or_default();
                list.extend(std::iter::repeat_n(cand.tp, cand.pp as usize));
                list.sort_unstable();
                let mut b = bins.get(&cand.gpu_type).cloned().unwrap_or_default();
                if packs(&mut list.clone(), &mut b) {
                    items.insert(cand.gpu_type, list);
                    total += cand.estimate.decode_tokens_per_second;
                    break;
                }
            }
        }
    }
    total
}

/// Tessera's aggregate with the same nominal predictions the optimum uses.
fn nominal_aggregate(inv: &Inventory, f: &[ModelDeployment], first_choice_only: bool) -> f64 {
    let c = CostConstants::default();
    let opts = PlanOptions {
        first_choice_only,
        ..PlanOptions::default()
    };
    let p = plan(inv, f, &[], &opts);
    let mut t = 0.0;
    for d in &p.deployments {
        let md = f
            .iter()
            .find(|m| m.metadata.name.as_deref() == Some(d.name.as_str()))
            .unwrap();
        let elig = Eligibility::compute(inv, &md.spec.placement);
        let stats = choose::type_stats(inv, &elig);
        let choice = choose::choose(&md.spec, inv, &stats, &elig, &c);
        for r in &d.placed {
            let cand = choice
                .candidates
                .iter()
                .find(|x| {
                    inv.types[x.gpu_type].product == r.gpu_type
                        && x.tp as i32 == r.tensor_parallel
                        && x.pp as i32 == r.pipeline_parallel
                })
                .unwrap();
            t += cand.estimate.decode_tokens_per_second;
        }
    }
    t
}
