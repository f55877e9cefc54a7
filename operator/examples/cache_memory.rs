//! Memory and time of the controller's Pod and Node caches at scale.
//!
//! Builds Nodes and Pods as the API server returns them (GPU feature discovery and NFD labels,
//! annotations, managedFields, images lists; pods with env, volumes, probes, security
//! contexts, conditions and container statuses), feeds them as a watch's initial list through
//! the same transform and reflector store as `tessera-operator run` (`controller::cache`),
//! then runs what one reconcile and one autoscaling pass gather a few times, and prints peak
//! RSS (`VmHWM`). Run each mode in its own process (peak RSS only grows):
//!
//! `cargo run --release -p tessera-operator --example cache_memory -- [--no-strip] [--copy]
//!  [--nodes 10000] [--pods 100000] [--gpu-pods 0.18] [--rounds 5]`
//!
//! - default: stripped caches, reconciles read the caches' `Arc`s (the controller today);
//! - `--no-strip`: objects cached whole;
//! - `--copy`: every observation deep-copies every cached pod, node and deployment, and
//!   planning copies every other pod again (the controller before `controller::cache`).
//!
//! Cluster: `--nodes` 8-GPU H100 nodes; `--pods` pods of which 2% belong to 4-replica
//! ModelDeployments (one 4-GPU pod per replica), `--gpu-pods` (share of all pods) are other
//! 4-GPU pods, and the rest hold no GPUs (DaemonSet pods, 7 per node while they last, then
//! CPU workloads).

#![recursion_limit = "512"]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector;
use kube::runtime::watcher;
use serde_json::{Value, json};
use tessera_operator::api::{ModelDeployment, parse_model_deployment};
use tessera_operator::autoscale::pass::pods_for_inventory;
use tessera_operator::autoscale::runner::Stores;
use tessera_operator::build::labels;
use tessera_operator::controller::cache;
use tessera_operator::controller::reconcile::{
    Config, Observed, reconcile, reservation_pods, reserved_by_others,
};
use tessera_operator::planner::inventory::{Inventory, labels_read};

const T0: &str = "2025-03-01T10:00:00Z";

struct Args {
    strip: bool,
    copy: bool,
    nodes: usize,
    pods: usize,
    gpu_share: f64,
    rounds: usize,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        strip: true,
        copy: false,
        nodes: 10_000,
        pods: 100_000,
        gpu_share: 0.18,
        rounds: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--no-strip" => a.strip = false,
            "--copy" => a.copy = true,
            "--nodes" => a.nodes = value()?.parse().map_err(|e| format!("--nodes: {e}"))?,
            "--pods" => a.pods = value()?.parse().map_err(|e| format!("--pods: {e}"))?,
            "--gpu-pods" => {
                a.gpu_share = value()?.parse().map_err(|e| format!("--gpu-pods: {e}"))?
            }
            "--rounds" => a.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// `VmHWM` and `VmRSS` of this process, MiB.
fn rss() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (get("VmHWM:"), get("VmRSS:"))
}

fn managed_field(manager: &str, subresource: Option<&str>, fields: Value) -> Value {
    json!({"manager": manager, "operation": "Update", "apiVersion": "v1", "time": T0,
        "fieldsType": "FieldsV1", "fieldsV1": fields, "subresource": subresource})
}

fn api_node(i: usize) -> Value {
    let name = format!(
        "ip-10-{}-{}-{}.ec2.internal",
        i / 65536,
        (i / 256) % 256,
        i % 256
    );
    let mut labels = json!({
        "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/instance-type": "p5.48xlarge",
        "node.kubernetes.io/instance-type": "p5.48xlarge",
        "topology.kubernetes.io/region": "us-east-1",
        "topology.kubernetes.io/zone": format!("us-east-1{}", ["a", "b", "c"][i % 3]),
        "failure-domain.beta.kubernetes.io/region": "us-east-1",
        "failure-domain.beta.kubernetes.io/zone": format!("us-east-1{}", ["a", "b", "c"][i % 3]),
        "tessera.dev/fabric.block": format!("block-{}", i / 256),
        "tessera.dev/fabric.rack": format!("rack-{}", i / 32),
        "eks.amazonaws.com/nodegroup": "gpu-p5", "eks.amazonaws.com/capacityType": "ON_DEMAND",
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8",
        "nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.family": "hopper",
        "nvidia.com/gpu.machine": "p5.48xlarge", "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.replicas": "1", "nvidia.com/gpu.sharing-strategy": "none",
        "nvidia.com/gpu.mode": "compute", "nvidia.com/gpu.compute.major": "9",
        "nvidia.com/gpu.compute.minor": "0", "nvidia.com/cuda.driver.major": "550",
        "nvidia.com/cuda.driver.minor": "90", "nvidia.com/cuda.driver.rev": "07",
        "nvidia.com/cuda.runtime.major": "12", "nvidia.com/cuda.runtime.minor": "4",
        "nvidia.com/cuda.driver-version.full": "550.90.07", "nvidia.com/mig.capable": "true",
        "nvidia.com/mig.strategy": "single", "nvidia.com/mps.capable": "false",
        "nvidia.com/vgpu.present": "false", "nvidia.com/gfd.timestamp": "1740823200",
        "nvidia.com/gpu.deploy.container-toolkit": "true", "nvidia.com/gpu.deploy.dcgm": "true",
        "nvidia.com/gpu.deploy.dcgm-exporter": "true", "nvidia.com/gpu.deploy.device-plugin": "true",
        "nvidia.com/gpu.deploy.driver": "pre-installed", "nvidia.com/gpu.deploy.gpu-feature-discovery": "true",
        "nvidia.com/gpu.deploy.node-status-exporter": "true", "nvidia.com/gpu.deploy.operator-validator": "true",
        "feature.node.kubernetes.io/pci-10de.present": "true",
        "feature.node.kubernetes.io/pci-1d0f.present": "true",
        "feature.node.kubernetes.io/kernel-version.full": "5.10.225-213.878.amzn2.x86_64",
        "feature.node.kubernetes.io/kernel-version.major": "5",
        "feature.node.kubernetes.io/kernel-version.minor": "10",
        "feature.node.kubernetes.io/system-os_release.ID": "amzn",
        "feature.node.kubernetes.io/system-os_release.VERSION_ID": "2",
        "feature.node.kubernetes.io/storage-nonrotationaldisk": "true",
    });
    for f in [
        "ADX",
        "AESNI",
        "AVX",
        "AVX2",
        "AVX512BW",
        "AVX512CD",
        "AVX512DQ",
        "AVX512F",
        "AVX512VL",
        "AVX512VNNI",
        "CMPXCHG8",
        "FMA3",
        "FXSR",
        "MOVBE",
        "OSXSAVE",
        "SHA",
        "SSE4",
        "VAES",
    ] {
        labels[format!("feature.node.kubernetes.io/cpu-cpuid.{f}")] = json!("true");
    }
    let images: Vec<Value> = (0..50)
        .map(|k| {
            json!({"names": [
                format!("123456789012.dkr.ecr.us-east-1.amazonaws.com/team/image-{k}@sha256:{:064x}", k * 7919 + 1),
                format!("123456789012.dkr.ecr.us-east-1.amazonaws.com/team/image-{k}:v1.{k}.0")],
                "sizeBytes": 1_000_000_000u64 + k as u64})
        })
        .collect();
    let label_fields: serde_json::Map<String, Value> = labels
        .as_object()
        .map(|m| m.keys().map(|k| (format!("f:{k}"), json!({}))).collect())
        .unwrap_or_default();
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "uid": format!("6c0e7f0a-1b2c-4d5e-8f90-{i:012}"),
            "resourceVersion": format!("{}", 900_000_000 + i), "creationTimestamp": T0,
            "labels": labels,
            "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                "alpha.kubernetes.io/provided-node-ip": "10.0.0.1",
                "csi.volume.kubernetes.io/nodeid": "{\"ebs.csi.aws.com\":\"i-0123456789abcdef0\",\"efs.csi.aws.com\":\"i-0123456789abcdef0\"}",
                "nfd.node.kubernetes.io/feature-labels": "cpu-cpuid.ADX,cpu-cpuid.AESNI,cpu-cpuid.AVX,cpu-cpuid.AVX2,kernel-version.full,kernel-version.major,pci-10de.present,storage-nonrotationaldisk,system-os_release.ID",
                "nfd.node.kubernetes.io/extended-resources": ""},
            "managedFields": [
                managed_field("kubelet", None, json!({"f:metadata": {"f:annotations": {}, "f:labels": {}}})),
                managed_field("nfd-master", None, json!({"f:metadata": {"f:labels": label_fields}})),
                managed_field("kubelet", Some("status"), json!({"f:status": {"f:allocatable": {"f:nvidia.com/gpu": {}},
                    "f:capacity": {"f:nvidia.com/gpu": {}}, "f:conditions": {"k:{\"type\":\"Ready\"}": {"f:lastHeartbeatTime": {}}},
                    "f:images": {}, "f:nodeInfo": {"f:bootID": {}}}}))]},
        "spec": {"providerID": format!("aws:///us-east-1a/i-{i:017x}"), "podCIDR": "10.244.1.0/24",
            "podCIDRs": ["10.244.1.0/24"],
            "taints": [{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}]},
        "status": {
            "capacity": {"cpu": "192", "ephemeral-storage": "3750000000Ki", "hugepages-1Gi": "0",
                "hugepages-2Mi": "0", "memory": "2097152000Ki", "nvidia.com/gpu": "8", "pods": "110",
                "vpc.amazonaws.com/efa": "32"},
            "allocatable": {"cpu": "191450m", "ephemeral-storage": "3455000000000", "hugepages-1Gi": "0",
                "hugepages-2Mi": "0", "memory": "2070000000Ki", "nvidia.com/gpu": "8", "pods": "110",
                "vpc.amazonaws.com/efa": "32"},
            "conditions": (["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"]).iter().map(|t| json!({
                "type": t, "status": if *t == "Ready" { "True" } else { "False" },
                "lastHeartbeatTime": T0, "lastTransitionTime": T0,
                "reason": format!("Kubelet{t}"), "message": format!("kubelet reports {t}")})).collect::<Vec<_>>(),
            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}, {"type": "InternalDNS", "address": name},
                {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": "ec2a1b2c3d4e5f", "systemUUID": "ec2a1b2c-3d4e-5f60-7182-93a4b5c6d7e8",
                "bootID": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "kernelVersion": "5.10.225-213.878.amzn2.x86_64",
                "osImage": "Amazon Linux 2", "containerRuntimeVersion": "containerd://1.7.22",
                "kubeletVersion": "v1.33.0-eks", "kubeProxyVersion": "v1.33.0-eks",
                "operatingSystem": "linux", "architecture": "amd64"},
            "images": images}
    })
}

fn node_name(i: usize) -> String {
    format!(
        "ip-10-{}-{}-{}.ec2.internal",
        i / 65536,
        (i / 256) % 256,
        i % 256
    )
}

fn container(name: &str, image: &str, gpus: u32, envs: usize) -> Value {
    let mut env: Vec<Value> = (0..envs)
        .map(|k| json!({"name": format!("APP_SETTING_{k}"), "value": format!("value-{k}-{name}")}))
        .collect();
    for (n, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("NODE_NAME", "spec.nodeName"),
    ] {
        env.push(
            json!({"name": n, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}),
        );
    }
    let mut resources =
        json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}});
    if gpus > 0 {
        resources = json!({"requests": {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": gpus.to_string()},
            "limits": {"memory": "200Gi", "nvidia.com/gpu": gpus.to_string()}});
    }
    let probe = |path: &str| {
        json!({"httpGet": {"path": path, "port": 8080, "scheme": "HTTP"}, "initialDelaySeconds": 10,
        "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3})
    };
    json!({"name": name, "image": image, "imagePullPolicy": "IfNotPresent",
        "command": ["/usr/bin/app"], "args": ["--port=8080", "--metrics-port=9090", "--log-level=info"],
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
        "env": env, "resources": resources,
        "volumeMounts": [{"name": "config", "mountPath": "/etc/app"},
            {"name": "kube-api-access-x7k2p", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
        "livenessProbe": probe("/healthz"), "readinessProbe": probe("/readyz"),
        "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
        "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": true, "runAsNonRoot": true}})
}

/// Metadata, volumes, scheduling, managedFields and a running status around `containers`.
fn api_pod(
    name: &str,
    namespace: &str,
    labels: Value,
    node: &str,
    containers: Vec<Value>,
    i: usize,
) -> Value {
    let statuses: Vec<Value> = containers
        .iter()
        .map(|c| {
            json!({"name": c["name"], "state": {"running": {"startedAt": T0}}, "lastState": {},
            "ready": true, "restartCount": 0, "image": c["image"],
            "imageID": format!("{}@sha256:{:064x}", c["image"].as_str().unwrap_or(""), i),
            "containerID": format!("containerd://{:064x}", i * 31 + 7), "started": true,
            "volumeMounts": c["volumeMounts"]})
        })
        .collect();
    let container_fields: serde_json::Map<String, Value> = containers
        .iter()
        .map(|c| {
            let env: serde_json::Map<String, Value> = c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    (
                        format!("k:{{\"name\":\"{}\"}}", e["name"].as_str().unwrap_or("")),
                        json!({".": {}, "f:name": {}, "f:value": {}}),
                    )
                })
                .collect();
            (
                format!("k:{{\"name\":\"{}\"}}", c["name"].as_str().unwrap_or("")),
                json!({".": {}, "f:args": {}, "f:command": {}, "f:env": env, "f:image": {},
                "f:imagePullPolicy": {}, "f:livenessProbe": {}, "f:name": {}, "f:ports": {},
                "f:readinessProbe": {}, "f:resources": {}, "f:securityContext": {}, "f:volumeMounts": {}}),
            )
        })
        .collect();
    let mut labels = labels;
    labels["app.kubernetes.io/version"] = json!("1.4.2");
    labels["helm.sh/chart"] = json!("app-1.4.2");
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "generateName": format!("{name}-"), "namespace": namespace,
            "uid": format!("3f2a9c1e-5b7d-4e8f-9a0b-{i:012}"), "resourceVersion": format!("{}", 1_000_000_000 + i),
            "creationTimestamp": T0, "labels": labels,
            "annotations": {"kubectl.kubernetes.io/default-container": containers.first().map(|c| c["name"].clone()),
                "prometheus.io/scrape": "true", "prometheus.io/port": "9090",
                "checksum/config": format!("{:064x}", i * 131)},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-rs"),
                "uid": format!("8d7c6b5a-4f3e-2d1c-0b9a-{i:012}"), "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                managed_field("kube-controller-manager", None, json!({"f:metadata": {"f:generateName": {},
                    "f:labels": {}, "f:ownerReferences": {}}, "f:spec": {"f:containers": container_fields}})),
                managed_field("kubelet", Some("status"), json!({"f:status": {"f:conditions": {
                    "k:{\"type\":\"ContainersReady\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                    "k:{\"type\":\"Initialized\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                    "k:{\"type\":\"Ready\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}}},
                    "f:containerStatuses": {}, "f:hostIP": {}, "f:podIP": {}, "f:startTime": {}}}))]},
        "spec": {
            "volumes": [
                {"name": "config", "configMap": {"name": "app-config", "defaultMode": 420}},
                {"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}],
            "containers": containers, "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst", "serviceAccountName": "default", "serviceAccount": "default",
            "nodeName": node, "securityContext": {"fsGroup": 2000}, "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priority": 0, "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority"},
        "status": {"phase": "Running",
            "conditions": (["PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"])
                .iter().map(|t| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": T0})).collect::<Vec<_>>(),
            "hostIP": "10.0.0.1", "hostIPs": [{"ip": "10.0.0.1"}],
            "podIP": format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256),
            "podIPs": [{"ip": format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256)}],
            "startTime": T0, "containerStatuses": statuses, "qosClass": "Burstable"}
    })
}

const DAEMONS: [&str; 7] = [
    "kube-proxy",
    "aws-node",
    "node-exporter",
    "dcgm-exporter",
    "nvidia-device-plugin",
    "gpu-feature-discovery",
    "nfd-worker",
];

/// Pod `i` of the cluster's other workloads (not a ModelDeployment's).
fn other_pod(i: usize, a: &Args, gpu_pods: usize) -> Value {
    let n = a.nodes.max(1);
    if i < gpu_pods {
        // 4-GPU pods, two per node, on the nodes the ModelDeployments leave alone.
        let node = node_name((n / 5 + i / 2) % n);
        let name = format!("trainer-{i:06}-7f9c8d6b5");
        let labels =
            json!({"app": "trainer", "pod-template-hash": "7f9c8d6b5", "team": "research"});
        return api_pod(
            &name,
            "research",
            labels,
            &node,
            vec![
                container("trainer", "nvcr.io/nvidia/pytorch:24.08-py3", 4, 20),
                container("log-shipper", "fluent/fluent-bit:3.1", 0, 5),
            ],
            i,
        );
    }
    let j = i - gpu_pods;
    if j < DAEMONS.len() * n {
        let daemon = DAEMONS[j / n];
        let labels = json!({"app.kubernetes.io/name": daemon, "controller-revision-hash": "5d8f7b9c6d",
            "pod-template-generation": "3", "k8s-app": daemon});
        return api_pod(
            &format!("{daemon}-{j:06x}"),
            "kube-system",
            labels,
            &node_name(j % n),
            vec![container(
                daemon,
                &format!("registry.k8s.io/{daemon}:v1.33.0"),
                0,
                8,
            )],
            i,
        );
    }
    let labels = json!({"app": "gateway", "pod-template-hash": "6c4d9f8b7"});
    api_pod(
        &format!("gateway-{j:06}-6c4d9f8b7"),
        "serving",
        labels,
        &node_name(j % n),
        vec![
            container("gateway", "envoyproxy/envoy:v1.31", 0, 12),
            container("istio-proxy", "istio/proxyv2:1.23", 0, 15),
        ],
        i,
    )
}

fn template() -> ModelDeployment {
    let mut md = parse_model_deployment(&json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "llm", "namespace": "inference", "uid": "uid-llm", "generation": 1,
            "resourceVersion": "1"},
        "spec": {
            "replicas": 4,
            "model": {"uri": "pvc://models/llama-70b", "architecture": {
                "parameters": 70553706496i64, "layers": 80, "hiddenSize": 8192,
                "attentionHeads": 64, "kvHeads": 8, "intermediateSize": 28672,
                "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 2}},
            "parallelism": {"tensor": 4, "pipeline": 1},
            "placement": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
            "serving": {"maxConcurrency": 32, "contextLength": 8192}
        }
    }))
    .expect("a valid ModelDeployment");
    md.metadata.generation = Some(1);
    md
}

/// Feed a watch stream through a reflector store, as `run` does.
fn feed<K, S>(writer: reflector::store::Writer<K>, stream: S)
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
    S: futures::Stream<Item = watcher::Result<watcher::Event<K>>>,
{
    futures::executor::block_on(reflector::reflector(writer, stream).for_each(|_| async {}));
}

/// A watch's initial list of `objects`.
fn listed<K>(
    objects: impl Iterator<Item = K> + Send,
) -> impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send
where
    K: Send,
{
    futures::stream::iter(
        std::iter::once(watcher::Event::Init)
            .chain(objects.map(watcher::Event::InitApply))
            .chain(std::iter::once(watcher::Event::InitDone))
            .map(Ok),
    )
}

fn median_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v.get(v.len() / 2)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

/// The pod of replica `r` of deployment `d`: the operator's own pod for the replica, bound
/// and running, as the API server returns it.
fn own_pod(template: &Pod, d: usize, node: &str, i: usize) -> Value {
    let name = format!("llm-{d}");
    let mut v = serde_json::to_value(template).expect("json");
    let pod_name = template
        .metadata
        .name
        .clone()
        .unwrap_or_default()
        .replacen("llm", &name, 1);
    let around = api_pod(&pod_name, "inference", json!({}), node, vec![], i);
    v["metadata"]["name"] = json!(pod_name);
    v["metadata"]["labels"][labels::DEPLOYMENT] = json!(name);
    v["metadata"]["labels"][labels::INSTANCE] = json!(name);
    for k in [
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "managedFields",
    ] {
        v["metadata"][k] = around["metadata"][k].clone();
    }
    v["spec"]["nodeName"] = json!(node);
    v["status"] = around["status"].clone();
    v["status"]["containerStatuses"] = json!(
        v["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(
                |c| json!({"name": c["name"], "state": {"running": {"startedAt": T0}},
                "lastState": {}, "ready": true, "restartCount": 0, "image": c["image"],
                "imageID": format!("{}@sha256:{:064x}", c["image"].as_str().unwrap_or(""), i),
                "containerID": format!("containerd://{:064x}", i), "started": true})
            )
            .collect::<Vec<_>>()
    );
    v
}

fn main() -> Result<(), String> {
    let a = args()?;
    let cfg = Config::default();
    let loading = Instant::now();

    // Nodes.
    let (node_store, node_writer) = reflector::store::<Node>();
    let nodes = (0..a.nodes).map(|i| serde_json::from_value::<Node>(api_node(i)).expect("a node"));
    if a.strip {
        feed(node_writer, cache::nodes(listed(nodes)));
    } else {
        feed(node_writer, listed(nodes));
    }

    // ModelDeployments of 4 replicas of 4 GPUs (one pod each), all running on the first fifth
    // of the nodes, placed as the planner places one.
    let deployments = (a.pods / 50 / 4).max(1);
    let (template, template_pods) = {
        let nodes = node_store.state();
        let mut md = template();
        let actions = reconcile(
            &Observed {
                md: &md,
                pods: &[],
                services: &[],
                routers: &[],
                nodes: &nodes,
                other_pods: &[],
                reserved: &[],
                now: Timestamp::now(),
            },
            &cfg,
        );
        md.status = actions.status;
        (md, actions.apply_pods)
    };
    if template_pods.len() != 4 {
        return Err(format!(
            "the template placed {} pods, not 4",
            template_pods.len()
        ));
    }
    let spread = (a.nodes / 5).max(1);
    let node_of = |d: usize, r: usize| node_name((d * 4 + r) % spread);
    let (md_store, md_writer) = reflector::store::<ModelDeployment>();
    feed(
        md_writer,
        listed((0..deployments).map(|d| {
            let mut md = template.clone();
            md.metadata.name = Some(format!("llm-{d}"));
            md.metadata.uid = Some(format!("uid-llm-{d}"));
            if let Some(st) = md.status.as_mut() {
                for (r, p) in st.placements.iter_mut().enumerate() {
                    for s in &mut p.stages {
                        s.node = node_of(d, r);
                    }
                    p.state = tessera_operator::api::ReplicaState::Running;
                    p.ready = true;
                }
            }
            md
        })),
    );

    // Pods: the other workloads, then the deployments' own.
    let own = deployments * 4;
    let others = a.pods.saturating_sub(own);
    let gpu_pods = ((a.pods as f64 * a.gpu_share) as usize).min(others);
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let args = &a;
    let pods = (0..others)
        .map(move |i| other_pod(i, args, gpu_pods))
        .chain((0..own).map(|k| {
            own_pod(
                &template_pods[k % 4],
                k / 4,
                &node_of(k / 4, k % 4),
                others + k,
            )
        }))
        .map(|v| serde_json::from_value::<Pod>(v).expect("a pod"));
    if a.strip {
        feed(pod_writer, cache::pods(listed(pods)));
    } else {
        feed(pod_writer, listed(pods));
    }
    let loaded = loading.elapsed();
    let (hwm_loaded, rss_loaded) = rss();

    // What one reconcile of deployment llm-0 and one autoscaling pass gather and compute.
    let md = md_store
        .state()
        .into_iter()
        .find(|d| d.metadata.name.as_deref() == Some("llm-0"))
        .ok_or("no deployment llm-0")?;
    let fresh = {
        let mut m = template;
        m.metadata.name = Some("fresh".into());
        m.metadata.uid = Some("uid-fresh".into());
        m.status = None;
        m
    };
    let now = Timestamp::now();
    let (mut gather, mut steady, mut placing, mut autoscale) = (vec![], vec![], vec![], vec![]);
    let mut summary = String::new();
    for round in 0..a.rounds.max(1) {
        let t = Instant::now();
        if a.copy {
            // The controller before: deep copies of every cached object per reconcile.
            let (own, other): (Vec<Pod>, Vec<Pod>) = pod_store
                .state()
                .iter()
                .map(|p| (**p).clone())
                .partition(|p| cache::is_own(p, "inference", "llm-0"));
            let nodes: Vec<Node> = node_store.state().iter().map(|n| (**n).clone()).collect();
            let mds: Vec<ModelDeployment> =
                md_store.state().iter().map(|d| (**d).clone()).collect();
            let reserved = reserved_by_others(&mds, md.metadata.uid.as_deref(), &other);
            gather.push(t.elapsed());
            let shared: Vec<Arc<Pod>> = Vec::new();
            let obs = |m: &'_ ModelDeployment| {
                reconcile(
                    &Observed {
                        md: m,
                        pods: if m.metadata.name == md.metadata.name {
                            &own
                        } else {
                            &[]
                        },
                        services: &[],
                        routers: &[],
                        nodes: &nodes,
                        other_pods: &shared,
                        reserved: &reserved,
                        now,
                    },
                    &cfg,
                )
            };
            let t = Instant::now();
            let actions = obs(&md);
            steady.push(t.elapsed());
            // Planning copied every other pod once more (`pods_for_inventory`).
            let t = Instant::now();
            let mut inv_pods = pods_for_inventory(&other);
            inv_pods.extend(reservation_pods(&reserved));
            let inv = Inventory::from_nodes(&nodes, &inv_pods, &cfg.catalog, &cfg.topology_keys);
            let placed = obs(&fresh);
            placing.push(t.elapsed());
            if round == 0 {
                summary = format!(
                    "own pods {}, other pods {}, reserved {}, steady writes {}, free GPUs {}, new pods {}",
                    own.len(),
                    other.len(),
                    reserved.len(),
                    actions.writes(),
                    inv.nodes.iter().map(|n| n.free_total()).sum::<u32>(),
                    placed.apply_pods.len()
                );
            }
        } else {
            // The controller now: `reconcile_one`'s gathering.
            let (own, other) = cache::own_and_other(&pod_store, "inference", "llm-0");
            let nodes = node_store.state();
            let mds = md_store.state();
            let reserved = reserved_by_others(
                mds.iter().map(|d| &**d),
                md.metadata.uid.as_deref(),
                other.iter().map(|p| &**p),
            );
            gather.push(t.elapsed());
            let obs = |m: &'_ ModelDeployment| {
                reconcile(
                    &Observed {
                        md: m,
                        pods: if m.metadata.name == md.metadata.name {
                            &own
                        } else {
                            &[]
                        },
                        services: &[],
                        routers: &[],
                        nodes: &nodes,
                        other_pods: &other,
                        reserved: &reserved,
                        now,
                    },
                    &cfg,
                )
            };
            let t = Instant::now();
            let actions = obs(&md);
            steady.push(t.elapsed());
            let t = Instant::now();
            let placed = obs(&fresh);
            placing.push(t.elapsed());
            if round == 0 {
                let inv = Inventory::from_nodes_and_use(
                    &nodes,
                    &cache::gpus_in_use(&other, &reserved),
                    &cfg.catalog,
                    &cfg.topology_keys,
                    Some(&labels_read([&md.spec.placement])),
                );
                summary = format!(
                    "own pods {}, other pods {}, reserved {}, steady writes {}, free GPUs {}, new pods {}",
                    own.len(),
                    other.len(),
                    reserved.len(),
                    actions.writes(),
                    inv.nodes.iter().map(|n| n.free_total()).sum::<u32>(),
                    placed.apply_pods.len()
                );
            }
        }
        // The autoscaler's inventory over a snapshot of the stores.
        let t = Instant::now();
        let stores = Stores {
            nodes: node_store.clone(),
            pods: pod_store.clone(),
            deployments: md_store.clone(),
        };
        if a.copy {
            let nodes: Vec<Node> = node_store.state().iter().map(|n| (**n).clone()).collect();
            let pods: Vec<Pod> = pod_store.state().iter().map(|p| (**p).clone()).collect();
            let mds: Vec<ModelDeployment> =
                md_store.state().iter().map(|d| (**d).clone()).collect();
            let mut inv_pods = pods_for_inventory(&pods);
            inv_pods.extend(reservation_pods(&reserved_by_others(&mds, None, &pods)));
            let inv = Inventory::from_nodes(&nodes, &inv_pods, &cfg.catalog, &cfg.topology_keys);
            std::hint::black_box(inv);
        } else {
            let snap = stores.snapshot();
            let reserved = reserved_by_others(
                snap.deployments.iter().map(|d| &**d),
                None,
                snap.pods.iter().map(|p| &**p),
            );
            let inv = Inventory::from_nodes_and_use(
                &snap.nodes,
                &cache::gpus_in_use(&snap.pods, &reserved),
                &cfg.catalog,
                &cfg.topology_keys,
                Some(&labels_read(
                    snap.deployments.iter().map(|d| &d.spec.placement),
                )),
            );
            std::hint::black_box(inv);
        }
        autoscale.push(t.elapsed());
    }
    let (hwm, rss_end) = rss();
    let mode = match (a.strip, a.copy) {
        (true, false) => "stripped caches, shared reads",
        (false, false) => "whole objects cached, shared reads",
        (true, true) => "stripped caches, copies per reconcile",
        (false, true) => "whole objects cached, copies per reconcile (before)",
    };
    println!("mode: {mode}");
    println!(
        "cluster: {} nodes, {} pods ({} of {} ModelDeployments, {} other GPU pods, {} without GPUs)",
        a.nodes,
        a.pods,
        own,
        deployments,
        gpu_pods,
        others - gpu_pods
    );
    println!(
        "cached: {} nodes, {} pods; loaded in {:.1} s",
        node_store.state().len(),
        pod_store.state().len(),
        loaded.as_secs_f64()
    );
    println!("first round: {summary}");
    println!(
        "per observation (median of {}): gather {:.2} ms, steady reconcile {:.2} ms, reconcile placing a new deployment {:.2} ms, autoscaler inventory {:.2} ms",
        a.rounds.max(1),
        median_ms(gather),
        median_ms(steady),
        median_ms(placing),
        median_ms(autoscale)
    );
    println!(
        "RSS after loading: {rss_loaded:.0} MiB (peak {hwm_loaded:.0} MiB); at the end: {rss_end:.0} MiB"
    );
    println!("peak RSS (VmHWM): {hwm:.0} MiB");
    Ok(())
}
