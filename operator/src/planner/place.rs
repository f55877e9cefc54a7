//! Gang placement on an index of free capacity.
//!
//! Free GPUs are indexed per GPU type in two ordered sets: NVLink domains by free GPUs and nodes
//! by free GPUs. A single-stage gang takes the best fit (the domain or node with the fewest free
//! GPUs that still fits) in O(log n). A multi-stage gang scans the type's domains with room once,
//! sums how many TP groups each topology group (node, rack, block, zone, cluster) can hold, picks
//! the tightest level that has a group with room and, on that level, the group with the least
//! room that fits (best fit again), then takes best-fit slots inside it.

use std::collections::BTreeSet;
use std::collections::HashMap;

use super::inventory::Inventory;

/// Where a TP group may spread, in the order placement tries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Each TP group inside one NVLink domain.
    Domain,
    /// Each TP group on one node.
    Node,
    /// TP groups may span nodes.
    Spread,
}

/// GPUs one stage takes from one NVLink domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alloc {
    pub stage: u32,
    pub node: u32,
    pub domain: u32,
    pub gpus: u32,
}

#[derive(Clone, Debug, Default)]
struct TypeIndex {
    /// (free, node, domain) for domains with free GPUs.
    domains: BTreeSet<(u32, u32, u32)>,
    /// (free, node) for nodes with free GPUs.
    nodes: BTreeSet<(u32, u32)>,
}

/// Free capacity of the cluster during one planning run.
#[derive(Clone, Debug)]
pub struct Capacity {
    pub free: Vec<Vec<u32>>,
    pub node_free: Vec<u32>,
    node_type: Vec<usize>,
    by_type: Vec<TypeIndex>,
}

/// Topology groups for multi-stage gangs: level 0 is the node, then each topology key from the
/// innermost to the outermost (as a prefix of keys), then the whole cluster. With a hard
/// `pipelineTopologyKey`, every group also carries that label's value and nodes without it are
/// excluded.
#[derive(Clone, Debug)]
pub struct Grouping {
    pub level_names: Vec<String>,
    /// Per level, per node: group id, or `u32::MAX` when the node is excluded.
    pub ids: Vec<Vec<u32>>,
    pub counts: Vec<usize>,
    /// Display names of the outermost level's groups (the hard key's values, or `cluster`).
    pub root_names: Vec<String>,
}

pub const EXCLUDED: u32 = u32::MAX;

/// A [`Grouping`] built on first use: only multi-stage gangs need one, and building it walks
/// every node's labels (milliseconds on 10,000 nodes), so single-stage plans never pay for it.
#[derive(Debug)]
pub struct LazyGrouping {
    hard_key: Option<String>,
    cell: std::cell::OnceCell<Grouping>,
}

impl LazyGrouping {
    pub fn new(hard_key: Option<&str>) -> Self {
        Self {
            hard_key: hard_key.map(str::to_owned),
            cell: std::cell::OnceCell::new(),
        }
    }

    /// The grouping, built on the first call.
    pub fn get(&self, inv: &Inventory) -> &Grouping {
        self.cell
            .get_or_init(|| Grouping::new(inv, self.hard_key.as_deref()))
    }
}

impl Grouping {
    pub fn new(inv: &Inventory, hard_key: Option<&str>) -> Grouping {
        let keys = &inv.topology_keys;
        let n = inv.nodes.len();
        let mut level_names = vec!["node".to_owned()];
        // Prefix lengths from innermost to outermost; with a hard key that is one of the
        // topology keys, levels outside it are pointless (they all carry its value anyway).
        let mut prefixes: Vec<usize> = (1..=keys.len()).rev().collect();
        if let Some(hk) = hard_key
            && let Some(pos) = keys.iter().position(|k| k == hk)
        {
            prefixes.retain(|&p| p > pos);
        }
        for &p in &prefixes {
            level_names.push(keys[p - 1].clone());
        }
        level_names.push(hard_key.map_or("cluster".to_owned(), str::to_owned));
        let levels = level_names.len();
        let mut ids = vec![vec![EXCLUDED; n]; levels];
        let mut counts = vec![0usize; levels];
        // Groups are interned hierarchically, outermost first: a group at prefix length p is
        // (its parent group at p - 1, the value of key p); the root is the hard key's value.
        // That equals interning the whole prefix tuple, without allocating a key per node.
        let nkeys = keys.len();
        let mut roots: HashMap<Option<&str>, u32> = HashMap::new();
        let mut root_names: Vec<String> = Vec::new();
        let mut interned: Vec<HashMap<(u32, &str), u32>> = vec![HashMap::new(); nkeys + 1];
        let mut next_id = vec![0u32; nkeys + 1];
        // Level index of each prefix length (0: not a level).
        let mut level_of = vec![0usize; nkeys + 1];
        for (li, &p) in prefixes.iter().enumerate() {
            level_of[p] = li + 1;
        }
        let last = levels - 1;
        for (i, node) in inv.nodes.iter().enumerate() {
            let hv = match hard_key {
                Some(k) => match node.labels.get(k) {
                    Some(v) => Some(v.as_str()),
                    None => continue,
                },
                None => None,
            };
            ids[0][i] = counts[0] as u32;
            counts[0] += 1;
            let next = roots.len() as u32;
            let root = *roots.entry(hv).or_insert_with(|| {
                root_names.push(hv.unwrap_or("cluster").to_owned());
                next
            });
            ids[last][i] = root;
            let mut parent = Some(root);
            for p in 1..=nkeys {
                parent = match (parent, node.topology[p - 1].as_deref()) {
                    (Some(par), Some(v)) => {
                        let fresh = next_id[p];
                        let id = *interned[p].entry((par, v)).or_insert(fresh);
                        if id == fresh {
                            next_id[p] += 1;
                        }
                        Some(id)
                    }
                    // Unknown position: the node is a group of its own on this level and below.
                    _ => None,
                };
                let lvl = level_of[p];
                if lvl == 0 {
                    continue;
                }
                ids[lvl][i] = match parent {
                    Some(id) => id,
                    None => {
                        let id = next_id[p];
                        next_id[p] += 1;
                        id
                    }
                };
            }
        }
        for p in 1..=nkeys {
            if level_of[p] > 0 {
                counts[level_of[p]] = next_id[p] as usize;
            }
        }
        counts[last] = roots.len();
        Grouping {
            level_names,
            ids,
            counts,
            root_names,
        }
    }
}

/// Why a gang did not fit.
#[derive(Clone, Debug, PartialEq)]
pub struct NoRoom(pub String);

impl Capacity {
    pub fn new(inv: &Inventory) -> Capacity {
        // Collect, sort and bulk-build the ordered sets (much faster than inserting one by one).
        let mut domains: Vec<Vec<(u32, u32, u32)>> = vec![Vec::new(); inv.types.len()];
        let mut nodes: Vec<Vec<(u32, u32)>> = vec![Vec::new(); inv.types.len()];
        let mut free = Vec::with_capacity(inv.nodes.len());
        let mut node_free = Vec::with_capacity(inv.nodes.len());
        let mut node_type = Vec::with_capacity(inv.nodes.len());
        for (i, n) in inv.nodes.iter().enumerate() {
            for (d, &f) in n.free.iter().enumerate() {
                if f > 0 {
                    domains[n.gpu_type].push((f, i as u32, d as u32));
                }
            }
            let total = n.free_total();
            if total > 0 {
                nodes[n.gpu_type].push((total, i as u32));
            }
            free.push(n.free.clone());
            node_free.push(total);
            node_type.push(n.gpu_type);
        }
        let by_type = domains
            .into_iter()
            .zip(nodes)
            .map(|(mut d, mut n)| {
                d.sort_unstable();
                n.sort_unstable();
                TypeIndex {
                    domains: d.into_iter().collect(),
                    nodes: n.into_iter().collect(),
                }
            })
            .collect();
        Capacity {
            free,
            node_free,
            node_type,
            by_type,
        }
    }

    fn set(&mut self, node: u32, domain: u32, new_free: u32) {
        let (n, d) = (node as usize, domain as usize);
        let idx = &mut self.by_type[self.node_type[n]];
        let old = self.free[n][d];
        if old > 0 {
            idx.domains.remove(&(old, node, domain));
        }
        if new_free > 0 {
            idx.domains.insert((new_free, node, domain));
        }
        let old_total = self.node_free[n];
        let new_total = old_total - old + new_free;
        if old_total > 0 {
            idx.nodes.remove(&(old_total, node));
        }
        if new_total > 0 {
            idx.nodes.insert((new_total, node));
        }
        self.free[n][d] = new_free;
        self.node_free[n] = new_total;
    }

    /// Take GPUs (the caller checked they are free).
    pub fn take(&mut self, a: &Alloc) {
        let f = self.free[a.node as usize][a.domain as usize];
        debug_assert!(f >= a.gpus);
        self.set(a.node, a.domain, f - a.gpus);
    }

    /// Give GPUs back (undo of [`Capacity::take`]).
    pub fn give(&mut self, a: &Alloc) {
        let f = self.free[a.node as usize][a.domain as usize];
        self.set(a.node, a.domain, f + a.gpus);
    }

    /// The largest free NVLink domain of a type on eligible nodes.
    pub fn largest_free_domain(&self, t: usize, ok: &[bool]) -> Option<(u32, u32)> {
        self.by_type[t]
            .domains
            .iter()
            .rev()
            .find(|(_, n, _)| ok[*n as usize])
            .map(|&(f, n, _)| (f, n))
    }

    /// The node of a type with most free GPUs among eligible nodes.
    pub fn largest_free_node(&self, t: usize, ok: &[bool]) -> Option<(u32, u32)> {
        self.by_type[t]
            .nodes
            .iter()
            .rev()
            .find(|(_, n)| ok[*n as usize])
            .copied()
    }

    /// Free GPUs of a type on eligible nodes.
    pub fn free_of_type(&self, t: usize, ok: &[bool]) -> u32 {
        self.by_type[t]
            .nodes
            .iter()
            .filter(|(_, n)| ok[*n as usize])
            .map(|(f, _)| *f)
            .sum()
    }

    /// `tp` GPUs on one node, taken from the domains with most free GPUs first (fewest domain
    /// crossings).
    fn node_group(
        &self,
        node: u32,
        tp: u32,
        stage: u32,
        out: &mut Vec<Alloc>,
        used: &mut HashMap<(u32, u32), u32>,
    ) {
        let mut doms: Vec<(u32, u32)> = self.free[node as usize]
            .iter()
            .enumerate()
            .map(|(d, &f)| {
                (
                    f - used.get(&(node, d as u32)).copied().unwrap_or(0),
                    d as u32,
                )
            })
            .filter(|(f, _)| *f > 0)
            .collect();
        doms.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut need = tp;
        for (f, d) in doms {
            if need == 0 {
                break;
            }
            let k = f.min(need);
            out.push(Alloc {
                stage,
                node,
                domain: d,
                gpus: k,
            });
            *used.entry((node, d)).or_insert(0) += k;
            need -= k;
        }
    }

    /// Find room for a gang of `pp` stages of `tp` GPUs of type `t` in `mode`; does not take it.
    #[allow(clippy::too_many_arguments)]
    pub fn find(
        &self,
        t: usize,
        tp: u32,
        pp: u32,
        mode: Mode,
        ok: &[bool],
        g: &LazyGrouping,
        short: &str,
        inv: &Inventory,
    ) -> Result<Vec<Alloc>, NoRoom> {
        let idx = &self.by_type[t];
        if pp == 1 {
            match mode {
                Mode::Domain => {
                    if let Some(&(_, n, d)) = idx
                        .domains
                        .range((tp, 0, 0)..)
                        .find(|(_, n, _)| ok[*n as usize])
                    {
                        return Ok(vec![Alloc {
                            stage: 0,
                            node: n,
                            domain: d,
                            gpus: tp,
                        }]);
                    }
                    return Err(NoRoom(match self.largest_free_domain(t, ok) {
                        Some((f, n)) => format!(
                            "needs {tp} GPUs in one NVLink domain of {short}; largest free is {f} (node {})",
                            inv.nodes[n as usize].name
                        ),
                        None => {
                            format!("needs {tp} GPUs in one NVLink domain of {short}; none is free")
                        }
                    }));
                }
                Mode::Node => {
                    if let Some(&(_, n)) = idx.nodes.range((tp, 0)..).find(|(_, n)| ok[*n as usize])
                    {
                        let mut out = Vec::new();
                        self.node_group(n, tp, 0, &mut out, &mut HashMap::new());
                        return Ok(out);
                    }
                    return Err(NoRoom(match self.largest_free_node(t, ok) {
                        Some((f, n)) => format!(
                            "needs {tp} GPUs on one node of {short}; most free is {f} (node {})",
                            inv.nodes[n as usize].name
                        ),
                        None => format!("needs {tp} GPUs on one node of {short}; none is free"),
                    }));
                }
                Mode::Spread => {}
            }
        }
        self.find_grouped(t, tp, pp, mode, ok, g.get(inv), short)
    }

    #[allow(clippy::too_many_arguments)]
    fn find_grouped(
        &self,
        t: usize,
        tp: u32,
        pp: u32,
        mode: Mode,
        ok: &[bool],
        g: &Grouping,
        short: &str,
    ) -> Result<Vec<Alloc>, NoRoom> {
        let idx = &self.by_type[t];
        let levels = g.ids.len();
        // Capacity unit: TP groups (Domain, Node) or GPUs (Spread).
        let need = if mode == Mode::Spread { tp * pp } else { pp };
        let mut acc: Vec<Vec<u32>> = g.counts.iter().map(|&c| vec![0u32; c]).collect();
        let mut touched: Vec<Vec<u32>> = vec![Vec::new(); levels];
        let mut add = |node: u32, cap: u32| {
            if cap == 0 || !ok[node as usize] || g.ids[0][node as usize] == EXCLUDED {
                return;
            }
            for lvl in 0..levels {
                let gid = g.ids[lvl][node as usize];
                let a = &mut acc[lvl][gid as usize];
                if *a == 0 {
                    touched[lvl].push(gid);
                }
                *a += cap;
            }
        };
        match mode {
            Mode::Domain => {
                for &(f, n, _) in idx.domains.range((tp, 0, 0)..) {
                    add(n, f / tp);
                }
            }
            Mode::Node => {
                for &(f, n) in idx.nodes.range((tp, 0)..) {
                    add(n, f / tp);
                }
            }
            Mode::Spread => {
                for &(f, n) in &idx.nodes {
                    add(n, f);
                }
            }
        }
        let mut chosen = None;
        for lvl in 0..levels {
            let best = touched[lvl]
                .iter()
                .map(|&gid| (acc[lvl][gid as usize], gid))
                .filter(|&(a, _)| a >= need)
                .min();
            if let Some((_, gid)) = best {
                chosen = Some((lvl, gid));
                break;
            }
        }
        let Some((lvl, gid)) = chosen else {
            let last = levels - 1;
            let most = touched[last]
                .iter()
                .map(|&gid| (acc[last][gid as usize], std::cmp::Reverse(gid)))
                .max();
            let scope = &g.level_names[last];
            let within = if scope == "cluster" {
                "in the cluster".to_owned()
            } else {
                format!("within one {scope}")
            };
            let unit = match mode {
                Mode::Domain => "one NVLink domain each",
                Mode::Node => "one node each",
                Mode::Spread => "any GPUs",
            };
            return Err(NoRoom(match (mode, most) {
                (Mode::Spread, Some((a, std::cmp::Reverse(gid)))) => format!(
                    "needs {} GPUs of {short} {within}; the most free is {a} ({})",
                    tp * pp,
                    g.root_names[gid as usize]
                ),
                (_, Some((a, std::cmp::Reverse(gid)))) => format!(
                    "needs {pp} stages of {tp} GPUs ({unit}) of {short} {within}; the most free is {a} stage{} ({})",
                    if a == 1 { "" } else { "s" },
                    g.root_names[gid as usize]
                ),
                (_, None) => format!(
                    "needs {pp} stage{} of {tp} GPUs ({unit}) of {short} {within}; none is free",
                    if pp == 1 { "" } else { "s" }
                ),
            }));
        };
        let in_group = |n: u32| ok[n as usize] && g.ids[lvl][n as usize] == gid;
        let mut out = Vec::new();
        let mut stage = 0;
        match mode {
            Mode::Domain => {
                for &(f, n, d) in idx.domains.range((tp, 0, 0)..) {
                    if stage == pp {
                        break;
                    }
                    if !in_group(n) {
                        continue;
                    }
                    let k = (f / tp).min(pp - stage);
                    for _ in 0..k {
                        out.push(Alloc {
                            stage,
                            node: n,
                            domain: d,
                            gpus: tp,
                        });
                        stage += 1;
                    }
                }
            }
            Mode::Node => {
                let mut used = HashMap::new();
                for &(f, n) in idx.nodes.range((tp, 0)..) {
                    if stage == pp {
                        break;
                    }
                    if !in_group(n) {
                        continue;
                    }
                    let k = (f / tp).min(pp - stage);
                    for _ in 0..k {
                        self.node_group(n, tp, stage, &mut out, &mut used);
                        stage += 1;
                    }
                }
            }
            Mode::Spread => {
                // Fill stage by stage from the nodes with most free GPUs (fewest nodes per stage).
                let mut nodes: Vec<(u32, u32)> = idx
                    .nodes
                    .iter()
                    .filter(|(_, n)| in_group(*n))
                    .copied()
                    .collect();
                nodes.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                let mut left = tp;
                let mut used = HashMap::new();
                'outer: for (_, n) in nodes {
                    loop {
                        let have: u32 = self.node_free[n as usize]
                            - used
                                .iter()
                                .filter(|((un, _), _)| *un == n)
                                .map(|(_, v)| *v)
                                .sum::<u32>();
                        if have == 0 {
                            break;
                        }
                        let k = have.min(left);
                        self.node_group(n, k, stage, &mut out, &mut used);
                        left -= k;
                        if left == 0 {
                            stage += 1;
                            left = tp;
                            if stage == pp {
                                break 'outer;
                            }
                        }
                    }
                }
            }
        }
        debug_assert_eq!(stage, pp);
        Ok(out)
    }
}
