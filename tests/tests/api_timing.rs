//! The real controller path (`reconcile_one`: expectations, promises, live reads, intent-first
//! status writes, the executor) against an API server with a real one's timing: caches that
//! lag its writes, watch events of different kinds delivered in a different order, conflicts
//! on a stale `resourceVersion`, refused creations (403 quota, 422), and two operator
//! replicas with the Lease changing hands in the middle of a reconcile.
//!
//! The API server is in memory behind a real `kube::Client`; each operator replica has its own
//! reflector stores, fed from the API's event log at its own, random pace. After every step
//! the invariants are checked on the API's truth:
//! - at most one live gang per replica index (pods of one incarnation),
//! - no replica's pods request more GPUs than its placement holds, and no more replica
//!   indices have pods than the spec has ever asked for,
//! - every pod name is created once, and each replica index gets one incarnation (no fault
//!   here is a member failure, so none may cause a recreation),
//! - the status is accepted by the CRD's schema.
//!
//! Figures: `cargo test -p tessera-tests --test api_timing -- --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use http::Method;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tessera_operator::api::schema::status_violations;
use tessera_operator::api::{ModelDeployment, parse_model_deployment};
use tessera_operator::build::labels;
use tessera_operator::controller::metrics::Metrics;
use tessera_operator::controller::reconcile::Config;
use tessera_operator::controller::run::{Context, reconcile_one};
use tessera_tests::Rng;
use tessera_tests::recording_api::client_from;

const NS: &str = "inference";

/// One write the API server made, for the watches.
#[derive(Clone)]
struct Change {
    kind: &'static str,
    deleted: bool,
    object: Value,
}

/// Faults the API server injects.
#[derive(Default)]
struct Faults {
    /// Percent of writes answered 409 regardless (a concurrent writer).
    conflict_percent: u64,
    /// Pod creations are refused with 403 (a quota is exhausted).
    quota_exhausted: bool,
    /// Pod creations of this replica index are refused with 422 (an admission webhook).
    reject_replica: Option<String>,
    /// After this many more writes every write fails (the process lost its Lease and stops).
    writes_left: Option<usize>,
}

#[derive(Default)]
struct ApiServer {
    objects: BTreeMap<(&'static str, String), Value>,
    resource_version: u64,
    log: Vec<Change>,
    faults: Faults,
    rng: u64,
    writes: usize,
    conflicts: usize,
    refused_creates: usize,
    /// Pod creations by name.
    created: BTreeMap<String, usize>,
    /// Incarnations created per (deployment, replica).
    incarnations: BTreeMap<(String, String), BTreeSet<String>>,
    events: Vec<String>,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code,
           "reason": reason, "message": message})
}

fn label_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v["metadata"]["labels"][key].as_str()
}

impl ApiServer {
    fn bump(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    fn put(&mut self, kind: &'static str, mut obj: Value) -> Value {
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = json!(rv);
        let name = obj["metadata"]["name"].as_str().expect("name").to_owned();
        self.objects.insert((kind, name), obj.clone());
        self.log.push(Change {
            kind,
            deleted: false,
            object: obj.clone(),
        });
        obj
    }

    fn remove(&mut self, kind: &'static str, name: &str) -> Option<Value> {
        let mut obj = self.objects.remove(&(kind, name.to_owned()))?;
        obj["metadata"]["resourceVersion"] = json!(self.bump());
        self.log.push(Change {
            kind,
            deleted: true,
            object: obj.clone(),
        });
        Some(obj)
    }

    fn chaos(&mut self, percent: u64) -> bool {
        let mut r = Rng(self.rng);
        let hit = r.chance(percent);
        self.rng = r.0;
        hit
    }

    fn handle(&mut self, method: &Method, path: &str, query: &str, body: &[u8]) -> (u16, Value) {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let ns_at = parts
            .iter()
            .position(|p| *p == "namespaces")
            .expect("namespaced");
        let resource = parts[ns_at + 2];
        let name = parts.get(ns_at + 3).map(|s| s.to_string());
        let sub = parts.get(ns_at + 4).copied();
        if resource == "events" {
            if let Ok(v) = serde_json::from_slice::<Value>(body) {
                self.events
                    .push(v["reason"].as_str().unwrap_or_default().to_owned());
                return (201, v);
            }
            return (200, json!({}));
        }
        let kind: &'static str = match resource {
            "pods" => "Pod",
            "services" => "Service",
            "serviceaccounts" => "ServiceAccount",
            "modeldeployments" => "ModelDeployment",
            "poddisruptionbudgets" => "PodDisruptionBudget",
            other => panic!("unexpected resource {other}"),
        };
        if *method != Method::GET {
            self.writes += 1;
            if let Some(left) = self.faults.writes_left.as_mut() {
                if *left == 0 {
                    return (503, status(503, "ServiceUnavailable", "connection lost"));
                }
                *left -= 1;
            }
            let percent = self.faults.conflict_percent;
            if self.chaos(percent) {
                self.conflicts += 1;
                return (409, status(409, "Conflict", "injected conflict"));
            }
        }
        match (method.clone(), name) {
            (Method::GET, None) => {
                // A list: pods by label selector.
                let selector: Vec<(String, String)> = query
                    .split('&')
                    .find_map(|q| q.strip_prefix("labelSelector="))
                    .map(|s| {
                        let s = s
                            .replace("%3D", "=")
                            .replace("%2C", ",")
                            .replace("%2F", "/");
                        s.split(',')
                            .filter_map(|kv| kv.split_once('='))
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|((k, _), _)| *k == kind)
                    .map(|(_, v)| v)
                    .filter(|v| {
                        selector
                            .iter()
                            .all(|(k, want)| label_of(v, k) == Some(want))
                    })
                    .cloned()
                    .collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": format!("{kind}List"),
                           "metadata": {"resourceVersion": self.resource_version.to_string()},
                           "items": items}),
                )
            }
            (Method::GET, Some(name)) => match self.objects.get(&(kind, name)) {
                Some(v) => (200, v.clone()),
                None => (404, status(404, "NotFound", "not found")),
            },
            (Method::DELETE, Some(name)) => match self.remove(kind, &name) {
                Some(_) => (
                    200,
                    json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
                ),
                None => (404, status(404, "NotFound", "not found")),
            },
            (Method::PATCH, Some(name)) => {
                let applied: Value = serde_json::from_slice(body).expect("apply body");
                let current = self.objects.get(&(kind, name.clone())).cloned();
                if sub == Some("status") {
                    let Some(mut obj) = current else {
                        return (404, status(404, "NotFound", "not found"));
                    };
                    if let Some(want) = applied["metadata"]["resourceVersion"].as_str()
                        && obj["metadata"]["resourceVersion"].as_str() != Some(want)
                    {
                        self.conflicts += 1;
                        return (409, status(409, "Conflict", "the object has been modified"));
                    }
                    obj["status"] = applied["status"].clone();
                    return (200, self.put(kind, obj));
                }
                match current {
                    // Applying what is there changes nothing (and writes nothing).
                    Some(obj) => (200, obj),
                    None => {
                        if kind == "Pod" {
                            let replica = label_of(&applied, labels::REPLICA).map(str::to_owned);
                            if self.faults.quota_exhausted {
                                self.refused_creates += 1;
                                return (
                                    403,
                                    status(
                                        403,
                                        "Forbidden",
                                        "exceeded quota: gpus, requested: nvidia.com/gpu=2",
                                    ),
                                );
                            }
                            if replica.is_some() && replica == self.faults.reject_replica {
                                self.refused_creates += 1;
                                return (
                                    422,
                                    status(422, "Invalid", "admission webhook denied the request"),
                                );
                            }
                            *self.created.entry(name.clone()).or_default() += 1;
                            self.incarnations
                                .entry((
                                    label_of(&applied, labels::DEPLOYMENT)
                                        .unwrap_or_default()
                                        .to_owned(),
                                    replica.unwrap_or_default(),
                                ))
                                .or_default()
                                .insert(
                                    label_of(&applied, labels::INCARNATION)
                                        .unwrap_or_default()
                                        .to_owned(),
                                );
                        }
                        let mut obj = applied;
                        obj["metadata"]["uid"] = json!(format!("uid-{kind}-{name}"));
                        obj["metadata"]["namespace"] = json!(NS);
                        if kind == "Pod" {
                            obj["status"] = json!({"phase": "Pending"});
                        }
                        (201, self.put(kind, obj))
                    }
                }
            }
            (m, n) => panic!("unexpected request {m} {path} ({n:?})"),
        }
    }
}

fn client(api: Arc<Mutex<ApiServer>>) -> kube::Client {
    client_from(move |method, path, query, body| {
        api.lock().expect("lock").handle(method, path, query, body)
    })
}

/// One operator process: its reflector stores (fed from the API's log at its own pace) and
/// its context (expectations, promises) around a client of the shared API server.
struct Operator {
    ctx: Arc<Context>,
    pods: Writer<Pod>,
    deployments: Writer<ModelDeployment>,
    nodes: Writer<Node>,
    services: Writer<Service>,
    /// How far into the API's log each kind's watch has delivered.
    seen: BTreeMap<&'static str, usize>,
}

impl Operator {
    fn start(api: &Arc<Mutex<ApiServer>>, clock: &Arc<AtomicI64>) -> Self {
        let client = client(api.clone());
        let (pod_store, pods) = reflector::store();
        let (md_store, deployments) = reflector::store();
        let (node_store, nodes) = reflector::store();
        let (svc_store, services) = reflector::store();
        let mut registry = Registry::default();
        let mut ctx = Context::new(
            client.clone(),
            Config {
                gang_timeout: std::time::Duration::from_secs(3600),
                ..Config::default()
            },
            node_store,
            pod_store,
            svc_store,
            reflector::store().0,
            None,
            md_store,
            Recorder::new(
                client,
                Reporter {
                    controller: "tessera-operator".into(),
                    instance: None,
                },
            ),
            Metrics::new(&mut registry),
        );
        let clock = clock.clone();
        ctx.clock = Arc::new(move || {
            Timestamp::UNIX_EPOCH
                .checked_add(SignedDuration::from_secs(clock.load(Ordering::Relaxed)))
                .expect("time")
        });
        let mut op = Operator {
            ctx: Arc::new(ctx),
            pods,
            deployments,
            nodes,
            services,
            seen: BTreeMap::new(),
        };
        // A process starts by listing everything: its caches begin complete.
        let end = api.lock().expect("lock").log.len();
        op.catch_up(api, ["Pod", "ModelDeployment", "Node", "Service"], |_| end);
        op
    }

    /// Deliver each kind's watch events up to `until(kind)`, in order within a kind.
    fn catch_up(
        &mut self,
        api: &Arc<Mutex<ApiServer>>,
        kinds: [&'static str; 4],
        until: impl Fn(&'static str) -> usize,
    ) {
        let log: Vec<Change> = api.lock().expect("lock").log.clone();
        for kind in kinds {
            let from = self.seen.get(kind).copied().unwrap_or(0);
            let to = until(kind).min(log.len()).max(from);
            for c in log[from..to].iter().filter(|c| c.kind == kind) {
                macro_rules! deliver {
                    ($w:expr, $t:ty) => {{
                        let obj: $t = serde_json::from_value(c.object.clone()).expect("decodes");
                        let ev = if c.deleted {
                            watcher::Event::Delete(obj)
                        } else {
                            watcher::Event::Apply(obj)
                        };
                        $w.apply_watcher_event(&ev);
                    }};
                }
                match kind {
                    "Pod" => deliver!(self.pods, Pod),
                    "ModelDeployment" => deliver!(self.deployments, ModelDeployment),
                    "Node" => deliver!(self.nodes, Node),
                    _ => deliver!(self.services, Service),
                }
            }
            self.seen.insert(kind, to);
        }
    }
}

fn node(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": format!("ip-{name}"),
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8",
            "nvidia.com/gpu.memory": "81559"}},
        "status": {"allocatable": {"nvidia.com/gpu": "8"},
                   "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

fn deployment(name: &str, replicas: i32, tp: u32) -> Value {
    let md = parse_model_deployment(&json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
        "spec": {
            "replicas": replicas,
            "model": {"uri": "pvc://models/llama-8b", "architecture": {
                "parameters": 8030261248i64, "layers": 32, "hiddenSize": 4096,
                "attentionHeads": 32, "kvHeads": 8, "intermediateSize": 14336,
                "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 2}},
            "parallelism": {"tensor": tp, "pipeline": 1},
            "serving": {"maxConcurrency": 16, "contextLength": 8192}
        }
    }))
    .expect("valid");
    serde_json::to_value(md).expect("json")
}

fn gpus(pod: &Value) -> u64 {
    pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

struct Sim {
    api: Arc<Mutex<ApiServer>>,
    clock: Arc<AtomicI64>,
    operators: [Operator; 2],
    leader: usize,
    rng: Rng,
    steps: usize,
    /// Most replicas each deployment has asked for.
    max_replicas: BTreeMap<String, i64>,
    handovers: usize,
    cut_reconciles: usize,
    /// Incarnations each (deployment, replica index) may have had: one, plus one for every
    /// scale-down that removed the index (scaling up again places it anew).
    allowed: BTreeMap<(String, String), usize>,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let api = Arc::new(Mutex::new(ApiServer {
            rng: seed ^ 0xA5A5,
            ..ApiServer::default()
        }));
        {
            let mut a = api.lock().expect("lock");
            for n in ["h100-0", "h100-1"] {
                a.put("Node", node(n));
            }
            a.put("ModelDeployment", deployment("alpha", 3, 2));
            a.put("ModelDeployment", deployment("beta", 2, 4));
        }
        let clock = Arc::new(AtomicI64::new(1_767_225_600));
        let operators = [Operator::start(&api, &clock), Operator::start(&api, &clock)];
        Sim {
            api,
            clock,
            operators,
            leader: 0,
            rng: Rng(seed),
            steps: 0,
            max_replicas: [("alpha".into(), 3), ("beta".into(), 2)].into(),
            handovers: 0,
            cut_reconciles: 0,
            allowed: BTreeMap::new(),
        }
    }

    /// Scheduler and kubelet: bind pinned pods whose node has the GPUs; Running one step
    /// after binding, Ready the step after.
    fn kubelet(&self) {
        let mut api = self.api.lock().expect("lock");
        let pods: Vec<Value> = api
            .objects
            .iter()
            .filter(|((k, _), _)| *k == "Pod")
            .map(|(_, v)| v.clone())
            .collect();
        let mut used: BTreeMap<String, u64> = BTreeMap::new();
        for p in &pods {
            if let Some(n) = p["spec"]["nodeName"].as_str() {
                *used.entry(n.to_owned()).or_default() += gpus(p);
            }
        }
        for mut p in pods {
            let phase = p["status"]["phase"].as_str().unwrap_or_default().to_owned();
            match (p["spec"]["nodeName"].as_str(), phase.as_str()) {
                (None, _) => {
                    let target = p["spec"]["affinity"]["nodeAffinity"]
                        ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
                        ["matchFields"][0]["values"][0]
                        .as_str()
                        .expect("pinned by node name")
                        .to_owned();
                    let need = gpus(&p);
                    if used.get(&target).copied().unwrap_or(0) + need <= 8 {
                        *used.entry(target.clone()).or_default() += need;
                        p["spec"]["nodeName"] = json!(target);
                        api.put("Pod", p);
                    }
                }
                (Some(_), "Pending") => {
                    p["status"] = json!({"phase": "Running",
                        "conditions": [{"type": "Ready", "status": "False"}]});
                    api.put("Pod", p);
                }
                (Some(_), "Running")
                    if p["status"]["conditions"][0]["status"].as_str() == Some("False") =>
                {
                    p["status"]["conditions"] = json!([{"type": "Ready", "status": "True",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]);
                    api.put("Pod", p);
                }
                _ => {}
            }
        }
    }

    /// One step: faults change, the caches advance at random paces, the leader reconciles
    /// every deployment (possibly cut off mid-way by a Lease handover), the cluster moves.
    async fn step(&mut self, faults: bool) {
        self.steps += 1;
        self.clock.fetch_add(5, Ordering::Relaxed);
        {
            let mut api = self.api.lock().expect("lock");
            api.faults.conflict_percent = if faults { 15 } else { 0 };
            if faults && self.rng.chance(15) {
                api.faults.quota_exhausted = !api.faults.quota_exhausted;
            }
            if !faults {
                api.faults.quota_exhausted = false;
            }
            api.faults.reject_replica =
                (faults && self.rng.chance(10)).then(|| self.rng.below(3).to_string());
            if faults && self.rng.chance(10) {
                // Scale alpha between 1 and 3 (the autoscaler or a user).
                let key = ("ModelDeployment", "alpha".to_owned());
                let mut md = api.objects[&key].clone();
                let replicas = 1 + self.rng.below(3) as i64;
                let before = md["spec"]["replicas"].as_i64().unwrap_or(0);
                for r in replicas..before {
                    *self
                        .allowed
                        .entry(("alpha".into(), r.to_string()))
                        .or_insert(1) += 1;
                }
                md["spec"]["replicas"] = json!(replicas);
                md["metadata"]["generation"] =
                    json!(md["metadata"]["generation"].as_i64().unwrap_or(1) + 1);
                api.put("ModelDeployment", md);
            }
        }
        // Watches: each kind of each operator advances to a random point of the log (never
        // back), so pods and deployments are seen out of order and behind the writes.
        let log: Vec<&'static str> = self
            .api
            .lock()
            .expect("lock")
            .log
            .iter()
            .map(|c| c.kind)
            .collect();
        for op in &mut self.operators {
            // Each kind's watch stops 0 to 3 of its own events short of the end.
            let lag: BTreeMap<&'static str, usize> = ["Pod", "ModelDeployment", "Node", "Service"]
                .into_iter()
                .map(|k| {
                    let behind = if faults {
                        self.rng.below(4) as usize
                    } else {
                        0
                    };
                    let mut to = log.len();
                    let mut skipped = 0;
                    while skipped < behind && to > 0 {
                        to -= 1;
                        if log[to] == k {
                            skipped += 1;
                        }
                    }
                    (k, to)
                })
                .collect();
            op.catch_up(
                &self.api,
                ["Pod", "ModelDeployment", "Node", "Service"],
                |k| lag[k],
            );
        }
        // A handover in the middle of a reconcile: the leader's writes stop after a few.
        let cut = faults && self.rng.chance(12);
        if cut {
            self.api.lock().expect("lock").faults.writes_left = Some(self.rng.below(4) as usize);
            self.cut_reconciles += 1;
        }
        let ctx = self.operators[self.leader].ctx.clone();
        let names: Vec<ModelDeployment> = ctx
            .deployments
            .state()
            .iter()
            .map(|d| (**d).clone())
            .collect();
        for md in names {
            let _ = reconcile_one(Arc::new(md), ctx.clone()).await;
        }
        if cut {
            self.api.lock().expect("lock").faults.writes_left = None;
            // The old leader exits; the standby (with its own, lagging caches and no memory of
            // what the old one did) leads; the old one restarts as a fresh standby.
            let old = self.leader;
            self.leader = 1 - old;
            self.operators[old] = Operator::start(&self.api, &self.clock);
            // The new leader's controller starts now, and its ModelDeployment watch with it
            // (run.rs runs the Controller only once the Lease is won): that cache begins with
            // a fresh list. Its pod and node caches were running all along and keep their lag.
            let end = self.api.lock().expect("lock").log.len();
            let (pods_seen, nodes_seen, svc_seen) = {
                let o = &self.operators[self.leader];
                (o.seen["Pod"], o.seen["Node"], o.seen["Service"])
            };
            self.operators[self.leader].catch_up(
                &self.api,
                ["Pod", "ModelDeployment", "Node", "Service"],
                |k| match k {
                    "Pod" => pods_seen,
                    "Node" => nodes_seen,
                    "Service" => svc_seen,
                    _ => end,
                },
            );
            self.handovers += 1;
        }
        self.kubelet();
        self.check();
    }

    fn check(&mut self) {
        let api = self.api.lock().expect("lock");
        let mds: Vec<ModelDeployment> = api
            .objects
            .iter()
            .filter(|((k, _), _)| *k == "ModelDeployment")
            .map(|(_, v)| serde_json::from_value(v.clone()).expect("md"))
            .collect();
        for md in &mds {
            let name = md.metadata.name.clone().expect("name");
            let max = self.max_replicas.entry(name.clone()).or_insert(0);
            *max = (*max).max(i64::from(md.spec.replicas));
            // TP x PP of each deployment (PP 1): what one replica's placement holds.
            let per_replica_gpus: u64 = if name == "alpha" { 2 } else { 4 };
            let mut by_replica: BTreeMap<String, (BTreeSet<String>, u64)> = BTreeMap::new();
            for p in api
                .objects
                .iter()
                .filter(|((k, _), v)| *k == "Pod" && label_of(v, labels::DEPLOYMENT) == Some(&name))
                .map(|(_, v)| v)
            {
                let e = by_replica
                    .entry(label_of(p, labels::REPLICA).unwrap_or_default().to_owned())
                    .or_default();
                e.0.insert(
                    label_of(p, labels::INCARNATION)
                        .unwrap_or_default()
                        .to_owned(),
                );
                e.1 += gpus(p);
            }
            for (r, (incs, g)) in &by_replica {
                assert!(
                    incs.len() <= 1,
                    "step {}: {name} replica {r} has live pods of incarnations {incs:?}",
                    self.steps
                );
                assert!(
                    *g <= per_replica_gpus,
                    "step {}: {name} replica {r} requests {g} GPUs, its placement holds {per_replica_gpus}",
                    self.steps
                );
            }
            assert!(
                by_replica.len() as i64 <= *max,
                "step {}: {name} has pods for {} replica indices, at most {max} were asked for",
                self.steps,
                by_replica.len()
            );
            if let Some(st) = &md.status {
                let v = status_violations(st);
                assert!(v.is_empty(), "step {}: {name}: {v:?}", self.steps);
            }
        }
        // No GPU promised twice: the pods pinned to a node (bound or not) fit its GPUs.
        let mut pinned: BTreeMap<String, u64> = BTreeMap::new();
        for p in api
            .objects
            .iter()
            .filter(|((k, _), _)| *k == "Pod")
            .map(|(_, v)| v)
        {
            let node = p["spec"]["affinity"]["nodeAffinity"]
                ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
                ["matchFields"][0]["values"][0]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            *pinned.entry(node).or_default() += gpus(p);
        }
        for (node, g) in &pinned {
            assert!(
                *g <= 8,
                "step {}: {g} GPUs promised on {node}, which has 8",
                self.steps
            );
        }
        for (pod, n) in &api.created {
            assert_eq!(*n, 1, "step {}: pod {pod} created {n} times", self.steps);
        }
        for ((d, r), incs) in &api.incarnations {
            let allowed = self
                .allowed
                .get(&(d.clone(), r.clone()))
                .copied()
                .unwrap_or(1);
            assert!(
                incs.len() <= allowed,
                "step {}: {d} replica {r} was created as incarnations {incs:?}, more than its {allowed} placements (no member failed)",
                self.steps
            );
        }
    }

    /// What the API holds, for failure messages.
    fn dump(&self) -> String {
        let api = self.api.lock().expect("lock");
        api.objects
            .iter()
            .filter(|((k, _), _)| *k != "Node" && *k != "Service" && *k != "ServiceAccount")
            .map(|((k, n), v)| {
                if *k == "Pod" {
                    format!(
                        "pod {n}: node {} phase {} rv {}",
                        v["spec"]["nodeName"],
                        v["status"]["phase"],
                        v["metadata"]["resourceVersion"]
                    )
                } else {
                    format!(
                        "{k} {n}: rv {} spec.replicas {} status {}",
                        v["metadata"]["resourceVersion"],
                        v["spec"]["replicas"],
                        serde_json::to_string_pretty(&v["status"]).unwrap_or_default()
                    )
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + &format!(
                "\nleader {} expectations {} promises {}",
                self.leader,
                self.operators[self.leader]
                    .ctx
                    .expectations
                    .lock()
                    .expect("lock")
                    .len(),
                self.operators[self.leader]
                    .ctx
                    .promises
                    .lock()
                    .expect("lock")
                    .len()
            )
    }

    fn settled(&self) -> bool {
        let api = self.api.lock().expect("lock");
        api.objects
            .iter()
            .filter(|((k, _), _)| *k == "ModelDeployment")
            .all(|(_, v)| {
                let md: ModelDeployment = serde_json::from_value(v.clone()).expect("md");
                md.status.as_ref().is_some_and(|s| {
                    s.ready_replicas == md.spec.replicas
                        && s.placements.len() as i32 == md.spec.replicas
                        && s.observed_generation == md.metadata.generation
                })
            })
    }
}

#[tokio::test]
async fn api_timing_faults_and_lease_handovers_hold_the_invariants() {
    let mut totals = (0usize, 0usize, 0usize, 0usize, 0usize, 0u64);
    for seed in 1..=12u64 {
        let mut sim = Sim::new(seed);
        for _ in 0..60 {
            sim.step(true).await;
        }
        // Faults stop: the fleet converges and then stays quiet.
        let mut calm = 0;
        while !sim.settled() {
            sim.step(false).await;
            calm += 1;
            assert!(
                calm <= 40,
                "seed {seed}: no convergence 40 steps after the faults stopped\n{}",
                sim.dump()
            );
        }
        let writes_before = sim.api.lock().expect("lock").writes;
        for _ in 0..5 {
            sim.step(false).await;
        }
        let api = sim.api.lock().expect("lock");
        assert_eq!(
            api.writes, writes_before,
            "seed {seed}: a converged fleet keeps writing"
        );
        let created: usize = api.created.values().sum();
        let stale: u64 = sim
            .operators
            .iter()
            .map(|o| o.ctx.metrics.stale_decisions.get())
            .sum();
        println!(
            "seed {seed:2}: {} writes, {} conflicts (409), {} refused creations, {} pods created, {} Lease handovers mid-reconcile, converged {calm} steps after the faults, {stale} decisions retaken from live reads, events FailedCreate={}",
            api.writes,
            api.conflicts,
            api.refused_creates,
            created,
            sim.handovers,
            api.events.iter().filter(|e| *e == "FailedCreate").count()
        );
        totals.0 += api.writes;
        totals.1 += api.conflicts;
        totals.2 += api.refused_creates;
        totals.3 += created;
        totals.4 += sim.handovers;
        totals.5 += stale;
        assert!(
            api.refused_creates == 0 || api.events.iter().any(|e| e == "FailedCreate"),
            "seed {seed}: refused creations without a FailedCreate Event"
        );
    }
    println!(
        "12 seeds: {} writes, {} conflicts, {} refused creations, {} pods created, {} handovers, {} decisions retaken from live reads; every invariant held after every step",
        totals.0, totals.1, totals.2, totals.3, totals.4, totals.5
    );
}
