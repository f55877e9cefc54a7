//! The watch caches of Pods and Nodes: what the controller keeps of each object, and how
//! reconciles and autoscaling passes read the caches without copying them.
//!
//! A cluster of 10,000 nodes and 100,000 pods, as the API server returns them (managedFields,
//! env, volumes, probes, images lists, annotations), is gigabytes of objects; the controller
//! reads a handful of fields of each. The Node and Pod watch streams are therefore transformed
//! before the reflector stores them ([`nodes`], [`pods`]):
//!
//! - A pod that holds no GPUs and carries no `tessera.dev/deployment` label is not cached at
//!   all ([`pod_matters`]): the planner's inventory counts GPUs only, and this deployment's
//!   pods, other deployments' reservations and the autoscaler's replica leaders are all found
//!   by that label. A pod that stops mattering (a label removed) leaves the cache.
//! - A cached pod keeps ([`strip_pod`]): name, namespace, uid, resourceVersion,
//!   deletionTimestamp, the labels the operator reads ([`POD_LABELS`]), `spec.nodeName`, the
//!   node it is pinned to by required node affinity while unbound, and the GPU limits and
//!   requests of its (init) containers that have any (with their names). A pod the operator
//!   manages also keeps creationTimestamp, `status.phase`, `reason`, `podIP`, the conditions
//!   Ready, PodScheduled and DisruptionTarget (type, status, reason, lastTransitionTime) and
//!   per container status its name, restartCount and `state.terminated` (exit code, reason,
//!   the first line of the message, bounded); other pods keep `status.phase` only.
//! - A cached node keeps ([`strip_node`]): name, uid, resourceVersion, every label (a
//!   deployment's `nodeSelector` may name any), `spec.unschedulable`, the NoSchedule and
//!   NoExecute taints, allocatable GPUs and the Ready condition (type, status,
//!   lastTransitionTime).
//!
//! Readers share the store's `Arc`s: a reconcile copies only its own deployment's pods
//! ([`own_and_other`]); the inventory reads the GPUs in use straight from the shared pods
//! ([`gpus_in_use`]) and copies only the node labels the deployments select on. Memory and
//! time at 10,000 nodes and 100,000 pods: `scripts/bench-cache-memory.sh`, recorded in
//! docs/benchmarks.md ("Controller caches").

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateTerminated, ContainerStatus, Node, NodeCondition,
    NodeSpec, NodeStatus, Pod, PodCondition, PodSpec, PodStatus, ResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};

use super::reconcile::{bounded, label, pinned_node};
use crate::build::labels;
use crate::planner::inventory::{self, GPU_RESOURCE};

/// The pod labels the operator reads; cached pods keep these only.
pub const POD_LABELS: [&str; 5] = [
    labels::DEPLOYMENT,
    labels::REPLICA,
    labels::INCARNATION,
    labels::ROLE,
    labels::MANAGED_BY,
];

/// The pod conditions the operator reads.
pub const POD_CONDITIONS: [&str; 3] = ["Ready", "PodScheduled", "DisruptionTarget"];

/// Longest termination message kept (its first line; Events are cut at 1024 bytes).
pub const MAX_TERMINATION_MESSAGE: usize = 1024;

/// Whether the operator manages the pod (its health, readiness and address are read).
fn managed(p: &Pod) -> bool {
    label(p, labels::DEPLOYMENT).is_some() && label(p, labels::MANAGED_BY) == Some(labels::MANAGER)
}

/// Whether anything the controller or the autoscaler reads depends on the pod: it holds GPUs
/// or belongs to a deployment.
pub fn pod_matters(p: &Pod) -> bool {
    label(p, labels::DEPLOYMENT).is_some() || inventory::pod_gpus(p) > 0
}

/// The container's name and GPU limit and request (the request only where it differs from
/// the limit), or `None` when it asks for no GPUs.
fn gpu_container(c: Container) -> Option<Container> {
    let r = c.resources?;
    let limit = r.limits.and_then(|mut m| m.remove(GPU_RESOURCE));
    let request = r
        .requests
        .and_then(|mut m| m.remove(GPU_RESOURCE))
        .filter(|q| Some(q) != limit.as_ref());
    if limit.is_none() && request.is_none() {
        return None;
    }
    let one = |q| BTreeMap::from([(GPU_RESOURCE.to_owned(), q)]);
    Some(Container {
        name: c.name,
        resources: Some(ResourceRequirements {
            limits: limit.map(one),
            requests: request.map(one),
            ..ResourceRequirements::default()
        }),
        ..Container::default()
    })
}

fn strip_container_status(cs: ContainerStatus) -> ContainerStatus {
    let terminated = cs.state.and_then(|s| s.terminated).map(|t| ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: t.exit_code,
            reason: t.reason,
            message: t.message.map(|m| {
                bounded(
                    m.lines().next().unwrap_or_default().trim(),
                    MAX_TERMINATION_MESSAGE,
                )
            }),
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    });
    ContainerStatus {
        name: cs.name,
        restart_count: cs.restart_count,
        state: terminated,
        ..ContainerStatus::default()
    }
}

/// The pod reduced to what the operator reads (see the module documentation).
pub fn strip_pod(pod: Pod) -> Pod {
    let detailed = managed(&pod);
    let pinned = pinned_node(&pod).map(str::to_owned);
    let Pod {
        metadata: m,
        spec,
        status,
    } = pod;
    let kept: BTreeMap<String, String> = m
        .labels
        .into_iter()
        .flatten()
        .filter(|(k, _)| POD_LABELS.contains(&k.as_str()))
        .collect();
    let metadata = ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: (!kept.is_empty()).then_some(kept),
        deletion_timestamp: m.deletion_timestamp,
        creation_timestamp: m.creation_timestamp.filter(|_| detailed),
        ..ObjectMeta::default()
    };
    let spec = spec.and_then(|s| {
        let containers: Vec<Container> =
            s.containers.into_iter().filter_map(gpu_container).collect();
        let init: Vec<Container> = s
            .init_containers
            .into_iter()
            .flatten()
            .filter_map(gpu_container)
            .collect();
        // The pinned node is read only while the pod is unbound.
        let affinity = pinned
            .filter(|_| s.node_name.is_none())
            .map(crate::build::pinned_to);
        let empty =
            s.node_name.is_none() && affinity.is_none() && containers.is_empty() && init.is_empty();
        (!empty).then(|| PodSpec {
            node_name: s.node_name,
            affinity,
            containers,
            init_containers: (!init.is_empty()).then_some(init),
            ..PodSpec::default()
        })
    });
    let status = status.map(|s| {
        if !detailed {
            return PodStatus {
                phase: s.phase,
                ..PodStatus::default()
            };
        }
        PodStatus {
            phase: s.phase,
            reason: s.reason,
            pod_ip: s.pod_ip,
            conditions: s.conditions.map(|cs| {
                cs.into_iter()
                    .filter(|c| POD_CONDITIONS.contains(&c.type_.as_str()))
                    .map(|c| PodCondition {
                        type_: c.type_,
                        status: c.status,
                        reason: c.reason,
                        last_transition_time: c.last_transition_time,
                        ..PodCondition::default()
                    })
                    .collect()
            }),
            container_statuses: s
                .container_statuses
                .map(|v| v.into_iter().map(strip_container_status).collect()),
            init_container_statuses: s
                .init_container_statuses
                .map(|v| v.into_iter().map(strip_container_status).collect()),
            ..PodStatus::default()
        }
    });
    Pod {
        metadata,
        spec,
        status,
    }
}

/// The node reduced to what the operator reads (see the module documentation).
pub fn strip_node(node: Node) -> Node {
    let Node {
        metadata: m,
        spec,
        status,
    } = node;
    Node {
        metadata: ObjectMeta {
            name: m.name,
            uid: m.uid,
            resource_version: m.resource_version,
            labels: m.labels,
            ..ObjectMeta::default()
        },
        spec: spec.map(|s| NodeSpec {
            unschedulable: s.unschedulable,
            taints: s
                .taints
                .map(|ts| {
                    ts.into_iter()
                        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
                        .collect::<Vec<_>>()
                })
                .filter(|ts| !ts.is_empty()),
            ..NodeSpec::default()
        }),
        status: status.map(|s| NodeStatus {
            allocatable: s
                .allocatable
                .and_then(|mut a| a.remove(GPU_RESOURCE))
                .map(|q| BTreeMap::from([(GPU_RESOURCE.to_owned(), q)])),
            conditions: s
                .conditions
                .and_then(|cs| cs.into_iter().find(|c| c.type_ == "Ready"))
                .map(|c| {
                    vec![NodeCondition {
                        type_: c.type_,
                        status: c.status,
                        last_transition_time: c.last_transition_time,
                        ..NodeCondition::default()
                    }]
                }),
            ..NodeStatus::default()
        }),
    }
}

/// Only what identifies the pod in a store (for a deletion).
fn key_of(pod: Pod) -> Pod {
    let m = pod.metadata;
    Pod {
        metadata: ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            ..ObjectMeta::default()
        },
        ..Pod::default()
    }
}

/// One pod watch event as the cache should see it: stripped, dropped (a listed pod that does
/// not matter) or turned into a deletion (a pod that stopped mattering).
pub fn pod_event(ev: watcher::Event<Pod>) -> Option<watcher::Event<Pod>> {
    use watcher::Event as E;
    match ev {
        E::Apply(p) if pod_matters(&p) => Some(E::Apply(strip_pod(p))),
        E::Apply(p) | E::Delete(p) => Some(E::Delete(key_of(p))),
        E::InitApply(p) => pod_matters(&p).then(|| E::InitApply(strip_pod(p))),
        E::Init => Some(E::Init),
        E::InitDone => Some(E::InitDone),
    }
}

/// One node watch event as the cache should see it.
pub fn node_event(ev: watcher::Event<Node>) -> watcher::Event<Node> {
    ev.modify(|n| *n = strip_node(std::mem::take(n)))
}

/// The pod watch stream as the pod cache should see it ([`pod_event`]).
pub fn pods<S>(events: S) -> impl Stream<Item = watcher::Result<watcher::Event<Pod>>> + Send
where
    S: Stream<Item = watcher::Result<watcher::Event<Pod>>> + Send,
{
    events.try_filter_map(|ev| futures::future::ready(Ok(pod_event(ev))))
}

/// The node watch stream as the node cache should see it ([`strip_node`]).
pub fn nodes<S>(events: S) -> impl Stream<Item = watcher::Result<watcher::Event<Node>>> + Send
where
    S: Stream<Item = watcher::Result<watcher::Event<Node>>> + Send,
{
    events.modify(|n| *n = strip_node(std::mem::take(n)))
}

/// Whether `p` is one of the pods of deployment `ns/name`.
pub fn is_own(p: &Pod, ns: &str, name: &str) -> bool {
    p.metadata.namespace.as_deref() == Some(ns)
        && label(p, labels::DEPLOYMENT) == Some(name)
        && label(p, labels::MANAGED_BY) == Some(labels::MANAGER)
}

/// The cached pods of deployment `ns/name` (copied: the pure reconcile owns them, and they are
/// few) and every other cached pod (shared with the cache, not copied).
pub fn own_and_other(pods: &Store<Pod>, ns: &str, name: &str) -> (Vec<Pod>, Vec<Arc<Pod>>) {
    let mut own = Vec::new();
    let mut other = Vec::new();
    for p in pods.state() {
        if is_own(&p, ns, name) {
            own.push(Pod::clone(&p));
        } else {
            other.push(p);
        }
    }
    (own, other)
}

/// GPUs in use per node as the planner's inventory counts them, read from shared pods without
/// copying them: every pod that is not Succeeded or Failed, on its node or, while unbound, on
/// the node it is pinned to, plus the `reserved` GPUs (see
/// [`reserved_by_others`](super::reconcile::reserved_by_others)).
pub fn gpus_in_use<P: Borrow<Pod>>(pods: &[P], reserved: &[(String, u32)]) -> HashMap<String, u32> {
    let mut used: HashMap<String, u32> = HashMap::new();
    let mut add = |node: &str, n: u32| {
        if n == 0 {
            return;
        }
        match used.get_mut(node) {
            Some(u) => *u += n,
            None => {
                used.insert(node.to_owned(), n);
            }
        }
    };
    for p in pods {
        let p = p.borrow();
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let Some(spec) = &p.spec else { continue };
        let Some(node) = spec.node_name.as_deref().or_else(|| pinned_node(p)) else {
            continue;
        };
        add(node, inventory::pod_gpus(p));
    }
    for (node, gpus) in reserved {
        add(node, *gpus);
    }
    used
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    use kube::runtime::reflector;
    use serde_json::{Value, json};

    use super::*;
    use crate::api::{ModelDeployment, parse_model_deployment};
    use crate::autoscale::pass::pods_for_inventory;
    use crate::autoscale::runner::leaders;
    use crate::controller::reconcile::{
        Config, Observed, reconcile, reservation_pods, reserved_by_others,
    };
    use crate::planner::inventory::Inventory;

    const T0: &str = "2025-03-01T10:00:00Z";

    fn now() -> Timestamp {
        T0.parse::<Timestamp>().expect("time") + SignedDuration::from_hours(2)
    }

    fn managed_fields(manager: &str, subresource: Option<&str>) -> Value {
        json!({"manager": manager, "operation": "Update", "apiVersion": "v1", "time": T0,
            "fieldsType": "FieldsV1", "subresource": subresource,
            "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                "f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}, "f:status": {}, "f:type": {}}}}}})
    }

    /// A GPU node as the API server returns it: GPU feature discovery and NFD labels,
    /// annotations, managedFields, capacity, conditions, images.
    fn api_node(name: &str, ready: &str, cordoned: bool) -> Node {
        let mut labels = json!({
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
            "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64",
            "node.kubernetes.io/instance-type": "p5.48xlarge",
            "topology.kubernetes.io/zone": "us-east-1a", "topology.kubernetes.io/region": "us-east-1",
            "tessera.dev/fabric.rack": format!("rack-{}", name.len() % 3),
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8",
            "nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.family": "hopper",
            "nvidia.com/gpu.machine": "p5.48xlarge", "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.replicas": "1", "nvidia.com/gpu.sharing-strategy": "none",
            "nvidia.com/gpu.compute.major": "9", "nvidia.com/gpu.compute.minor": "0",
            "nvidia.com/cuda.driver.major": "550", "nvidia.com/cuda.driver.minor": "90",
            "nvidia.com/cuda.runtime.major": "12", "nvidia.com/cuda.runtime.minor": "4",
            "nvidia.com/mig.capable": "true", "nvidia.com/mps.capable": "false",
            "feature.node.kubernetes.io/pci-10de.present": "true",
            "feature.node.kubernetes.io/kernel-version.full": "5.15.0-1051-aws",
        });
        for i in 0..20 {
            labels[format!("feature.node.kubernetes.io/cpu-cpuid.FEATURE{i}")] = json!("true");
        }
        let images: Vec<Value> = (0..30)
            .map(|i| json!({"names": [format!("registry.example.com/team/image-{i}@sha256:{:064x}", i),
                format!("registry.example.com/team/image-{i}:v1.{i}")], "sizeBytes": 1_000_000_000 + i}))
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "123456",
                "creationTimestamp": T0, "labels": labels,
                "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                    "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                    "nfd.node.kubernetes.io/feature-labels": "cpu-cpuid.AVX,cpu-cpuid.AVX2,pci-10de.present"},
                "managedFields": [managed_fields("kubelet", Some("status")), managed_fields("nfd-master", None)]},
            "spec": {"providerID": format!("aws:///us-east-1a/{name}"), "podCIDR": "10.244.1.0/24",
                "unschedulable": cordoned,
                "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "PreferNoSchedule"},
                    {"key": "dedicated", "value": "inference", "effect": "NoSchedule"}]},
            "status": {
                "capacity": {"cpu": "192", "memory": "2097152Ki", "nvidia.com/gpu": "8", "pods": "110",
                    "ephemeral-storage": "1000Gi", "hugepages-1Gi": "0"},
                "allocatable": {"cpu": "191450m", "memory": "2000000Ki", "nvidia.com/gpu": "8", "pods": "110",
                    "ephemeral-storage": "900Gi", "hugepages-1Gi": "0"},
                "conditions": [
                    {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": T0, "lastTransitionTime": T0,
                        "reason": "KubeletHasSufficientMemory", "message": "kubelet has sufficient memory available"},
                    {"type": "DiskPressure", "status": "False", "lastHeartbeatTime": T0, "lastTransitionTime": T0,
                        "reason": "KubeletHasNoDiskPressure", "message": "kubelet has no disk pressure"},
                    {"type": "Ready", "status": ready, "lastHeartbeatTime": T0, "lastTransitionTime": T0,
                        "reason": "KubeletReady", "message": "kubelet is posting ready status"}],
                "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}, {"type": "Hostname", "address": name}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                "nodeInfo": {"machineID": "m", "systemUUID": "s", "bootID": "b", "kernelVersion": "5.15",
                    "osImage": "Ubuntu 22.04", "containerRuntimeVersion": "containerd://1.7",
                    "kubeletVersion": "v1.33.0", "kubeProxyVersion": "v1.33.0", "operatingSystem": "linux",
                    "architecture": "amd64"},
                "images": images}
        }))
        .expect("node")
    }

    fn deployment(name: &str, uid: &str, replicas: i32) -> ModelDeployment {
        let mut md = parse_model_deployment(&json!({
            "apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "inference"},
            "spec": {
                "replicas": replicas,
                "model": {"uri": "pvc://models/llama-8b", "architecture": {
                    "parameters": 8030261248i64, "layers": 32, "hiddenSize": 4096,
                    "attentionHeads": 32, "kvHeads": 8, "intermediateSize": 14336,
                    "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 2}},
                "parallelism": {"tensor": 2, "pipeline": 1},
                "placement": {"tolerations": [{"key": "dedicated", "operator": "Exists"}]},
                "serving": {"maxConcurrency": 16, "contextLength": 8192}
            }
        }))
        .expect("valid");
        md.metadata.uid = Some(uid.into());
        md.metadata.generation = Some(1);
        md
    }

    /// `pod` as the API server returns it once bound to `node` (or still pending, pinned),
    /// with `status` merged over a running, ready status.
    fn api_pod(pod: &Pod, node: Option<&str>, status: Value) -> Pod {
        let mut v = serde_json::to_value(pod).expect("json");
        let name = pod.metadata.name.clone().unwrap_or_default();
        v["metadata"]["uid"] = json!(format!("uid-{name}"));
        v["metadata"]["resourceVersion"] = json!("777");
        v["metadata"]["creationTimestamp"] = json!(T0);
        v["metadata"]["managedFields"] = json!([
            managed_fields("tessera-operator", None),
            managed_fields("kubelet", Some("status"))
        ]);
        if let Some(n) = node {
            v["spec"]["nodeName"] = json!(n);
        }
        v["spec"]["volumes"] = json!([{"name": "kube-api-access", "projected": {"sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}}]);
        let mut st = json!({
            "phase": "Running", "hostIP": "10.0.0.1", "podIP": "10.244.1.5", "startTime": T0,
            "qosClass": "Burstable",
            "conditions": [
                {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": T0},
                {"type": "Initialized", "status": "True", "lastTransitionTime": T0},
                {"type": "Ready", "status": "True", "lastTransitionTime": T0},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": T0},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": T0}],
            "containerStatuses": pod.spec.iter().flat_map(|s| &s.containers).map(|c| json!({
                "name": c.name, "ready": true, "restartCount": 0, "started": true,
                "image": "ghcr.io/tessera/worker:1.0", "imageID": "ghcr.io/tessera/worker@sha256:abc",
                "containerID": "containerd://0123", "state": {"running": {"startedAt": T0}}, "lastState": {}
            })).collect::<Vec<_>>()
        });
        if let (Some(st), Some(over)) = (st.as_object_mut(), status.as_object()) {
            for (k, val) in over {
                st.insert(k.clone(), val.clone());
            }
        }
        v["status"] = st;
        serde_json::from_value(v).expect("pod")
    }

    /// A pod of someone else's, with `gpus` GPUs (0: none) on `node`.
    fn foreign_pod(name: &str, node: Option<&str>, gpus: u32, phase: &str) -> Pod {
        let mut resources =
            json!({"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}});
        if gpus > 0 {
            resources["requests"]["nvidia.com/gpu"] = json!(gpus.to_string());
            resources["limits"]["nvidia.com/gpu"] = json!(gpus.to_string());
        }
        let mut spec = json!({
            "containers": [
                {"name": "main", "image": "example/app:1", "resources": resources,
                    "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}},
                {"name": "sidecar", "image": "example/proxy:1", "resources": {"requests": {"cpu": "10m"}}}],
            "initContainers": [{"name": "init", "image": "example/init:1",
                "resources": {"limits": {"nvidia.com/gpu": if gpus > 1 { "1" } else { "0" }}}}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "tolerations": [{"key": "dedicated", "operator": "Exists"}]
        });
        match node {
            Some(n) => spec["nodeName"] = json!(n),
            None => {
                spec["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [
                        {"key": "kubernetes.io/hostname", "operator": "In", "values": ["gpu-3"]}]}]}}})
            }
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "team-a", "uid": format!("uid-{name}"),
                "resourceVersion": "55", "creationTimestamp": T0,
                "labels": {"app": "other", "pod-template-hash": "abc", "app.kubernetes.io/managed-by": "Helm"},
                "annotations": {"kubectl.kubernetes.io/restartedAt": T0},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u", "controller": true}],
                "managedFields": [managed_fields("kube-controller-manager", None)]},
            "spec": spec,
            "status": {"phase": phase, "podIP": "10.244.9.9",
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": T0}]}
        }))
        .expect("pod")
    }

    struct Cluster {
        nodes: Vec<Node>,
        md: ModelDeployment,
        own: Vec<Pod>,
        other: Vec<Pod>,
        deployments: Vec<ModelDeployment>,
    }

    fn obs<'a, N>(
        md: &'a ModelDeployment,
        own: &'a [Pod],
        nodes: &'a [N],
        other: &'a [Arc<Pod>],
        reserved: &'a [(String, u32)],
    ) -> Observed<'a, N> {
        Observed {
            md,
            pods: own,
            services: &[],
            routers: &[],
            nodes,
            other_pods: other,
            reserved,
            now: now(),
        }
    }

    /// Deployment `llama` with three replicas placed and running (one ready, one whose
    /// container restarted after a multi-line termination message, one member pending and
    /// unschedulable past the gang timeout), another deployment `other` with a replica whose
    /// pods are partly missing, foreign pods with and without GPUs, bound, pinned and failed.
    fn cluster() -> Cluster {
        let nodes: Vec<Node> = (0..6)
            .map(|i| {
                api_node(
                    &format!("gpu-{i}"),
                    if i == 5 { "False" } else { "True" },
                    i == 4,
                )
            })
            .collect();
        let cfg = Config::default();
        let place = |md: &mut ModelDeployment, other: &[Arc<Pod>]| -> Vec<Pod> {
            let a = reconcile(&obs(md, &[], &nodes, other, &[]), &cfg);
            md.status = a.status;
            a.apply_pods
        };
        let mut md = deployment("llama", "uid-1", 3);
        let mine = place(&mut md, &[]);
        assert_eq!(mine.len(), 3, "one pod per replica of 2 GPUs");
        let bound = |p: &Pod| -> String { pinned_node(p).expect("pinned").to_owned() };
        let own = vec![
            api_pod(&mine[0], Some(&bound(&mine[0])), json!({})),
            api_pod(
                &mine[1],
                Some(&bound(&mine[1])),
                json!({"containerStatuses": [{"name": "worker", "ready": false, "restartCount": 0,
                    "image": "i", "imageID": "i", "state": {"terminated": {"exitCode": 3, "reason": "Error",
                    "message": "  model checksum mismatch  \nstack trace line 1\nline 2", "startedAt": T0, "finishedAt": T0}},
                    "lastState": {}}],
                    "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": T0}]}),
            ),
            api_pod(
                &mine[2],
                None,
                json!({"phase": "Pending", "podIP": null, "containerStatuses": null, "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": "0/6 nodes are available", "lastTransitionTime": T0}]}),
            ),
        ];
        let mut md2 = deployment("other", "uid-2", 1);
        let theirs = place(
            &mut md2,
            &own.iter().cloned().map(Arc::new).collect::<Vec<_>>(),
        );
        let mut other = vec![
            foreign_pod("bound-gpu", Some("gpu-0"), 2, "Running"),
            foreign_pod("pinned-gpu", None, 4, "Pending"),
            foreign_pod("failed-gpu", Some("gpu-1"), 8, "Failed"),
            foreign_pod("daemon", Some("gpu-2"), 0, "Running"),
        ];
        other.extend(
            theirs
                .iter()
                .map(|p| api_pod(p, Some(&bound(p)), json!({"conditions": []}))),
        );
        Cluster {
            deployments: vec![md.clone(), md2],
            nodes,
            md,
            own,
            other,
        }
    }

    fn stripped(pods: &[Pod]) -> Vec<Pod> {
        pods.iter()
            .filter(|p| pod_matters(p))
            .cloned()
            .map(strip_pod)
            .collect()
    }

    fn shared(pods: &[Pod]) -> Vec<Arc<Pod>> {
        pods.iter().cloned().map(Arc::new).collect()
    }

    #[test]
    fn stripped_objects_decide_like_the_full_ones() {
        let c = cluster();
        let cfg = Config {
            gang_timeout: std::time::Duration::from_secs(600),
            ..Config::default()
        };
        let nodes: Vec<Arc<Node>> = c
            .nodes
            .iter()
            .cloned()
            .map(strip_node)
            .map(Arc::new)
            .collect();
        let own = stripped(&c.own);
        assert_eq!(own.len(), c.own.len(), "own pods are all kept");
        let other = shared(&stripped(&c.other));
        assert_eq!(
            other.len(),
            c.other.len() - 1,
            "only the pod without GPUs goes"
        );
        let full_other = shared(&c.other);

        // Reservations, as the controller computes them.
        let reserved_full = reserved_by_others(&c.deployments, Some("uid-1"), &c.other);
        let reserved =
            reserved_by_others(&c.deployments, Some("uid-1"), other.iter().map(|p| &**p));
        assert_eq!(reserved, reserved_full);

        // The inventory: the old path (copies of every pod, pinned ones moved to their node,
        // stand-in pods for reservations) against GPU use read from the stripped pods.
        let reserved_some = vec![("gpu-2".to_owned(), 3)];
        let mut inv_pods = pods_for_inventory(&c.other);
        inv_pods.extend(reservation_pods(&reserved_some));
        let inv_full = Inventory::from_nodes(&c.nodes, &inv_pods, &cfg.catalog, &cfg.topology_keys);
        let inv = Inventory::from_nodes_and_use(
            &nodes,
            &gpus_in_use(&other, &reserved_some),
            &cfg.catalog,
            &cfg.topology_keys,
            None,
        );
        assert_eq!(inv, inv_full);
        // Keeping only the labels a deployment selects on changes nothing else.
        let keep = crate::planner::inventory::labels_read([&c.md.spec.placement]);
        let lean_inv = Inventory::from_nodes_and_use(
            &nodes,
            &gpus_in_use(&other, &reserved_some),
            &cfg.catalog,
            &cfg.topology_keys,
            Some(&keep),
        );
        let mut without_labels = inv.clone();
        for n in &mut without_labels.nodes {
            n.labels.retain(|k, _| keep.contains(k));
        }
        assert_eq!(lean_inv, without_labels);
        assert!(inv.nodes.iter().any(|n| n.free_total() < n.allocatable));

        // The reconcile: failures, readiness, the gang timeout, node loss, planning.
        let full = reconcile(
            &obs(&c.md, &c.own, &c.nodes, &full_other, &reserved_full),
            &cfg,
        );
        let lean = reconcile(&obs(&c.md, &own, &nodes, &other, &reserved), &cfg);
        assert_eq!(lean, full);
        let notes: Vec<&str> = full.events.iter().map(|e| e.note.as_str()).collect();
        assert!(
            notes
                .iter()
                .any(|n| n.contains("exited with code 3 (Error): model checksum mismatch")),
            "{notes:?}"
        );
        // A short gang timeout replaces the pending member; a lost node replaces its replica.
        let cfg = Config {
            gang_timeout: std::time::Duration::from_secs(60),
            ..cfg
        };
        let mut md = c.md.clone();
        if let Some(st) = md.status.as_mut() {
            st.placements[0].stages[0].node = "gpu-5".into();
        }
        let full = reconcile(
            &obs(&md, &c.own, &c.nodes, &full_other, &reserved_full),
            &cfg,
        );
        let lean = reconcile(&obs(&md, &own, &nodes, &other, &reserved), &cfg);
        assert_eq!(lean, full);
        assert!(full.events.iter().any(|e| e.note.contains("gang timeout")));
        // A new deployment, placed around everything else.
        let fresh = deployment("fresh", "uid-3", 2);
        let full = reconcile(
            &obs(&fresh, &[], &c.nodes, &full_other, &reserved_full),
            &cfg,
        );
        let lean = reconcile(&obs(&fresh, &[], &nodes, &other, &reserved), &cfg);
        assert_eq!(lean, full);
        assert_eq!(full.apply_pods.len(), 2);

        // The autoscaler's replica leaders.
        let mut all_full = c.own.clone();
        all_full.extend(c.other.iter().cloned());
        let all: Vec<Pod> = stripped(&all_full);
        assert_eq!(leaders(&c.md, &all), leaders(&c.md, &all_full));
        assert!(!leaders(&c.md, &all).is_empty());
    }

    #[test]
    fn stripped_objects_are_much_smaller() {
        let c = cluster();
        let size = |v: &dyn erased::Size| v.bytes();
        let pods: Vec<Pod> = c.own.iter().chain(&c.other).cloned().collect();
        let lean = stripped(&pods);
        let nodes: Vec<Node> = c.nodes.iter().cloned().map(strip_node).collect();
        let (pf, pl) = (size(&pods), size(&lean));
        let (nf, nl) = (size(&c.nodes), size(&nodes));
        assert!(pl * 5 < pf, "pods: {pl} of {pf} bytes");
        assert!(nl * 3 < nf, "nodes: {nl} of {nf} bytes");
        // Nothing the operator reads is lost: every label of a node stays.
        assert_eq!(nodes[0].metadata.labels, c.nodes[0].metadata.labels);
        let p = strip_pod(c.own[1].clone());
        let t = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .expect("statuses");
        assert_eq!(
            t[0].state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .and_then(|t| t.message.as_deref()),
            Some("model checksum mismatch")
        );
        assert!(p.metadata.managed_fields.is_none() && p.metadata.annotations.is_none());
    }

    mod erased {
        pub trait Size {
            fn bytes(&self) -> usize;
        }
        impl<T: serde::Serialize> Size for Vec<T> {
            fn bytes(&self) -> usize {
                serde_json::to_vec(self).expect("json").len()
            }
        }
    }

    #[test]
    fn watch_events_reach_the_store_stripped_or_not_at_all() {
        let c = cluster();
        let daemon = foreign_pod("daemon", Some("gpu-2"), 0, "Running");
        let gpu = foreign_pod("bound-gpu", Some("gpu-0"), 2, "Running");
        let mut relabelled = c.own[0].clone();
        relabelled.metadata.labels = None;
        relabelled.spec.as_mut().expect("spec").containers[0].resources = None;
        use watcher::Event as E;
        let events = vec![
            E::Init,
            E::InitApply(daemon.clone()),
            E::InitApply(gpu.clone()),
            E::InitApply(c.own[0].clone()),
            E::InitDone,
            E::Apply(daemon),
            // No longer a deployment's, and no GPUs: leaves the cache.
            E::Apply(relabelled),
        ];
        let (store, writer) = reflector::store::<Pod>();
        let stream = pods(futures::stream::iter(events.into_iter().map(Ok)));
        futures::executor::block_on(reflector::reflector(writer, stream).for_each(|_| async {}));
        let names: std::collections::BTreeSet<String> = store
            .state()
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        assert_eq!(names, ["bound-gpu".to_owned()].into());
        assert_eq!(*store.state()[0], strip_pod(gpu));

        let (store, writer) = reflector::store::<Node>();
        let stream = nodes(futures::stream::iter(
            [E::Init, E::InitApply(c.nodes[0].clone()), E::InitDone].map(Ok),
        ));
        futures::executor::block_on(reflector::reflector(writer, stream).for_each(|_| async {}));
        assert_eq!(*store.state()[0], strip_node(c.nodes[0].clone()));
        let E::Apply(n) = node_event(E::Apply(c.nodes[1].clone())) else {
            panic!("an Apply stays an Apply");
        };
        assert_eq!(n, strip_node(c.nodes[1].clone()));
    }
}
