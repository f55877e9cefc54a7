//! The chart's alert rules (`charts/tessera/files/prometheus-rules.yaml`) and Grafana dashboard
//! (`charts/tessera/files/dashboard.json`): every PromQL expression parses (promql-parser, the
//! Prometheus grammar), every metric it selects is one the operator or the worker exports, and
//! every label it matches on is one that metric carries.
//!
//! The exported names are not a hand-kept list: they come from the registries themselves
//! (`Metrics::new`, `AutoscalerMetrics::new`, `ServerMetrics::new`), encoded as Prometheus text,
//! with prometheus-client's suffixes (`_total` on counters; `_bucket`, `_sum`, `_count` on
//! histograms), and so do their label names. Renaming a metric or a label in the code breaks this
//! test until the rules and the dashboard follow. prometheus-client leaves a labelled family out
//! of the text until it has a child, so `expositions` gives each family one; a family registered
//! later without one fails `every_registered_metric_is_seen` instead of passing unseen.

use std::collections::{BTreeMap, BTreeSet};

use prometheus_client::registry::Registry;
use promql_parser::label::MatchOp;
use promql_parser::parser::{self, Expr, VectorSelector};
use promql_parser::util::{ExprVisitor, parse_duration, walk_expr};
use serde_json::Value;
use tessera_operator::controller::metrics::{
    AutoscalerMetrics, CategoryLabel, DeploymentLabels, DirectionLabel, Metrics, REPLICA_STATES,
    ReplicaLabels, ResultLabel,
};
use tessera_tests::repo_root;
use tessera_worker::server::metrics::ServerMetrics;

const RULES: &str = "charts/tessera/files/prometheus-rules.yaml";
const DASHBOARD: &str = "charts/tessera/files/dashboard.json";

/// Labels Prometheus adds to every series: the target's (the Prometheus Operator's service and
/// pod discovery) and the chart PodMonitor's relabelings of the replica leaders' pod labels.
const TARGET_LABELS: &[&str] = &[
    "namespace",
    "pod",
    "job",
    "instance",
    "service",
    "endpoint",
    "container",
    "deployment",
    "replica",
];

/// The alerts the chart promises (docs/operations.md has a runbook for each).
const ALERTS: &[&str] = &[
    "TesseraReplicaDegraded",
    "TesseraReplicasUnplaced",
    "TesseraRankLost",
    "TesseraAutoscalerCapacityLimited",
    "TesseraOperatorNotLeading",
];

/// Series name -> its label names; `None` for an awaited metric (labels not known yet).
type Allowed = BTreeMap<String, Option<BTreeSet<String>>>;

fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Series in a Prometheus text exposition and the label names of each, from its `# TYPE` lines
/// and its sample lines.
fn series(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                panic!("malformed TYPE line {line:?}");
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "gauge" | "unknown" => &[""],
                other => panic!("metric {name} has a type this test does not expand: {other}"),
            };
            for s in suffixes {
                out.entry(format!("{name}{s}")).or_default();
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = out.entry(line[..end].to_owned()).or_default();
            if let Some(inner) = line[end..].strip_prefix('{') {
                let inner = &inner[..inner.find('}').expect("closing brace")];
                for pair in inner.split(',').filter(|p| !p.is_empty()) {
                    let (key, _) = pair.split_once('=').expect("label=value");
                    labels.insert(key.to_owned());
                }
            }
        }
    }
    out
}

/// The names a registry's `Debug` shows (prometheus-client's `Descriptor { name: "..." }`).
fn registered_names(debug: &str) -> Vec<String> {
    debug
        .split("Descriptor { name: \"")
        .skip(1)
        .map(|rest| rest[..rest.find('"').expect("end of name")].to_owned())
        .collect()
}

/// The text of the operator's registry and of a worker's, with a child in every family, and the
/// names each registry holds.
fn expositions() -> Vec<(String, Vec<String>)> {
    let mut registry = Registry::default();
    let controller = Metrics::new(&mut registry);
    let autoscaler = AutoscalerMetrics::new(&mut registry);
    let ok = ResultLabel { result: "ok" };
    let deployment = DeploymentLabels {
        namespace: "ns".into(),
        deployment: "d".into(),
    };
    // Each guard is dropped at once (`let _`): encoding takes the same locks.
    let _ = controller.reconciles.get_or_create(&ok);
    let _ = controller
        .failures
        .get_or_create(&CategoryLabel { category: "api" });
    let _ = controller.replicas.get_or_create(&ReplicaLabels {
        namespace: deployment.namespace.clone(),
        deployment: deployment.deployment.clone(),
        state: REPLICA_STATES[0],
    });
    let _ = autoscaler.scrapes.get_or_create(&ok);
    let _ = autoscaler
        .decisions
        .get_or_create(&DirectionLabel { direction: "up" });
    let _ = autoscaler.desired_replicas.get_or_create(&deployment);
    let _ = autoscaler.capacity_limited.get_or_create(&deployment);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    let operator = (text, registered_names(&format!("{registry:?}")));

    let server = ServerMetrics::new();
    server.finished("stop");
    let worker = (server.render(), registered_names(&format!("{server:?}")));
    vec![operator, worker]
}

/// Every series the operator's and the worker's `/metrics` can carry, with its label names.
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for (text, _) in expositions() {
        out.extend(series(&text));
    }
    out
}

/// What a query may select: everything exported.
fn allowed() -> Allowed {
    exported().into_iter().map(|(k, v)| (k, Some(v))).collect()
}

/// A label matcher: label, operator, value.
type Matcher = (String, MatchOp, String);

/// Collects the metric name and the label matchers of every vector and matrix selector.
#[derive(Default)]
struct Selectors {
    found: Vec<(String, Vec<Matcher>)>,
    problems: Vec<String>,
}

impl Selectors {
    fn add(&mut self, vs: &VectorSelector) {
        let by_matcher = vs
            .matchers
            .matchers
            .iter()
            .find(|m| m.name == "__name__")
            .map(|m| (m.op.clone(), m.value.clone()));
        let name = match (&vs.name, by_matcher) {
            (Some(name), _) => name.clone(),
            (None, Some((MatchOp::Equal, name))) => name,
            _ => {
                self.problems
                    .push(format!("selector {vs} names no single metric"));
                return;
            }
        };
        if !vs.matchers.or_matchers.is_empty() {
            self.problems
                .push(format!("selector {vs}: `or` matchers are not checked"));
        }
        let matchers = vs
            .matchers
            .matchers
            .iter()
            .filter(|m| m.name != "__name__")
            .map(|m| (m.name.clone(), m.op.clone(), m.value.clone()))
            .collect();
        self.found.push((name, matchers));
    }
}

impl ExprVisitor for Selectors {
    type Error = std::convert::Infallible;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Self::Error> {
        match expr {
            Expr::VectorSelector(vs) => self.add(vs),
            Expr::MatrixSelector(ms) => self.add(&ms.vs),
            _ => {}
        }
        Ok(true)
    }
}

/// Parse `query` and return the metric names it selects, or why it is wrong: a syntax error, a
/// selector without one metric name, a name that is not in `allowed`, a matcher on a label the
/// metric does not carry, or a `tessera_replicas` state that is not one of `REPLICA_STATES`.
fn check_query(query: &str, allowed: &Allowed) -> Result<Vec<String>, String> {
    let expr = parser::parse(query).map_err(|e| format!("does not parse: {e}"))?;
    let mut sel = Selectors::default();
    walk_expr(&mut sel, &expr).expect("infallible");
    if sel.found.is_empty() {
        sel.problems.push("selects no metric".into());
    }
    for (name, matchers) in &sel.found {
        let Some(labels) = allowed.get(name) else {
            sel.problems.push(format!(
                "{name} is not a metric the operator or the worker exports"
            ));
            continue;
        };
        for (label, op, value) in matchers {
            if let Some(labels) = labels
                && !labels.contains(label)
                && !TARGET_LABELS.contains(&label.as_str())
            {
                sel.problems
                    .push(format!("{name} has no label {label} (it has {labels:?})"));
            }
            if name == "tessera_replicas" && label == "state" {
                let values: Vec<&str> = match op {
                    MatchOp::Equal | MatchOp::NotEqual => vec![value.as_str()],
                    MatchOp::Re(_) | MatchOp::NotRe(_) => value.split('|').collect(),
                };
                for v in values {
                    if !REPLICA_STATES.contains(&v) {
                        sel.problems.push(format!(
                            "tessera_replicas has no state {v:?} (states: {REPLICA_STATES:?})"
                        ));
                    }
                }
            }
        }
    }
    if sel.problems.is_empty() {
        Ok(sel.found.into_iter().map(|(name, _)| name).collect())
    } else {
        Err(sel.problems.join("; "))
    }
}

/// Grafana's variables made PromQL: the interval variables become a duration, the others (only
/// allowed inside label values) a plain word. A variable standing for a metric name therefore
/// becomes the unknown metric `x`.
fn grafana_to_promql(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    let mut rest = query;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').expect("closing brace of a ${variable}");
            (&braced[..end], end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        assert!(!name.is_empty(), "a lone $ in {query:?}");
        out.push_str(match name.split(':').next().unwrap_or(name) {
            "__rate_interval" | "__interval" | "__range" => "5m",
            _ => "x",
        });
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Every (where, query) of the dashboard: panel targets and the `label_values(selector, label)`
/// queries of its variables (their selector is checked).
fn dashboard_queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let panels = dash["panels"].as_array().expect("dashboard.panels");
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            out.push((format!("panel {title:?} {}", t["refId"]), expr.to_owned()));
        }
    }
    for var in dash["templating"]["list"].as_array().expect("templating") {
        if var["type"] != "query" {
            continue;
        }
        let q = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .expect("query variable with a query");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {}: only label_values(...) is used", var["name"]));
        let (selector, _label) = inner
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        out.push((format!("variable {}", var["name"]), selector.to_owned()));
    }
    out
}

#[test]
fn every_registered_metric_is_seen() {
    for (text, registered) in expositions() {
        assert!(registered.len() >= 5, "{registered:?}");
        for name in registered {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} is registered but not in the exposition: give its family a child in \
                 expositions() (tests/tests/alerts.rs)"
            );
        }
    }
}

#[test]
fn exported_names_come_from_the_registries() {
    let names = exported();
    for want in [
        "tessera_replicas",
        "tessera_reconciles_total",
        "tessera_reconcile_failures_total",
        "tessera_reconcile_duration_seconds_bucket",
        "tessera_operator_leader",
        "tessera_autoscaler_decisions_total",
        "tessera_autoscaler_desired_replicas",
        "tessera_generated_tokens_total",
        "tessera_time_to_first_token_seconds_bucket",
        "tessera_inter_token_latency_seconds_bucket",
        "tessera_kv_cache_usage_ratio",
        "tessera_requests_waiting",
    ] {
        assert!(names.contains_key(want), "{want} missing from {names:?}");
    }
    // Counters are only ever exposed with `_total`.
    assert!(!names.contains_key("tessera_reconciles"), "{names:?}");
    assert_eq!(
        names["tessera_replicas"],
        BTreeSet::from(["namespace".into(), "deployment".into(), "state".into()])
    );
    assert!(names["tessera_reconcile_duration_seconds_bucket"].contains("le"));
    assert!(names["tessera_requests_total"].contains("finish_reason"));
}

#[test]
fn every_alert_rule_parses_and_selects_exported_metrics() {
    let allowed = allowed();
    let file: Value = serde_yaml_ng::from_str(&read(RULES)).expect("rules file is YAML");
    let mut alerts = Vec::new();
    let mut errors = Vec::new();
    for group in file["groups"].as_array().expect("groups") {
        let gname = group["name"].as_str().expect("group name");
        for rule in group["rules"].as_array().expect("rules") {
            let alert = rule["alert"]
                .as_str()
                .unwrap_or_else(|| panic!("group {gname}: every rule is an alert"));
            alerts.push(alert.to_owned());
            let expr = rule["expr"].as_str().expect("expr");
            if let Err(e) = check_query(expr, &allowed) {
                errors.push(format!("{alert}: {e}\n    {}", expr.trim()));
            }
            let r#for = rule["for"]
                .as_str()
                .unwrap_or_else(|| panic!("{alert}: for"));
            if let Err(e) = parse_duration(r#for) {
                errors.push(format!("{alert}: for {for:?}: {e}"));
            }
            let severity = rule["labels"]["severity"].as_str();
            if !matches!(severity, Some("critical" | "warning" | "info")) {
                errors.push(format!("{alert}: severity {severity:?}"));
            }
            for key in ["summary", "description", "runbook"] {
                if rule["annotations"][key].as_str().is_none_or(str::is_empty) {
                    errors.push(format!("{alert}: no {key} annotation"));
                }
            }
        }
    }
    assert!(errors.is_empty(), "{RULES}:\n  {}", errors.join("\n  "));
    let mut sorted = alerts.clone();
    sorted.sort();
    let mut want: Vec<String> = ALERTS.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    assert_eq!(sorted, want, "alerts of {RULES}");
}

#[test]
fn every_dashboard_query_parses_and_selects_exported_metrics() {
    let allowed = allowed();
    let dash: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard is JSON");
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let queries = dashboard_queries(&dash);
    assert!(queries.len() >= 20, "only {} queries", queries.len());
    let mut used = BTreeSet::new();
    let mut errors = Vec::new();
    for (at, query) in &queries {
        match check_query(&grafana_to_promql(query), &allowed) {
            Ok(names) => used.extend(names),
            Err(e) => errors.push(format!("{at}: {e}\n    {query}")),
        }
    }
    assert!(errors.is_empty(), "{DASHBOARD}:\n  {}", errors.join("\n  "));
    // The panels docs/operations.md describes.
    for want in [
        "tessera_replicas",
        "tessera_reconciles_total",
        "tessera_reconcile_failures_total",
        "tessera_reconcile_duration_seconds_bucket",
        "tessera_operator_leader",
        "tessera_autoscaler_decisions_total",
        "tessera_generated_tokens_total",
        "tessera_time_to_first_token_seconds_bucket",
        "tessera_inter_token_latency_seconds_bucket",
        "tessera_kv_cache_usage_ratio",
        "tessera_requests_waiting",
    ] {
        assert!(used.contains(want), "no dashboard panel reads {want}");
    }
}

#[test]
fn the_check_rejects_syntax_errors_unknown_metrics_and_labels() {
    let allowed = allowed();
    let good = r#"sum by (state) (tessera_replicas{namespace="a", state=~"ready|starting"})"#;
    assert_eq!(
        check_query(good, &allowed),
        Ok(vec!["tessera_replicas".into()])
    );
    for (bad, why) in [
        (
            r#"sum by (state) (tessera_replicas{state="ready"}"#,
            "does not parse",
        ),
        ("rate(tessera_reconciles_total[5m]", "does not parse"),
        ("tessera_replicas > > 0", "does not parse"),
        ("rate(tessera_reconciles[5m])", "tessera_reconciles is not"),
        (
            "tessera_kv_cache_utilization",
            "tessera_kv_cache_utilization is not",
        ),
        (
            "max(tessera_replicas) + on() tessera_no_such_metric",
            "tessera_no_such_metric",
        ),
        (r#"{__name__=~"tessera_.+"}"#, "names no single metric"),
        ("vector(1)", "selects no metric"),
        (r#"tessera_replicas{phase="ready"}"#, "has no label phase"),
        (
            r#"rate(tessera_reconciles_total{state="x"}[5m])"#,
            "has no label state",
        ),
        (
            r#"tessera_replicas{state="pending"}"#,
            r#"no state "pending""#,
        ),
        (
            r#"tessera_replicas{state=~"ready|lost"}"#,
            r#"no state "lost""#,
        ),
    ] {
        let err = check_query(bad, &allowed).expect_err(bad);
        assert!(err.contains(why), "{bad}: {err}");
    }
    assert_eq!(
        grafana_to_promql(
            r#"rate(x{namespace=~"$namespace", d="${deployment}"}[$__rate_interval])"#
        ),
        r#"rate(x{namespace=~"x", d="x"}[5m])"#
    );
    assert!(check_query(&grafana_to_promql("rate($metric[5m])"), &allowed).is_err());
}
