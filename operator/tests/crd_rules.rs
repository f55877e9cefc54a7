//! Every CEL rule of the ModelDeployment CRD, evaluated offline with kube's `cel` support against
//! the generated schema: at least one accepted and one rejected object per rule, with the exact
//! message the API server would return.

use serde_json::{Value, json};
use tessera_operator::api::{self, FieldError, ModelDeployment, parse_model_deployment};

/// A valid ModelDeployment (Llama 3.1 70B shape: 64 heads, 8 KV heads, 80 layers).
fn base() -> Value {
    json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "llama-70b", "namespace": "inference"},
        "spec": {
            "replicas": 2,
            "model": {
                "uri": "pvc://models/llama-3.1-70b",
                "architecture": {
                    "parameters": 70553706496i64,
                    "layers": 80,
                    "hiddenSize": 8192,
                    "attentionHeads": 64,
                    "kvHeads": 8,
                    "intermediateSize": 28672,
                    "vocabSize": 128256,
                    "contextLength": 131072,
                    "bytesPerParameter": 2
                }
            }
        }
    })
}

fn with(mut v: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
    let mut node = &mut v;
    for step in parent.split('/').skip(1) {
        if node.get(step).is_none() {
            node[step] = json!({});
        }
        node = node.get_mut(step).expect("just inserted");
    }
    node[key] = value;
    v
}

fn accepted(v: &Value) -> ModelDeployment {
    match parse_model_deployment(v) {
        Ok(md) => md,
        Err(e) => panic!("expected the object to be accepted, got: {e}"),
    }
}

fn rejected(v: &Value) -> Vec<FieldError> {
    match parse_model_deployment(v) {
        Ok(_) => panic!("expected the object to be rejected: {v}"),
        Err(e) => e.errors,
    }
}

/// Assert exactly one error with this field and message.
fn assert_single(v: &Value, field: &str, message: &str) {
    let errors = rejected(v);
    assert_eq!(
        errors,
        vec![FieldError {
            field: field.into(),
            message: message.into()
        }],
        "for {v}"
    );
}

#[test]
fn the_base_object_is_valid_and_defaults_apply() {
    let md = accepted(&base());
    assert_eq!(md.spec.replicas, 2);
    assert_eq!(md.spec.parallelism.tensor, api::ParallelDegree::Auto);
    assert_eq!(md.spec.serving.port, 8000);
    assert!(md.spec.failure_policy.recreate_group);
}

#[test]
fn name_length_rule() {
    let ok = with(base(), "/metadata/name", json!("a".repeat(45)));
    accepted(&ok);
    let long = "a".repeat(46);
    let bad = with(base(), "/metadata/name", json!(long));
    assert_single(
        &bad,
        "",
        &format!(
            "metadata.name: \"{long}\" has 46 characters; at most 45 are allowed so that worker pod and Service names stay within 63; choose a shorter name"
        ),
    );
}

#[test]
fn name_must_be_a_dns_label() {
    let bad = with(base(), "/metadata/name", json!("llama.70b"));
    assert_single(
        &bad,
        "",
        "metadata.name: \"llama.70b\" must be a DNS label (lowercase letters, digits and dashes, starting with a letter, no dots) because it names the worker Services; choose a name like \"llama-70b\"",
    );
}

#[test]
fn tensor_degree_must_be_auto_or_in_range() {
    accepted(&with(base(), "/spec/parallelism/tensor", json!("auto")));
    accepted(&with(base(), "/spec/parallelism/tensor", json!(8)));
    // "4" as a string is an int-or-string value the API server accepts structurally; the rule
    // refuses it. The typed decode refuses it first, naming the fix.
    let errors = rejected(&with(base(), "/spec/parallelism/tensor", json!("4")));
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].message.contains(
            r#""4" is not a valid degree; use "auto" or an integer (without quotes) from 1 to 64"#
        ),
        "{errors:?}"
    );
}

#[test]
fn degree_rule_messages_from_the_schema() {
    // The CEL rule on the int-or-string field itself, checked through the schema directly
    // (the typed decode would stop "max" before CEL runs).
    let schema = api::spec_schema();
    let validator = kube::core::cel::Validator::new();
    let errors = validator
        .validate(
            &schema,
            &with(base(), "/spec/parallelism/pipeline", json!("max")),
            None,
        )
        .expect_err("\"max\" is not a degree");
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        vec![
            r#"spec.parallelism.pipeline: "max" is not a valid pipeline-parallel degree; use "auto" or an integer from 1 to 64"#
        ]
    );
    let errors = validator
        .validate(
            &schema,
            &with(base(), "/spec/parallelism/tensor", json!(0)),
            None,
        )
        .expect_err("0 is not a degree");
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        vec![
            r#"spec.parallelism.tensor: 0 is not a valid tensor-parallel degree; use "auto" or an integer from 1 to 64"#
        ]
    );
    validator
        .validate(
            &schema,
            &with(base(), "/spec/parallelism/tensor", json!(64)),
            None,
        )
        .expect("64 is in range");
}

#[test]
fn tensor_must_divide_attention_heads() {
    accepted(&with(base(), "/spec/parallelism/tensor", json!(4)));
    let bad = with(base(), "/spec/parallelism/tensor", json!(3));
    let errors = rejected(&bad);
    assert!(
        errors.contains(&FieldError {
            field: "spec.parallelism.tensor".into(),
            message: "3 must divide the model's 64 attention heads; valid: 1, 2, 4, 8, 16, 32, 64"
                .into()
        }),
        "{errors:?}"
    );
}

#[test]
fn tensor_must_divide_kv_heads_or_be_a_multiple() {
    // 9 heads, 3 KV heads (SmolLM2): 3 divides both; 9 is a multiple of 3 and divides 9.
    let smol = |tp: u32| {
        let v = with(base(), "/spec/model/architecture/attentionHeads", json!(9));
        let v = with(v, "/spec/model/architecture/kvHeads", json!(3));
        with(v, "/spec/parallelism/tensor", json!(tp))
    };
    accepted(&smol(3));
    accepted(&smol(9));
    // 16 heads / 4 KV heads: TP 8 is a multiple of 4 (KV heads replicated) and divides 16.
    let v = with(base(), "/spec/model/architecture/attentionHeads", json!(16));
    let v = with(v, "/spec/model/architecture/kvHeads", json!(4));
    accepted(&with(v, "/spec/parallelism/tensor", json!(8)));
    // 12 heads, 8 KV heads? kvHeads must divide heads; use 24 heads / 8 KV heads with TP 12:
    // 12 divides 24 but neither divides nor is a multiple of 8.
    let v = with(base(), "/spec/model/architecture/attentionHeads", json!(24));
    let v = with(v, "/spec/model/architecture/kvHeads", json!(8));
    let bad = with(v, "/spec/parallelism/tensor", json!(12));
    assert_single(
        &bad,
        "spec.parallelism.tensor",
        "12 must divide the model's 8 KV heads or be a multiple of them; valid: 1, 2, 4, 8, 24",
    );
}

#[test]
fn pipeline_at_most_layers() {
    accepted(&with(base(), "/spec/parallelism/pipeline", json!(64)));
    let v = with(base(), "/spec/model/architecture/layers", json!(30));
    accepted(&with(v.clone(), "/spec/parallelism/pipeline", json!(30)));
    assert_single(
        &with(v, "/spec/parallelism/pipeline", json!(32)),
        "spec.parallelism.pipeline",
        "32 exceeds the model's 30 layers (each stage needs at least one); use \"auto\" or 1 to 30",
    );
}

#[test]
fn tensor_times_pipeline_is_bounded() {
    let v = with(base(), "/spec/parallelism/tensor", json!(8));
    accepted(&with(v.clone(), "/spec/parallelism/pipeline", json!(8)));
    assert_single(
        &with(v, "/spec/parallelism/pipeline", json!(16)),
        "spec.parallelism",
        "tensor x pipeline = 8 x 16 = 128 GPUs per replica exceeds the maximum of 64; lower tensor or pipeline, or set them to \"auto\"",
    );
}

#[test]
fn kv_heads_must_divide_attention_heads() {
    accepted(&with(base(), "/spec/model/architecture/kvHeads", json!(64)));
    assert_single(
        &with(base(), "/spec/model/architecture/kvHeads", json!(6)),
        "spec.model.architecture.kvHeads",
        "6 must divide attentionHeads (64): grouped-query attention shares each KV head among a whole number of query heads; copy num_key_value_heads from the model config",
    );
}

#[test]
fn model_uri_schemes() {
    for ok in [
        "pvc://models/llama/70b",
        "https://models.example.com/llama.gguf",
        "http://10.0.0.1:8080/m.gguf",
    ] {
        accepted(&with(base(), "/spec/model/uri", json!(ok)));
    }
    for bad in [
        "s3://bucket/model",
        "pvc://Models/x",
        "pvc://models",
        "file://relative",
    ] {
        let errors = rejected(&with(base(), "/spec/model/uri", json!(bad)));
        let expected = FieldError {
            field: "spec.model.uri".into(),
            message: format!(
                "\"{bad}\" is not a supported model location; use file:///PATH (inside a volume from worker.volumes), pvc://CLAIM/PATH or https://HOST/PATH"
            ),
        };
        assert!(errors.contains(&expected), "{bad}: {errors:?}");
    }
}

#[test]
fn file_uri_needs_a_mounted_volume() {
    let file = with(
        base(),
        "/spec/model/uri",
        json!("file:///models/llama.gguf"),
    );
    assert_single(
        &file,
        "spec.model.uri",
        "\"file:///models/llama.gguf\" is a path inside the worker, but worker.volumeMounts is empty; add a volume in worker.volumes and mount it, or use pvc://CLAIM/PATH",
    );
    let v = with(
        file,
        "/spec/worker/volumes",
        json!([{"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": true}}]),
    );
    let v = with(
        v,
        "/spec/worker/volumeMounts",
        json!([{"name": "models", "mountPath": "/models", "readOnly": true}]),
    );
    accepted(&v);
}

#[test]
fn sha256_format() {
    accepted(&with(base(), "/spec/model/sha256", json!("a".repeat(64))));
    assert_single(
        &with(base(), "/spec/model/sha256", json!("A".repeat(64))),
        "spec.model.sha256",
        &format!(
            "\"{}\" is not a SHA-256; use the 64 lowercase hex characters that sha256sum prints",
            "A".repeat(64)
        ),
    );
}

#[test]
fn serving_context_at_most_model_context() {
    let v = with(
        base(),
        "/spec/model/architecture/contextLength",
        json!(8192),
    );
    accepted(&with(v.clone(), "/spec/serving/contextLength", json!(8192)));
    assert_single(
        &with(v, "/spec/serving/contextLength", json!(16384)),
        "spec.serving.contextLength",
        "16384 exceeds the model's context length of 8192; use at most 8192 or leave it unset",
    );
}

#[test]
fn autoscaling_min_at_most_max() {
    let auto = |min: i32, max: i32| {
        with(
            base(),
            "/spec/autoscaling",
            json!({"enabled": true, "minReplicas": min, "maxReplicas": max, "target": 8}),
        )
    };
    accepted(&auto(2, 2));
    assert_single(
        &auto(3, 2),
        "spec.autoscaling.minReplicas",
        "3 is greater than maxReplicas (2); raise maxReplicas or lower minReplicas",
    );
    // minReplicas defaults to 1, which is within any maxReplicas >= 1.
    accepted(&with(
        base(),
        "/spec/autoscaling",
        json!({"enabled": true, "maxReplicas": 1, "target": 8}),
    ));
}

#[test]
fn reserved_env_names() {
    accepted(&with(
        base(),
        "/spec/worker/env",
        json!([{"name": "HF_HOME", "value": "/tmp"}]),
    ));
    assert_single(
        &with(
            base(),
            "/spec/worker/env",
            json!([{"name": "TESSERA_RANK", "value": "0"}, {"name": "A", "value": "b"}]),
        ),
        "spec.worker.env",
        "TESSERA_RANK: names starting with TESSERA_ are reserved for the operator; rename them",
    );
}

#[test]
fn reserved_label_keys() {
    accepted(&with(
        base(),
        "/spec/worker/labels",
        json!({"team": "search"}),
    ));
    assert_single(
        &with(
            base(),
            "/spec/worker/labels",
            json!({"tessera.dev/replica": "9"}),
        ),
        "spec.worker.labels",
        "tessera.dev/replica: label keys under tessera.dev/ are reserved for the operator; use another prefix",
    );
}

#[test]
fn volume_needs_exactly_one_source() {
    accepted(&with(
        base(),
        "/spec/worker/volumes",
        json!([{"name": "cache", "emptyDir": {}}]),
    ));
    let errors = rejected(&with(
        base(),
        "/spec/worker/volumes",
        json!([{"name": "cache", "emptyDir": {}, "secret": {"secretName": "s"}}]),
    ));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        errors[0].message,
        "volume \"cache\" must set exactly one of persistentVolumeClaim, configMap, secret or emptyDir"
    );
    assert!(
        errors[0].field.starts_with("spec.worker.volumes"),
        "{errors:?}"
    );
}

#[test]
fn host_path_volumes_are_refused_as_unknown_fields() {
    assert_single(
        &with(
            base(),
            "/spec/worker/volumes",
            json!([{"name": "host", "hostPath": {"path": "/"}}]),
        ),
        "spec.worker.volumes[0].hostPath",
        "unknown field \"hostPath\"; the fields here are configMap, emptyDir, name, persistentVolumeClaim, secret (see docs/api.md)",
    );
}

#[test]
fn mounts_must_name_declared_volumes() {
    assert_single(
        &with(
            base(),
            "/spec/worker/volumeMounts",
            json!([{"name": "weights", "mountPath": "/w"}]),
        ),
        "spec.worker.volumeMounts",
        "weights: mounted but not declared in worker.volumes; add the volume or fix the name",
    );
}

#[test]
fn unknown_fields_are_rejected_with_their_name() {
    assert_single(
        &with(base(), "/spec/parallelism/pipline", json!(2)),
        "spec.parallelism.pipline",
        "unknown field \"pipline\" (did you mean \"pipeline\"?); the fields here are attention, expert, pipeline, tensor (see docs/api.md)",
    );
    assert_single(
        &with(
            base(),
            "/spec/worker/resources",
            json!({"limits": {"nvidia.com/gpu": 8}}),
        ),
        "spec.worker.resources.limits.nvidia.com/gpu",
        "unknown field \"nvidia.com/gpu\"; the fields here are cpu, memory (see docs/api.md)",
    );
    // Every unknown field is named, at any depth, not only the first.
    let v = with(base(), "/spec/replicsa", json!(2));
    let v = with(
        v,
        "/spec/worker/volumeMounts",
        json!([{"name": "w", "mountPath": "/w", "readonly": true}]),
    );
    let errors = rejected(&v);
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        ["spec.replicsa", "spec.worker.volumeMounts[0].readonly"],
        "{errors:?}"
    );
    assert!(
        errors[0].message.contains("(did you mean \"replicas\"?)"),
        "{errors:?}"
    );
    assert!(
        errors[1].message.contains("(did you mean \"readOnly\"?)"),
        "{errors:?}"
    );
    // Labels and annotations are maps: any key is a field of the map, not an unknown one.
    accepted(&with(
        base(),
        "/spec/worker/annotations",
        json!({"example.com/anything": "x"}),
    ));
}

#[test]
fn unknown_fields_decode_for_the_controller_and_are_named_at_plan_time() {
    // An object written under a newer CRD, with fields this version does not know.
    let newer = with(base(), "/spec/newFeature", json!({"enabled": true}));
    let newer = with(newer, "/spec/worker/sidecars", json!([{"name": "proxy"}]));
    let newer = with(newer, "/status/newCounter", json!(3));
    // The controller's path: kube decodes the object with serde, then the CEL rules run on the
    // typed value. Neither stops on the unknown fields.
    let md: ModelDeployment =
        serde_json::from_value(newer.clone()).expect("unknown fields must not stop the controller");
    assert_eq!(md.spec, accepted(&base()).spec);
    api::validate(&md).expect("the known fields are valid");
    // `plan -f` (and the API server's strict field validation) still name each one.
    let errors = rejected(&newer);
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.newFeature",
            "spec.worker.sidecars",
            "status.newCounter"
        ],
        "{errors:?}"
    );
    assert!(
        errors[0].message.starts_with("unknown field \"newFeature\"; the fields here are autoscaling, engine, failurePolicy, gpu, model, parallelism, placement, poolReplicas, priority, replicas, serving, worker"),
        "{errors:?}"
    );
}

#[test]
fn wrong_kind_and_version_name_the_fix() {
    let errors = rejected(&with(base(), "/apiVersion", json!("tessera.dev/v1")));
    assert_eq!(
        errors[0].to_string(),
        "apiVersion: \"tessera.dev/v1\" is not served; use apiVersion: tessera.dev/v1alpha1"
    );
    let errors = rejected(&with(base(), "/kind", json!("Deployment")));
    assert_eq!(
        errors[0].to_string(),
        "kind: \"Deployment\" is not a ModelDeployment; use kind: ModelDeployment"
    );
}

#[test]
fn architecture_changes_only_with_the_uri() {
    let old = accepted(&base());
    // Parallelism may change in place: the controller rolls replicas one at a time.
    let mut new = old.clone();
    new.spec.parallelism.tensor = api::ParallelDegree::Fixed(8);
    api::validate_update(&new, &old).expect("parallelism may change in place");
    // The architecture alone may not change.
    let mut new = old.clone();
    new.spec.model.architecture.layers = 81;
    let err = api::validate_update(&new, &old).expect_err("architecture alone is immutable");
    assert_eq!(
        err.errors,
        vec![FieldError {
            field: "spec.model.architecture".into(),
            message: "describes the weights at pvc://models/llama-3.1-70b and cannot change on its own; change model.uri in the same update, or create a new ModelDeployment".into()
        }]
    );
    // Together with a new uri it may.
    new.spec.model.uri = "pvc://models/llama-3.1-70b-v2".into();
    api::validate_update(&new, &old).expect("uri and architecture change together");
    // On create, the transition rule does not apply.
    api::validate(&new).expect("creation ignores transition rules");
}

#[test]
fn error_display_has_the_api_server_shape() {
    let err = parse_model_deployment(&with(base(), "/spec/parallelism/tensor", json!(3)))
        .expect_err("invalid");
    assert!(
        err.to_string().starts_with(
            "ModelDeployment.tessera.dev \"llama-70b\" is invalid: spec.parallelism.tensor: 3 must divide"
        ),
        "{err}"
    );
}

#[test]
fn every_rule_has_a_test_here() {
    // 53 rules, each exercised in this file with accepted and rejected objects (the five engine
    // rules in the engine_* tests, the label rules in the *label*, annotation, node selector and
    // topology key tests, the volume rules in the volume_* and mount_* tests, the twelve
    // mixture-of-experts rules in the moe_* tests, the five serving rules in the
    // disaggregation_* tests). Adding a rule to
    // operator/src/api/rules.rs? Add its accepted and rejected cases to this file, then bump this.
    assert_eq!(api::rules::rules().len(), 53);
}

#[test]
fn every_rule_compiles_and_fits_the_api_servers_cost_budget() {
    use kube::core::cel::{ScopeContext, WarningKind, analyze_rule, cel::Program, compile_schema};
    // kube-cel's scope check does not know macro-bound variables (`list.filter(d, ...)`), so
    // warnings about exactly those names are false positives; anything else fails the test.
    let bound = ["'d'", "'e'", "'k'", "'m'", "'v'", "'x'"];
    let schema = api::spec_schema();
    for r in api::rules::rules() {
        Program::compile(&r.rule).unwrap_or_else(|e| panic!("rule {:?}: {e}", r.rule));
        Program::compile(&r.message_expression)
            .unwrap_or_else(|e| panic!("messageExpression {:?}: {e}", r.message_expression));
        let mut node = &schema;
        for step in r.at {
            node = if *step == "items" {
                &node["items"]
            } else {
                &node["properties"][*step]
            };
        }
        let compiled = compile_schema(node);
        assert!(
            !compiled.has_errors(),
            "{:?}",
            compiled.compilation_errors()
        );
        for expr in [&r.rule, &r.message_expression] {
            let warnings: Vec<_> = analyze_rule(expr, &compiled, ScopeContext::CrdValidation)
                .into_iter()
                .filter(|w| {
                    !(w.kind == WarningKind::WrongScope
                        && bound
                            .iter()
                            .any(|b| w.message.starts_with(&format!("variable {b} "))))
                })
                .collect();
            assert!(warnings.is_empty(), "{expr}: {warnings:?}");
        }
    }
}

#[test]
fn engine_defaults_to_tessera_and_existing_manifests_are_unchanged() {
    let md = accepted(&base());
    assert_eq!(md.spec.engine, api::EngineSpec::default());
    assert_eq!(md.spec.engine.name, api::EngineName::Tessera);
    let md = accepted(&with(base(), "/spec/engine/name", json!("vllm")));
    assert_eq!(md.spec.engine.name, api::EngineName::Vllm);
    let errors = rejected(&with(base(), "/spec/engine/name", json!("trtllm")));
    assert!(
        errors[0].message.contains("trtllm") || errors[0].field.contains("engine"),
        "{errors:?}"
    );
}

#[test]
fn engine_args_the_operator_owns_are_refused_naming_them() {
    let v = with(base(), "/spec/engine/name", json!("vllm"));
    // Allowed: arguments the operator does not set.
    accepted(&with(
        v.clone(),
        "/spec/engine/args",
        json!([
            "--gpu-memory-utilization=0.9",
            "--enable-prefix-caching",
            "--tp-size",
            "4"
        ]),
    ));
    for owned in [
        "--tensor-parallel-size=4",
        "--tensor_parallel_size",
        "-tp",
        "-n=2",
        "-r",
        "--pipeline-parallel-size",
        "--port=9000",
        "--node-rank",
        "--master-addr",
        "--headless",
        "--max-model-len=4096",
        "--model",
    ] {
        let errors = rejected(&with(
            v.clone(),
            "/spec/engine/args",
            json!(["--seed=1", owned]),
        ));
        assert_eq!(errors.len(), 1, "{owned}: {errors:?}");
        assert_eq!(errors[0].field, "spec.engine.args", "{owned}");
        assert!(
            errors[0].message.starts_with(owned)
                && errors[0].message.contains("set by the operator for vllm")
                && !errors[0].message.contains("--seed"),
            "{owned}: {}",
            errors[0].message
        );
    }
    let s = with(base(), "/spec/engine/name", json!("sglang"));
    accepted(&with(
        s.clone(),
        "/spec/engine/args",
        json!(["--mem-fraction-static=0.85", "--tensor-parallel-size-extra"]),
    ));
    for owned in [
        "--tp-size=8",
        "--tp",
        "--dist-init-addr",
        "--nnodes=2",
        "--model-path",
    ] {
        let errors = rejected(&with(s.clone(), "/spec/engine/args", json!([owned])));
        assert!(
            errors[0].message.contains("set by the operator for sglang"),
            "{owned}: {errors:?}"
        );
    }
    // The tessera engine takes no arguments at all.
    let errors = rejected(&with(base(), "/spec/engine/args", json!(["--threads=4"])));
    assert!(
        errors[0].message.contains("from the environment")
            && errors[0].message.contains("--threads=4"),
        "{errors:?}"
    );
}

#[test]
fn engine_env_and_model_location_rules() {
    let v = with(base(), "/spec/engine/name", json!("vllm"));
    let errors = rejected(&with(
        v.clone(),
        "/spec/engine/env",
        json!([{"name": "VLLM_HOST_IP", "value": "1.2.3.4"}, {"name": "TESSERA_TP", "value": "2"}]),
    ));
    assert_eq!(errors[0].field, "spec.engine.env");
    assert!(
        errors[0]
            .message
            .starts_with("VLLM_HOST_IP, TESSERA_TP: reserved"),
        "{errors:?}"
    );
    accepted(&with(
        v.clone(),
        "/spec/engine/env",
        json!([{"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}]),
    ));
    // Every engine takes a model by URL (vLLM and SGLang through the fetch init container),
    // a file or a Hugging Face directory.
    for uri in [
        "https://models.example/llama.gguf",
        "https://models.example/org/llama/resolve/0123abc/",
        "https://models.example/llama/?sig=x",
    ] {
        accepted(&with(v.clone(), "/spec/model/uri", json!(uri)));
        accepted(&with(base(), "/spec/model/uri", json!(uri)));
    }
    // A checksum is for one file: refused with a directory URI, naming the fix.
    let with_sha = with(v, "/spec/model/sha256", json!("a".repeat(64)));
    accepted(&with(
        with_sha.clone(),
        "/spec/model/uri",
        json!("https://models.example/llama.gguf?sig=x"),
    ));
    for uri in [
        "https://models.example/org/llama/resolve/main/",
        "https://models.example/llama/?sig=x",
    ] {
        let errors = rejected(&with(with_sha.clone(), "/spec/model/uri", json!(uri)));
        assert_eq!(errors[0].field, "spec.model.sha256", "{errors:?}");
        assert!(
            errors[0].message.contains("is a model directory")
                && errors[0].message.contains("Remove model.sha256"),
            "{errors:?}"
        );
    }
}

const KEY_FIX: &str = r#"a key is an optional prefix (a DNS subdomain of at most 253 lowercase letters, digits, "-" and ".") and "/", then a name of at most 63 letters, digits, "-", "_" and "." that starts and ends with a letter or digit; for example "team" or "example.com/team""#;
const VALUE_FIX: &str = r#"a value has at most 63 letters, digits, "-", "_" and ".", and starts and ends with a letter or digit, or is empty; for example "search-team""#;

#[test]
fn worker_label_keys_must_be_kubernetes_label_keys() {
    let name63 = "n".repeat(63);
    let prefix253 = format!("{}.io", "p".repeat(250));
    accepted(&with(
        base(),
        "/spec/worker/labels",
        json!({
            "team": "search",
            "example.com/team": "a",
            "a.b-c_d": "x",
            "A1": "",
            name63.clone(): "x",
            format!("{prefix253}/{name63}"): "x",
        }),
    ));
    assert_single(
        &with(
            base(),
            "/spec/worker/labels",
            json!({"Team Name": "search"}),
        ),
        "spec.worker.labels",
        &format!(r#""Team Name": not a valid label key; {KEY_FIX}"#),
    );
    for bad in [
        String::new(),
        "-team".into(),
        "team-".into(),
        "Example.com/team".into(),
        "example.com/".into(),
        "/team".into(),
        "a/b/c".into(),
        "exa_mple.com/team".into(),
        "n".repeat(64),
        format!("{}p.io/team", "p".repeat(250)),
    ] {
        let errors = rejected(&with(
            base(),
            "/spec/worker/labels",
            json!({"team": "search", bad.clone(): "x"}),
        ));
        assert_eq!(
            errors,
            vec![FieldError {
                field: "spec.worker.labels".into(),
                message: format!(r#""{bad}": not a valid label key; {KEY_FIX}"#),
            }],
            "{bad}"
        );
    }
    // Every bad key is named (in the map's order, which CEL leaves open).
    let errors = rejected(&with(
        base(),
        "/spec/worker/labels",
        json!({"a b": "x", "c d": "y", "ok": "z"}),
    ));
    let m = &errors[0].message;
    assert!(
        (m.starts_with(r#""a b", "c d": "#) || m.starts_with(r#""c d", "a b": "#))
            && m.contains(": not a valid label key; "),
        "{errors:?}"
    );
}

#[test]
fn worker_label_values_must_be_kubernetes_label_values() {
    accepted(&with(
        base(),
        "/spec/worker/labels",
        json!({"a": "", "b": "v1.2_3-x", "c": "V".repeat(63)}),
    ));
    assert_single(
        &with(
            base(),
            "/spec/worker/labels",
            json!({"team": "Search Team", "ok": "fine"}),
        ),
        "spec.worker.labels",
        &format!(r#"team="Search Team": not a valid label value; {VALUE_FIX}"#),
    );
    for bad in [
        "-x".to_owned(),
        "x.".to_owned(),
        "a/b".to_owned(),
        "v".repeat(64),
    ] {
        assert_single(
            &with(base(), "/spec/worker/labels", json!({"team": bad.clone()})),
            "spec.worker.labels",
            &format!(r#"team="{bad}": not a valid label value; {VALUE_FIX}"#),
        );
    }
}

#[test]
fn app_kubernetes_io_label_keys_are_reserved() {
    accepted(&with(
        base(),
        "/spec/worker/labels",
        json!({"example.com/app": "x", "app": "y"}),
    ));
    assert_single(
        &with(
            base(),
            "/spec/worker/labels",
            json!({"app.kubernetes.io/managed-by": "me", "team": "a"}),
        ),
        "spec.worker.labels",
        "app.kubernetes.io/managed-by: label keys under app.kubernetes.io/ are reserved: the operator sets app.kubernetes.io/name, app.kubernetes.io/instance, app.kubernetes.io/managed-by on the worker pods and selects them by these labels; use another prefix",
    );
}

#[test]
fn worker_annotation_keys_must_be_kubernetes_keys() {
    // Annotation values are free text.
    accepted(&with(
        base(),
        "/spec/worker/annotations",
        json!({"example.com/note": "any text at all, even / and spaces!"}),
    ));
    assert_single(
        &with(base(), "/spec/worker/annotations", json!({"my note": "x"})),
        "spec.worker.annotations",
        &format!(r#""my note": not a valid annotation key; {KEY_FIX}"#),
    );
}

#[test]
fn node_selector_keys_and_values_must_be_kubernetes_labels() {
    accepted(&with(
        base(),
        "/spec/placement/nodeSelector",
        json!({"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": ""}),
    ));
    assert_single(
        &with(
            base(),
            "/spec/placement/nodeSelector",
            json!({"gpu product": "h100"}),
        ),
        "spec.placement.nodeSelector",
        &format!(r#""gpu product": not a valid label key, so no node can carry it; {KEY_FIX}"#),
    );
    assert_single(
        &with(
            base(),
            "/spec/placement/nodeSelector",
            json!({"pool": "gpu pool"}),
        ),
        "spec.placement.nodeSelector",
        &format!(
            r#"pool="gpu pool": not a valid label value, so no node can carry it; {VALUE_FIX}"#
        ),
    );
}

#[test]
fn pipeline_topology_key_must_be_a_label_key() {
    accepted(&with(
        base(),
        "/spec/placement/pipelineTopologyKey",
        json!("topology.kubernetes.io/rack"),
    ));
    assert_single(
        &with(
            base(),
            "/spec/placement/pipelineTopologyKey",
            json!("rack id"),
        ),
        "spec.placement.pipelineTopologyKey",
        &format!(r#""rack id" is not a valid label key, so no node can carry it; {KEY_FIX}"#),
    );
}

/// `base()` with these user volumes, each mounted at the given path.
fn with_volumes(uri: &str, volumes: &[(&str, &str)]) -> Value {
    let v = with(base(), "/spec/model/uri", json!(uri));
    let v = with(
        v,
        "/spec/worker/volumes",
        Value::Array(
            volumes
                .iter()
                .map(|(name, _)| json!({"name": name, "emptyDir": {}}))
                .collect(),
        ),
    );
    with(
        v,
        "/spec/worker/volumeMounts",
        Value::Array(
            volumes
                .iter()
                .map(|(name, path)| json!({"name": name, "mountPath": path}))
                .collect(),
        ),
    )
}

const PVC: &str = "pvc://models/llama-3.1-70b";
const HTTPS: &str = "https://models.example/llama.gguf";
const FILE: &str = "file:///weights/llama.gguf";

#[test]
fn volume_names_must_be_dns_labels() {
    accepted(&with_volumes(PVC, &[("weights-1", "/weights")]));
    let errors = rejected(&with_volumes(PVC, &[("Weights_1", "/weights")]));
    assert_eq!(
        errors,
        vec![FieldError {
            field: "spec.worker.volumes[0].name".into(),
            message: r#""Weights_1" is not a valid volume name; use a DNS label: at most 63 lowercase letters, digits and "-", starting and ending with a letter or digit (for example "weights")"#.into(),
        }]
    );
}

#[test]
fn volume_names_of_the_operators_volumes_are_refused() {
    let errors = rejected(&with_volumes(
        PVC,
        &[("dshm", "/data"), ("model", "/data2")],
    ));
    assert!(
        errors.contains(&FieldError {
            field: "spec.worker.volumes".into(),
            message: "dshm, model: the operator gives this name to a volume of its own in every worker pod (dshm: shared memory at /dev/shm, tmp: scratch space at /tmp, model: the model claim at /models); rename the volume and the volumeMounts that use it".into(),
        }),
        "{errors:?}"
    );
    let errors = rejected(&with_volumes(HTTPS, &[("tmp", "/data")]));
    assert!(
        errors.contains(&FieldError {
            field: "spec.worker.volumes".into(),
            message: "tmp: the operator gives this name to a volume of its own in every worker pod (dshm: shared memory at /dev/shm, tmp: scratch space at /tmp, model: the downloaded model at /model-cache); rename the volume and the volumeMounts that use it".into(),
        }),
        "{errors:?}"
    );
    // A file:// model comes from the user's own volumes: the operator adds no `model` volume.
    accepted(&with_volumes(FILE, &[("model", "/weights")]));
    let errors = rejected(&with_volumes(FILE, &[("dshm", "/weights")]));
    assert!(
        errors.contains(&FieldError {
            field: "spec.worker.volumes".into(),
            message: "dshm: the operator gives this name to a volume of its own in every worker pod (dshm: shared memory at /dev/shm, tmp: scratch space at /tmp); rename the volume and the volumeMounts that use it".into(),
        }),
        "{errors:?}"
    );
}

#[test]
fn mounts_of_the_operators_volumes_are_refused() {
    let v = with(
        base(),
        "/spec/worker/volumes",
        json!([{"name": "cache", "emptyDir": {}}]),
    );
    let v = with(
        v,
        "/spec/worker/volumeMounts",
        json!([{"name": "cache", "mountPath": "/cache"}, {"name": "tmp", "mountPath": "/scratch"}]),
    );
    // One error: the mount of `tmp` is not also reported as undeclared.
    assert_single(
        &v,
        "spec.worker.volumeMounts",
        "tmp: a volume the operator adds and mounts itself (dshm: shared memory at /dev/shm, tmp: scratch space at /tmp, model: the model claim at /models); mount a volume of your own from worker.volumes instead",
    );
    let v = with(
        with(base(), "/spec/model/uri", json!(HTTPS)),
        "/spec/worker/volumeMounts",
        json!([{"name": "model", "mountPath": "/weights"}]),
    );
    let errors = rejected(&v);
    assert!(
        errors.contains(&FieldError {
            field: "spec.worker.volumeMounts".into(),
            message: "model: a volume the operator adds and mounts itself (dshm: shared memory at /dev/shm, tmp: scratch space at /tmp, model: the downloaded model at /model-cache); mount a volume of your own from worker.volumes instead".into(),
        }),
        "{errors:?}"
    );
    // With a file:// model, `model` is an ordinary (here undeclared) name.
    let v = with(
        with(base(), "/spec/model/uri", json!(FILE)),
        "/spec/worker/volumeMounts",
        json!([{"name": "model", "mountPath": "/weights"}]),
    );
    assert_single(
        &v,
        "spec.worker.volumeMounts",
        "model: mounted but not declared in worker.volumes; add the volume or fix the name",
    );
}

#[test]
fn mount_paths_may_not_overlap_the_operators() {
    let message = |mounts: &str, paths: &str| {
        format!(
            "{mounts}: overlaps a path where the operator mounts a volume of its own in every worker pod ({paths}); a mount may not equal, contain or lie inside one of them; mount it elsewhere, for example under /data"
        )
    };
    for ok in [
        "/data",
        "/devices",
        "/tmpx",
        "/dev2/shm",
        "/model-cache",
        "/modelsx",
        "/weights/models",
    ] {
        accepted(&with_volumes(PVC, &[("w", ok)]));
    }
    for bad in [
        "/dev/shm",
        "/dev/shm/",
        "/dev/shm/nccl",
        "/dev",
        "/dev/",
        "/",
        "/tmp",
        "/tmp//cache",
        "/models",
        "/models/extra",
        "//models",
    ] {
        assert_single(
            &with_volumes(PVC, &[("w", bad)]),
            "spec.worker.volumeMounts",
            &message(&format!("{bad} (volume w)"), "/dev/shm, /tmp, /models"),
        );
    }
    // A downloaded model lives at /model-cache; /models is free then.
    accepted(&with_volumes(HTTPS, &[("w", "/models")]));
    assert_single(
        &with_volumes(HTTPS, &[("w", "/data"), ("c", "/model-cache/x")]),
        "spec.worker.volumeMounts",
        &message("/model-cache/x (volume c)", "/dev/shm, /tmp, /model-cache"),
    );
    // A file:// model is in the user's own volume, which may sit at /models.
    accepted(&with_volumes(
        "file:///models/llama.gguf",
        &[("w", "/models")],
    ));
    assert_single(
        &with_volumes(FILE, &[("w", "/weights"), ("s", "/dev/shm")]),
        "spec.worker.volumeMounts",
        &message("/dev/shm (volume s)", "/dev/shm, /tmp"),
    );
}

#[test]
fn the_reserved_names_are_the_ones_the_builder_uses() {
    use tessera_operator::api::{Prediction, ReplicaPlacement, StagePlacement};
    use tessera_operator::build::{BuildOptions, ReplicaToBuild, desired_children};

    let p = ReplicaPlacement {
        replica: 0,
        gpu_type: "NVIDIA-H100-80GB-HBM3".into(),
        tensor_parallel: 8,
        pipeline_parallel: 1,
        stages: vec![StagePlacement {
            stage: 0,
            node: "h100-1".into(),
            gpus: 8,
        }],
        predicted: Prediction::default(),
        ..ReplicaPlacement::default()
    };
    for uri in [PVC, HTTPS, FILE] {
        let spec = with_volumes(uri, &[("w", "/weights")]);
        let mut md = accepted(&spec);
        md.metadata.uid = Some("0c1d2e3f-0000-4000-8000-000000000001".into());
        let pods = desired_children(
            &md,
            &[ReplicaToBuild {
                placement: &p,
                incarnation: "k3x9a",
            }],
            &BuildOptions::default(),
        )
        .pods;
        let pod = pods[0].spec.as_ref().expect("pod spec");
        // Every volume and mount the operator adds, taken by a user, is refused.
        for vol in pod.volumes.iter().flatten().filter(|v| v.name != "w") {
            let errors = rejected(&with_volumes(uri, &[(vol.name.as_str(), "/data")]));
            assert!(
                errors.iter().any(|e| e.field == "spec.worker.volumes"),
                "{uri}: volume {} is not reserved: {errors:?}",
                vol.name
            );
        }
        let mounts = pod.containers[0].volume_mounts.iter().flatten();
        for m in mounts.filter(|m| m.name != "w") {
            let errors = rejected(&with_volumes(uri, &[("mine", m.mount_path.as_str())]));
            assert!(
                errors.iter().any(|e| e.field == "spec.worker.volumeMounts"),
                "{uri}: mount path {} is not reserved: {errors:?}",
                m.mount_path
            );
        }
        // Every label key the operator sets is under a reserved prefix.
        for key in pods[0].metadata.labels.iter().flatten().map(|(k, _)| k) {
            assert!(
                api::rules::RESERVED_LABEL_PREFIXES
                    .iter()
                    .any(|p| key.starts_with(p)),
                "operator label {key} is not reserved"
            );
            let errors = rejected(&with(
                base(),
                "/spec/worker/labels",
                json!({key.clone(): "x"}),
            ));
            assert_eq!(errors[0].field, "spec.worker.labels", "{key}");
        }
    }
}

#[test]
fn fp8_kv_cache_needs_an_engine_that_has_one() {
    // Default (bf16) is fine with every engine; fp8 with vLLM or SGLang too.
    accepted(&with(base(), "/spec/serving/kvCacheDtype", json!("bf16")));
    let vllm = with(base(), "/spec/engine", json!({"name": "vllm"}));
    let md = accepted(&with(vllm, "/spec/serving/kvCacheDtype", json!("fp8")));
    assert_eq!(
        md.spec.serving.kv_cache_dtype,
        tessera_operator::api::KvCacheDtype::Fp8
    );
    let sglang = with(base(), "/spec/engine", json!({"name": "sglang"}));
    accepted(&with(sglang, "/spec/serving/kvCacheDtype", json!("fp8")));
    // The tessera engine (the default) has no FP8 KV cache: refused with the fix.
    assert_single(
        &with(base(), "/spec/serving/kvCacheDtype", json!("fp8")),
        "spec.serving.kvCacheDtype",
        "fp8: the tessera engine keeps its KV cache in the model dtype and has no FP8 KV cache yet; use kvCacheDtype: bf16, or engine.name vllm or sglang, which take --kv-cache-dtype",
    );
    // Other values are not in the enum.
    assert!(!rejected(&with(base(), "/spec/serving/kvCacheDtype", json!("fp4"))).is_empty());
    // And the flag belongs to the operator.
    let vllm = with(
        base(),
        "/spec/engine",
        json!({"name": "vllm", "args": ["--kv-cache-dtype=fp8"]}),
    );
    assert!(
        rejected(&vllm)
            .iter()
            .any(|e| e.message.contains("--kv-cache-dtype=fp8")),
        "{:?}",
        rejected(&vllm)
    );
}

/// `base()` as DeepSeek-V3 (config.json: 61 layers, the first 3 dense, 256 routed experts of
/// width 2048, 8 per token, 1 shared, multi-head latent attention of rank 512 + 64).
fn moe() -> Value {
    let mut v = base();
    v["spec"]["model"]["architecture"] = json!({
        "parameters": 671026419200i64, "layers": 61, "hiddenSize": 7168,
        "attentionHeads": 128, "kvHeads": 128, "intermediateSize": 18432,
        "vocabSize": 129280, "contextLength": 163840, "bytesPerParameter": 1,
        "experts": 256, "expertsPerToken": 8, "sharedExperts": 1,
        "expertIntermediateSize": 2048, "denseLayers": 3,
        "kvLoraRank": 512, "qkRopeHeadDim": 64
    });
    v
}

#[test]
fn moe_shape_is_accepted_and_derives_active_parameters() {
    let md = accepted(&moe());
    let a = &md.spec.model.architecture;
    assert!(a.is_moe());
    assert_eq!(a.moe_layers(), 58);
    // 58 layers x 256 experts x 3 x 7168 x 2048 = 653.7 B routed; 17.3 B dense; 37.6 B active.
    assert_eq!(a.routed_expert_parameters(), 58 * 256 * 3 * 7168 * 2048);
    let active = a.active_parameters() as f64 / 1e9;
    assert!((37.0..38.0).contains(&active), "{active}");
    // A dense model is its own active parameter count.
    let dense = accepted(&base());
    assert!(!dense.spec.model.architecture.is_moe());
    assert_eq!(
        dense.spec.model.architecture.active_parameters(),
        dense.spec.model.architecture.parameters
    );
    // The expert degree and data-parallel attention are accepted for it.
    let v = with(moe_vllm(), "/spec/parallelism/expert", json!(16));
    let v = with(v, "/spec/parallelism/attention", json!("data"));
    let md = accepted(&v);
    assert_eq!(md.spec.parallelism.expert, api::ParallelDegree::Fixed(16));
}

#[test]
fn moe_fields_come_all_or_none() {
    let mut v = moe();
    v["spec"]["model"]["architecture"]
        .as_object_mut()
        .unwrap()
        .remove("expertsPerToken");
    assert_single(
        &v,
        "spec.model.architecture.experts",
        "a mixture of experts needs experts, expertsPerToken and expertIntermediateSize together (set: experts expertIntermediateSize); copy num_local_experts (or n_routed_experts), num_experts_per_tok and moe_intermediate_size from config.json, or remove them for a dense model",
    );
    let v = with(base(), "/spec/model/architecture/denseLayers", json!(1));
    assert_single(
        &v,
        "spec.model.architecture.experts",
        "sharedExperts and denseLayers describe a mixture of experts; set experts, expertsPerToken and expertIntermediateSize too, or remove them",
    );
}

#[test]
fn moe_counts_must_be_consistent() {
    assert_single(
        &with(
            moe(),
            "/spec/model/architecture/expertsPerToken",
            json!(300),
        ),
        "spec.model.architecture.expertsPerToken",
        "300 experts per token exceeds the 256 experts of the model; copy num_experts_per_tok from config.json",
    );
    accepted(&with(
        moe(),
        "/spec/model/architecture/expertsPerToken",
        json!(256),
    ));
    assert_single(
        &with(moe(), "/spec/model/architecture/denseLayers", json!(61)),
        "spec.model.architecture.denseLayers",
        "61 dense layers leave no MoE layer of the 61; denseLayers counts the layers whose feed-forward is dense (first_k_dense_replace), at most layers - 1",
    );
    accepted(&with(
        moe(),
        "/spec/model/architecture/denseLayers",
        json!(60),
    ));
    assert_single(
        &with(
            moe(),
            "/spec/model/architecture/expertIntermediateSize",
            json!(4096),
        ),
        "spec.model.architecture.parameters",
        "the routed experts alone hold (layers - denseLayers) x experts x 3 x hiddenSize x expertIntermediateSize = 1307817541632 parameters, not less than parameters (671026419200); parameters is the total over all experts: check it, expertIntermediateSize (moe_intermediate_size) and denseLayers",
    );
    let mut v = moe();
    v["spec"]["model"]["architecture"]
        .as_object_mut()
        .unwrap()
        .remove("kvLoraRank");
    assert_single(
        &v,
        "spec.model.architecture.qkRopeHeadDim",
        "qkRopeHeadDim is part of multi-head latent attention; set kvLoraRank (kv_lora_rank) too, or remove it",
    );
}

#[test]
fn moe_expert_degree_rules() {
    assert_single(
        &with(moe(), "/spec/parallelism/expert", json!(6)),
        "spec.parallelism.expert",
        "6 must divide the model's 256 experts so that every GPU holds the same number of whole experts; valid: 1, 2, 4, 8, 16, 32, 64",
    );
    assert_single(
        &with(moe(), "/spec/parallelism/expert", json!(128)),
        "spec.parallelism.expert",
        "128 is not a valid expert-parallel degree; use \"auto\" or an integer from 1 to 64",
    );
    let v = with(moe(), "/spec/parallelism/tensor", json!(8));
    accepted(&with(v.clone(), "/spec/parallelism/expert", json!(8)));
    accepted(&with(v.clone(), "/spec/parallelism/expert", json!(1)));
    assert_single(
        &with(v, "/spec/parallelism/expert", json!(16)),
        "spec.parallelism.expert",
        "expert 16 with tensor 8: the expert-parallel group is the GPUs of a pipeline stage, so expert must be 1 or equal tensor; set expert: 8, expert: 1, or tensor: \"auto\"",
    );
    // A dense model takes no expert parallelism (1 and auto are fine).
    accepted(&with(base(), "/spec/parallelism/expert", json!(1)));
    assert_single(
        &with(base(), "/spec/parallelism/expert", json!(2)),
        "spec.parallelism.expert",
        "expert parallelism 2 needs a mixture-of-experts model, and model.architecture has no experts; use expert: 1 or \"auto\", or describe the experts (experts, expertsPerToken, expertIntermediateSize)",
    );
}

/// `moe()` served by vLLM (the tessera engine has no data-parallel attention).
fn moe_vllm() -> Value {
    with(moe(), "/spec/engine", json!({"name": "vllm"}))
}

#[test]
fn moe_data_parallel_attention_needs_an_engine_that_has_it() {
    assert_single(
        &with(moe(), "/spec/parallelism/attention", json!("data")),
        "spec.parallelism.attention",
        "data: the tessera engine runs attention tensor-parallel (it splits the experts over its tensor-parallel ranks); use attention: tensor or \"auto\", or engine.name vllm or sglang, which run data-parallel attention",
    );
    accepted(&with(
        moe_vllm(),
        "/spec/parallelism/attention",
        json!("data"),
    ));
    let sglang = with(moe(), "/spec/engine", json!({"name": "sglang"}));
    accepted(&with(sglang, "/spec/parallelism/attention", json!("data")));
}

#[test]
fn moe_data_parallel_attention_needs_expert_parallelism() {
    let msg = "data-parallel attention runs inside an expert-parallel group: it needs a mixture-of-experts model (model.architecture.experts) and expert parallelism (expert \"auto\" or above 1); use attention: tensor or \"auto\"";
    assert_single(
        &with(base(), "/spec/parallelism/attention", json!("data")),
        "spec.parallelism.attention",
        msg,
    );
    let v = with(moe_vllm(), "/spec/parallelism/attention", json!("data"));
    accepted(&v);
    assert_single(
        &with(v, "/spec/parallelism/expert", json!(1)),
        "spec.parallelism.attention",
        msg,
    );
    accepted(&with(
        base(),
        "/spec/parallelism/attention",
        json!("tensor"),
    ));
}

#[test]
fn disaggregation_needs_a_workload_that_fits_the_context() {
    let pd = json!({"inputTokens": 8192, "outputTokens": 256});
    let v = with(base(), "/spec/serving/disaggregation", json!("Auto"));
    assert_single(
        &v,
        "spec.serving.disaggregation",
        "Auto: the planner decides and sizes prefill/decode pools by the request shape; set serving.workload (inputTokens, outputTokens), or disaggregation: Off",
    );
    let v = with(v, "/spec/serving/workload", pd);
    accepted(&v);
    accepted(&with(
        v.clone(),
        "/spec/serving/slo",
        json!({"timeToFirstTokenSeconds": 2.0, "interTokenLatencySeconds": 0.05}),
    ));
    assert_single(
        &with(
            base(),
            "/spec/serving/slo",
            json!({"interTokenLatencySeconds": 0.05}),
        ),
        "spec.serving.slo",
        "the latency targets are for a typical request: set serving.workload (inputTokens, outputTokens) too, or remove serving.slo",
    );
    let v = with(v, "/spec/serving/contextLength", json!(8192));
    assert_single(
        &v,
        "spec.serving.workload",
        "8192 + 256 tokens exceed the context of 8192 tokens a sequence may use (serving.contextLength, else the context of the model); shorten the workload or raise serving.contextLength",
    );
    // Pool scaling needs pools; each pool takes only its own signals.
    let v = with(
        with(base(), "/spec/serving/disaggregation", json!("On")),
        "/spec/serving/workload",
        json!({"inputTokens": 2048, "outputTokens": 256}),
    );
    let scaling = json!({"enabled": true, "maxReplicas": 4, "target": 10,
        "prefill": {"metric": "timeToFirstToken", "target": 2.0},
        "decode": {"metric": "kvCacheUtilization", "target": 0.8}});
    accepted(&with(v.clone(), "/spec/autoscaling", scaling.clone()));
    assert_single(
        &with(base(), "/spec/autoscaling", scaling.clone()),
        "spec.autoscaling",
        "autoscaling.prefill and autoscaling.decode scale prefill/decode pools, which run only with serving.disaggregation Auto or On; set it, or remove them and scale on autoscaling.metric",
    );
    let mut wrong = scaling;
    wrong["prefill"]["metric"] = json!("kvCacheUtilization");
    assert!(parse_model_deployment(&with(v.clone(), "/spec/autoscaling", wrong)).is_err());
    // Pool sizes need pools, and each is at least 1.
    let sized = accepted(&with(
        v.clone(),
        "/spec/poolReplicas",
        json!({"prefill": 12, "decode": 3}),
    ));
    assert_eq!(sized.spec.pool_size("prefill", 10), 12);
    assert_eq!(sized.spec.pool_size("decode", 1), 3);
    let half = accepted(&with(v.clone(), "/spec/poolReplicas", json!({"decode": 3})));
    assert_eq!(half.spec.replicas, 2);
    assert_eq!(
        half.spec.pool_size("prefill", 10),
        20,
        "unset: replicas units of the ratio"
    );
    assert_single(
        &with(base(), "/spec/poolReplicas", json!({"prefill": 2})),
        "spec.poolReplicas",
        "poolReplicas sizes prefill/decode pools, which run only with serving.disaggregation Auto or On; set it, or remove poolReplicas and size the deployment with replicas",
    );
    // The API server's bounds (the CRD's schema): a pool of 0 replicas is refused.
    let spec_schema = &api::spec_schema()["properties"]["spec"];
    let zero = with(v, "/spec/poolReplicas", json!({"decode": 0}));
    assert_eq!(
        api::schema::violations(spec_schema, &zero["spec"]),
        vec![".poolReplicas.decode: 0 is less than minimum 1".to_owned()]
    );
    // Off needs nothing; unknown modes are refused by the schema.
    accepted(&with(base(), "/spec/serving/disaggregation", json!("Off")));
    assert!(
        parse_model_deployment(&with(
            base(),
            "/spec/serving/disaggregation",
            json!("Sometimes")
        ))
        .is_err()
    );
}
