//! The middle of the reconcile pipeline, pure: from what was observed (the ModelDeployment, its
//! pods, the cluster's nodes and GPU use, the time) to what to do (pods and Services to apply,
//! pods to delete, the new status, Events, when to look again).
//!
//! The controller, the in-memory API tests and the cluster simulation all drive this same
//! function; only the executor differs.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::{
    self, ModelDeployment, ModelDeploymentStatus, Phase, ReplicaPlacement, ReplicaState,
};
use crate::build::{self, BuildOptions, ReplicaToBuild, labels};
use crate::planner::catalog::Catalog;
use crate::planner::inventory::{DEFAULT_TOPOLOGY_KEYS, Inventory};
use crate::planner::{self, ExistingPlacement, PlanOptions};

/// Annotation on children: hash of what they were built from.
pub const TEMPLATE_HASH: &str = "tessera.dev/template-hash";
/// Condition the executor sets when the API refuses to create a pod (quota, admission).
pub const REPLICA_FAILURE: &str = "ReplicaFailure";
/// Longest wait between group recreations.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// Operator-wide settings of the reconcile.
#[derive(Clone, Debug)]
pub struct Config {
    pub topology_keys: Vec<String>,
    pub catalog: Catalog,
    pub plan: PlanOptions,
    pub build: BuildOptions,
    /// A node NotReady for longer than this is treated as lost and its replicas re-placed.
    pub node_lost_grace: Duration,
    /// How often to look at a replica that is starting.
    pub starting_requeue: Duration,
    /// A replica whose member stays unschedulable this long releases its GPUs and is placed
    /// again (a half-placed gang never holds GPUs forever).
    pub gang_timeout: Duration,
    /// A replica whose group has been ready this long forgets its past recreations (its
    /// `restarts` go back to 0, so an old crash does not count towards `maxRestarts` forever).
    pub failure_decay: Duration,
    /// How long a node stays in `avoidNodes`.
    pub avoid_ttl: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            topology_keys: DEFAULT_TOPOLOGY_KEYS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            catalog: Catalog::default(),
            plan: PlanOptions::default(),
            build: BuildOptions::default(),
            node_lost_grace: Duration::from_secs(300),
            starting_requeue: Duration::from_secs(30),
            gang_timeout: Duration::from_secs(300),
            failure_decay: Duration::from_secs(600),
            avoid_ttl: Duration::from_secs(3600),
        }
    }
}

/// What the controller saw. Nodes are `Node`s or, from the controller's watch cache, shared
/// `Arc<Node>`s (never copied per reconcile).
#[derive(Debug)]
pub struct Observed<'a, N = Node> {
    pub md: &'a ModelDeployment,
    /// Pods labelled with this deployment, in its namespace.
    pub pods: &'a [Pod],
    /// Services owned by this deployment.
    pub services: &'a [Service],
    /// Deployments owned by this deployment: the router in front of its prefill/decode pools.
    pub routers: &'a [Deployment],
    pub nodes: &'a [N],
    /// Every other pod in the cluster (their GPUs are not free), shared with the watch cache.
    pub other_pods: &'a [Arc<Pod>],
    /// GPUs other deployments hold without pods (replicas waiting out a backoff keep their
    /// place): (node, GPUs). See [`reserved_by_others`].
    pub reserved: &'a [(String, u32)],
    pub now: Timestamp,
}

impl<N> Clone for Observed<'_, N> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<N> Copy for Observed<'_, N> {}

/// GPUs that other deployments' replicas hold without pods to show for them, so they are not
/// promised twice: a replica waiting out a backoff keeps its place, and a replica whose
/// placement is written in status (intent is recorded before pods are created) holds the GPUs
/// of every member pod that `pods` does not show yet.
pub fn reserved_by_others<'d, 'p>(
    deployments: impl IntoIterator<Item = &'d ModelDeployment>,
    except_uid: Option<&str>,
    pods: impl IntoIterator<Item = &'p Pod>,
) -> Vec<(String, u32)> {
    // GPUs the pods of each (deployment, replica, incarnation) hold per node.
    let mut seen: BTreeMap<(&str, &str, &str, &str), u32> = BTreeMap::new();
    for p in pods {
        let (Some(d), Some(r), Some(i)) = (
            label(p, labels::DEPLOYMENT),
            label(p, labels::REPLICA),
            label(p, labels::INCARNATION),
        ) else {
            continue;
        };
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .or_else(|| pinned_node(p))
            .unwrap_or_default();
        *seen.entry((d, r, i, node)).or_default() += crate::planner::inventory::pod_gpus(p);
    }
    let mut out = Vec::new();
    for d in deployments
        .into_iter()
        .filter(|d| except_uid.is_none() || d.metadata.uid.as_deref() != except_uid)
    {
        let name = d.metadata.name.as_deref().unwrap_or_default();
        for p in d.status.iter().flat_map(|st| st.placements.iter()) {
            let replica = p.replica.to_string();
            let inc = p.incarnation.as_deref().unwrap_or_default();
            for s in &p.stages {
                let want = u32::try_from(s.gpus).unwrap_or(0);
                let have = if p.state == ReplicaState::Backoff {
                    0
                } else {
                    seen.get(&(name, replica.as_str(), inc, s.node.as_str()))
                        .copied()
                        .unwrap_or(0)
                };
                if want > have {
                    out.push((s.node.clone(), want - have));
                }
            }
        }
    }
    out
}

/// The node a pod is pinned to by required node affinity (`matchFields` on `metadata.name`, or
/// the `kubernetes.io/hostname` label that older operators used).
pub fn pinned_node(p: &Pod) -> Option<&str> {
    let term = p
        .spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .first()?;
    let by_field = term
        .match_fields
        .iter()
        .flatten()
        .find(|r| r.key == "metadata.name" && r.operator == "In");
    let by_label = term
        .match_expressions
        .iter()
        .flatten()
        .find(|r| r.key == "kubernetes.io/hostname" && r.operator == "In");
    by_field
        .or(by_label)
        .and_then(|r| r.values.as_ref())
        .filter(|v| v.len() == 1)
        .map(|v| v[0].as_str())
}

/// Severity of an Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// An Event to publish on the ModelDeployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventNote {
    pub type_: EventType,
    pub reason: &'static str,
    pub note: String,
}

/// What to do.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Actions {
    pub apply_services: Vec<Service>,
    /// Every NetworkPolicy this deployment should have (one per replica group, with
    /// `--worker-network-policies`); the executor applies those that differ and deletes the rest.
    pub network_policies: Vec<NetworkPolicy>,
    pub apply_pods: Vec<Pod>,
    /// Pod names to delete (in the deployment's namespace).
    pub delete_pods: Vec<String>,
    /// The router in front of the prefill/decode pools, when it differs from the one running
    /// (applied before the pods it routes to).
    pub apply_router: Option<Deployment>,
    /// Router Deployments to delete: the deployment serves aggregated again.
    pub delete_routers: Vec<String>,
    /// The new status, when it differs from the current one.
    pub status: Option<ModelDeploymentStatus>,
    pub events: Vec<EventNote>,
    /// Look again after this long even without a watch event.
    pub requeue_after: Option<Duration>,
}

impl Actions {
    /// Whether these actions write pods or status (the decisions a stale cache could get
    /// wrong; NetworkPolicies follow the replicas in status and are diffed by the executor).
    pub fn acts(&self) -> bool {
        self.writes() > 0
    }

    /// Number of API writes these actions need (status and Events included).
    pub fn writes(&self) -> usize {
        self.apply_services.len()
            + self.apply_pods.len()
            + self.delete_pods.len()
            + usize::from(self.apply_router.is_some())
            + self.delete_routers.len()
            + usize::from(self.status.is_some())
    }
}

/// The value of a pod's label.
pub(crate) fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

fn pod_name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// Why a member pod was taken away by the cluster rather than failing on its own, if it was:
/// evicted (drain, node pressure), preempted, or deleted by the taint manager. Such a
/// disruption re-places the replica without counting towards `maxRestarts`.
fn pod_disruption(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
    {
        return Some(format!(
            "pod {} was disrupted ({})",
            pod_name(pod),
            c.reason.as_deref().unwrap_or("DisruptionTarget")
        ));
    }
    match status.reason.as_deref() {
        Some(r @ ("Evicted" | "Preempting" | "Shutdown" | "NodeShutdown" | "Terminated"))
            if status.phase.as_deref() == Some("Failed") =>
        {
            Some(format!("pod {} was disrupted ({r})", pod_name(pod)))
        }
        _ => None,
    }
}

/// Why a member pod counts as failed, if it does. A failed container's own account (its exit
/// code and the termination message the worker writes) is preferred to the pod's phase, which
/// the kubelet sets to Failed soon after.
fn pod_failure(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let containers = container_failure(pod, status);
    if status.phase.as_deref() == Some("Failed") {
        let reason = status.reason.clone().unwrap_or_else(|| "Failed".into());
        return containers.or_else(|| Some(format!("pod {} failed ({reason})", pod_name(pod))));
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Some(format!("pod {} is being deleted", pod_name(pod)));
    }
    containers
}

/// The first container of `pod` that restarted or stopped: the model fetch (an init container,
/// which counts only when it failed: a completed one exited 0) before the engine.
fn container_failure(pod: &Pod, status: &k8s_openapi::api::core::v1::PodStatus) -> Option<String> {
    let init = status.init_container_statuses.iter().flatten();
    let init_failed = init.filter(|cs| {
        cs.restart_count > 0
            || cs
                .state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .is_some_and(|t| t.exit_code != 0)
    });
    for cs in init_failed.chain(status.container_statuses.iter().flatten()) {
        if cs.restart_count > 0 {
            return Some(format!(
                "container {} of pod {} restarted {} times",
                cs.name,
                pod_name(pod),
                cs.restart_count
            ));
        }
        if let Some(t) = cs.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            // The worker writes why it stopped (an unreachable model, a checksum mismatch, a
            // lost rank) to its termination message; it ends up in the Degraded condition.
            let message = t
                .message
                .as_deref()
                .map(|m| format!(": {}", m.lines().next().unwrap_or_default().trim()))
                .unwrap_or_default();
            return Some(format!(
                "container {} of pod {} exited with code {}{}{message}",
                cs.name,
                pod_name(pod),
                t.exit_code,
                t.reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ));
        }
    }
    None
}

/// How long a pod has been unschedulable (zero when it is not).
fn unschedulable_for(pod: &Pod, now: Timestamp) -> Duration {
    let cond = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| {
            cs.iter().find(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
        });
    let Some(c) = cond else {
        return Duration::ZERO;
    };
    let since = c
        .last_transition_time
        .as_ref()
        .or(pod.metadata.creation_timestamp.as_ref())
        .map(|t| t.0)
        .unwrap_or(now);
    Duration::from_secs(now.duration_since(since).as_secs().max(0) as u64)
}

/// Since when a pod has been Ready.
fn ready_since(pod: &Pod) -> Option<Time> {
    pod.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready" && c.status == "True")?
        .last_transition_time
        .clone()
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Why a node can no longer hold a replica, if it cannot.
fn node_lost(
    nodes: &BTreeMap<&str, &Node>,
    name: &str,
    now: Timestamp,
    grace: Duration,
) -> Option<String> {
    let Some(node) = nodes.get(name) else {
        return Some(format!("node {name} is gone"));
    };
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        return Some(format!("node {name} is cordoned"));
    }
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    if let Some(c) = ready
        && c.status != "True"
    {
        let since = c.last_transition_time.as_ref().map(|t| t.0).unwrap_or(now);
        let down = now.duration_since(since);
        if down >= SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX) {
            return Some(format!(
                "node {name} has been NotReady for {}s (grace {}s)",
                down.as_secs(),
                grace.as_secs()
            ));
        }
    }
    None
}

/// Hash of the parts of the spec that shape a replica's pods (not replicas, priority or
/// autoscaling, which never restart a group).
pub fn template_hash(md: &ModelDeployment, default_image: &str) -> String {
    let s = &md.spec;
    // The request shape, latency targets and disaggregation steer the planner (a new layout
    // rolls through the placements), not the pods of a placed replica; the router's image
    // shapes the router only.
    let serving = crate::api::ServingSpec {
        workload: None,
        slo: None,
        disaggregation: crate::api::Disaggregation::Off,
        ..s.serving.clone()
    };
    let engine = crate::api::EngineSpec {
        router_image: None,
        ..s.engine.clone()
    };
    let mut relevant = serde_json::json!({
        "model": s.model,
        "parallelism": s.parallelism,
        "gpu": s.gpu,
        "placement": s.placement,
        "serving": serving,
        "worker": s.worker,
        "failurePolicy": s.failure_policy.recreate_group,
        "defaultImage": default_image,
    });
    // Only a non-default engine enters the hash, so that upgrading to an operator that knows
    // `spec.engine` does not roll running Tessera replicas.
    if engine != crate::api::EngineSpec::default() {
        relevant["engine"] = serde_json::json!(engine);
    }
    build::short_hash(relevant.to_string().as_bytes())
}

fn backoff(spec_backoff: i32, restarts: i32) -> Duration {
    let base = Duration::from_secs(u64::try_from(spec_backoff.max(1)).unwrap_or(1));
    let factor = 1u32 << restarts.clamp(1, 16).saturating_sub(1);
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

fn time_after(t: &Time, d: Duration) -> Timestamp {
    t.0.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

/// Set the `ReplicaFailure` condition (a pod could not be created) on `status`.
pub fn set_replica_failure(status: &mut ModelDeploymentStatus, message: &str, now: Timestamp) {
    let previous = status
        .conditions
        .iter()
        .find(|c| c.type_ == REPLICA_FAILURE)
        .cloned();
    status.conditions.retain(|c| c.type_ != REPLICA_FAILURE);
    status.conditions.push(Condition {
        type_: REPLICA_FAILURE.to_owned(),
        status: "True".to_owned(),
        reason: "FailedCreate".to_owned(),
        message: bounded(message, MAX_MESSAGE),
        observed_generation: previous.as_ref().and_then(|c| c.observed_generation),
        last_transition_time: previous
            .filter(|c| c.status == "True")
            .map_or(Time(now), |c| c.last_transition_time),
    });
}

/// Builds the condition list, keeping each condition's transition time while its status holds.
struct Conditions<'a> {
    list: Vec<Condition>,
    old: &'a [Condition],
    generation: Option<i64>,
    now: Timestamp,
}

impl Conditions<'_> {
    fn set(&mut self, type_: &str, status: bool, reason: &str, message: String) {
        let status = if status { "True" } else { "False" }.to_owned();
        let previous = self.old.iter().find(|c| c.type_ == type_);
        let last_transition_time = match previous {
            Some(p) if p.status == status => p.last_transition_time.clone(),
            _ => Time(self.now),
        };
        self.list.push(Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message,
            observed_generation: self.generation,
            last_transition_time,
        });
    }
}

/// Stand-in pods that hold `reserved` GPUs on their nodes, for the planner's inventory.
pub fn reservation_pods(reserved: &[(String, u32)]) -> Vec<Pod> {
    reserved
        .iter()
        .map(|(node, gpus)| {
            serde_json::from_value::<Pod>(serde_json::json!({
                "metadata": {"name": format!("reserved-{node}")},
                "spec": {"nodeName": node, "containers": [{"name": "r", "resources": {"limits": {build::GPU_RESOURCE: gpus.to_string()}}}]}
            }))
            .expect("a reservation is a valid pod")
        })
        .collect()
}

/// The id of a deployment's incarnation number `seq`: derived from its uid and the number, so
/// that every reconcile that decides the same group names the same pods, and a deployment
/// deleted and created again under the same name never reuses the names of pods still
/// terminating.
pub fn incarnation_for(uid: &str, seq: i64) -> String {
    build::incarnation_id(build::fnv1a(format!("{uid}/{seq}").as_bytes()))
}

/// Longest condition message and `lastFailure` (bytes); the CRD allows 4096, and a status
/// must stay readable in `kubectl describe`.
pub const MAX_MESSAGE: usize = 1000;
/// Most entries of `avoidNodes` (the oldest expire first).
pub const MAX_AVOID_NODES: usize = 32;

/// `s` cut at a character boundary to at most `max` bytes, marked with an ellipsis when cut.
pub fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Replica indices as ranges: `0-4, 7, 9-10`.
fn ranges(replicas: &[i32]) -> String {
    let mut sorted = replicas.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(", ")
}

/// Reasons grouped with the replicas they apply to, largest group first, bounded:
/// `replicas 3-499 (497): no node has 8 free H100 GPUs; replica 1: ...`.
fn summarise(items: &[(i32, String)], max: usize) -> String {
    let mut groups: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (r, why) in items {
        groups.entry(why.as_str()).or_default().push(*r);
    }
    let mut groups: Vec<(&str, Vec<i32>)> = groups.into_iter().collect();
    groups.sort_by_key(|(_, rs)| std::cmp::Reverse(rs.len()));
    let parts: Vec<String> = groups
        .iter()
        .map(|(why, rs)| match rs.as_slice() {
            [one] => format!("replica {one}: {why}"),
            _ => format!("replicas {} ({}): {why}", ranges(rs), rs.len()),
        })
        .collect();
    bounded(&parts.join("; "), max)
}

/// Decide what to do.
pub fn reconcile<N: Borrow<Node>>(obs: &Observed<'_, N>, cfg: &Config) -> Actions {
    let md = obs.md;
    // A deployment being deleted (foreground deletion keeps it while its pods go) is left
    // alone: recreating its groups would fight the garbage collector.
    if md.metadata.deletion_timestamp.is_some() {
        return Actions::default();
    }
    let spec = &md.spec;
    let name = md.metadata.name.clone().unwrap_or_default();
    let uid = md.metadata.uid.clone().unwrap_or_default();
    let generation = md.metadata.generation;
    let old = md.status.clone().unwrap_or_default();
    let now = obs.now;
    let mut actions = Actions::default();
    let mut status = ModelDeploymentStatus {
        observed_generation: generation,
        selector: Some(build::leader_selector(&name)),
        avoid_nodes: old.avoid_nodes.clone(),
        avoid_nodes_since: old.avoid_nodes_since.clone(),
        incarnations: old.incarnations,
        template_hash: old.template_hash.clone(),
        ..ModelDeploymentStatus::default()
    };
    // Incarnations are numbered; the number is written to status before any pod of the new
    // group is created (the executor writes status first, with a resourceVersion
    // precondition), so a reconcile from a stale cache proposes the same names or is refused.
    let seq = std::cell::Cell::new(old.incarnations);
    let new_incarnation = |_replica: i32| {
        let id = incarnation_for(&uid, seq.get());
        seq.set(seq.get() + 1);
        id
    };

    // Validate: an invalid spec waits for a change (no requeue), and loses nothing: the pods
    // that run keep running.
    if let Err(e) = api::validate(md) {
        let mut conditions = Conditions {
            list: Vec::new(),
            old: &old.conditions,
            generation,
            now,
        };
        conditions.set("Ready", false, "InvalidSpec", e.to_string());
        status.phase = Some(Phase::Failed);
        status.conditions = conditions.list;
        status.placements = old.placements.clone();
        status.replicas = old.replicas;
        status.ready_replicas = old.ready_replicas;
        if status != old {
            actions.events.push(EventNote {
                type_: EventType::Warning,
                reason: "InvalidSpec",
                note: e.to_string(),
            });
            actions.status = Some(status);
        }
        return actions;
    }

    let hash = template_hash(md, cfg.build.default_image(md.spec.engine.name));
    // Avoided nodes: cleared when the pod template changes (a new image or setting may well
    // run there), and each expires after `avoid_ttl`.
    if old.template_hash.as_deref().is_some_and(|h| h != hash) && !old.avoid_nodes.is_empty() {
        actions.events.push(EventNote {
            type_: EventType::Normal,
            reason: "AvoidNodesCleared",
            note: format!(
                "the pod template changed; no longer avoiding {}",
                old.avoid_nodes.join(", ")
            ),
        });
        status.avoid_nodes.clear();
    }
    status.template_hash = Some(hash.clone());
    status
        .avoid_nodes_since
        .retain(|n, _| status.avoid_nodes.contains(n));
    for n in &status.avoid_nodes {
        // Entries written by an older operator carry no time: their clock starts now.
        status
            .avoid_nodes_since
            .entry(n.clone())
            .or_insert_with(|| Time(now));
    }
    let expired: Vec<String> = status
        .avoid_nodes_since
        .iter()
        .filter(|(_, t)| time_after(t, cfg.avoid_ttl) <= now)
        .map(|(n, _)| n.clone())
        .collect();
    if !expired.is_empty() {
        actions.events.push(EventNote {
            type_: EventType::Normal,
            reason: "AvoidNodesExpired",
            note: format!(
                "no longer avoiding {} (avoided for {}s)",
                expired.join(", "),
                cfg.avoid_ttl.as_secs()
            ),
        });
        status.avoid_nodes.retain(|n| !expired.contains(n));
        status.avoid_nodes_since.retain(|n, _| !expired.contains(n));
    }
    let nodes: BTreeMap<&str, &Node> = obs
        .nodes
        .iter()
        .map(Borrow::borrow)
        .filter_map(|n: &Node| n.metadata.name.as_deref().map(|k| (k, n)))
        .collect();
    let mut requeue: Option<Duration> = None;
    let mut requeue_in = |d: Duration| {
        requeue = Some(requeue.map_or(d, |r: Duration| r.min(d)));
    };

    // Pods by replica.
    let mut pods_by_replica: BTreeMap<i32, Vec<&Pod>> = BTreeMap::new();
    for p in obs.pods {
        if let Some(r) = label(p, labels::REPLICA).and_then(|r| r.parse().ok()) {
            pods_by_replica.entry(r).or_default().push(p);
        } else {
            actions.delete_pods.push(pod_name(p));
        }
    }

    // 1. Existing replicas: health, node loss, failures.
    let mut kept: Vec<ReplicaPlacement> = Vec::new();
    let mut replace: Vec<(i32, i32, String)> = Vec::new(); // (replica, restarts, why)
    let mut avoid: BTreeSet<String> = status.avoid_nodes.iter().cloned().collect();
    for p in &old.placements {
        let mut p = p.clone();
        let inc = p.incarnation.clone().unwrap_or_default();
        let members: Vec<&Pod> = pods_by_replica
            .get(&p.replica)
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|x| label(x, labels::INCARNATION) == Some(inc.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        let lost = p
            .stages
            .iter()
            .find_map(|s| node_lost(&nodes, &s.node, now, cfg.node_lost_grace));
        if let Some(why) = lost {
            actions.events.push(EventNote {
                type_: EventType::Warning,
                reason: "Replacing",
                note: format!("replica {}: {why}; placing it again", p.replica),
            });
            replace.push((p.replica, p.restarts, why));
            continue;
        }
        match p.state {
            ReplicaState::Backoff => {
                let wait = backoff(spec.failure_policy.backoff_seconds, p.restarts);
                let retry_at = p
                    .last_failure_time
                    .as_ref()
                    .map(|t| time_after(t, wait))
                    .unwrap_or(now);
                if now >= retry_at {
                    let next = new_incarnation(p.replica);
                    actions.events.push(EventNote {
                        type_: EventType::Normal,
                        reason: "Recreating",
                        note: format!(
                            "replica {}: recreating the whole group as incarnation {next} (restart {} of {})",
                            p.replica, p.restarts, spec.failure_policy.max_restarts
                        ),
                    });
                    p.incarnation = Some(next);
                    p.state = ReplicaState::Creating;
                    p.ready = false;
                    p.template_hash = Some(hash.clone());
                } else {
                    let left = retry_at.duration_since(now);
                    requeue_in(Duration::from_secs(left.as_secs().max(1) as u64));
                }
                kept.push(p);
            }
            ReplicaState::Creating | ReplicaState::Running => {
                // A gang that cannot be completed (a member stays unschedulable, e.g. another
                // pod took the GPUs in between) must not hold the GPUs of the members that did
                // start: after the gang timeout the whole replica is placed again.
                if let Some(stuck) = members
                    .iter()
                    .find(|m| unschedulable_for(m, now) >= cfg.gang_timeout)
                {
                    let why = format!(
                        "pod {} could not be scheduled for {}s (gang timeout)",
                        pod_name(stuck),
                        cfg.gang_timeout.as_secs()
                    );
                    actions.events.push(EventNote {
                        type_: EventType::Warning,
                        reason: "Replacing",
                        note: format!(
                            "replica {}: {why}; releasing its GPUs and placing it again",
                            p.replica
                        ),
                    });
                    replace.push((p.replica, p.restarts, why));
                    continue;
                }
                if let Some(why) = members.iter().find_map(|m| pod_disruption(m)) {
                    actions.events.push(EventNote {
                        type_: EventType::Normal,
                        reason: "Disrupted",
                        note: format!(
                            "replica {}: {why}; placing the whole group again (not counted as a failure)",
                            p.replica
                        ),
                    });
                    replace.push((p.replica, p.restarts, why));
                    continue;
                }
                let failure = members.iter().find_map(|m| pod_failure(m)).or_else(|| {
                    (p.state == ReplicaState::Running && members.len() < p.stages.len()).then(
                        || {
                            format!(
                                "{} of {} member pods disappeared",
                                p.stages.len() - members.len(),
                                p.stages.len()
                            )
                        },
                    )
                });
                if let Some(why) = failure.filter(|_| spec.failure_policy.recreate_group) {
                    p.restarts += 1;
                    p.last_failure_time = Some(Time(now));
                    p.last_failure = Some(bounded(&why, MAX_MESSAGE));
                    p.ready = false;
                    if p.restarts > spec.failure_policy.max_restarts {
                        // Degraded: this placement keeps failing; avoid its nodes and place the
                        // replica elsewhere.
                        let bad: Vec<String> = p.stages.iter().map(|s| s.node.clone()).collect();
                        avoid.extend(bad.iter().cloned());
                        actions.events.push(EventNote {
                            type_: EventType::Warning,
                            reason: "Degraded",
                            note: format!(
                                "replica {}: {why}; {} recreations exceed maxRestarts {}; avoiding {} and placing it elsewhere",
                                p.replica,
                                p.restarts,
                                spec.failure_policy.max_restarts,
                                bad.join(", ")
                            ),
                        });
                        replace.push((p.replica, 0, why));
                        continue;
                    }
                    let wait = backoff(spec.failure_policy.backoff_seconds, p.restarts);
                    actions.events.push(EventNote {
                        type_: EventType::Warning,
                        reason: "MemberFailed",
                        note: format!(
                            "replica {}: {why}; removing the group and recreating it in {}s",
                            p.replica,
                            wait.as_secs()
                        ),
                    });
                    p.state = ReplicaState::Backoff;
                    requeue_in(wait);
                    kept.push(p);
                    continue;
                }
                if members.len() == p.stages.len() {
                    p.state = ReplicaState::Running;
                    p.ready = members.iter().all(|m| pod_ready(m));
                    // Ready for a while: past recreations no longer count.
                    if p.ready
                        && p.restarts > 0
                        && members
                            .iter()
                            .filter_map(|m| ready_since(m))
                            .max()
                            .is_some_and(|t| time_after(&t, cfg.failure_decay) <= now)
                    {
                        actions.events.push(EventNote {
                            type_: EventType::Normal,
                            reason: "Recovered",
                            note: format!(
                                "replica {}: ready for {}s; its {} earlier recreations no longer count towards maxRestarts",
                                p.replica,
                                cfg.failure_decay.as_secs(),
                                p.restarts
                            ),
                        });
                        p.restarts = 0;
                        p.last_failure = None;
                        p.last_failure_time = None;
                    }
                } else {
                    requeue_in(cfg.starting_requeue);
                }
                if !p.ready {
                    requeue_in(cfg.starting_requeue);
                }
                kept.push(p);
            }
        }
    }

    // Prefill/decode pools run when the deployment asks for disaggregation and its engine
    // renders pools (SGLang; vLLM with a router image). Then the plan runs every pass: it
    // decides the pools and their sizes (`spec.poolReplicas`, else `spec.replicas` units of the
    // pair's ratio) and each pool's replica indices; a running replica stays while the pools
    // have its index in its role and layout, and every missing one is placed from this plan.
    // Otherwise pools are decided and reported, and every replica serves aggregated.
    let disaggregation_asked = spec.serving.disaggregation != api::Disaggregation::Off;
    let pools_blocked = if disaggregation_asked {
        build::pools_renderable(md, &cfg.build).err()
    } else {
        None
    };
    let mut plan_report: Option<planner::DeploymentPlan> = None;
    let mut pooled = false;
    let mut desired = usize::try_from(spec.replicas.max(0)).unwrap_or(0);
    // The pools' replica indices, when they run.
    let mut pool_indices: Vec<i32> = Vec::new();
    if disaggregation_asked && pools_blocked.is_none() {
        let dp = plan_deployment(obs, cfg, &avoid, &kept, None, false);
        if dp.disaggregation.as_ref().is_some_and(|d| d.disaggregated) {
            pooled = true;
            desired = usize::try_from(dp.replicas.max(0)).unwrap_or(0);
            // A replica stays while the pools still have its index, in its role and layout;
            // whether its node is healthy is decided above (with the grace periods), as for
            // every replica, not by whether this plan could reserve it again.
            let pools = dp.disaggregation.as_ref().expect("disaggregated");
            pool_indices = pools.indices(spec.replicas);
            let indices = &pool_indices;
            kept.retain(|p| {
                let pool = pools
                    .pool_of(spec.replicas, p.replica)
                    .filter(|_| indices.binary_search(&p.replica).is_ok());
                let stays = pool.is_some_and(|x| {
                        Some(&x.role) == p.role.as_ref()
                            && x.gpu_type == p.gpu_type
                            && x.tensor_parallel == p.tensor_parallel
                            && x.pipeline_parallel == p.pipeline_parallel
                            && x.expert_parallel == p.expert_parallel
                            && x.data_parallel_attention == p.data_parallel_attention
                    });
                if !stays {
                    let was = p.role.as_deref().unwrap_or("aggregated");
                    actions.events.push(EventNote {
                        type_: EventType::Normal,
                        reason: "Repooled",
                        note: match pool {
                            Some(x) => format!(
                                "replica {} ({was}) is placed again as a {} replica: the pools changed",
                                p.replica, x.role
                            ),
                            None => format!(
                                "replica {} ({was}) removed: the pools hold {}",
                                p.replica,
                                pools
                                    .pools
                                    .iter()
                                    .map(|x| format!("{} {} replicas", x.replicas, x.role))
                                    .collect::<Vec<_>>()
                                    .join(" and ")
                            ),
                        },
                    });
                }
                stays
            });
        }
        plan_report = Some(dp);
    }
    if !pooled {
        // Replicas of pools that no longer run are placed again, aggregated.
        kept.retain(|p| {
            if p.role.is_none() {
                return true;
            }
            let why = format!(
                "the {} pool no longer runs; serving whole requests",
                p.role.as_deref().unwrap_or_default()
            );
            actions.events.push(EventNote {
                type_: EventType::Normal,
                reason: "Repooled",
                note: format!("replica {}: {why}", p.replica),
            });
            replace.push((p.replica, 0, why));
            false
        });
    }

    // 2. Scale down: keep ready replicas first, then the lowest indices.
    if kept.len() > desired {
        kept.sort_by_key(|p| (!p.ready, p.replica));
        for p in kept.drain(desired..) {
            actions.events.push(EventNote {
                type_: EventType::Normal,
                reason: "ScaledDown",
                note: format!(
                    "replica {} removed (spec.replicas = {})",
                    p.replica, spec.replicas
                ),
            });
        }
        kept.sort_by_key(|p| p.replica);
    }
    replace.truncate(desired.saturating_sub(kept.len()));

    // 3. Rolling update of pod templates: one replica at a time, only when every other replica
    //    is ready, recreated in place (no surge, so no extra GPUs are needed).
    let all_ready = kept.iter().all(|p| p.ready) && kept.len() == desired;
    if all_ready
        && let Some(p) = kept
            .iter_mut()
            .find(|p| p.template_hash.as_deref() != Some(hash.as_str()))
    {
        let next = new_incarnation(p.replica);
        actions.events.push(EventNote {
            type_: EventType::Normal,
            reason: "Rolling",
            note: format!(
                "replica {}: the pod template changed; recreating it as incarnation {next}",
                p.replica
            ),
        });
        p.incarnation = Some(next);
        p.state = ReplicaState::Creating;
        p.ready = false;
        p.template_hash = Some(hash.clone());
    }

    // 4. Place what is missing: replicas being re-placed keep their index, new ones take the
    //    lowest free indices.
    //    With pools, the indices are the plan's (each index has its pool).
    let used: BTreeSet<i32> = kept.iter().map(|p| p.replica).collect();
    let mut wanted: Vec<(i32, i32, Option<String>)> = if pooled {
        pool_indices
            .iter()
            .copied()
            .filter(|r| !used.contains(r))
            .map(|r| match replace.iter().find(|x| x.0 == r) {
                Some((_, restarts, why)) => (r, *restarts, Some(why.clone())),
                None => (r, 0, None),
            })
            .collect()
    } else {
        replace
            .iter()
            .map(|(r, restarts, why)| (*r, *restarts, Some(why.clone())))
            .collect()
    };
    let mut next_index = 0;
    while kept.len() + wanted.len() < desired {
        while used.contains(&next_index) || wanted.iter().any(|w| w.0 == next_index) {
            next_index += 1;
        }
        wanted.push((next_index, 0, None));
        next_index += 1;
    }
    // The pools' plan above serves; aggregated replicas are planned here, with the replica
    // indices in use (a replica kept above `spec.replicas` after a scale-down). Pools are then
    // decided and reported, and replicas placed aggregated (pools not asked for, not chosen,
    // or not renderable: see the Disaggregated condition).
    if !pooled && (!wanted.is_empty() || old.alternatives.is_empty()) {
        let max_index = kept
            .iter()
            .map(|p| p.replica)
            .chain(wanted.iter().map(|w| w.0))
            .max()
            .map_or(0, |m| m + 1);
        plan_report = Some(plan_deployment(
            obs,
            cfg,
            &avoid,
            &kept,
            Some(max_index),
            true,
        ));
    }
    let mut verdict: Option<planner::DisaggregationPlan> = None;
    if let Some(dp) = &plan_report {
        verdict = dp.disaggregation.clone();
        place_wanted(
            dp,
            &wanted,
            &mut kept,
            &mut actions,
            &new_incarnation,
            &hash,
        );
        kept.sort_by_key(|p| p.replica);
    }

    // 5. Build the pods of every live replica; apply those missing, delete everything else.
    let live: Vec<&ReplicaPlacement> = kept
        .iter()
        .filter(|p| p.state != ReplicaState::Backoff)
        .collect();
    let incarnations: Vec<String> = live
        .iter()
        .map(|p| p.incarnation.clone().unwrap_or_default())
        .collect();
    let to_build: Vec<ReplicaToBuild<'_>> = live
        .iter()
        .zip(&incarnations)
        .map(|(p, inc)| ReplicaToBuild {
            placement: p,
            incarnation: inc,
        })
        .collect();
    let mut children = build::desired_children(md, &to_build, &cfg.build);
    // Pools: each replica's pods in its role, the pools' Services, and the router in front
    // (kept as it is while a pool has no replica placed yet: it needs one of each).
    let mut router_problem: Option<String> = None;
    if pooled {
        // Each pool runs at the batch the planner sized it for (the decode pool's meets the
        // inter-token target).
        let pools: &[api::PoolStatus] = verdict.as_ref().map_or(&[], |v| &v.pools[..]);
        let batch_of = |role: build::PoolRole| {
            pools
                .iter()
                .find(|p| p.role == role.as_str())
                .and_then(|p| p.batch)
        };
        let members: Vec<build::PoolReplicaToBuild<'_>> = to_build
            .iter()
            .filter_map(|r| {
                let role = build::PoolRole::parse(r.placement.role.as_deref()?)?;
                Some(build::PoolReplicaToBuild {
                    role,
                    replica: r.clone(),
                    max_concurrency: batch_of(role),
                })
            })
            .collect();
        (children, router_problem) = build::disaggregated_children(md, &members, &cfg.build);
    }
    if let Some(router) = children.router {
        actions.apply_router = changed(router, obs.routers, |d| &d.spec);
    } else if !pooled {
        actions.delete_routers = obs
            .routers
            .iter()
            .filter_map(|d| d.metadata.name.clone())
            .collect();
    }
    if let Some(np) = &cfg.build.network_policies {
        // Every replica group that exists, waiting out a backoff included (its pods come back).
        let replicas: BTreeMap<i32, Option<build::PoolRole>> = kept
            .iter()
            .map(|p| {
                (
                    p.replica,
                    p.role.as_deref().and_then(build::PoolRole::parse),
                )
            })
            .collect();
        actions.network_policies = replicas
            .into_iter()
            .map(|(r, role)| build::replica_network_policy(md, r, role, np))
            .collect();
    }
    let existing_pods: BTreeSet<String> = obs.pods.iter().map(pod_name).collect();
    let desired_pods: BTreeSet<String> = children
        .pods
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    for mut pod in children.pods {
        let pname = pod.metadata.name.clone().unwrap_or_default();
        if !existing_pods.contains(&pname) {
            pod.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(TEMPLATE_HASH.into(), hash.clone());
            actions.apply_pods.push(pod);
        }
    }
    for p in obs.pods {
        let pname = pod_name(p);
        if !desired_pods.contains(&pname) && !actions.delete_pods.contains(&pname) {
            actions.delete_pods.push(pname);
        }
    }
    for svc in children.services {
        actions
            .apply_services
            .extend(changed(svc, obs.services, |s| &s.spec));
    }

    // 6. Status.
    let placed = kept.len();
    let ready = kept.iter().filter(|p| p.ready).count();
    let running = |p: &&ReplicaPlacement| p.state != ReplicaState::Backoff;
    let is_ready = |p: &&ReplicaPlacement| p.ready;
    match verdict.as_ref().filter(|_| pooled) {
        // Pools: `spec.replicas` counts units, so the scale subresource's status does too (HPA
        // and KEDA compare the two): whole units with pods, whole units ready.
        Some(v) => {
            status.replicas = api::whole_units(
                &v.pools,
                spec.replicas,
                kept.iter().filter(running).map(|p| p.role.as_deref()),
            );
            status.ready_replicas = api::whole_units(
                &v.pools,
                spec.replicas,
                kept.iter().filter(is_ready).map(|p| p.role.as_deref()),
            );
        }
        None => {
            status.replicas =
                i32::try_from(kept.iter().filter(running).count()).unwrap_or(i32::MAX);
            status.ready_replicas = i32::try_from(ready).unwrap_or(i32::MAX);
        }
    }
    for n in &avoid {
        status
            .avoid_nodes_since
            .entry(n.clone())
            .or_insert_with(|| Time(now));
    }
    // Bounded: past the cap, the longest-avoided nodes go first.
    let mut by_age: Vec<(&String, &Time)> = status.avoid_nodes_since.iter().collect();
    by_age.sort_by_key(|(n, t)| (std::cmp::Reverse(t.0), (*n).clone()));
    let keep: BTreeSet<String> = by_age
        .into_iter()
        .take(MAX_AVOID_NODES)
        .map(|(n, _)| n.clone())
        .collect();
    status.avoid_nodes = avoid.into_iter().filter(|n| keep.contains(n)).collect();
    status.avoid_nodes_since.retain(|n, _| keep.contains(n));
    if let Some(first) = kept.first() {
        status.gpu_type = Some(first.gpu_type.clone());
        status.tensor_parallel = Some(first.tensor_parallel);
        status.pipeline_parallel = Some(first.pipeline_parallel);
        status.expert_parallel = first.expert_parallel;
    }
    let arch = &md.spec.model.architecture;
    status.active_parameters = arch.is_moe().then(|| arch.active_parameters());
    let unplaced: Vec<(i32, String)> = plan_report
        .as_ref()
        .map(|dp| {
            dp.unplaced
                .iter()
                .filter(|u| wanted.iter().any(|w| w.0 == u.replica))
                .map(|u| (u.replica, u.reason.clone()))
                .collect()
        })
        .unwrap_or_default();
    match &verdict {
        Some(v) => {
            status.pools = v.pools.clone();
            status.disaggregation = Some(bounded(&v.reason, MAX_MESSAGE));
        }
        None if plan_report.is_none()
            && spec.serving.disaggregation != api::Disaggregation::Off =>
        {
            status.pools = old.pools.clone();
            status.disaggregation = old.disaggregation.clone();
        }
        None => {}
    }
    status.alternatives = match &plan_report {
        Some(dp) => dp
            .choice
            .chosen
            .iter()
            .cloned()
            .chain(dp.choice.alternatives.iter().cloned())
            .collect(),
        None => old.alternatives.clone(),
    };
    let mut conditions = Conditions {
        list: Vec::new(),
        old: &old.conditions,
        generation,
        now,
    };
    let all_placed = placed >= desired;
    let placed_msg = if all_placed {
        format!(
            "{placed} of {desired} replicas placed{}",
            kept.first()
                .map(|p| format!(
                    " on {} (TP={}, PP={}{})",
                    p.gpu_type,
                    p.tensor_parallel,
                    p.pipeline_parallel,
                    expert_note(p.expert_parallel, p.data_parallel_attention)
                ))
                .unwrap_or_default()
        )
    } else {
        let why = if unplaced.is_empty() {
            plan_report
                .as_ref()
                .map(|dp| dp.choice.reason.clone())
                .unwrap_or_default()
        } else {
            summarise(&unplaced, MAX_MESSAGE)
        };
        bounded(
            &format!("{placed} of {desired} replicas placed; {why}"),
            MAX_MESSAGE,
        )
    };
    conditions.set(
        "Placed",
        all_placed,
        if all_placed {
            "AllReplicasPlaced"
        } else {
            "Unschedulable"
        },
        placed_msg.clone(),
    );
    let all_ready = ready >= desired && desired > 0 || desired == 0;
    conditions.set(
        "Ready",
        all_ready,
        if all_ready {
            "AllReplicasReady"
        } else {
            "ReplicasNotReady"
        },
        format!("{ready} of {desired} replicas ready"),
    );
    let progressing = kept
        .iter()
        .any(|p| p.state != ReplicaState::Running || !p.ready);
    conditions.set(
        "Progressing",
        progressing,
        if progressing {
            "ReplicasStarting"
        } else {
            "Stable"
        },
        {
            let starting = kept
                .iter()
                .filter(|p| p.state == ReplicaState::Creating)
                .count();
            let backing_off = kept
                .iter()
                .filter(|p| p.state == ReplicaState::Backoff)
                .count();
            format!("{starting} starting, {backing_off} waiting to be recreated")
        },
    );
    let failing: Vec<(i32, String)> = kept
        .iter()
        .filter(|p| p.restarts > 0 && !p.ready)
        .map(|p| {
            (
                p.replica,
                format!(
                    "restarted {} times ({})",
                    p.restarts,
                    p.last_failure.clone().unwrap_or_default()
                ),
            )
        })
        .collect();
    let degraded = !failing.is_empty() || !status.avoid_nodes.is_empty();
    conditions.set(
        "Degraded",
        degraded,
        if degraded {
            "ReplicasFailing"
        } else {
            "Healthy"
        },
        if degraded {
            let mut parts = Vec::new();
            if !status.avoid_nodes.is_empty() {
                parts.push(format!("avoiding nodes {}", status.avoid_nodes.join(", ")));
            }
            if !failing.is_empty() {
                parts.push(format!("{} replicas failing", failing.len()));
                parts.push(summarise(&failing, MAX_MESSAGE));
            }
            bounded(&parts.join("; "), MAX_MESSAGE)
        } else {
            "no replica is failing".into()
        },
    );
    if disaggregation_asked {
        let wanted_pools = !status.pools.is_empty();
        let pools_text = status
            .pools
            .iter()
            .map(|p| {
                format!(
                    "{} x{} on {} TP={}",
                    p.role, p.replicas, p.gpu_type, p.tensor_parallel
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        conditions.set(
            "Disaggregated",
            pooled,
            if pooled {
                "PoolsRunning"
            } else if wanted_pools {
                "PoolsNotRenderable"
            } else {
                "AggregatedPredictedBetter"
            },
            if pooled {
                bounded(
                    &format!(
                        "prefill/decode pools: {pools_text}; {}",
                        router_problem
                            .as_deref()
                            .map(|e| format!("router not updated: {e}"))
                            .unwrap_or_else(|| format!(
                                "the router {} serves the deployment's Service",
                                build::router_name(&name)
                            ))
                    ),
                    MAX_MESSAGE,
                )
            } else if wanted_pools {
                bounded(
                    &format!(
                        "the planner chose prefill/decode pools ({pools_text}), but they cannot run: {}; every replica serves whole requests",
                        pools_blocked.as_deref().unwrap_or("the pools could not be rendered")
                    ),
                    MAX_MESSAGE,
                )
            } else {
                status
                    .disaggregation
                    .clone()
                    .unwrap_or_else(|| "serving.workload is needed to decide".into())
            },
        );
    }
    // ScalingLimited belongs to the autoscaler; carry it over. ReplicaFailure (set by the
    // executor when creating a pod failed) holds while a starting group still misses pods.
    let mut conditions = conditions.list;
    let missing_pods = kept
        .iter()
        .filter(|p| p.state == ReplicaState::Creating)
        .any(|p| {
            let inc = p.incarnation.as_deref().unwrap_or_default();
            let have = pods_by_replica.get(&p.replica).map_or(0, |v| {
                v.iter()
                    .filter(|x| label(x, labels::INCARNATION) == Some(inc))
                    .count()
            });
            have < p.stages.len()
        });
    conditions.extend(
        old.conditions
            .iter()
            .filter(|c| c.type_ == "ScalingLimited" || (c.type_ == REPLICA_FAILURE && missing_pods))
            .cloned(),
    );
    status.conditions = conditions;
    status.phase = Some(if placed == 0 && desired > 0 {
        Phase::Unschedulable
    } else if all_ready && all_placed {
        Phase::Ready
    } else if ready > 0 && (degraded || !all_placed) {
        Phase::Degraded
    } else {
        Phase::Progressing
    });
    // What the fleet measured for each layout, next to the prediction (two decimals, so the
    // status changes only when the measurement does).
    let calibration = &cfg.plan.constants.calibration;
    if !calibration.is_empty() {
        for p in &mut kept {
            let Some(gpu) = cfg.catalog.lookup(&p.gpu_type) else {
                continue;
            };
            let key = crate::planner::calibration::LayoutKey {
                gpu_type: gpu.name.clone(),
                tensor_parallel: u32::try_from(p.tensor_parallel).unwrap_or(0),
                pipeline_parallel: u32::try_from(p.pipeline_parallel).unwrap_or(0),
                engine: spec.engine.name.as_str().to_owned(),
            };
            let (decode, prefill) = calibration.measured(&key);
            let two = |x: f64| (x * 100.0).round() / 100.0;
            p.predicted.measured_decode_ratio = decode.map(two);
            p.predicted.measured_prefill_ratio = prefill.map(two);
            p.predicted.measured_all_reduce_ratio = calibration.measured_allreduce(&key).map(two);
        }
    }
    status.placements = kept;
    status.incarnations = seq.get();
    if !all_placed {
        actions.events.push(EventNote {
            type_: EventType::Warning,
            reason: "Unschedulable",
            note: placed_msg,
        });
        requeue_in(Duration::from_secs(60));
    }
    if status != old {
        actions.status = Some(status);
    } else {
        // Nothing changed: repeat no Events either.
        actions.events.retain(|e| e.reason != "Unschedulable");
    }
    actions.requeue_after = requeue;
    actions
}

/// `desired`, stamped with the hash of its spec, when the observed object of its name carries
/// another hash (or is missing): what to apply.
fn changed<K, S>(mut desired: K, observed: &[K], spec: impl Fn(&K) -> &S) -> Option<K>
where
    K: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
    S: serde::Serialize + Clone,
{
    let hashed = spec(&desired).clone();
    let current = observed
        .iter()
        .find(|o| o.metadata().name == desired.metadata().name);
    build::stamp_if_changed(
        &hashed,
        desired.metadata_mut(),
        current.map(|o| o.metadata()),
        TEMPLATE_HASH,
    )
    .then_some(desired)
}

/// Plan this deployment alone against the cluster as observed, its own pods' GPUs moved out
/// of the way: every other pod's GPUs are used, and pinned but not yet bound pods count on
/// their planned node (otherwise two deployments reconciled back to back could both be
/// promised the same free GPUs). Of the nodes' labels, only those it selects on are copied.
/// `kept` replicas stay where they are when they still fit; `replicas` overrides the count
/// to place (aggregated replicas kept above `spec.replicas`); `aggregated_only` places pools'
/// replicas aggregated.
fn plan_deployment<N: Borrow<Node>>(
    obs: &Observed<'_, N>,
    cfg: &Config,
    avoid: &BTreeSet<String>,
    kept: &[ReplicaPlacement],
    replicas: Option<i32>,
    aggregated_only: bool,
) -> planner::DeploymentPlan {
    let md = obs.md;
    let namespace = md.metadata.namespace.clone().unwrap_or_default();
    let name = md.metadata.name.clone().unwrap_or_default();
    let mut inv = Inventory::from_nodes_and_use(
        obs.nodes,
        &crate::controller::cache::gpus_in_use(obs.other_pods, obs.reserved),
        &cfg.catalog,
        &cfg.topology_keys,
        Some(&crate::planner::inventory::labels_read([&md
            .spec
            .placement])),
    );
    for n in inv.nodes.iter_mut().filter(|n| avoid.contains(&n.name)) {
        n.unschedulable = true;
    }
    let existing: Vec<ExistingPlacement> = kept
        .iter()
        .map(|p| ExistingPlacement::from_status(&namespace, &name, p))
        .collect();
    let mut planned_md = md.clone();
    if let Some(r) = replicas {
        planned_md.spec.replicas = r;
    }
    let opts = planner::PlanOptions {
        aggregated_only,
        ..cfg.plan.clone()
    };
    let plan = planner::plan(&inv, std::slice::from_ref(&planned_md), &existing, &opts);
    plan.deployments.into_iter().next().unwrap_or_default()
}

/// Take the plan's placement of every wanted replica (index, restarts, why it is placed
/// again) as a new incarnation, with an Event each.
fn place_wanted(
    dp: &planner::DeploymentPlan,
    wanted: &[(i32, i32, Option<String>)],
    kept: &mut Vec<ReplicaPlacement>,
    actions: &mut Actions,
    new_incarnation: &dyn Fn(i32) -> String,
    hash: &str,
) {
    for (replica, restarts, why) in wanted {
        let Some(pr) = dp.placed.iter().find(|x| x.replica == *replica) else {
            continue;
        };
        let inc = new_incarnation(*replica);
        let nodes_list: Vec<String> = pr
            .stages
            .iter()
            .map(|s| format!("{}:{}", s.node, s.gpus))
            .collect();
        actions.events.push(EventNote {
            type_: EventType::Normal,
            reason: "Placed",
            note: format!(
                "replica {replica}{} placed on {} (TP={}, PP={}{}, {}){}",
                pr.role
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default(),
                pr.gpu_type,
                pr.tensor_parallel,
                pr.pipeline_parallel,
                expert_note(pr.expert_parallel, pr.data_parallel_attention),
                nodes_list.join(", "),
                why.as_ref()
                    .map(|w| format!(" after: {w}"))
                    .unwrap_or_default()
            ),
        });
        kept.push(ReplicaPlacement {
            replica: *replica,
            incarnation: Some(inc),
            gpu_type: pr.gpu_type.clone(),
            tensor_parallel: pr.tensor_parallel,
            pipeline_parallel: pr.pipeline_parallel,
            expert_parallel: pr.expert_parallel,
            data_parallel_attention: pr.data_parallel_attention,
            stages: pr.stages.clone(),
            predicted: pr.predicted.clone(),
            ready: false,
            restarts: *restarts,
            state: ReplicaState::Creating,
            template_hash: Some(hash.to_owned()),
            last_failure_time: None,
            last_failure: why.clone(),
            role: pr.role.clone(),
        });
    }
}

/// `, EP=16, data-parallel attention` for an expert-parallel placement; empty otherwise.
fn expert_note(ep: Option<i32>, data_attention: bool) -> String {
    match ep {
        Some(ep) if data_attention => format!(", EP={ep}, data-parallel attention"),
        Some(ep) => format!(", EP={ep}"),
        None => String::new(),
    }
}
