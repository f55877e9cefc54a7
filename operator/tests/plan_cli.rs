//! `tessera-operator plan` end to end: the README command on the example cluster, JSON output,
//! and bad input (clear message naming the file, non-zero exit, never a panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera-operator"))
        .arg("plan")
        .args(args)
        .current_dir(root())
        .output()
        .expect("runs")
}

/// A file named `name` in its own temporary directory; both are deleted when it is dropped.
struct TmpFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl std::ops::Deref for TmpFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

fn tmp(name: &str, text: &str) -> TmpFile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    TmpFile { _dir: dir, path }
}

fn fails_with(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "missing {n:?} in: {err}");
    }
}

#[test]
fn readme_command_prints_a_plan() {
    let out = plan(&[
        "--nodes",
        "examples/cluster.yaml",
        "-f",
        "examples/deployments",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("inference/llama-405b"), "{text}");
    assert!(text.contains("inference/llama-70b"), "{text}");
    assert!(text.contains("choice: H100 TP=8 PP=2"), "{text}");
    assert!(!text.contains("unplaced"), "{text}");
}

#[test]
fn deepseek_v3_plans_expert_parallel_with_reasons_that_cite_the_all_to_all() {
    // The example cluster with every example: DeepSeek-V3 (671B, FP8) does not fit one 8 x 80 GB
    // node, so H800 (its first gpu.types choice) takes two nodes. Expert parallelism over the
    // 16 GPUs with data-parallel attention beats TP=8 x PP=2 per GPU (no all-reduce, no copied
    // latent KV cache, 2 stages that wait on each other gone), at the price of an all-to-all
    // whose cross-node half runs over the fabric.
    let out = plan(&[
        "--nodes",
        "examples/cluster.yaml",
        "-f",
        "examples/deployments",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = v["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "deepseek-v3")
        .expect("deepseek-v3 planned");
    let chosen = &d["choice"]["chosen"];
    assert_eq!(chosen["gpuType"], "NVIDIA-H800", "{d}");
    assert_eq!(chosen["expertParallel"], 16, "{d}");
    assert_eq!(chosen["dataParallelAttention"], true, "{d}");
    let reason = d["choice"]["reason"].as_str().unwrap();
    for needle in [
        "37.6B of 671.0B parameters active per token",
        "16 experts per GPU",
        "expert all-to-all at 94 GB/s per GPU",
        "us per MoE layer per decode step",
    ] {
        assert!(reason.contains(needle), "{needle:?} not in {reason}");
    }
    let r = &d["placed"][0];
    assert_eq!(r["expertParallel"], 16);
    assert_eq!(r["tensorParallel"], 16);
    // One stage over two whole nodes.
    let stages = r["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2, "{r}");
    assert!(
        stages.iter().all(|s| s["stage"] == 0 && s["gpus"] == 8),
        "{r}"
    );
    assert_ne!(stages[0]["node"], stages[1]["node"]);
    let a2a = r["predicted"]["allToAllGBps"].as_f64().unwrap();
    assert!((90.0..100.0).contains(&a2a), "{r}");
    assert!(r["predicted"]["allToAllMicrosPerLayer"].as_f64().unwrap() > 0.0);
    // The alternatives name the all-to-all too.
    let alts = d["choice"]["alternatives"].as_array().unwrap();
    assert!(
        alts.iter().any(|a| a["note"]
            .as_str()
            .unwrap_or("")
            .contains("expert all-to-all")),
        "{alts:?}"
    );
    // The same spec pinned to tensor parallelism (expert: 1) plans TP=8 x PP=2 instead, and
    // the chosen expert-parallel layout predicted more decode tokens/s per GPU.
    let text = std::fs::read_to_string(root().join("examples/deployments/deepseek-v3.yaml"))
        .unwrap()
        .replace("expert: auto", "expert: 1");
    let p = tmp("deepseek-tp.yaml", &text);
    let out = plan(&[
        "--nodes",
        "examples/cluster.yaml",
        "-f",
        p.to_str().unwrap(),
        "-o",
        "json",
    ]);
    let w: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tp = &w["deployments"][0]["choice"]["chosen"];
    assert!(tp["expertParallel"].is_null(), "{tp}");
    assert!(tp["pipelineParallel"].as_i64().unwrap() >= 2, "{tp}");
    let per_gpu = |c: &serde_json::Value| {
        c["predicted"]["decodeTokensPerSecond"].as_f64().unwrap()
            / (c["tensorParallel"].as_f64().unwrap() * c["pipelineParallel"].as_f64().unwrap())
    };
    assert!(per_gpu(chosen) > per_gpu(tp), "{chosen} vs {tp}");
}

#[test]
fn json_output_is_the_documented_shape() {
    let out = plan(&[
        "--nodes",
        "examples/cluster.yaml",
        "-f",
        "examples/deployments/llama-405b.yaml",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = &v["deployments"][0];
    assert_eq!(d["namespace"], "inference");
    assert_eq!(d["name"], "llama-405b");
    let r = &d["placed"][0];
    assert_eq!(r["replica"], 0);
    assert_eq!(r["gpuType"], "NVIDIA-H100-80GB-HBM3");
    assert_eq!(r["tensorParallel"], 8);
    assert!(r["pipelineParallel"].as_i64().unwrap() >= 2);
    assert_eq!(r["stages"][0]["stage"], 0);
    assert_eq!(r["stages"][0]["gpus"], 8);
    for k in [
        "decodeTokensPerSecond",
        "prefillTokensPerSecond",
        "timeToFirstTokenSeconds",
        "allReduceGBps",
    ] {
        assert!(r["predicted"][k].as_f64().unwrap() > 0.0, "{k}");
    }
    assert!(d["unplaced"].as_array().unwrap().is_empty());
    assert!(d["choice"]["chosen"]["gpuType"].is_string());
    assert!(v["warnings"].is_array());
}

#[test]
fn missing_file() {
    fails_with(
        &plan(&[
            "--nodes",
            "no/such/nodes.yaml",
            "-f",
            "examples/deployments",
        ]),
        &["no/such/nodes.yaml", "cannot read"],
    );
    fails_with(
        &plan(&["--nodes", "examples/cluster.yaml", "-f", "no/such/dir"]),
        &["no/such/dir", "cannot read"],
    );
}

#[test]
fn invalid_yaml() {
    let p = tmp("bad.yaml", "kind: List\nitems: [\n");
    fails_with(
        &plan(&["--nodes", p.to_str().unwrap(), "-f", "examples/deployments"]),
        &["bad.yaml", "not valid YAML"],
    );
}

#[test]
fn wrong_kind() {
    fails_with(
        &plan(&[
            "--nodes",
            "examples/deployments/llama-70b.yaml",
            "-f",
            "examples/deployments",
        ]),
        &["llama-70b.yaml", "ModelDeployment", "is not a Node"],
    );
    fails_with(
        &plan(&[
            "--nodes",
            "examples/cluster.yaml",
            "-f",
            "examples/cluster.yaml",
        ]),
        &["cluster.yaml", "is not a ModelDeployment"],
    );
}

#[test]
fn invalid_model_deployment_gets_the_api_server_message() {
    let text = std::fs::read_to_string(root().join("examples/deployments/llama-70b.yaml"))
        .unwrap()
        .replace("tensor: auto", "tensor: 3");
    let p = tmp("tp3.yaml", &text);
    fails_with(
        &plan(&[
            "--nodes",
            "examples/cluster.yaml",
            "-f",
            p.to_str().unwrap(),
        ]),
        &["tp3.yaml", "spec.parallelism.tensor", "llama-70b"],
    );
    let unknown = tmp(
        "unknown.yaml",
        &std::fs::read_to_string(root().join("examples/deployments/llama-70b.yaml"))
            .unwrap()
            .replace("priority: 100", "priority: 100\n  bogus: 1"),
    );
    fails_with(
        &plan(&[
            "--nodes",
            "examples/cluster.yaml",
            "-f",
            unknown.to_str().unwrap(),
        ]),
        &["unknown.yaml", "bogus"],
    );
}

#[test]
fn empty_inputs() {
    let p = tmp("empty.yaml", "# nothing\n");
    fails_with(
        &plan(&[
            "--nodes",
            "examples/cluster.yaml",
            "-f",
            p.to_str().unwrap(),
        ]),
        &["no ModelDeployment found", "empty.yaml"],
    );
    let scalar = tmp("scalar.yaml", "42\n");
    fails_with(
        &plan(&[
            "--nodes",
            scalar.to_str().unwrap(),
            "-f",
            "examples/deployments",
        ]),
        &["scalar.yaml", "expected a Kubernetes object"],
    );
    let badcat = tmp("catalog.yaml", "- name: NEWGPU\n");
    fails_with(
        &plan(&[
            "--nodes",
            "examples/cluster.yaml",
            "-f",
            "examples/deployments",
            "--catalog",
            badcat.to_str().unwrap(),
        ]),
        &["catalog.yaml", "NEWGPU"],
    );
}

#[test]
fn pods_file_consumes_gpus() {
    let pods = tmp(
        "pods.yaml",
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: busy, namespace: x}\n  spec:\n    nodeName: l40s-1\n    containers:\n    - name: c\n      resources: {limits: {nvidia.com/gpu: \"4\"}}\n  status: {phase: Running}\n",
    );
    let out = plan(&[
        "--nodes",
        "examples/cluster.yaml",
        "--pods",
        pods.to_str().unwrap(),
        "-f",
        "examples/deployments/smollm2-135m.yaml",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for r in v["deployments"][0]["placed"].as_array().unwrap() {
        assert_ne!(r["stages"][0]["node"], "l40s-1");
    }
}

/// `-o yaml` prints the objects the controller would apply: one Pod per planned (replica, stage)
/// on the planned node with its GPUs, the Services and the worker ServiceAccount; the same on
/// every run.
#[test]
fn yaml_output_is_the_child_objects_of_the_plan() {
    use k8s_openapi::api::core::v1::Pod;
    let args = [
        "--nodes",
        "examples/cluster.yaml",
        "-f",
        "examples/deployments",
    ];
    let json = plan(&[&args[..], &["-o", "json"]].concat());
    assert!(json.status.success());
    let plan: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let out = plan_yaml(&args);
    assert_eq!(out, plan_yaml(&args), "output must be reproducible");

    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    let mut pods: Vec<Pod> = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&out) {
        let v = <serde_json::Value as serde::Deserialize>::deserialize(doc).unwrap();
        if v.is_null() {
            continue;
        }
        let kind = v["kind"].as_str().unwrap().to_owned();
        let want_api = if kind == "PodDisruptionBudget" {
            "policy/v1"
        } else {
            "v1"
        };
        assert_eq!(v["apiVersion"], want_api, "{v}");
        if kind == "Pod" {
            pods.push(serde_json::from_value(v).unwrap());
        }
        *kinds.entry(kind).or_default() += 1;
    }
    // Planned (deployment, node, gpus) per stage, against the pods printed.
    let mut want: Vec<(String, String, String)> = Vec::new();
    for d in plan["deployments"].as_array().unwrap() {
        for r in d["placed"].as_array().unwrap() {
            for s in r["stages"].as_array().unwrap() {
                want.push((
                    d["name"].as_str().unwrap().to_owned(),
                    s["node"].as_str().unwrap().to_owned(),
                    s["gpus"].to_string(),
                ));
            }
        }
    }
    let mut got: Vec<(String, String, String)> = pods
        .iter()
        .map(|p| {
            let spec = p.spec.as_ref().unwrap();
            let node = &spec
                .affinity
                .as_ref()
                .unwrap()
                .node_affinity
                .as_ref()
                .unwrap()
                .required_during_scheduling_ignored_during_execution
                .as_ref()
                .unwrap()
                .node_selector_terms[0]
                .match_fields
                .as_ref()
                .unwrap()[0];
            assert_eq!(node.key, "metadata.name");
            let gpus = &spec.containers[0]
                .resources
                .as_ref()
                .unwrap()
                .limits
                .as_ref()
                .unwrap()["nvidia.com/gpu"];
            (
                p.metadata.labels.as_ref().unwrap()["tessera.dev/deployment"].clone(),
                node.values.as_ref().unwrap()[0].clone(),
                gpus.0.clone(),
            )
        })
        .collect();
    want.sort();
    got.sort();
    assert!(!want.is_empty());
    assert_eq!(got, want);
    assert_eq!(kinds["ServiceAccount"], 2, "{kinds:?}"); // namespaces demo and inference
    assert_eq!(kinds["Service"], 2 * 5, "{kinds:?}"); // headless + traffic per deployment
    // One disruption budget per deployment with pods.
    assert_eq!(kinds["PodDisruptionBudget"], 5, "{kinds:?}");
}

fn plan_yaml(args: &[&str]) -> String {
    let out = plan(&[args, &["-o", "yaml"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What a live API server would refuse, `plan` refuses first, naming the field, the value, the
/// rule and a fix.
#[test]
fn colliding_volumes_and_bad_labels_are_refused_before_any_object_is_printed() {
    let base = std::fs::read_to_string(root().join("examples/deployments/llama-70b.yaml")).unwrap();
    let bad = base.replace(
        "  serving:\n",
        "  worker:\n    labels:\n      \"Team Name\": search\n      app.kubernetes.io/name: mine\n    volumes:\n      - name: dshm\n        emptyDir: {}\n    volumeMounts:\n      - name: dshm\n        mountPath: /models/extra\n  serving:\n",
    );
    assert_ne!(bad, base, "the example has a serving section");
    let f = tmp("bad.yaml", &bad);
    let out = plan(&[
        "--nodes",
        "examples/cluster.yaml",
        "-f",
        f.to_str().unwrap(),
        "-o",
        "yaml",
    ]);
    fails_with(
        &out,
        &[
            "spec.worker.labels",
            "\"Team Name\": not a valid label key",
            "app.kubernetes.io/name: label keys under app.kubernetes.io/ are reserved",
            "spec.worker.volumes",
            "dshm",
            "rename the volume",
            "/models/extra",
        ],
    );
    assert!(
        out.stdout.is_empty(),
        "nothing printed for an invalid deployment"
    );
}

#[test]
fn a_saved_calibration_changes_the_plan_offline() {
    let args = [
        "--nodes",
        "examples/cluster.yaml",
        "-f",
        "examples/deployments/llama-70b.yaml",
    ];
    let before = plan(&args);
    assert!(before.status.success());
    let before = String::from_utf8_lossy(&before.stdout).to_string();
    assert!(before.contains("choice: H100 TP=4 PP=1"), "{before}");
    let cal = tmp(
        "calibration.yaml",
        "layouts:\n- gpuType: H100\n  tensorParallel: 4\n  pipelineParallel: 1\n  engine: tessera\n  decodeRatios: [0.7, 0.7, 0.7]\n",
    );
    let after = plan(&[&args[..], &["--calibration", cal.to_str().unwrap()]].concat());
    let out = String::from_utf8_lossy(&after.stdout);
    assert!(
        after.status.success(),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
    assert!(!out.contains("choice: H100 TP=4 PP=1"), "{out}");
    // A file that is not a calibration is named with the expected shape.
    let bad = tmp("bad.yaml", "layouts: 3\n");
    fails_with(
        &plan(&[&args[..], &["--calibration", bad.to_str().unwrap()]].concat()),
        &["bad.yaml: not a calibration file", "decodeRatios"],
    );
}

/// The objects of `plan -o yaml`, as JSON values.
fn yaml_objects(out: &str) -> Vec<serde_json::Value> {
    serde_yaml_ng::Deserializer::from_str(out)
        .map(|doc| <serde_json::Value as serde::Deserialize>::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Each example of examples/disaggregation plans prefill/decode pools on the example cluster,
/// and `-o yaml` renders both pools' pods with their role, a Service per pool, the router over
/// every replica's leader, and the deployment's traffic Service on the router.
#[test]
fn disaggregated_examples_render_both_pools_and_a_router() {
    for (file, router_command, role_flag) in [
        (
            "examples/disaggregation/llama-70b-sglang-pd.yaml",
            "python3 -m sglang_router.launch_router",
            "--disaggregation-mode",
        ),
        (
            "examples/disaggregation/llama-70b-vllm-pd.yaml",
            "vllm-router",
            "--kv-transfer-config",
        ),
    ] {
        let args = ["--nodes", "examples/cluster.yaml", "-f", file];
        let out = plan_yaml(&args);
        assert_eq!(out, plan_yaml(&args), "output must be reproducible");
        let name = if file.contains("sglang") {
            "llama-70b-sglang-pd"
        } else {
            "llama-70b-vllm-pd"
        };
        assert!(
            out.contains(&format!("# inference/{name}: disaggregated, ")),
            "{out}"
        );
        let objects = yaml_objects(&out);
        let pods: Vec<&serde_json::Value> = objects.iter().filter(|o| o["kind"] == "Pod").collect();
        let mut leaders = std::collections::BTreeMap::<&str, Vec<String>>::new();
        for pod in &pods {
            let labels = &pod["metadata"]["labels"];
            let role = labels["tessera.dev/pool"].as_str().expect("a pool label");
            let args: Vec<&str> = pod["spec"]["containers"][0]["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            assert!(args.contains(&role_flag), "{file}: {args:?}");
            if role_flag == "--disaggregation-mode" {
                let i = args.iter().position(|a| *a == role_flag).unwrap();
                assert_eq!(args[i + 1], role);
            }
            if labels["tessera.dev/role"] == "leader" {
                leaders.entry(role).or_default().push(format!(
                    "http://{}.{name}-workers.inference.svc:8000",
                    pod["metadata"]["name"].as_str().unwrap()
                ));
            }
        }
        assert_eq!(
            leaders.keys().copied().collect::<Vec<_>>(),
            ["decode", "prefill"],
            "{file}: both pools"
        );

        let routers: Vec<&serde_json::Value> = objects
            .iter()
            .filter(|o| o["kind"] == "Deployment")
            .collect();
        assert_eq!(routers.len(), 1, "{file}");
        let router = routers[0];
        assert_eq!(router["apiVersion"], "apps/v1");
        assert_eq!(router["metadata"]["name"], format!("{name}-router"));
        let c = &router["spec"]["template"]["spec"]["containers"][0];
        let command: Vec<&str> = c["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(command.join(" "), router_command);
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        for (role, flag) in [("prefill", "--prefill"), ("decode", "--decode")] {
            let listed: Vec<String> = args
                .windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].to_owned())
                .collect();
            assert_eq!(
                listed, leaders[role],
                "{file}: {role} leaders in the router"
            );
        }

        let services: std::collections::BTreeMap<&str, &serde_json::Value> = objects
            .iter()
            .filter(|o| o["kind"] == "Service")
            .map(|o| {
                (
                    o["metadata"]["name"].as_str().unwrap(),
                    &o["spec"]["selector"],
                )
            })
            .collect();
        assert_eq!(
            services[name],
            &serde_json::json!({"tessera.dev/router": name}),
            "{file}: the traffic Service selects the router"
        );
        for role in ["prefill", "decode"] {
            assert_eq!(
                services[format!("{name}-{role}").as_str()],
                &serde_json::json!({
                    "tessera.dev/deployment": name,
                    "tessera.dev/role": "leader",
                    "tessera.dev/pool": role
                })
            );
        }
    }
}

/// The tessera engine's pools are not rendered yet: the header says why, and the aggregated
/// objects the controller serves follow.
#[test]
fn tessera_pools_are_not_rendered_and_the_aggregated_objects_follow() {
    let text =
        std::fs::read_to_string(root().join("examples/disaggregation/llama-70b-sglang-pd.yaml"))
            .unwrap()
            .replace("name: sglang", "name: tessera")
            .replace("kvCacheDtype: fp8", "kvCacheDtype: bf16")
            .replace("    args: [\"--mem-fraction-static=0.85\"]\n", "");
    let file = tmp("tessera-pd.yaml", &text);
    let out = plan_yaml(&[
        "--nodes",
        "examples/cluster.yaml",
        "-f",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.contains("#   PoolsNotRenderable: the planner chose prefill/decode pools")
            && out.contains("but they cannot run: the tessera engine's prefill/decode pools are not rendered yet"),
        "{out}"
    );
    let objects = yaml_objects(&out);
    assert!(objects.iter().all(|o| o["kind"] != "Deployment"));
    let pods: Vec<_> = objects.iter().filter(|o| o["kind"] == "Pod").collect();
    assert!(!pods.is_empty(), "{out}");
    assert!(
        pods.iter()
            .all(|p| p["metadata"]["labels"].get("tessera.dev/pool").is_none())
    );
}
