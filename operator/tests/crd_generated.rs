//! The committed CRD equals what the code generates, and its schema is fully bounded.

use serde_json::Value;
use tessera_operator::api;

fn repo_file(path: &str) -> String {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {}: {e}", full.display()))
}

#[test]
fn committed_crd_matches_the_code() {
    let committed = repo_file("crds/modeldeployment.yaml");
    assert!(
        committed == api::crd_yaml(),
        "crds/modeldeployment.yaml is stale: run scripts/gen-crd.sh and commit the result"
    );
}

#[test]
fn crd_has_the_contracted_names_subresources_and_columns() {
    let crd = api::crd();
    assert_eq!(crd.spec.group, "tessera.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.kind, "ModelDeployment");
    assert_eq!(crd.spec.names.short_names, Some(vec!["mdep".to_string()]));
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    let sub = v.subresources.as_ref().expect("subresources");
    assert!(sub.status.is_some());
    let scale = sub.scale.as_ref().expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let columns: Vec<&str> = v
        .additional_printer_columns
        .as_ref()
        .expect("printer columns")
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        ["Ready", "Replicas", "GPU", "TP", "PP", "Phase", "Age"]
    );
}

/// Every string, list, map and number in the schema carries a bound (maxLength, enum or
/// pattern-bounded int-or-string; maxItems; maxProperties; minimum and maximum).
#[test]
fn every_value_in_the_schema_is_bounded() {
    let schema = api::spec_schema();
    let mut unbounded = Vec::new();
    walk(&schema, "", &mut unbounded);
    assert!(
        unbounded.is_empty(),
        "unbounded schema nodes: {unbounded:#?}"
    );
}

fn walk(node: &Value, path: &str, out: &mut Vec<String>) {
    let has = |k: &str| node.get(k).is_some();
    let int_or_string = node.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    match node.get("type").and_then(Value::as_str) {
        Some("string") if !has("maxLength") && !has("enum") => out.push(format!("{path} (string)")),
        Some("array") if !has("maxItems") => out.push(format!("{path} (array)")),
        Some("object") if has("additionalProperties") && !has("maxProperties") => {
            out.push(format!("{path} (map)"))
        }
        Some("integer" | "number") if !(has("minimum") && has("maximum")) => {
            out.push(format!("{path} (number)"))
        }
        None if int_or_string && !has("pattern") && !has("x-kubernetes-validations") => {
            out.push(format!("{path} (int-or-string)"))
        }
        _ => {}
    }
    if let Some(items) = node.get("items") {
        walk(items, &format!("{path}[]"), out);
    }
    if let Some(ap) = node.get("additionalProperties").filter(|v| v.is_object()) {
        walk(ap, &format!("{path}{{}}"), out);
    }
    if let Some(Value::Object(props)) = node.get("properties") {
        for (name, child) in props {
            if path.is_empty() && name == "metadata" {
                continue;
            }
            walk(child, &format!("{path}.{name}"), out);
        }
    }
}
