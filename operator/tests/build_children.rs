//! The object builder: worker pods meet the restricted Pod Security Standard, carry the
//! worker's environment contract, request exactly their GPUs on their planned node, and every
//! child has one controller owner.

use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use tessera_operator::api::{
    ModelDeployment, Prediction, ReplicaPlacement, StagePlacement, parse_model_deployment,
};
use tessera_operator::build::{
    self, BuildOptions, ReplicaToBuild, desired_children, env, labels, leader_selector,
};

fn deployment(uri: &str) -> ModelDeployment {
    let mut md = parse_model_deployment(&json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "llama-405b", "namespace": "inference", "uid": "0c1d2e3f-0000-4000-8000-000000000001"},
        "spec": {
            "replicas": 1,
            "model": {
                "uri": uri,
                "architecture": {
                    "parameters": 405853388800i64, "layers": 126, "hiddenSize": 16384,
                    "attentionHeads": 128, "kvHeads": 8, "intermediateSize": 53248,
                    "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 2
                }
            },
            "serving": {"maxConcurrency": 16, "contextLength": 8192},
            "worker": {
                "env": [{"name": "HF_HOME", "value": "/tmp/hf"}],
                "resources": {"requests": {"cpu": "16", "memory": "256Gi"}}
            }
        }
    }))
    .expect("valid deployment");
    md.metadata.uid = Some("0c1d2e3f-0000-4000-8000-000000000001".into());
    md
}

fn placement() -> ReplicaPlacement {
    ReplicaPlacement {
        replica: 0,
        incarnation: None,
        gpu_type: "NVIDIA-H100-80GB-HBM3".into(),
        tensor_parallel: 8,
        pipeline_parallel: 2,
        stages: vec![
            StagePlacement {
                stage: 0,
                node: "h100-1".into(),
                gpus: 8,
            },
            StagePlacement {
                stage: 1,
                node: "h100-2".into(),
                gpus: 8,
            },
        ],
        predicted: Prediction::default(),
        ..ReplicaPlacement::default()
    }
}

fn pods(md: &ModelDeployment) -> Vec<Pod> {
    let p = placement();
    desired_children(
        md,
        &[ReplicaToBuild {
            placement: &p,
            incarnation: "k3x9a",
        }],
        &BuildOptions::default(),
    )
    .pods
}

fn env_of(pod: &Pod) -> std::collections::BTreeMap<String, String> {
    pod.spec.as_ref().expect("spec").containers[0]
        .env
        .as_ref()
        .expect("env")
        .iter()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect()
}

#[test]
fn one_pod_per_stage_with_the_contract_environment() {
    let md = deployment("pvc://models/llama-3.1-405b");
    let pods = pods(&md);
    assert_eq!(pods.len(), 2);
    let names: Vec<_> = pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["llama-405b-r0-k3x9a-s0", "llama-405b-r0-k3x9a-s1"]);
    for (stage, pod) in pods.iter().enumerate() {
        let e = env_of(pod);
        for var in env::REQUIRED {
            assert!(e.contains_key(*var), "{var} missing on stage {stage}");
        }
        assert_eq!(e[env::STAGE], stage.to_string());
        assert_eq!(e[env::RANK_OFFSET], (stage * 8).to_string());
        assert_eq!(e[env::WORLD_SIZE], "16");
        assert_eq!(e[env::INCARNATION], "k3x9a");
        assert_eq!(
            e[env::LEADER_ADDRESS],
            "llama-405b-r0-k3x9a-s0.llama-405b-workers.inference.svc:29500"
        );
        assert_eq!(e[env::MODEL_PATH], "/models/llama-3.1-405b");
        assert_eq!(e[env::CONTEXT_LENGTH], "8192");
        assert_eq!(e["HF_HOME"], "/tmp/hf", "user env is kept");
        let l = pod.metadata.labels.as_ref().expect("labels");
        assert_eq!(
            l[labels::ROLE],
            if stage == 0 { "leader" } else { "worker" }
        );
        assert_eq!(l[labels::DEPLOYMENT], "llama-405b");
        assert_eq!(l[labels::INCARNATION], "k3x9a");
    }
}

#[test]
fn pods_request_their_gpus_on_their_planned_node() {
    let md = deployment("pvc://models/llama-3.1-405b");
    for (pod, node) in pods(&md).iter().zip(["h100-1", "h100-2"]) {
        let spec = pod.spec.as_ref().expect("spec");
        let limits = spec.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .expect("limits");
        assert_eq!(limits["nvidia.com/gpu"].0, "8");
        let requests = spec.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .expect("requests");
        assert_eq!(requests["cpu"].0, "16");
        let term = &spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .expect("required node affinity")
            .node_selector_terms[0];
        // Pinned by the Node's name (matchFields), not the hostname label, which may differ.
        assert!(term.match_expressions.is_none());
        let req = &term.match_fields.as_ref().expect("fields")[0];
        assert_eq!(req.key, "metadata.name");
        assert_eq!(req.operator, "In");
        assert_eq!(req.values.as_deref(), Some(&[node.to_string()][..]));
        assert!(
            spec.node_name.is_none(),
            "the real scheduler still admits the pod"
        );
    }
}

#[test]
fn worker_pods_meet_the_restricted_pod_security_standard() {
    let md = deployment("https://models.example.com/llama-405b.gguf");
    for pod in pods(&md) {
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.service_account_name.as_deref(), Some("tessera-worker"));
        assert!(spec.host_network.is_none() && spec.host_pid.is_none() && spec.host_ipc.is_none());
        let psc = spec.security_context.expect("pod security context");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.map(|s| s.type_),
            Some("RuntimeDefault".to_string())
        );
        let init = spec.init_containers.iter().flatten();
        for c in spec.containers.iter().chain(init) {
            let sc = c
                .security_context
                .as_ref()
                .expect("container security context");
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(sc.privileged, None);
            assert_eq!(
                sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
                Some(vec!["ALL".to_string()])
            );
            assert!(
                sc.capabilities
                    .as_ref()
                    .and_then(|c| c.add.as_ref())
                    .is_none()
            );
        }
        let volumes = spec.volumes.expect("volumes");
        assert!(volumes.iter().all(|v| v.host_path.is_none()));
        let shm = volumes
            .iter()
            .find(|v| v.name == "dshm")
            .expect("/dev/shm volume");
        assert_eq!(
            shm.empty_dir.as_ref().and_then(|e| e.medium.as_deref()),
            Some("Memory")
        );
        // http(s) models are fetched into a size-limited emptyDir (810 GB x 1.1 = 831 GiB).
        let model = volumes
            .iter()
            .find(|v| v.name == "model")
            .expect("model volume");
        assert_eq!(
            model
                .empty_dir
                .as_ref()
                .and_then(|e| e.size_limit.as_ref())
                .map(|q| q.0.as_str()),
            Some("832Gi")
        );
    }
}

#[test]
fn every_child_has_one_controller_owner_and_short_names() {
    let md = deployment("pvc://models/llama-3.1-405b");
    let p = placement();
    let children = desired_children(
        &md,
        &[ReplicaToBuild {
            placement: &p,
            incarnation: "k3x9a",
        }],
        &BuildOptions::default(),
    );
    let metas = children
        .pods
        .iter()
        .map(|p| &p.metadata)
        .chain(children.services.iter().map(|s| &s.metadata));
    for m in metas {
        let owners = m.owner_references.as_ref().expect("owner references");
        let controllers: Vec<_> = owners
            .iter()
            .filter(|o| o.controller == Some(true))
            .collect();
        assert_eq!(controllers.len(), 1, "{:?}", m.name);
        assert_eq!(controllers[0].kind, "ModelDeployment");
        assert_eq!(controllers[0].name, "llama-405b");
        assert!(m.name.as_ref().expect("name").len() <= 63);
    }
    let names: Vec<_> = children
        .services
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["llama-405b-workers", "llama-405b"]);
    let headless = children.services[0].spec.as_ref().expect("spec");
    assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
    assert_eq!(headless.publish_not_ready_addresses, Some(true));
    let traffic = children.services[1].spec.as_ref().expect("spec");
    assert_eq!(
        traffic.selector.as_ref().expect("selector")[labels::ROLE],
        "leader"
    );
    assert_eq!(
        leader_selector("llama-405b"),
        "tessera.dev/deployment=llama-405b,tessera.dev/role=leader"
    );
}

#[test]
fn longest_names_stay_within_63_characters() {
    let name = "a".repeat(45);
    let pod = build::pod_name(&name, 511, "zzzzz", 63, 9);
    assert!(pod.len() <= 63, "{pod} has {}", pod.len());
    assert!(build::workers_service_name(&name).len() <= 63);
}

#[test]
fn incarnation_ids_are_short_dns_safe_and_vary() {
    let ids: std::collections::BTreeSet<String> = (0..1000).map(build::incarnation_id).collect();
    assert_eq!(ids.len(), 1000);
    assert!(ids.iter().all(|i| {
        i.len() == 5
            && i.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    }));
}

fn policy_options() -> build::NetworkPolicyOptions {
    build::NetworkPolicyOptions {
        api_namespace_selector: build::NetworkPolicyOptions::parse_selector("team=ml").unwrap(),
        monitoring_namespace: "monitoring".into(),
        operator_pod_labels: build::NetworkPolicyOptions::parse_selector(
            "app.kubernetes.io/name=tessera,app.kubernetes.io/component=operator",
        )
        .unwrap(),
    }
}

/// A pool replica also admits the deployment's other pool replicas (KV caches move between
/// them on ports the engine picks) and its router, on any port; nothing else is added.
#[test]
fn a_pool_replicas_network_policy_admits_the_other_pool_and_the_router() {
    let md = deployment("pvc://models/llama-405b");
    let plain = serde_json::to_value(build::replica_network_policy(
        &md,
        3,
        None,
        &policy_options(),
    ))
    .unwrap();
    let pooled = serde_json::to_value(build::replica_network_policy(
        &md,
        3,
        Some(build::PoolRole::Decode),
        &policy_options(),
    ))
    .unwrap();
    let rules = pooled["spec"]["ingress"].as_array().unwrap();
    assert_eq!(rules.len(), 3);
    assert_eq!(&rules[..2], plain["spec"]["ingress"].as_array().unwrap());
    assert!(rules[2].get("ports").is_none());
    assert_eq!(
        rules[2]["from"],
        json!([
            {"podSelector": {"matchLabels": {"tessera.dev/deployment": "llama-405b"},
                "matchExpressions": [{"key": "tessera.dev/pool", "operator": "Exists"}]}},
            {"podSelector": {"matchLabels": {"tessera.dev/router": "llama-405b"}}}
        ])
    );
}

/// A replica group's pods accept any port only from their own group, and the HTTP port from
/// the API namespaces, monitoring and the operator; nothing else.
#[test]
fn replica_network_policy_admits_only_its_group_and_the_http_clients() {
    let md = deployment("pvc://models/llama-405b");
    let p = build::replica_network_policy(&md, 3, None, &policy_options());
    assert_eq!(p.metadata.name.as_deref(), Some("llama-405b-r3"));
    assert_eq!(p.metadata.namespace.as_deref(), Some("inference"));
    assert_eq!(
        p.metadata.owner_references.as_ref().unwrap()[0].controller,
        Some(true)
    );
    let v = serde_json::to_value(&p).unwrap();
    let group = json!({"tessera.dev/deployment": "llama-405b", "tessera.dev/replica": "3"});
    assert_eq!(v["spec"]["podSelector"]["matchLabels"], group);
    assert_eq!(v["spec"]["policyTypes"], json!(["Ingress"]));
    let rules = v["spec"]["ingress"].as_array().unwrap();
    assert_eq!(rules.len(), 2);
    // Rule 1: every port, only from the same group (collectives, rendezvous, stage links).
    assert!(rules[0].get("ports").is_none());
    assert_eq!(
        rules[0]["from"],
        json!([{"podSelector": {"matchLabels": group}}])
    );
    // Rule 2: the HTTP port from the API namespaces, monitoring and the operator's pods.
    assert_eq!(
        rules[1]["ports"],
        json!([{"port": 8000, "protocol": "TCP"}])
    );
    let from = rules[1]["from"].as_array().unwrap();
    assert_eq!(
        from[0],
        json!({"namespaceSelector": {"matchLabels": {"team": "ml"}}})
    );
    assert_eq!(
        from[1],
        json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}})
    );
    assert_eq!(
        from[2]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "operator"
    );
    assert_eq!(from[2]["namespaceSelector"], json!({}));
    // Without an API namespace selector: only the deployment's own namespace.
    let mut own = policy_options();
    own.api_namespace_selector.clear();
    let v = serde_json::to_value(build::replica_network_policy(&md, 0, None, &own)).unwrap();
    assert_eq!(
        v["spec"]["ingress"][1]["from"][0],
        json!({"podSelector": {}})
    );
    // A bad selector names the flag and the part.
    let err = build::NetworkPolicyOptions::parse_selector("team").unwrap_err();
    assert!(
        err.contains("--api-namespace-selector") && err.contains("\"team\""),
        "{err}"
    );
}

#[test]
fn network_policy_changes_apply_what_differs_and_delete_the_rest() {
    let md = deployment("pvc://models/llama-405b");
    let o = policy_options();
    let want: Vec<_> = (0..2)
        .map(|r| build::replica_network_policy(&md, r, None, &o))
        .collect();
    // Nothing observed: both applied, with the hash annotation.
    let (apply, delete) = build::network_policy_changes(&want, &[]);
    assert_eq!(apply.len(), 2);
    assert!(delete.is_empty());
    assert!(
        apply[0]
            .metadata
            .annotations
            .as_ref()
            .unwrap()
            .contains_key(build::POLICY_HASH)
    );
    // Observed as applied: nothing to do.
    let (apply2, delete2) = build::network_policy_changes(&want, &apply);
    assert!(apply2.is_empty() && delete2.is_empty());
    // Scaled down to one replica: r1 deleted; a changed port re-applies r0.
    let mut md2 = md;
    md2.spec.serving.port = 9000;
    let want2 = vec![build::replica_network_policy(&md2, 0, None, &o)];
    let (apply3, delete3) = build::network_policy_changes(&want2, &apply);
    assert_eq!(apply3.len(), 1);
    assert_eq!(apply3[0].metadata.name.as_deref(), Some("llama-405b-r0"));
    assert_eq!(delete3, ["llama-405b-r1"]);
}

fn with_engine(name: &str, args: &[&str]) -> ModelDeployment {
    let mut md = deployment("pvc://models/llama-405b");
    md.spec.engine.name = match name {
        "vllm" => tessera_operator::api::EngineName::Vllm,
        "sglang" => tessera_operator::api::EngineName::Sglang,
        _ => tessera_operator::api::EngineName::Tessera,
    };
    md.spec.engine.args = args.iter().map(|a| a.to_string()).collect();
    md
}

fn container(pod: &Pod) -> &k8s_openapi::api::core::v1::Container {
    &pod.spec.as_ref().expect("spec").containers[0]
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn probe_path(p: &Option<k8s_openapi::api::core::v1::Probe>) -> Option<String> {
    p.as_ref()
        .and_then(|p| p.http_get.as_ref())
        .and_then(|h| h.path.clone())
}

#[test]
fn vllm_replicas_render_the_multi_node_launch_with_one_http_leader() {
    let md = with_engine("vllm", &["--gpu-memory-utilization=0.9"]);
    let pods = pods(&md);
    assert_eq!(pods.len(), 2);
    let master = "llama-405b-r0-k3x9a-s0.llama-405b-workers.inference.svc";
    for (rank, pod) in pods.iter().enumerate() {
        let c = container(pod);
        let args = c.args.clone().unwrap();
        assert_eq!(c.command.as_deref(), Some(&["vllm".to_owned()][..]));
        assert_eq!(c.image.as_deref(), Some(build::DEFAULT_VLLM_IMAGE));
        assert_eq!(args[0], "serve");
        assert_eq!(args[1], "/models/llama-405b");
        assert_eq!(flag(&args, "--tensor-parallel-size"), Some("8"));
        assert_eq!(flag(&args, "--pipeline-parallel-size"), Some("2"));
        assert_eq!(flag(&args, "--served-model-name"), Some("llama-405b"));
        assert_eq!(flag(&args, "--port"), Some("8000"));
        assert_eq!(flag(&args, "--max-num-seqs"), Some("16"));
        assert_eq!(flag(&args, "--max-model-len"), Some("8192"));
        assert_eq!(flag(&args, "--distributed-executor-backend"), Some("mp"));
        assert_eq!(flag(&args, "--nnodes"), Some("2"));
        assert_eq!(flag(&args, "--node-rank"), Some(rank.to_string().as_str()));
        assert_eq!(flag(&args, "--master-addr"), Some(master));
        assert_eq!(flag(&args, "--master-port"), Some("29500"));
        assert_eq!(args.contains(&"--headless".to_owned()), rank > 0);
        // The user's arguments come last, so they are never taken for an owned flag's value.
        assert_eq!(
            args.last().map(String::as_str),
            Some("--gpu-memory-utilization=0.9")
        );
        let vars = c.env.as_ref().unwrap();
        let host_ip = vars
            .iter()
            .find(|e| e.name == "VLLM_HOST_IP")
            .expect("VLLM_HOST_IP");
        assert_eq!(
            host_ip
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "status.podIP"
        );
        assert_eq!(env_of(pod).get("HOME").map(String::as_str), Some("/tmp"));
        let role = &pod.metadata.labels.as_ref().unwrap()[labels::ROLE];
        if rank == 0 {
            assert_eq!(role, labels::ROLE_LEADER);
            assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/health"));
            assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/health"));
            assert_eq!(probe_path(&c.startup_probe).as_deref(), Some("/health"));
        } else {
            // Headless ranks serve no HTTP: no probes, never behind the Service.
            assert_eq!(role, labels::ROLE_WORKER);
            assert!(c.readiness_probe.is_none() && c.liveness_probe.is_none());
            assert!(c.startup_probe.is_none());
        }
    }
}

#[test]
fn a_one_pod_vllm_replica_has_no_multi_node_flags() {
    let md = with_engine("vllm", &[]);
    let mut p = placement();
    p.pipeline_parallel = 1;
    p.stages.truncate(1);
    let pods = desired_children(
        &md,
        &[ReplicaToBuild {
            placement: &p,
            incarnation: "k3x9a",
        }],
        &BuildOptions::default(),
    )
    .pods;
    assert_eq!(pods.len(), 1);
    let args = container(&pods[0]).args.clone().unwrap();
    for f in [
        "--nnodes",
        "--node-rank",
        "--master-addr",
        "--headless",
        "--distributed-executor-backend",
    ] {
        assert!(!args.iter().any(|a| a == f), "{f} in {args:?}");
    }
    assert_eq!(flag(&args, "--pipeline-parallel-size"), Some("1"));
}

#[test]
fn sglang_replicas_render_nnodes_and_a_health_probe_on_every_rank() {
    let md = with_engine("sglang", &["--mem-fraction-static=0.85"]);
    let pods = pods(&md);
    for (rank, pod) in pods.iter().enumerate() {
        let c = container(pod);
        let args = c.args.clone().unwrap();
        assert_eq!(
            c.command.clone().unwrap(),
            ["python3", "-m", "sglang.launch_server"]
        );
        assert_eq!(c.image.as_deref(), Some(build::DEFAULT_SGLANG_IMAGE));
        assert_eq!(flag(&args, "--model-path"), Some("/models/llama-405b"));
        assert_eq!(flag(&args, "--tp-size"), Some("8"));
        assert_eq!(flag(&args, "--pp-size"), Some("2"));
        assert_eq!(flag(&args, "--nnodes"), Some("2"));
        assert_eq!(flag(&args, "--node-rank"), Some(rank.to_string().as_str()));
        assert_eq!(
            flag(&args, "--dist-init-addr"),
            Some("llama-405b-r0-k3x9a-s0.llama-405b-workers.inference.svc:29500")
        );
        assert_eq!(flag(&args, "--host"), Some("0.0.0.0"));
        assert!(args.contains(&"--enable-metrics".to_owned()));
        assert_eq!(
            args.last().map(String::as_str),
            Some("--mem-fraction-static=0.85")
        );
        assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/health"));
        assert!(!env_of(pod).contains_key("VLLM_HOST_IP"));
        let role = &pod.metadata.labels.as_ref().unwrap()[labels::ROLE];
        assert_eq!(role == labels::ROLE_LEADER, rank == 0);
    }
    // Only leaders are behind the traffic Service.
    let svc = build::services(&md);
    let traffic = svc
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("llama-405b"))
        .unwrap();
    assert_eq!(
        traffic.spec.as_ref().unwrap().selector.as_ref().unwrap()[labels::ROLE],
        labels::ROLE_LEADER
    );
}

#[test]
fn engine_image_wins_over_worker_image_and_the_default() {
    let mut md = with_engine("vllm", &[]);
    md.spec.worker.image = Some("registry.local/my-vllm:1".into());
    assert_eq!(
        container(&pods(&md)[0]).image.as_deref(),
        Some("registry.local/my-vllm:1")
    );
    md.spec.engine.image = Some("vllm-custom:2".into());
    assert_eq!(
        container(&pods(&md)[0]).image.as_deref(),
        Some("vllm-custom:2")
    );
    // The tessera engine keeps its command line.
    let md = with_engine("tessera", &[]);
    let c = container(&pods(&md)[0]).clone();
    assert!(c.command.is_none());
    assert_eq!(c.args.unwrap(), ["serve"]);
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/readyz"));
}

#[test]
fn the_template_hash_of_existing_tessera_deployments_does_not_change() {
    use tessera_operator::controller::reconcile::template_hash;
    let md = deployment("pvc://models/llama-405b");
    let mut explicit = md.clone();
    explicit.spec.engine.name = tessera_operator::api::EngineName::Tessera;
    assert_eq!(template_hash(&md, "img"), template_hash(&explicit, "img"));
    // A value computed before spec.engine existed (same spec, same image). Objects stored by
    // the API server carry every default the CRD had when they were written, so the scope is
    // the old default, NVLinkDomain, not today's Auto.
    let mut stored = md.clone();
    stored.spec.placement.tensor_parallel_scope =
        tessera_operator::api::TensorParallelScope::NvLinkDomain;
    assert_eq!(template_hash(&stored, "img"), PRE_ENGINE_HASH);
    let vllm = with_engine("vllm", &[]);
    assert_ne!(template_hash(&vllm, "img"), template_hash(&md, "img"));
    // What steers the planner or the router only does not roll placed replicas: the request
    // shape, the SLO, disaggregation and the router's image.
    let mut steered = vllm.clone();
    steered.spec.serving.workload = Some(tessera_operator::api::WorkloadShape {
        input_tokens: 4096,
        output_tokens: 256,
    });
    steered.spec.serving.slo = Some(tessera_operator::api::ServingSlo {
        time_to_first_token_seconds: Some(1.0),
        inter_token_latency_seconds: None,
    });
    steered.spec.serving.disaggregation = tessera_operator::api::Disaggregation::Auto;
    steered.spec.engine.router_image = Some("router:1".into());
    assert_eq!(template_hash(&steered, "img"), template_hash(&vllm, "img"));
    // The KV-cache type does.
    steered.spec.serving.kv_cache_dtype = tessera_operator::api::KvCacheDtype::Fp8;
    assert_ne!(template_hash(&steered, "img"), template_hash(&vllm, "img"));
}

/// `template_hash` of `deployment("pvc://models/llama-405b")` with image "img", computed by the
/// operator before `spec.engine` existed: an upgrade must not roll running replicas.
const PRE_ENGINE_HASH: &str = "afd2025f4d";

#[test]
fn an_fp8_kv_cache_reaches_the_engines_command_lines() {
    for (engine, value) in [("vllm", "fp8"), ("sglang", "fp8_e4m3")] {
        let mut md = with_engine(engine, &[]);
        let args = container(&pods(&md)[0]).args.clone().unwrap_or_default();
        assert!(!args.iter().any(|a| a == "--kv-cache-dtype"), "{args:?}");
        md.spec.serving.kv_cache_dtype = tessera_operator::api::KvCacheDtype::Fp8;
        for pod in pods(&md) {
            let args = container(&pod).args.clone().unwrap_or_default();
            let at = args
                .iter()
                .position(|a| a == "--kv-cache-dtype")
                .unwrap_or_else(|| panic!("{engine}: {args:?}"));
            assert_eq!(args[at + 1], value, "{engine}");
        }
    }
}

/// vLLM and SGLang cannot download a model: an http(s) URI gets the `tessera-worker fetch` init
/// container (the operator's worker image, the model volume, the checksum), and the engine
/// reads what it fetched. The Tessera engine downloads a single file itself (no init container,
/// pods unchanged) but takes the init container for a model directory.
#[test]
fn an_http_model_is_fetched_by_an_init_container_for_the_engines_that_cannot_download() {
    let opts = BuildOptions {
        default_worker_image: "tessera-worker:test".into(),
        ..BuildOptions::default()
    };
    let build = |md: &ModelDeployment| {
        let p = placement();
        desired_children(
            md,
            &[ReplicaToBuild {
                placement: &p,
                incarnation: "k3x9a",
            }],
            &opts,
        )
        .pods
    };
    let sha = "ab".repeat(32);
    for (engine, uri, sha256, path) in [
        (
            "vllm",
            "https://models.example/llama.gguf?sig=1",
            true,
            "/model-cache/llama.gguf",
        ),
        (
            "sglang",
            "https://models.example/org/llama/resolve/0123/",
            false,
            "/model-cache/model",
        ),
        (
            "tessera",
            "https://models.example/org/llama/resolve/0123/",
            false,
            "/model-cache/model",
        ),
    ] {
        let mut md = with_engine(engine, &[]);
        md.spec.model.uri = uri.into();
        md.spec.model.sha256 = sha256.then(|| sha.clone());
        if engine != "tessera" {
            md.spec.engine.image = Some(format!("{engine}-custom:1"));
        }
        for pod in build(&md) {
            let spec = pod.spec.as_ref().expect("spec");
            let init = spec.init_containers.as_ref().expect("init containers");
            assert_eq!(init.len(), 1, "{engine}");
            let fetch = &init[0];
            assert_eq!(fetch.name, "fetch-model");
            // The worker image even where the pod runs another (engine.image is vLLM's).
            assert_eq!(
                fetch.image.as_deref(),
                Some("tessera-worker:test"),
                "{engine}"
            );
            let args = fetch.args.clone().unwrap_or_default();
            assert_eq!(args[0], "fetch");
            assert_eq!(flag(&args, "--uri"), Some(uri));
            assert_eq!(flag(&args, "--dest"), Some(path));
            assert_eq!(flag(&args, "--sha256"), sha256.then_some(sha.as_str()));
            let mounts = fetch.volume_mounts.as_ref().expect("mounts");
            assert_eq!(mounts.len(), 1);
            assert_eq!(
                (mounts[0].name.as_str(), mounts[0].mount_path.as_str()),
                ("model", "/model-cache")
            );
            assert_ne!(mounts[0].read_only, Some(true));
            // The engine starts on the fetched path.
            let c = container(&pod);
            match engine {
                "vllm" => assert_eq!(c.args.as_ref().unwrap()[1], path),
                "sglang" => assert_eq!(flag(c.args.as_ref().unwrap(), "--model-path"), Some(path)),
                _ => assert_eq!(env_of(&pod)["TESSERA_MODEL_PATH"], path),
            }
            assert!(
                c.volume_mounts
                    .as_ref()
                    .unwrap()
                    .iter()
                    .any(|m| m.mount_path == "/model-cache")
            );
        }
    }
    // The Tessera engine with a single file downloads it itself: no init container.
    let md = deployment("https://models.example.com/llama-405b.gguf");
    for pod in build(&md) {
        assert!(pod.spec.as_ref().unwrap().init_containers.is_none());
        assert_eq!(
            env_of(&pod)["TESSERA_MODEL_PATH"],
            "/model-cache/llama-405b.gguf"
        );
    }
    // A volume model needs no fetch.
    for pod in build(&with_engine("vllm", &[])) {
        assert!(pod.spec.as_ref().unwrap().init_containers.is_none());
    }
}

/// With the operator's key, every pod of one incarnation carries the same group secret (so its
/// ranks can prove membership to each other), another incarnation or deployment gets another,
/// the same incarnation built again gets the same (a pod recreated on a later pass still
/// matches its peers), and neither the key nor the options' debug output shows it.
#[test]
fn each_incarnation_gets_its_own_group_secret_from_the_operators_key() {
    let key = build::GroupKey(b"0123456789abcdef0123456789abcdef".to_vec());
    let opts = BuildOptions {
        group_key: Some(key),
        ..BuildOptions::default()
    };
    let build = |md: &ModelDeployment, incarnation: &str| {
        let p = placement();
        desired_children(
            md,
            &[ReplicaToBuild {
                placement: &p,
                incarnation,
            }],
            &opts,
        )
        .pods
    };
    let secret_of = |pod: &Pod| env_of(pod).get("TESSERA_GROUP_SECRET").cloned();
    let md = deployment("pvc://models/llama-405b");
    let a = build(&md, "k3x9a");
    assert_eq!(a.len(), 2);
    let s0 = secret_of(&a[0]).expect("a secret");
    assert_eq!(s0.len(), 64);
    assert_eq!(secret_of(&a[1]).as_deref(), Some(s0.as_str()));
    assert_eq!(
        secret_of(&build(&md, "k3x9a")[0]).as_deref(),
        Some(s0.as_str())
    );
    assert_ne!(
        secret_of(&build(&md, "k3x9b")[0]).as_deref(),
        Some(s0.as_str())
    );
    let mut other = md.clone();
    other.metadata.uid = Some("0c1d2e3f-0000-4000-8000-000000000002".into());
    assert_ne!(
        secret_of(&build(&other, "k3x9a")[0]).as_deref(),
        Some(s0.as_str())
    );
    assert!(!format!("{opts:?}").contains("0123456789abcdef"));
    // vLLM and SGLang have no Tessera rank group; without a key there is no secret.
    assert!(
        build(&with_engine("vllm", &[]), "k3x9a")
            .iter()
            .all(|p| secret_of(p).is_none())
    );
    assert!(pods(&md).iter().all(|p| secret_of(p).is_none()));
}

/// DeepSeek-V3's shape (671B, 256 experts, MLA) served by `engine`.
fn deepseek(engine: &str, args: &[&str]) -> ModelDeployment {
    let mut md = parse_model_deployment(&deepseek_object(engine, args)).expect("valid deployment");
    md.metadata.uid = Some("0c1d2e3f-0000-4000-8000-000000000002".into());
    md
}

fn deepseek_object(engine: &str, args: &[&str]) -> serde_json::Value {
    json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "deepseek-v3", "namespace": "inference", "uid": "0c1d2e3f-0000-4000-8000-000000000002"},
        "spec": {
            "replicas": 1,
            "model": {
                "uri": "pvc://models/deepseek-v3",
                "architecture": {
                    "parameters": 671026419200i64, "layers": 61, "hiddenSize": 7168,
                    "attentionHeads": 128, "kvHeads": 128, "intermediateSize": 18432,
                    "vocabSize": 129280, "contextLength": 163840, "bytesPerParameter": 1,
                    "experts": 256, "expertsPerToken": 8, "sharedExperts": 1,
                    "expertIntermediateSize": 2048, "denseLayers": 3, "kvLoraRank": 512,
                    "qkRopeHeadDim": 64
                }
            },
            "parallelism": {"expert": "auto"},
            "serving": {"maxConcurrency": 256, "contextLength": 8192, "kvCacheDtype": "fp8"},
            "engine": {"name": engine, "args": args}
        }
    })
}

/// A placement of `tp` GPUs per stage (expert-parallel over them when `ep`), one entry per
/// (stage, node, GPUs).
fn moe_placement(
    tp: i32,
    pp: i32,
    ep: bool,
    data_attention: bool,
    stages: &[(i32, &str, i32)],
) -> ReplicaPlacement {
    ReplicaPlacement {
        replica: 0,
        incarnation: None,
        gpu_type: "NVIDIA-H800".into(),
        tensor_parallel: tp,
        pipeline_parallel: pp,
        expert_parallel: ep.then_some(tp),
        data_parallel_attention: data_attention,
        stages: stages
            .iter()
            .map(|&(stage, node, gpus)| StagePlacement {
                stage,
                node: node.into(),
                gpus,
            })
            .collect(),
        predicted: Prediction::default(),
        ..ReplicaPlacement::default()
    }
}

/// EP=16 with data-parallel attention: one stage over two H800 nodes, 8 GPUs each.
fn ep16_data_attention() -> ReplicaPlacement {
    moe_placement(16, 1, true, true, &[(0, "h800-1", 8), (0, "h800-2", 8)])
}

/// TP=8 EP=8 (tensor-parallel attention) on one node.
fn ep8_one_node() -> ReplicaPlacement {
    moe_placement(8, 1, true, false, &[(0, "h800-1", 8)])
}

fn moe_pods(md: &ModelDeployment, p: &ReplicaPlacement) -> Vec<Pod> {
    desired_children(
        md,
        &[ReplicaToBuild {
            placement: p,
            incarnation: "k3x9a",
        }],
        &BuildOptions::default(),
    )
    .pods
}

fn args_of(pod: &Pod) -> Vec<String> {
    container(pod).args.clone().unwrap_or_default()
}

/// `a b c` as owned words.
fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

const DEEPSEEK_LEADER: &str = "deepseek-v3-r0-k3x9a-s0.deepseek-v3-workers.inference.svc";

#[test]
fn vllm_expert_parallel_with_data_parallel_attention_renders_the_data_parallel_launch() {
    let md = deepseek("vllm", &["--gpu-memory-utilization=0.9"]);
    let pods = moe_pods(&md, &ep16_data_attention());
    assert_eq!(pods.len(), 2);
    let names: Vec<_> = pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        ["deepseek-v3-r0-k3x9a-s0", "deepseek-v3-r0-k3x9a-s0p1"]
    );
    // 16 single-GPU engines, 8 on each pod; --max-num-seqs is per engine (256 / 16).
    let common = "serve /models/deepseek-v3 --served-model-name deepseek-v3 \
         --tensor-parallel-size 1 --pipeline-parallel-size 1 --data-parallel-size 16 \
         --enable-expert-parallel --host 0.0.0.0 --port 8000 --max-num-seqs 16 \
         --max-model-len 8192 --kv-cache-dtype fp8 --data-parallel-size-local 8";
    assert_eq!(
        args_of(&pods[0]),
        words(&format!(
            "{common} --data-parallel-address {DEEPSEEK_LEADER} --data-parallel-rpc-port 29500 \
             --gpu-memory-utilization=0.9"
        ))
    );
    assert_eq!(
        args_of(&pods[1]),
        words(&format!(
            "{common} --data-parallel-address {DEEPSEEK_LEADER} --data-parallel-rpc-port 29500 \
             --data-parallel-start-rank 8 --headless --gpu-memory-utilization=0.9"
        ))
    );
    // The first pod serves HTTP (the API server and the engines' coordinator) and is the
    // leader behind the Service; the headless one has no probes.
    let c0 = container(&pods[0]);
    assert_eq!(probe_path(&c0.readiness_probe).as_deref(), Some("/health"));
    assert_eq!(probe_path(&c0.startup_probe).as_deref(), Some("/health"));
    let c1 = container(&pods[1]);
    assert!(c1.readiness_probe.is_none() && c1.liveness_probe.is_none());
    assert!(c1.startup_probe.is_none());
    let roles: Vec<_> = pods
        .iter()
        .map(|p| p.metadata.labels.as_ref().unwrap()[labels::ROLE].clone())
        .collect();
    assert_eq!(roles, [labels::ROLE_LEADER, labels::ROLE_WORKER]);
    // The worker contract is unchanged: both pods are stage 0, ranks 0-7 and 8-15.
    let offsets: Vec<_> = pods
        .iter()
        .map(|p| env_of(p)[env::RANK_OFFSET].clone())
        .collect();
    assert_eq!(offsets, ["0", "8"]);
    for pod in &pods {
        assert_eq!(env_of(pod)[env::STAGE], "0");
        assert_eq!(env_of(pod)[env::WORLD_SIZE], "16");
    }
}

#[test]
fn sglang_expert_parallel_with_data_parallel_attention_over_two_nodes_uses_deepep() {
    let md = deepseek("sglang", &["--mem-fraction-static=0.85"]);
    let pods = moe_pods(&md, &ep16_data_attention());
    assert_eq!(pods.len(), 2);
    for (rank, pod) in pods.iter().enumerate() {
        assert_eq!(
            args_of(pod),
            words(&format!(
                "--model-path /models/deepseek-v3 --served-model-name deepseek-v3 \
                 --tp-size 16 --pp-size 1 --ep-size 16 --attn-dp-size 16 \
                 --moe-a2a-backend deepep --host 0.0.0.0 --port 8000 --enable-metrics \
                 --max-running-requests 256 --context-length 8192 --kv-cache-dtype fp8_e4m3 \
                 --nnodes 2 --node-rank {rank} --dist-init-addr {DEEPSEEK_LEADER}:29500 \
                 --mem-fraction-static=0.85"
            )),
            "pod {rank}"
        );
        // SGLang as before: /health on every rank, the leader alone behind the Service.
        assert_eq!(
            probe_path(&container(pod).readiness_probe).as_deref(),
            Some("/health")
        );
    }
}

#[test]
fn tensor_attention_expert_parallel_on_one_node_adds_the_expert_flags_only() {
    let vllm = moe_pods(&deepseek("vllm", &[]), &ep8_one_node());
    assert_eq!(vllm.len(), 1);
    assert_eq!(
        args_of(&vllm[0]),
        words(
            "serve /models/deepseek-v3 --served-model-name deepseek-v3 \
             --tensor-parallel-size 8 --pipeline-parallel-size 1 --enable-expert-parallel \
             --host 0.0.0.0 --port 8000 --max-num-seqs 256 --max-model-len 8192 \
             --kv-cache-dtype fp8"
        )
    );
    // One node: SGLang's own expert-parallel path (no DeepEP flag; engine.args may add it).
    let sglang = moe_pods(&deepseek("sglang", &[]), &ep8_one_node());
    assert_eq!(sglang.len(), 1);
    assert_eq!(
        args_of(&sglang[0]),
        words(
            "--model-path /models/deepseek-v3 --served-model-name deepseek-v3 \
             --tp-size 8 --pp-size 1 --ep-size 8 --host 0.0.0.0 --port 8000 --enable-metrics \
             --max-running-requests 256 --context-length 8192 --kv-cache-dtype fp8_e4m3"
        )
    );
    // EP=8 data-parallel attention on one node: no multi-pod flags at all.
    let dp8 = moe_placement(8, 1, true, true, &[(0, "h800-1", 8)]);
    assert_eq!(
        args_of(&moe_pods(&deepseek("vllm", &[]), &dp8)[0]),
        words(
            "serve /models/deepseek-v3 --served-model-name deepseek-v3 \
             --tensor-parallel-size 1 --pipeline-parallel-size 1 --data-parallel-size 8 \
             --enable-expert-parallel --host 0.0.0.0 --port 8000 --max-num-seqs 32 \
             --max-model-len 8192 --kv-cache-dtype fp8"
        )
    );
    assert_eq!(
        flag(
            &args_of(&moe_pods(&deepseek("sglang", &[]), &dp8)[0]),
            "--attn-dp-size"
        ),
        Some("8")
    );
}

/// Each pipeline stage's expert-parallel group on its own node: the existing multi-node launch
/// plus the expert flags; no DeepEP, since no group leaves its node.
#[test]
fn expert_parallel_stages_on_their_own_nodes_keep_the_multi_node_launch() {
    let p = moe_placement(8, 2, true, false, &[(0, "h800-1", 8), (1, "h800-2", 8)]);
    let pods = moe_pods(&deepseek("vllm", &[]), &p);
    for (rank, pod) in pods.iter().enumerate() {
        let headless = if rank > 0 { " --headless" } else { "" };
        assert_eq!(
            args_of(pod),
            words(&format!(
                "serve /models/deepseek-v3 --served-model-name deepseek-v3 \
                 --tensor-parallel-size 8 --pipeline-parallel-size 2 --enable-expert-parallel \
                 --host 0.0.0.0 --port 8000 --max-num-seqs 256 --max-model-len 8192 \
                 --kv-cache-dtype fp8 --distributed-executor-backend mp --nnodes 2 \
                 --node-rank {rank} --master-addr {DEEPSEEK_LEADER} --master-port 29500{headless}"
            ))
        );
    }
    for pod in moe_pods(&deepseek("sglang", &[]), &p) {
        let args = args_of(&pod);
        assert_eq!(flag(&args, "--ep-size"), Some("8"));
        assert_eq!(flag(&args, "--pp-size"), Some("2"));
        assert!(
            !args
                .iter()
                .any(|a| a == "--moe-a2a-backend" || a == "--attn-dp-size")
        );
    }
}

/// vLLM's data-parallel engines each hold a whole pipeline on one node, so data-parallel
/// attention cannot keep each stage's group on that stage's nodes: with PP > 1 vLLM gets the
/// same expert-parallel groups with tensor-parallel attention (docs/engines.md). SGLang runs
/// the placement as planned.
#[test]
fn vllm_data_parallel_attention_with_pipeline_stages_falls_back_to_tensor_attention() {
    let p = moe_placement(8, 2, true, true, &[(0, "h800-1", 8), (1, "h800-2", 8)]);
    for (rank, pod) in moe_pods(&deepseek("vllm", &[]), &p).iter().enumerate() {
        let args = args_of(pod);
        assert_eq!(flag(&args, "--tensor-parallel-size"), Some("8"));
        assert_eq!(flag(&args, "--pipeline-parallel-size"), Some("2"));
        assert!(args.iter().any(|a| a == "--enable-expert-parallel"));
        assert!(
            !args.iter().any(|a| a.starts_with("--data-parallel")),
            "{args:?}"
        );
        assert_eq!(flag(&args, "--node-rank"), Some(rank.to_string().as_str()));
        assert_eq!(flag(&args, "--max-num-seqs"), Some("256"));
    }
    for pod in moe_pods(&deepseek("sglang", &[]), &p) {
        let args = args_of(&pod);
        assert_eq!(flag(&args, "--attn-dp-size"), Some("8"));
        assert_eq!(flag(&args, "--ep-size"), Some("8"));
    }
}

/// Every flag the operator renders, in every layout, is one `engine.args` may not set (the CEL
/// rule is generated from these lists), except `--moe-a2a-backend`, a default the user may
/// override (the last occurrence wins).
#[test]
fn every_flag_the_operator_renders_is_owned() {
    use tessera_operator::api::rules::{SGLANG_OWNED_FLAGS, VLLM_OWNED_FLAGS};
    let placements = [
        placement(),
        ep16_data_attention(),
        ep8_one_node(),
        moe_placement(8, 2, true, false, &[(0, "h800-1", 8), (1, "h800-2", 8)]),
        moe_placement(8, 2, true, true, &[(0, "h800-1", 8), (1, "h800-2", 8)]),
    ];
    for (engine, owned) in [("vllm", VLLM_OWNED_FLAGS), ("sglang", SGLANG_OWNED_FLAGS)] {
        for p in &placements {
            for pod in moe_pods(&deepseek(engine, &[]), p) {
                for a in args_of(&pod).iter().filter(|a| a.starts_with('-')) {
                    let name = a.trim_start_matches('-');
                    let ok =
                        owned.contains(&name) || (engine == "sglang" && name == "moe-a2a-backend");
                    assert!(ok, "{engine}: {a} is rendered but not owned");
                }
            }
        }
    }
}

/// `engine.args` may not set the expert-parallel and data-parallel flags (the validation names
/// them), but may replace SGLang's all-to-all backend: appended last, its value wins.
#[test]
fn moe_flags_are_refused_in_engine_args_but_the_all_to_all_backend_may_be_overridden() {
    for (engine, arg) in [
        ("vllm", "--enable-expert-parallel"),
        ("vllm", "--no-enable-expert-parallel"),
        ("vllm", "-ep"),
        ("vllm", "--data-parallel-size=4"),
        ("vllm", "-dpl"),
        ("vllm", "--data_parallel_start_rank"),
        ("vllm", "--data-parallel-address"),
        ("vllm", "--data-parallel-rpc-port=1"),
        ("vllm", "--data-parallel-hybrid-lb"),
        ("vllm", "--data-parallel-rank"),
        ("sglang", "--ep-size=8"),
        ("sglang", "--ep"),
        ("sglang", "--expert-parallel-size"),
        ("sglang", "--attn-dp-size"),
        ("sglang", "--dp-size=2"),
        ("sglang", "--enable-dp-attention"),
    ] {
        let err = parse_model_deployment(&deepseek_object(engine, &[arg]))
            .expect_err(&format!("{engine} {arg} refused"));
        assert!(
            err.errors.iter().any(|e| e.field == "spec.engine.args"
                && e.message.starts_with(arg)
                && e.message
                    .contains(&format!("set by the operator for {engine}"))),
            "{engine} {arg}: {err:?}"
        );
    }
    let md = deepseek("sglang", &["--moe-a2a-backend=none"]);
    for pod in moe_pods(&md, &ep16_data_attention()) {
        let args = args_of(&pod);
        assert_eq!(flag(&args, "--moe-a2a-backend"), Some("deepep"));
        assert_eq!(
            args.last().map(String::as_str),
            Some("--moe-a2a-backend=none")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Prefill/decode disaggregation: each pool's pods carry their role's engine flags and the
// `tessera.dev/pool` label, a router in front lists every replica's leader, and the
// deployment's traffic Service points at the router.

use tessera_operator::build::{PoolReplicaToBuild, PoolRole};

/// Llama 3.3 70B FP8 with long prompts and `disaggregation: Auto` on `engine`.
fn pd_deployment(engine: &str, engine_extra: serde_json::Value) -> ModelDeployment {
    let mut engine_spec = json!({"name": engine});
    if let (Some(e), Some(extra)) = (engine_spec.as_object_mut(), engine_extra.as_object()) {
        e.extend(extra.clone());
    }
    // The tessera engine has no FP8 KV cache.
    let kv = if engine == "tessera" { "bf16" } else { "fp8" };
    parse_model_deployment(&json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "llama-pd", "namespace": "inference"},
        "spec": {
            "model": {
                "uri": "pvc://models/llama-3.3-70b-instruct-fp8",
                "architecture": {
                    "parameters": 70553706496i64, "layers": 80, "hiddenSize": 8192,
                    "attentionHeads": 64, "kvHeads": 8, "intermediateSize": 28672,
                    "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 1
                }
            },
            "gpu": {"types": ["H800", "H20"]},
            "engine": engine_spec,
            "serving": {
                "maxConcurrency": 32, "contextLength": 16384, "kvCacheDtype": kv,
                "workload": {"inputTokens": 8192, "outputTokens": 256},
                "slo": {"timeToFirstTokenSeconds": 2.0, "interTokenLatencySeconds": 0.05},
                "disaggregation": "Auto"
            }
        }
    }))
    .expect("valid deployment")
}

/// Replica `replica` with TP=4 on four GPUs of `node`.
fn tp4(replica: i32, node: &str) -> ReplicaPlacement {
    ReplicaPlacement {
        replica,
        gpu_type: "NVIDIA-H800".into(),
        tensor_parallel: 4,
        pipeline_parallel: 1,
        stages: vec![StagePlacement {
            stage: 0,
            node: node.into(),
            gpus: 4,
        }],
        ..ReplicaPlacement::default()
    }
}

/// A Service's name, selector and ports.
type ServiceSummary = (String, Vec<(String, String)>, Vec<i32>);

/// Incarnation ids of the replicas in these tests.
const INCARNATIONS: [&str; 3] = ["aaaaa", "bbbbb", "ccccc"];

/// The pool replicas to build of `placements`, each with its incarnation of [`INCARNATIONS`].
fn pool_to_build(placements: &[(PoolRole, ReplicaPlacement)]) -> Vec<PoolReplicaToBuild<'_>> {
    placements
        .iter()
        .map(|(role, p)| PoolReplicaToBuild {
            role: *role,
            replica: ReplicaToBuild {
                placement: p,
                incarnation: INCARNATIONS[p.replica as usize],
            },
            max_concurrency: None,
        })
        .collect()
}

/// Two prefill replicas (0, 1) and one decode replica (2), in the order `placements` gives.
fn pool_children(
    md: &ModelDeployment,
    placements: &[(PoolRole, ReplicaPlacement)],
) -> Result<build::Children, String> {
    let to_build = pool_to_build(placements);
    match build::disaggregated_children(md, &to_build, &BuildOptions::default()) {
        (children, None) => Ok(children),
        (children, Some(why)) => {
            assert!(children.router.is_none());
            Err(why)
        }
    }
}

fn two_prefill_one_decode() -> Vec<(PoolRole, ReplicaPlacement)> {
    vec![
        (PoolRole::Decode, tp4(2, "h800-2")),
        (PoolRole::Prefill, tp4(0, "h800-1")),
        (PoolRole::Prefill, tp4(1, "h800-1")),
    ]
}

fn pod_named<'a>(pods: &'a [Pod], name: &str) -> &'a Pod {
    pods.iter()
        .find(|p| p.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no pod {name}"))
}

fn label<'a>(
    m: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    k: &str,
) -> Option<&'a str> {
    m.labels.as_ref().and_then(|l| l.get(k)).map(String::as_str)
}

fn port_names(pod: &Pod) -> Vec<(String, i32)> {
    container(pod)
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect()
}

fn leader(replica: usize) -> String {
    format!(
        "http://llama-pd-r{replica}-{}-s0.llama-pd-workers.inference.svc:8000",
        INCARNATIONS[replica]
    )
}

#[test]
fn sglang_pools_render_their_role_and_sglang_router_lists_every_leader() {
    let md = pd_deployment("sglang", json!({"args": ["--mem-fraction-static=0.85"]}));
    let children = pool_children(&md, &two_prefill_one_decode()).expect("renders");
    let base = "--model-path /models/llama-3.3-70b-instruct-fp8 --served-model-name llama-pd \
                --tp-size 4 --pp-size 1 --host 0.0.0.0 --port 8000 --enable-metrics \
                --max-running-requests 32 --context-length 16384 --kv-cache-dtype fp8_e4m3";
    for (replica, role) in [(0, "prefill"), (1, "prefill"), (2, "decode")] {
        let pod = pod_named(
            &children.pods,
            &format!("llama-pd-r{replica}-{}-s0", INCARNATIONS[replica]),
        );
        let mut want = format!(
            "{base} --disaggregation-mode {role} --disaggregation-transfer-backend mooncake"
        );
        if role == "prefill" {
            want.push_str(" --disaggregation-bootstrap-port 8998");
        }
        want.push_str(" --mem-fraction-static=0.85");
        assert_eq!(args_of(pod), words(&want), "{role}");
        assert_eq!(
            container(pod).command,
            Some(words("python3 -m sglang.launch_server"))
        );
        assert_eq!(label(&pod.metadata, labels::POOL), Some(role));
        assert_eq!(
            label(&pod.metadata, labels::ROLE),
            Some(labels::ROLE_LEADER)
        );
        assert_eq!(label(&pod.metadata, labels::DEPLOYMENT), Some("llama-pd"));
        let mut ports = vec![("http".to_owned(), 8000), ("rendezvous".to_owned(), 29500)];
        if role == "prefill" {
            ports.push(("bootstrap".to_owned(), 8998));
        }
        assert_eq!(port_names(pod), ports, "{role}");
    }
    assert_eq!(children.pods.len(), 3);

    let router = children.router.as_ref().expect("a router");
    assert_eq!(router.metadata.name.as_deref(), Some("llama-pd-router"));
    let spec = router.spec.as_ref().unwrap();
    // Two routers, preferably on two nodes: a lost node or a roll leaves one serving.
    assert_eq!(spec.replicas, Some(2));
    let pod_spec = spec.template.spec.as_ref().unwrap();
    let spread = pod_spec
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .expect("anti-affinity");
    assert_eq!(
        spread[0].pod_affinity_term.topology_key,
        "kubernetes.io/hostname"
    );
    assert_eq!(
        spread[0]
            .pod_affinity_term
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels,
        spec.selector.match_labels
    );
    let c = &pod_spec.containers[0];
    assert_eq!(c.image.as_deref(), Some(build::DEFAULT_SGLANG_IMAGE));
    assert_eq!(
        c.command,
        Some(words("python3 -m sglang_router.launch_router"))
    );
    let want = format!(
        "--pd-disaggregation --prefill {} 8998 --prefill {} 8998 --decode {} \
         --host 0.0.0.0 --port 8000 --prometheus-host 0.0.0.0 --prometheus-port 29000 \
         --worker-startup-timeout-secs 1800",
        leader(0),
        leader(1),
        leader(2)
    );
    assert_eq!(c.args, Some(words(&want)));
    assert_eq!(
        probe_path(&c.readiness_probe).as_deref(),
        Some("/readiness")
    );
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/liveness"));
    // The router's pods are not worker pods: no deployment label (worker selectors, the
    // disruption budget and the controller's pod accounting skip them), no GPU.
    let template_meta = spec.template.metadata.as_ref().unwrap();
    assert_eq!(label(template_meta, labels::DEPLOYMENT), None);
    assert_eq!(label(template_meta, labels::ROUTER), Some("llama-pd"));
    assert_eq!(
        spec.selector.match_labels,
        Some([(labels::ROUTER.to_owned(), "llama-pd".to_owned())].into())
    );
    let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert!(!limits.contains_key(build::GPU_RESOURCE));
    assert_eq!(pod_spec.automount_service_account_token, Some(false));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        pod_spec.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );

    // Services: headless rendezvous, the traffic Service over the router, one per pool.
    let svc: Vec<ServiceSummary> = children
        .services
        .iter()
        .map(|s| {
            let spec = s.spec.as_ref().unwrap();
            (
                s.metadata.name.clone().unwrap(),
                spec.selector.clone().unwrap().into_iter().collect(),
                spec.ports.iter().flatten().map(|p| p.port).collect(),
            )
        })
        .collect();
    let kv = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    assert_eq!(
        svc,
        vec![
            (
                "llama-pd-workers".to_owned(),
                vec![kv(labels::DEPLOYMENT, "llama-pd")],
                vec![29500]
            ),
            (
                "llama-pd".to_owned(),
                vec![kv(labels::ROUTER, "llama-pd")],
                vec![8000]
            ),
            (
                "llama-pd-prefill".to_owned(),
                vec![
                    kv(labels::DEPLOYMENT, "llama-pd"),
                    kv(labels::POOL, "prefill"),
                    kv(labels::ROLE, labels::ROLE_LEADER)
                ],
                vec![8000, 8998]
            ),
            (
                "llama-pd-decode".to_owned(),
                vec![
                    kv(labels::DEPLOYMENT, "llama-pd"),
                    kv(labels::POOL, "decode"),
                    kv(labels::ROLE, labels::ROLE_LEADER)
                ],
                vec![8000]
            ),
        ]
    );
    assert_eq!(
        children.services[0]
            .spec
            .as_ref()
            .unwrap()
            .cluster_ip
            .as_deref(),
        Some("None")
    );
}

#[test]
fn vllm_pools_render_the_nixl_connector_and_vllm_router_in_front() {
    let md = pd_deployment(
        "vllm",
        json!({"routerImage": "registry.example.com/vllm-router:0.1.17"}),
    );
    let children = pool_children(&md, &two_prefill_one_decode()).expect("renders");
    let want = "serve /models/llama-3.3-70b-instruct-fp8 --served-model-name llama-pd \
                --tensor-parallel-size 4 --pipeline-parallel-size 1 --host 0.0.0.0 --port 8000 \
                --max-num-seqs 32 --max-model-len 16384 --kv-cache-dtype fp8 \
                --kv-transfer-config";
    for (replica, role) in [(0, "prefill"), (1, "prefill"), (2, "decode")] {
        let pod = pod_named(
            &children.pods,
            &format!("llama-pd-r{replica}-{}-s0", INCARNATIONS[replica]),
        );
        let mut want = words(want);
        want.push(r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#.to_owned());
        assert_eq!(args_of(pod), want, "{role}");
        assert_eq!(label(&pod.metadata, labels::POOL), Some(role));
        let side_channel = container(pod)
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "VLLM_NIXL_SIDE_CHANNEL_HOST")
            .expect("the NIXL side-channel address");
        assert_eq!(
            side_channel
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("status.podIP")
        );
        assert_eq!(
            port_names(pod),
            vec![
                ("http".to_owned(), 8000),
                ("rendezvous".to_owned(), 29500),
                ("nixl".to_owned(), 5600)
            ]
        );
    }
    let router = children.router.as_ref().expect("a router");
    let c = &router
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example.com/vllm-router:0.1.17")
    );
    assert_eq!(c.command, Some(words("vllm-router")));
    let want = format!(
        "--vllm-pd-disaggregation --kv-connector nixl --prefill {} --prefill {} --decode {} \
         --host 0.0.0.0 --port 8000 --prometheus-host 0.0.0.0 --prometheus-port 29000 \
         --worker-startup-timeout-secs 1800",
        leader(0),
        leader(1),
        leader(2)
    );
    assert_eq!(c.args, Some(words(&want)));
    // No bootstrap port on vLLM's prefill Service.
    let prefill = &children.services[2];
    assert_eq!(prefill.metadata.name.as_deref(), Some("llama-pd-prefill"));
    assert_eq!(
        prefill.spec.as_ref().unwrap().ports.as_ref().unwrap().len(),
        1
    );
}

/// A pool of multi-pod replicas (DeepSeek-V3 EP=16 with data-parallel attention over two
/// nodes): every pod of a replica carries its role, the router lists the leaders only.
#[test]
fn multi_node_pool_replicas_keep_their_launch_and_the_router_reaches_their_leaders() {
    let mut md = deepseek("sglang", &[]);
    md.metadata.name = Some("llama-pd".into());
    let mut prefill = ep16_data_attention();
    prefill.replica = 0;
    let mut decode = ep16_data_attention();
    decode.replica = 1;
    decode.gpu_type = "NVIDIA-H20".into();
    decode.stages = vec![
        StagePlacement {
            stage: 0,
            node: "h20-1".into(),
            gpus: 8,
        },
        StagePlacement {
            stage: 0,
            node: "h20-2".into(),
            gpus: 8,
        },
    ];
    let children = pool_children(
        &md,
        &[(PoolRole::Prefill, prefill), (PoolRole::Decode, decode)],
    )
    .expect("renders");
    assert_eq!(children.pods.len(), 4);
    for pod in &children.pods {
        let args = args_of(pod);
        let role = label(&pod.metadata, labels::POOL).unwrap();
        assert_eq!(flag(&args, "--disaggregation-mode"), Some(role));
        assert_eq!(flag(&args, "--ep-size"), Some("16"));
        assert_eq!(flag(&args, "--nnodes"), Some("2"));
        assert_eq!(
            flag(&args, "--disaggregation-bootstrap-port").is_some(),
            role == "prefill"
        );
        let leader = label(&pod.metadata, labels::ROLE) == Some(labels::ROLE_LEADER);
        assert_eq!(
            port_names(pod).iter().any(|(n, _)| n == "bootstrap"),
            leader && role == "prefill",
            "the bootstrap server runs on the prefill leader"
        );
    }
    let router = children.router.unwrap();
    let args = router.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    let urls: Vec<&String> = args.iter().filter(|a| a.starts_with("http://")).collect();
    assert_eq!(urls, [&leader(0), &leader(1)]);
}

#[test]
fn pools_are_not_rendered_without_a_router_image_for_vllm_without_both_pools_or_on_tessera() {
    let err = pool_children(&pd_deployment("vllm", json!({})), &two_prefill_one_decode())
        .expect_err("vLLM needs a router image");
    assert!(
        err.contains("engine.routerImage") && err.contains("vllm-router"),
        "{err}"
    );

    let err = pool_children(
        &pd_deployment("tessera", json!({})),
        &two_prefill_one_decode(),
    )
    .expect_err("tessera pools are not rendered");
    assert!(
        err.contains("tessera-worker local --prefill/--decode"),
        "{err}"
    );

    let only_prefill: Vec<_> = two_prefill_one_decode()
        .into_iter()
        .filter(|(r, _)| *r == PoolRole::Prefill)
        .collect();
    let err = pool_children(&pd_deployment("sglang", json!({})), &only_prefill)
        .expect_err("no decode pool");
    assert!(err.contains("decode pool has no placed replica"), "{err}");

    // engine.routerImage wins for SGLang too.
    let md = pd_deployment("sglang", json!({"routerImage": "my/sglang-router:1"}));
    let router = pool_children(&md, &two_prefill_one_decode())
        .unwrap()
        .router
        .unwrap();
    assert_eq!(
        router.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("my/sglang-router:1")
    );
}

/// Aggregated rendering carries no pool label, no role flags and no router.
#[test]
fn aggregated_replicas_carry_no_pool_flags() {
    for engine in ["vllm", "sglang"] {
        let md = with_engine(engine, &[]);
        let children = desired_children(
            &md,
            &[ReplicaToBuild {
                placement: &placement(),
                incarnation: "k3x9a",
            }],
            &BuildOptions::default(),
        );
        assert!(children.router.is_none());
        for pod in &children.pods {
            assert_eq!(label(&pod.metadata, labels::POOL), None);
            let args = args_of(pod).join(" ");
            assert!(
                !args.contains("disaggregation") && !args.contains("kv-transfer"),
                "{engine}: {args}"
            );
        }
    }
}

/// The role flags are owned (refused in `engine.args`); SGLang's transfer backend is a default
/// `engine.args` may override on both pools (the last occurrence wins).
#[test]
fn role_flags_are_owned_and_the_transfer_backend_may_be_overridden() {
    use tessera_operator::api::rules::{SGLANG_OWNED_FLAGS, VLLM_OWNED_FLAGS};
    for (engine, owned, extra) in [
        (
            "vllm",
            VLLM_OWNED_FLAGS,
            json!({"routerImage": "registry.example.com/vllm-router:0.1.17"}),
        ),
        ("sglang", SGLANG_OWNED_FLAGS, json!({})),
    ] {
        let children =
            pool_children(&pd_deployment(engine, extra), &two_prefill_one_decode()).unwrap();
        for pod in &children.pods {
            for a in args_of(pod).iter().filter(|a| a.starts_with('-')) {
                let name = a.trim_start_matches('-');
                let ok = owned.contains(&name)
                    || (engine == "sglang" && name == "disaggregation-transfer-backend");
                assert!(ok, "{engine}: {a} is rendered but not owned");
            }
        }
    }
    for (engine, arg) in [
        (
            "vllm",
            r#"--kv-transfer-config={"kv_connector":"NixlConnector","kv_role":"kv_producer"}"#,
        ),
        ("vllm", "--kv_transfer_config"),
        ("sglang", "--disaggregation-mode=decode"),
        ("sglang", "--disaggregation-bootstrap-port"),
    ] {
        let err = parse_model_deployment(&deepseek_object(engine, &[arg]))
            .expect_err(&format!("{engine} {arg} refused"));
        assert!(
            err.errors
                .iter()
                .any(|e| e.field == "spec.engine.args" && e.message.starts_with(arg)),
            "{engine} {arg}: {err:?}"
        );
    }
    let md = pd_deployment(
        "sglang",
        json!({"args": ["--disaggregation-transfer-backend=nixl"]}),
    );
    for pod in pool_children(&md, &two_prefill_one_decode()).unwrap().pods {
        let args = args_of(&pod);
        assert_eq!(
            flag(&args, "--disaggregation-transfer-backend"),
            Some("mooncake")
        );
        assert_eq!(
            args.last().map(String::as_str),
            Some("--disaggregation-transfer-backend=nixl")
        );
    }
}

#[test]
fn rdma_devices_go_to_the_pods_that_move_data_between_nodes_only() {
    let rdma = build::RdmaOptions::parse(&["rdma/rdma_shared_device_a=1".to_owned()])
        .expect("valid")
        .expect("set");
    let opts = BuildOptions {
        rdma: Some(rdma),
        ..BuildOptions::default()
    };
    let has_rdma = |pod: &Pod| {
        let c = container(pod);
        let limits = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .unwrap_or_default();
        let caps = c
            .security_context
            .as_ref()
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.add.clone())
            .unwrap_or_default();
        let rdma = limits.get("rdma/rdma_shared_device_a").map(|q| q.0.clone());
        assert_eq!(
            rdma.is_some(),
            caps == ["IPC_LOCK"],
            "the devices and IPC_LOCK come together: {limits:?} {caps:?}"
        );
        // Everything else stays restricted.
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_owned()])
        );
        rdma
    };
    // Prefill and decode pods move KV caches: every one of them.
    let md = pd_deployment("sglang", json!({}));
    let placements = two_prefill_one_decode();
    let to_build = pool_to_build(&placements);
    let (children, why) = build::disaggregated_children(&md, &to_build, &opts);
    assert_eq!(why, None);
    assert_eq!(children.pods.len(), 3);
    for pod in &children.pods {
        assert_eq!(
            has_rdma(pod),
            Some("1".to_owned()),
            "{:?}",
            pod.metadata.name
        );
        // The GPUs are still there.
        assert!(
            container(pod)
                .resources
                .as_ref()
                .unwrap()
                .limits
                .as_ref()
                .unwrap()
                .contains_key("nvidia.com/gpu")
        );
    }
    // An expert-parallel group over two nodes (DeepEP) does; one on a single node does not.
    let ds = deepseek("sglang", &[]);
    let spread = desired_children(
        &ds,
        &[ReplicaToBuild {
            placement: &ep16_data_attention(),
            incarnation: "k3x9a",
        }],
        &opts,
    );
    assert!(spread.pods.iter().all(|p| has_rdma(p).is_some()));
    let one = desired_children(
        &ds,
        &[ReplicaToBuild {
            placement: &ep8_one_node(),
            incarnation: "k3x9a",
        }],
        &opts,
    );
    assert!(one.pods.iter().all(|p| has_rdma(p).is_none()));
    // An aggregated dense replica does not, even with a pipeline over two nodes.
    let plain = desired_children(
        &deployment("pvc://models/llama"),
        &[ReplicaToBuild {
            placement: &placement(),
            incarnation: "k3x9a",
        }],
        &opts,
    );
    assert_eq!(plain.pods.len(), 2);
    assert!(plain.pods.iter().all(|p| has_rdma(p).is_none()));
    // Without the option nothing changes.
    let (children, _) = build::disaggregated_children(&md, &to_build, &BuildOptions::default());
    assert!(children.pods.iter().all(|p| has_rdma(p).is_none()));
}

#[test]
fn rdma_resource_flags_are_checked_with_the_fix_in_the_error() {
    let parse = |v: &[&str]| {
        build::RdmaOptions::parse(&v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    };
    assert_eq!(parse(&[]), Ok(None));
    assert_eq!(parse(&[" "]), Ok(None));
    let two = parse(&["rdma/hca_shared_devices_a=2", "nvidia.com/hostdev=1"])
        .unwrap()
        .unwrap();
    assert_eq!(two.resources.len(), 2);
    for (bad, says) in [
        ("rdma", "not NAME=COUNT"),
        ("hostdev=1", "is not an extended resource name"),
        ("kubernetes.io/rdma=1", "is not an extended resource name"),
        ("rdma/ib=0", "must be a whole number of at least 1"),
        ("rdma/ib=1.5", "must be a whole number of at least 1"),
    ] {
        let e = parse(&[bad]).expect_err(bad);
        assert!(e.starts_with(&format!("--rdma-resource {bad:?}")), "{e}");
        assert!(e.contains(says), "{e}");
        assert!(
            e.contains("--rdma-resource rdma/rdma_shared_device_a=1"),
            "{e}"
        );
    }
}
