//! CEL rules (`x-kubernetes-validations`) of the ModelDeployment CRD.
//!
//! These are the checks a structural schema cannot express. Each rule's message is built by a
//! CEL `messageExpression` so that it names the value, the rule and a fix; the API server
//! prefixes it with the field path (`fieldPath`), giving errors such as
//! `spec.parallelism.tensor: Invalid value: "object": 3 must divide the model's 32 attention
//! heads; valid: 1, 2, 4, 8, 16, 32`. The same rules run client-side (kube's `cel` support) in
//! `tessera-operator plan` and in the tests, so both see the same messages.

use super::{MAX_GPUS_PER_REPLICA, MAX_NAME_LENGTH};
use crate::build::labels;

/// One CEL rule and where it sits in the schema.
#[derive(Clone, Debug)]
pub struct CelRule {
    /// Schema location as property names from the root (`"items"` steps into a list).
    pub at: &'static [&'static str],
    /// The CEL expression that must hold.
    pub rule: String,
    /// CEL expression that builds the failure message.
    pub message_expression: String,
    /// Static fallback message (used by the API server if the expression fails).
    pub message: String,
    /// Field the error is reported on, relative to `at` (for example `.parallelism.tensor`).
    pub field_path: Option<&'static str>,
    /// A transition rule (uses `oldSelf`): evaluated on updates only.
    pub transition: bool,
}

/// CEL literal list of the candidate degrees 1..=MAX_GPUS_PER_REPLICA.
fn degrees() -> String {
    let items: Vec<String> = (1..=MAX_GPUS_PER_REPLICA).map(|d| d.to_string()).collect();
    format!("[{}]", items.join(", "))
}

/// CEL expression: the tensor-parallel degrees the model's heads allow, as a ", "-joined string.
fn valid_tensor_degrees(arch: &str) -> String {
    format!(
        "{list}.filter(d, {arch}.attentionHeads % d == 0 && ({arch}.kvHeads % d == 0 || d % {arch}.kvHeads == 0)).map(d, string(d)).join(', ')",
        list = degrees()
    )
}

/// CEL for "this int-or-string value is a pinned integer degree" (1 to 999; the range rule
/// narrows it further). Written with `string()` and
/// `int()` instead of `type()` so that it evaluates the same in the API server and in kube's
/// client-side CEL (which has no `type()`).
fn is_pinned(v: &str) -> String {
    format!("string({v}).matches('^[1-9][0-9]{{0,2}}$')")
}

/// CEL for the integer value of a pinned degree (only evaluated when [`is_pinned`] holds).
fn pinned(v: &str) -> String {
    format!("int(string({v}))")
}

fn degree_rule(field: &str) -> (String, String, String) {
    let max = MAX_GPUS_PER_REPLICA;
    (
        format!(
            "string(self) == 'auto' || ({} && {} >= 1 && {} <= {max})",
            is_pinned("self"),
            pinned("self"),
            pinned("self")
        ),
        format!(
            r#"(string(self).matches('^[0-9]+$') ? string(self) : '"' + string(self) + '"') + ' is not a valid {field} degree; use "auto" or an integer from 1 to {max}'"#
        ),
        format!(r#"must be "auto" or an integer from 1 to {max}"#),
    )
}

/// Long options of vLLM's `vllm serve` that the operator sets from the plan and the spec
/// (`build::engine_args`), without the leading `--`; `-` and `_` are interchangeable, as in
/// vLLM's own parser.
pub const VLLM_OWNED_FLAGS: &[&str] = &[
    "model",
    "tensor-parallel-size",
    "pipeline-parallel-size",
    "served-model-name",
    "host",
    "port",
    "distributed-executor-backend",
    "nnodes",
    "node-rank",
    "master-addr",
    "master-port",
    "headless",
    "max-num-seqs",
    "max-model-len",
    "kv-cache-dtype",
    // Expert parallelism and vLLM's data-parallel launch (data-parallel attention): the
    // sizes, ranks and address come from the placement, and the load-balancing modes decide
    // which pods serve HTTP.
    "enable-expert-parallel",
    "no-enable-expert-parallel",
    "data-parallel-size",
    "data-parallel-size-local",
    "data-parallel-start-rank",
    "data-parallel-rank",
    "data-parallel-address",
    "data-parallel-rpc-port",
    "data-parallel-backend",
    "data-parallel-hybrid-lb",
    "no-data-parallel-hybrid-lb",
    "data-parallel-external-lb",
    "no-data-parallel-external-lb",
    "data-parallel-multi-port-external-lb",
    // Prefill/decode disaggregation: the KV connector and role must match the router's.
    "kv-transfer-config",
];
/// Short options of vLLM that alias owned ones (`-tp`, `-pp`, `-n` = `--nnodes`, `-r` =
/// `--node-rank`, `-ep` = `--enable-expert-parallel`, `-dp` = `--data-parallel-size` and the
/// other `-dp*` of the data-parallel launch).
pub const VLLM_OWNED_SHORT: &[&str] = &[
    "tp", "pp", "n", "r", "ep", "dp", "dpl", "dpr", "dpn", "dpa", "dpp", "dpb", "dph", "dpe", "dpm",
];
/// Options of SGLang's `launch_server` that the operator sets (see [`VLLM_OWNED_FLAGS`]).
pub const SGLANG_OWNED_FLAGS: &[&str] = &[
    "model-path",
    "model",
    "tp-size",
    "tensor-parallel-size",
    "tp",
    "pp-size",
    "pipeline-parallel-size",
    "nnodes",
    "node-rank",
    "dist-init-addr",
    "nccl-init-addr",
    "host",
    "port",
    "served-model-name",
    "enable-metrics",
    "max-running-requests",
    "context-length",
    "kv-cache-dtype",
    // Expert parallelism and data-parallel attention (`--attn-dp-size`; the deprecated spelling
    // `--dp-size N --enable-dp-attention`; `--dp-size` alone would run whole extra replicas).
    // `--moe-a2a-backend` is not owned: a default the user may override.
    "ep-size",
    "expert-parallel-size",
    "ep",
    "attn-dp-size",
    "attention-data-parallel-size",
    "dp-size",
    "data-parallel-size",
    "enable-dp-attention",
    // Prefill/decode disaggregation: the pool's role, and the prefill bootstrap port the
    // router hands to the decode side. `--disaggregation-transfer-backend` is not owned: a
    // default the user may override (on both pools alike, as engine.args are).
    "disaggregation-mode",
    "disaggregation-bootstrap-port",
];

/// An RE2 pattern that matches an argument setting one of `long` (`--name` or `--name=...`, with
/// `-` and `_` interchangeable) or `short` (`-x`, `-x=...`).
pub fn owned_args_pattern(long: &[&str], short: &[&str]) -> String {
    let long: Vec<String> = long.iter().map(|f| f.replace('-', "[-_]")).collect();
    let mut alts = format!("--({})", long.join("|"));
    if !short.is_empty() {
        alts = format!("{alts}|-({})", short.join("|"));
    }
    format!("^({alts})(=.*)?$")
}

/// The CEL rule refusing operator-owned arguments for one engine.
fn owned_args_rule(engine: &str, pattern: &str) -> CelRule {
    CelRule {
        at: &["spec", "engine"],
        rule: format!(
            "self.name != '{engine}' || !has(self.args) || !self.args.exists(x, x.matches('{pattern}'))"
        ),
        message_expression: format!(
            "self.args.filter(x, x.matches('{pattern}')).join(', ') + ': set by the operator for {engine} from the plan and the spec (parallel sizes, node rank, addresses, ports, model, served name, concurrency, context length); remove it and change the ModelDeployment field instead (parallelism, serving, model)'"
        ),
        message: format!("engine.args must not set arguments the operator owns for {engine}"),
        field_path: Some(".args"),
        transition: false,
    }
}

/// Volumes the operator adds to every worker pod and where it mounts them
/// (`build::replica_pods`).
pub const OPERATOR_VOLUMES: &[(&str, &str, &str)] = &[
    ("dshm", "/dev/shm", "shared memory"),
    ("tmp", "/tmp", "scratch space"),
];
/// The volume the operator adds for a `pvc://` or `http(s)://` model (`build::model_delivery`).
pub const MODEL_VOLUME: &str = "model";
/// Where the claim of a `pvc://` model is mounted.
pub const PVC_MODEL_PATH: &str = "/models";
/// Where an `http(s)://` model is downloaded to.
pub const HTTP_MODEL_PATH: &str = "/model-cache";
/// Label key prefixes the operator sets on worker pods and selects them by.
pub const RESERVED_LABEL_PREFIXES: &[&str] = &["tessera.dev/", "app.kubernetes.io/"];

/// RE2 pattern of a Kubernetes label key (a qualified name): an optional DNS-1123 subdomain
/// prefix and `/`, then a name that starts and ends with a letter or digit.
pub const LABEL_KEY_PATTERN: &str = "^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$";
/// RE2 pattern of the lengths of a label key: prefix at most 253, name at most 63 characters.
pub const LABEL_KEY_LENGTH_PATTERN: &str = "^([^/]{1,253}/)?[^/]{1,63}$";
/// RE2 pattern of a Kubernetes label value (at most 63 characters, checked separately).
pub const LABEL_VALUE_PATTERN: &str = "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";
/// RE2 pattern of a DNS-1123 label (volume names).
pub const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

const LABEL_KEY_FIX: &str = r#"a key is an optional prefix (a DNS subdomain of at most 253 lowercase letters, digits, "-" and ".") and "/", then a name of at most 63 letters, digits, "-", "_" and "." that starts and ends with a letter or digit; for example "team" or "example.com/team""#;
const LABEL_VALUE_FIX: &str = r#"a value has at most 63 letters, digits, "-", "_" and ".", and starts and ends with a letter or digit, or is empty; for example "search-team""#;

/// CEL: the string `k` is a valid label key.
fn label_key_ok(k: &str) -> String {
    format!(
        "(size({k}) <= 317 && {k}.matches('{LABEL_KEY_PATTERN}') && {k}.matches('{LABEL_KEY_LENGTH_PATTERN}'))"
    )
}

/// CEL: the string `v` is a valid label value.
fn label_value_ok(v: &str) -> String {
    format!("(size({v}) <= 63 && {v}.matches('{LABEL_VALUE_PATTERN}'))")
}

/// Rule: every key of the map at `field_path` (`.labels`, relative to `at`) is a label key.
fn map_keys_rule(
    at: &'static [&'static str],
    field_path: &'static str,
    what: &str,
    why: &str,
) -> CelRule {
    let field = &field_path[1..];
    let ok = label_key_ok("k");
    CelRule {
        at,
        rule: format!("!has(self.{field}) || self.{field}.all(k, {ok})"),
        message_expression: format!(
            r#"'"' + self.{field}.filter(k, !{ok}).join('", "') + '": not a valid {what} key{why}; {LABEL_KEY_FIX}'"#
        ),
        message: format!("{field} keys must be valid Kubernetes {what} keys"),
        field_path: Some(field_path),
        transition: false,
    }
}

/// Rule: every value of the map at `field_path` (relative to `at`) is a label value.
fn map_values_rule(at: &'static [&'static str], field_path: &'static str, why: &str) -> CelRule {
    let field = &field_path[1..];
    let ok = label_value_ok(&format!("self.{field}[k]"));
    CelRule {
        at,
        rule: format!("!has(self.{field}) || self.{field}.all(k, {ok})"),
        message_expression: format!(
            r#"self.{field}.filter(k, !{ok}).map(k, k + '="' + self.{field}[k] + '"').join(', ') + ': not a valid label value{why}; {LABEL_VALUE_FIX}'"#
        ),
        message: format!("{field} values must be valid Kubernetes label values"),
        field_path: Some(field_path),
        transition: false,
    }
}

/// An RE2 pattern matching a mount path that equals one of `paths`, lies inside one, or contains
/// one (`/`, `/dev`), with repeated and trailing slashes allowed.
pub fn overlap_pattern(paths: &[&str]) -> String {
    fn nested(parts: &[&str]) -> String {
        match parts {
            [] => String::new(),
            [last] => format!("{last}(/.*)?"),
            [first, rest @ ..] => format!("{first}(/+{})?", nested(rest)),
        }
    }
    let alts: Vec<String> = paths
        .iter()
        .map(|p| {
            let parts: Vec<&str> = p.split('/').filter(|c| !c.is_empty()).collect();
            nested(&parts)
        })
        .collect();
    format!("^/+({})?/*$", alts.join("|"))
}

/// CEL: the model is delivered by the operator through a claim (`pvc://`).
const IS_PVC: &str = "self.model.uri.startsWith('pvc://')";
/// CEL: the model is downloaded by the workers (`http(s)://`).
const IS_HTTP: &str = "self.model.uri.matches('^https?://')";

/// CEL list of the volume names the operator adds for this spec's model location.
fn operator_volume_names() -> String {
    let base: Vec<String> = OPERATOR_VOLUMES
        .iter()
        .map(|(n, _, _)| format!("'{n}'"))
        .collect();
    let base = base.join(", ");
    format!("(({IS_PVC}) || ({IS_HTTP}) ? [{base}, '{MODEL_VOLUME}'] : [{base}])")
}

/// CEL string describing the operator's volumes for this spec (`dshm: shared memory at
/// /dev/shm, ...`).
fn operator_volumes_described() -> String {
    let base: Vec<String> = OPERATOR_VOLUMES
        .iter()
        .map(|(n, p, what)| format!("{n}: {what} at {p}"))
        .collect();
    let base = base.join(", ");
    format!(
        "'{base}' + ({IS_PVC} ? ', {MODEL_VOLUME}: the model claim at {PVC_MODEL_PATH}' : {IS_HTTP} ? ', {MODEL_VOLUME}: the downloaded model at {HTTP_MODEL_PATH}' : '')"
    )
}

/// CEL: the mount `m` overlaps a path where the operator mounts a volume for this spec.
fn overlaps_operator_mount(m: &str) -> String {
    let base: Vec<&str> = OPERATOR_VOLUMES.iter().map(|(_, p, _)| *p).collect();
    format!(
        "({m}.mountPath.matches('{}') || ({IS_PVC} && {m}.mountPath.matches('{}')) || ({IS_HTTP} && {m}.mountPath.matches('{}')))",
        overlap_pattern(&base),
        overlap_pattern(&[PVC_MODEL_PATH]),
        overlap_pattern(&[HTTP_MODEL_PATH]),
    )
}

/// The rules on user volumes and mounts that would collide with the operator's own.
fn volume_rules() -> Vec<CelRule> {
    let names = operator_volume_names();
    let described = operator_volumes_described();
    let overlaps = overlaps_operator_mount("m");
    let base_paths: Vec<&str> = OPERATOR_VOLUMES.iter().map(|(_, p, _)| *p).collect();
    let base_paths = base_paths.join(", ");
    vec![
        CelRule {
            at: &["spec", "worker", "volumes", "items"],
            rule: format!("self.name.matches('{DNS_LABEL_PATTERN}')"),
            message_expression: r#"'"' + self.name + '" is not a valid volume name; use a DNS label: at most 63 lowercase letters, digits and "-", starting and ending with a letter or digit (for example "weights")'"#.into(),
            message: "a volume name must be a DNS label".into(),
            field_path: Some(".name"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: format!(
                "!has(self.worker) || !has(self.worker.volumes) || self.worker.volumes.all(v, !(v.name in {names}))"
            ),
            message_expression: format!(
                "self.worker.volumes.filter(v, v.name in {names}).map(v, v.name).join(', ') + ': the operator gives this name to a volume of its own in every worker pod (' + {described} + '); rename the volume and the volumeMounts that use it'"
            ),
            message: "worker.volumes must not use the names of the operator's volumes".into(),
            field_path: Some(".worker.volumes"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: format!(
                "!has(self.worker) || !has(self.worker.volumeMounts) || self.worker.volumeMounts.all(m, !(m.name in {names}))"
            ),
            message_expression: format!(
                "self.worker.volumeMounts.filter(m, m.name in {names}).map(m, m.name).join(', ') + ': a volume the operator adds and mounts itself (' + {described} + '); mount a volume of your own from worker.volumes instead'"
            ),
            message: "worker.volumeMounts must not mount the operator's volumes".into(),
            field_path: Some(".worker.volumeMounts"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: format!(
                "!has(self.worker) || !has(self.worker.volumeMounts) || self.worker.volumeMounts.all(m, !{overlaps})"
            ),
            message_expression: format!(
                "self.worker.volumeMounts.filter(m, {overlaps}).map(m, m.mountPath + ' (volume ' + m.name + ')').join(', ') + ': overlaps a path where the operator mounts a volume of its own in every worker pod ({base_paths}' + ({IS_PVC} ? ', {PVC_MODEL_PATH}' : {IS_HTTP} ? ', {HTTP_MODEL_PATH}' : '') + '); a mount may not equal, contain or lie inside one of them; mount it elsewhere, for example under /data'"
            ),
            message: "worker.volumeMounts must not overlap the operator's mount paths".into(),
            field_path: Some(".worker.volumeMounts"),
            transition: false,
        },
    ]
}

/// The rules on label and annotation keys and values.
fn label_rules() -> Vec<CelRule> {
    let app = RESERVED_LABEL_PREFIXES[1];
    let owned = [labels::NAME, labels::INSTANCE, labels::MANAGED_BY].join(", ");
    let pipeline_key_ok = label_key_ok("self");
    vec![
        map_keys_rule(&["spec", "worker"], ".labels", "label", ""),
        map_values_rule(&["spec", "worker"], ".labels", ""),
        CelRule {
            at: &["spec", "worker"],
            rule: format!("!has(self.labels) || self.labels.all(k, !k.startsWith('{app}'))"),
            message_expression: format!(
                "self.labels.filter(k, k.startsWith('{app}')).join(', ') + ': label keys under {app} are reserved: the operator sets {owned} on the worker pods and selects them by these labels; use another prefix'"
            ),
            message: format!("label keys under {app} are reserved"),
            field_path: Some(".labels"),
            transition: false,
        },
        map_keys_rule(&["spec", "worker"], ".annotations", "annotation", ""),
        map_keys_rule(
            &["spec", "placement"],
            ".nodeSelector",
            "label",
            ", so no node can carry it",
        ),
        map_values_rule(
            &["spec", "placement"],
            ".nodeSelector",
            ", so no node can carry it",
        ),
        CelRule {
            at: &["spec", "placement", "pipelineTopologyKey"],
            rule: pipeline_key_ok,
            message_expression: format!(
                r#"'"' + self + '" is not a valid label key, so no node can carry it; {LABEL_KEY_FIX}'"#
            ),
            message: "pipelineTopologyKey must be a valid Kubernetes label key".into(),
            field_path: None,
            transition: false,
        },
    ]
}

/// Every CEL rule of the CRD, in a stable order.
pub fn rules() -> Vec<CelRule> {
    let arch = "self.model.architecture";
    let valid_tp = valid_tensor_degrees(arch);
    let max_gpus = MAX_GPUS_PER_REPLICA;
    let max_name = MAX_NAME_LENGTH;
    let (tensor_rule, tensor_msg, tensor_static) = degree_rule("tensor-parallel");
    let (pipeline_rule, pipeline_msg, pipeline_static) = degree_rule("pipeline-parallel");
    let (expert_rule, expert_msg, expert_static) = degree_rule("expert-parallel");
    let expert_is_int = format!(
        "has(self.parallelism) && has(self.parallelism.expert) && {}",
        is_pinned("self.parallelism.expert")
    );
    let ep = pinned("self.parallelism.expert");
    let tensor_is_int = format!(
        "has(self.parallelism) && has(self.parallelism.tensor) && {}",
        is_pinned("self.parallelism.tensor")
    );
    let pipeline_is_int = format!(
        "has(self.parallelism) && has(self.parallelism.pipeline) && {}",
        is_pinned("self.parallelism.pipeline")
    );
    let tp = pinned("self.parallelism.tensor");
    let pp = pinned("self.parallelism.pipeline");
    let always: Vec<String> = OPERATOR_VOLUMES
        .iter()
        .map(|(n, _, _)| format!("'{n}'"))
        .collect();
    let always = format!("[{}]", always.join(", "));

    let mut rules = vec![
        CelRule {
            at: &[],
            rule: format!("size(self.metadata.name) <= {max_name}"),
            message_expression: format!(
                r#"'metadata.name: "' + self.metadata.name + '" has ' + string(size(self.metadata.name)) + ' characters; at most {max_name} are allowed so that worker pod and Service names stay within 63; choose a shorter name'"#
            ),
            message: format!("metadata.name must have at most {max_name} characters"),
            field_path: None,
            transition: false,
        },
        CelRule {
            at: &[],
            rule: "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')".into(),
            message_expression: r#"'metadata.name: "' + self.metadata.name + '" must be a DNS label (lowercase letters, digits and dashes, starting with a letter, no dots) because it names the worker Services; choose a name like "llama-70b"'"#.into(),
            message: "metadata.name must be a DNS-1035 label".into(),
            field_path: None,
            transition: false,
        },
        CelRule {
            at: &["spec", "parallelism", "tensor"],
            rule: tensor_rule,
            message_expression: tensor_msg,
            message: tensor_static,
            field_path: None,
            transition: false,
        },
        CelRule {
            at: &["spec", "parallelism", "pipeline"],
            rule: pipeline_rule,
            message_expression: pipeline_msg,
            message: pipeline_static,
            field_path: None,
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: format!("!({tensor_is_int}) || {arch}.attentionHeads % {tp} == 0"),
            message_expression: format!(
                r#"string({tp}) + " must divide the model's " + string({arch}.attentionHeads) + ' attention heads; valid: ' + {valid_tp}"#
            ),
            message: "tensor-parallel degree must divide model.architecture.attentionHeads".into(),
            field_path: Some(".parallelism.tensor"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: format!(
                "!({tensor_is_int}) || {arch}.kvHeads % {tp} == 0 || {tp} % {arch}.kvHeads == 0"
            ),
            message_expression: format!(
                r#"string({tp}) + " must divide the model's " + string({arch}.kvHeads) + ' KV heads or be a multiple of them; valid: ' + {valid_tp}"#
            ),
            message: "tensor-parallel degree must divide model.architecture.kvHeads or be a multiple of it".into(),
            field_path: Some(".parallelism.tensor"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: format!("!({pipeline_is_int}) || {pp} <= {arch}.layers"),
            message_expression: format!(
                r#"string({pp}) + " exceeds the model's " + string({arch}.layers) + ' layers (each stage needs at least one); use "auto" or 1 to ' + string({arch}.layers)"#
            ),
            message: "pipeline-parallel degree must be at most model.architecture.layers".into(),
            field_path: Some(".parallelism.pipeline"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: format!(
                "!({tensor_is_int}) || !({pipeline_is_int}) || {tp} * {pp} <= {max_gpus}"
            ),
            message_expression: format!(
                r#"'tensor x pipeline = ' + string({tp}) + ' x ' + string({pp}) + ' = ' + string({tp} * {pp}) + ' GPUs per replica exceeds the maximum of {max_gpus}; lower tensor or pipeline, or set them to "auto"'"#
            ),
            message: format!("tensor x pipeline must be at most {max_gpus} GPUs per replica"),
            field_path: Some(".parallelism"),
            transition: false,
        },
        CelRule {
            at: &["spec", "model", "architecture"],
            rule: "self.kvHeads <= self.attentionHeads && self.attentionHeads % self.kvHeads == 0".into(),
            message_expression: "string(self.kvHeads) + ' must divide attentionHeads (' + string(self.attentionHeads) + '): grouped-query attention shares each KV head among a whole number of query heads; copy num_key_value_heads from the model config'".into(),
            message: "kvHeads must divide attentionHeads".into(),
            field_path: Some(".kvHeads"),
            transition: false,
        },
        CelRule {
            at: &["spec", "model", "uri"],
            rule: r"self.matches('^(file:///[^\\s]+|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/[^\\s]+|https?://[^/\\s]+(/[^\\s]*)?)$')".into(),
            message_expression: r#"'"' + self + '" is not a supported model location; use file:///PATH (inside a volume from worker.volumes), pvc://CLAIM/PATH or https://HOST/PATH'"#.into(),
            message: "model.uri must be file:///PATH, pvc://CLAIM/PATH or http(s)://HOST/PATH".into(),
            field_path: None,
            transition: false,
        },
        CelRule {
            at: &["spec", "model", "sha256"],
            rule: "self.matches('^[0-9a-f]{64}$')".into(),
            message_expression: r#"'"' + self + '" is not a SHA-256; use the 64 lowercase hex characters that sha256sum prints'"#.into(),
            message: "sha256 must be 64 lowercase hex characters".into(),
            field_path: None,
            transition: false,
        },
        CelRule {
            at: &["spec", "model"],
            rule: "self.uri != oldSelf.uri || self.architecture == oldSelf.architecture".into(),
            message_expression: "'describes the weights at ' + self.uri + ' and cannot change on its own; change model.uri in the same update, or create a new ModelDeployment'".into(),
            message: "model.architecture can only change together with model.uri".into(),
            field_path: Some(".architecture"),
            transition: true,
        },
        CelRule {
            at: &["spec"],
            rule: "!self.model.uri.startsWith('file://') || (has(self.worker) && has(self.worker.volumeMounts) && size(self.worker.volumeMounts) > 0)".into(),
            message_expression: r#"'"' + self.model.uri + '" is a path inside the worker, but worker.volumeMounts is empty; add a volume in worker.volumes and mount it, or use pvc://CLAIM/PATH'"#.into(),
            message: "a file:// model needs a volume mounted through worker.volumes and worker.volumeMounts".into(),
            field_path: Some(".model.uri"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: format!(
                "!has(self.serving) || !has(self.serving.contextLength) || self.serving.contextLength <= {arch}.contextLength"
            ),
            message_expression: format!(
                r#"string(self.serving.contextLength) + " exceeds the model's context length of " + string({arch}.contextLength) + '; use at most ' + string({arch}.contextLength) + ' or leave it unset'"#
            ),
            message: "serving.contextLength must be at most model.architecture.contextLength".into(),
            field_path: Some(".serving.contextLength"),
            transition: false,
        },
        CelRule {
            at: &["spec", "autoscaling"],
            rule: "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas".into(),
            message_expression: "string(self.minReplicas) + ' is greater than maxReplicas (' + string(self.maxReplicas) + '); raise maxReplicas or lower minReplicas'".into(),
            message: "minReplicas must be at most maxReplicas".into(),
            field_path: Some(".minReplicas"),
            transition: false,
        },
        CelRule {
            at: &["spec", "worker"],
            rule: "!has(self.env) || self.env.all(e, !e.name.startsWith('TESSERA_'))".into(),
            message_expression: "self.env.filter(e, e.name.startsWith('TESSERA_')).map(e, e.name).join(', ') + ': names starting with TESSERA_ are reserved for the operator; rename them'".into(),
            message: "env names starting with TESSERA_ are reserved".into(),
            field_path: Some(".env"),
            transition: false,
        },
        CelRule {
            at: &["spec", "worker"],
            rule: "!has(self.labels) || self.labels.all(k, !k.startsWith('tessera.dev/'))".into(),
            message_expression: "self.labels.filter(k, k.startsWith('tessera.dev/')).join(', ') + ': label keys under tessera.dev/ are reserved for the operator; use another prefix'".into(),
            message: "label keys under tessera.dev/ are reserved".into(),
            field_path: Some(".labels"),
            transition: false,
        },
        owned_args_rule(
            "vllm",
            &owned_args_pattern(VLLM_OWNED_FLAGS, VLLM_OWNED_SHORT),
        ),
        owned_args_rule("sglang", &owned_args_pattern(SGLANG_OWNED_FLAGS, &[])),
        CelRule {
            at: &["spec"],
            rule: "!has(self.serving) || !has(self.serving.kvCacheDtype) || self.serving.kvCacheDtype != 'fp8' || (has(self.engine) && self.engine.name != 'tessera')".into(),
            message_expression: "'fp8: the tessera engine keeps its KV cache in the model dtype and has no FP8 KV cache yet; use kvCacheDtype: bf16, or engine.name vllm or sglang, which take --kv-cache-dtype'".into(),
            message: "serving.kvCacheDtype fp8 needs the vllm or sglang engine".into(),
            field_path: Some(".serving.kvCacheDtype"),
            transition: false,
        },
        CelRule {
            at: &["spec", "engine"],
            rule: "self.name != 'tessera' || !has(self.args) || size(self.args) == 0".into(),
            message_expression: "'tessera-worker serve takes its settings from the environment the operator sets, not from arguments; remove engine.args (' + self.args.join(' ') + ') or set engine.env'".into(),
            message: "engine.args must be empty for the tessera engine".into(),
            field_path: Some(".args"),
            transition: false,
        },
        CelRule {
            at: &["spec", "engine"],
            rule: "!has(self.env) || self.env.all(e, !e.name.startsWith('TESSERA_') && e.name != 'VLLM_HOST_IP')".into(),
            message_expression: "self.env.filter(e, e.name.startsWith('TESSERA_') || e.name == 'VLLM_HOST_IP').map(e, e.name).join(', ') + ': reserved for the operator (TESSERA_* configure the worker, VLLM_HOST_IP is the pod IP); rename or remove them'".into(),
            message: "engine.env names starting with TESSERA_, and VLLM_HOST_IP, are reserved".into(),
            field_path: Some(".env"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: "!has(self.model.sha256) || !self.model.uri.matches('^https?://[^?#]*/([?#].*)?$')".into(),
            message_expression: r#"'"' + self.model.uri + '" is a model directory (it ends in /), fetched file by file; model.sha256 names the checksum of one file. Remove model.sha256, or pin the directory by a revision in its URL (for example .../resolve/COMMIT/)'"#.into(),
            message: "model.sha256 is for a single-file model, not a directory URI ending in /".into(),
            field_path: Some(".model.sha256"),
            transition: false,
        },
        CelRule {
            at: &["spec", "worker", "volumes", "items"],
            rule: "[has(self.persistentVolumeClaim), has(self.configMap), has(self.secret), has(self.emptyDir)].filter(x, x).size() == 1".into(),
            message_expression: r#"'volume "' + self.name + '" must set exactly one of persistentVolumeClaim, configMap, secret or emptyDir'"#.into(),
            message: "a volume must set exactly one source".into(),
            field_path: None,
            transition: false,
        },
        CelRule {
            at: &["spec", "worker"],
            // The operator's own volumes have a rule of their own (see `volume_rules`).
            rule: format!("!has(self.volumeMounts) || self.volumeMounts.all(m, m.name in {always} || (has(self.volumes) && self.volumes.exists(v, v.name == m.name)))"),
            message_expression: format!("self.volumeMounts.filter(m, !(m.name in {always}) && (!has(self.volumes) || !self.volumes.exists(v, v.name == m.name))).map(m, m.name).join(', ') + ': mounted but not declared in worker.volumes; add the volume or fix the name'"),
            message: "every volumeMount must name a volume in worker.volumes".into(),
            field_path: Some(".volumeMounts"),
            transition: false,
        },
    ];
    rules.push(CelRule {
        at: &["spec", "parallelism", "expert"],
        rule: expert_rule,
        message_expression: expert_msg,
        message: expert_static,
        field_path: None,
        transition: false,
    });
    rules.extend(serving_rules(arch));
    rules.extend(moe_rules(arch, &expert_is_int, &ep, &tensor_is_int, &tp));
    rules.extend(label_rules());
    rules.extend(volume_rules());
    rules
}

/// The request shape, latency targets and disaggregation.
fn serving_rules(arch: &str) -> Vec<CelRule> {
    vec![
        CelRule {
            at: &["spec", "serving"],
            rule: "!has(self.disaggregation) || self.disaggregation == 'Off' || has(self.workload)".into(),
            message_expression: "self.disaggregation + ': the planner decides and sizes prefill/decode pools by the request shape; set serving.workload (inputTokens, outputTokens), or disaggregation: Off'".into(),
            message: "serving.disaggregation Auto or On needs serving.workload".into(),
            field_path: Some(".disaggregation"),
            transition: false,
        },
        CelRule {
            at: &["spec", "serving"],
            rule: "!has(self.slo) || has(self.workload)".into(),
            message_expression: "'the latency targets are for a typical request: set serving.workload (inputTokens, outputTokens) too, or remove serving.slo'".into(),
            message: "serving.slo needs serving.workload".into(),
            field_path: Some(".slo"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: format!("!has(self.serving) || !has(self.serving.workload) || self.serving.workload.inputTokens + self.serving.workload.outputTokens <= (has(self.serving.contextLength) ? self.serving.contextLength : {arch}.contextLength)"),
            message_expression: format!("string(self.serving.workload.inputTokens) + ' + ' + string(self.serving.workload.outputTokens) + ' tokens exceed the context of ' + string(has(self.serving.contextLength) ? self.serving.contextLength : {arch}.contextLength) + ' tokens a sequence may use (serving.contextLength, else the context of the model); shorten the workload or raise serving.contextLength'"),
            message: "serving.workload must fit the serving context".into(),
            field_path: Some(".serving.workload"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: "!has(self.autoscaling) || (!has(self.autoscaling.prefill) && !has(self.autoscaling.decode)) || (has(self.serving) && has(self.serving.disaggregation) && self.serving.disaggregation != 'Off')".into(),
            message_expression: "'autoscaling.prefill and autoscaling.decode scale prefill/decode pools, which run only with serving.disaggregation Auto or On; set it, or remove them and scale on autoscaling.metric'".into(),
            message: "autoscaling.prefill and autoscaling.decode need serving.disaggregation Auto or On".into(),
            field_path: Some(".autoscaling"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: "!has(self.poolReplicas) || (has(self.serving) && has(self.serving.disaggregation) && self.serving.disaggregation != 'Off')".into(),
            message_expression: "'poolReplicas sizes prefill/decode pools, which run only with serving.disaggregation Auto or On; set it, or remove poolReplicas and size the deployment with replicas'".into(),
            message: "poolReplicas needs serving.disaggregation Auto or On".into(),
            field_path: Some(".poolReplicas"),
            transition: false,
        },
    ]
}

/// The mixture-of-experts shape and the expert-parallel degree.
fn moe_rules(
    arch: &str,
    expert_is_int: &str,
    ep: &str,
    tensor_is_int: &str,
    tp: &str,
) -> Vec<CelRule> {
    let moe = format!("has({arch}.experts)");
    vec![
        CelRule {
            at: &["spec", "model", "architecture"],
            rule: "has(self.experts) == has(self.expertsPerToken) && has(self.experts) == has(self.expertIntermediateSize)".into(),
            message_expression: "'a mixture of experts needs experts, expertsPerToken and expertIntermediateSize together (set: ' + (has(self.experts) ? 'experts ' : '') + (has(self.expertsPerToken) ? 'expertsPerToken ' : '') + (has(self.expertIntermediateSize) ? 'expertIntermediateSize' : '') + '); copy num_local_experts (or n_routed_experts), num_experts_per_tok and moe_intermediate_size from config.json, or remove them for a dense model'".into(),
            message: "experts, expertsPerToken and expertIntermediateSize must be set together".into(),
            field_path: Some(".experts"),
            transition: false,
        },
        CelRule {
            at: &["spec", "model", "architecture"],
            rule: "has(self.experts) || (!has(self.sharedExperts) && !has(self.denseLayers))".into(),
            message_expression: "'sharedExperts and denseLayers describe a mixture of experts; set experts, expertsPerToken and expertIntermediateSize too, or remove them'".into(),
            message: "sharedExperts and denseLayers need experts".into(),
            field_path: Some(".experts"),
            transition: false,
        },
        CelRule {
            at: &["spec", "model", "architecture"],
            rule: "!has(self.experts) || !has(self.expertsPerToken) || self.expertsPerToken <= self.experts".into(),
            message_expression: "string(self.expertsPerToken) + ' experts per token exceeds the ' + string(self.experts) + ' experts of the model; copy num_experts_per_tok from config.json'".into(),
            message: "expertsPerToken must be at most experts".into(),
            field_path: Some(".expertsPerToken"),
            transition: false,
        },
        CelRule {
            at: &["spec", "model", "architecture"],
            rule: "!has(self.denseLayers) || self.denseLayers < self.layers".into(),
            message_expression: "string(self.denseLayers) + ' dense layers leave no MoE layer of the ' + string(self.layers) + '; denseLayers counts the layers whose feed-forward is dense (first_k_dense_replace), at most layers - 1'".into(),
            message: "denseLayers must be less than layers".into(),
            field_path: Some(".denseLayers"),
            transition: false,
        },
        CelRule {
            at: &["spec", "model", "architecture"],
            rule: "!has(self.experts) || !has(self.expertIntermediateSize) || (self.layers - (has(self.denseLayers) ? self.denseLayers : 0)) * self.experts * 3 * self.hiddenSize * self.expertIntermediateSize < self.parameters".into(),
            message_expression: "'the routed experts alone hold (layers - denseLayers) x experts x 3 x hiddenSize x expertIntermediateSize = ' + string((self.layers - (has(self.denseLayers) ? self.denseLayers : 0)) * self.experts * 3 * self.hiddenSize * self.expertIntermediateSize) + ' parameters, not less than parameters (' + string(self.parameters) + '); parameters is the total over all experts: check it, expertIntermediateSize (moe_intermediate_size) and denseLayers'".into(),
            message: "the routed experts' parameters must be fewer than parameters".into(),
            field_path: Some(".parameters"),
            transition: false,
        },
        CelRule {
            at: &["spec", "model", "architecture"],
            rule: "!has(self.qkRopeHeadDim) || has(self.kvLoraRank)".into(),
            message_expression: "'qkRopeHeadDim is part of multi-head latent attention; set kvLoraRank (kv_lora_rank) too, or remove it'".into(),
            message: "qkRopeHeadDim needs kvLoraRank".into(),
            field_path: Some(".qkRopeHeadDim"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: format!("!({expert_is_int}) || {ep} == 1 || {moe}"),
            message_expression: format!(
                r#"'expert parallelism ' + string({ep}) + ' needs a mixture-of-experts model, and model.architecture has no experts; use expert: 1 or "auto", or describe the experts (experts, expertsPerToken, expertIntermediateSize)'"#
            ),
            message: "parallelism.expert above 1 needs model.architecture.experts".into(),
            field_path: Some(".parallelism.expert"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: format!("!({expert_is_int}) || !({moe}) || {arch}.experts % {ep} == 0"),
            message_expression: format!(
                r#"string({ep}) + " must divide the model's " + string({arch}.experts) + ' experts so that every GPU holds the same number of whole experts; valid: ' + {list}.filter(d, {arch}.experts % d == 0).map(d, string(d)).join(', ')"#,
                list = degrees()
            ),
            message: "parallelism.expert must divide model.architecture.experts".into(),
            field_path: Some(".parallelism.expert"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: format!("!({expert_is_int}) || !({tensor_is_int}) || {ep} == 1 || {ep} == {tp}"),
            message_expression: format!(
                r#"'expert ' + string({ep}) + ' with tensor ' + string({tp}) + ': the expert-parallel group is the GPUs of a pipeline stage, so expert must be 1 or equal tensor; set expert: ' + string({tp}) + ', expert: 1, or tensor: "auto"'"#
            ),
            message: "parallelism.expert must be 1 or equal parallelism.tensor".into(),
            field_path: Some(".parallelism.expert"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: format!("!has(self.parallelism) || !has(self.parallelism.attention) || self.parallelism.attention != 'data' || ({moe} && !({expert_is_int} && {ep} == 1))"),
            message_expression: r#"'data-parallel attention runs inside an expert-parallel group: it needs a mixture-of-experts model (model.architecture.experts) and expert parallelism (expert "auto" or above 1); use attention: tensor or "auto"'"#.into(),
            message: "parallelism.attention data needs a mixture of experts with expert parallelism".into(),
            field_path: Some(".parallelism.attention"),
            transition: false,
        },
        CelRule {
            at: &["spec"],
            rule: "!has(self.parallelism) || !has(self.parallelism.attention) || self.parallelism.attention != 'data' || !has(self.model.architecture.experts) || (has(self.engine) && self.engine.name != 'tessera')".into(),
            message_expression: "'data: the tessera engine runs attention tensor-parallel (it splits the experts over its tensor-parallel ranks); use attention: tensor or \"auto\", or engine.name vllm or sglang, which run data-parallel attention'".into(),
            message: "parallelism.attention data needs the vllm or sglang engine".into(),
            field_path: Some(".parallelism.attention"),
            transition: false,
        },
    ]
}
