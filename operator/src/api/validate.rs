//! Client-side validation of ModelDeployments, giving the API server's answers offline.
//!
//! Three layers, in the order the API server applies them: unknown fields (the server's strict
//! field validation, checked against the generated schema), the typed decode (field types, enums)
//! and the CRD's CEL rules, evaluated with kube's `cel` support against the generated schema with
//! its defaults applied. `plan` and the controller use this, so a spec the API server would
//! refuse is refused here with the same message.
//!
//! The Rust types themselves accept unknown fields: the controller decodes objects written under
//! a newer CRD (with fields this version does not know) instead of failing on them. Manifests
//! given to `plan -f` go through [`parse_model_deployment`], which still names every unknown field.

use std::fmt;
use std::sync::LazyLock;

use kube::core::cel::{CompiledSchema, Validator, compile_schema};
use serde_json::Value;

use super::{GROUP, ModelDeployment, VERSION, spec_schema};

/// One invalid field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, for example `spec.parallelism.tensor`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// A ModelDeployment that the API server would refuse, with every reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ModelDeployment.{GROUP} \"{name}\" is invalid: {}", join(.errors))]
pub struct ValidationError {
    /// Name of the object (or `<unnamed>`).
    pub name: String,
    /// Every failed check.
    pub errors: Vec<FieldError>,
}

fn join(errors: &[FieldError]) -> String {
    let parts: Vec<String> = errors.iter().map(ToString::to_string).collect();
    parts.join("; ")
}

struct Compiled {
    /// The openAPIV3Schema as JSON (for the unknown-field check).
    raw: Value,
    schema: CompiledSchema,
    validator: Validator,
}

static COMPILED: LazyLock<Compiled> = LazyLock::new(|| {
    let raw = spec_schema();
    Compiled {
        schema: compile_schema(&raw),
        raw,
        validator: Validator::new(),
    }
});

/// Decode and validate one ModelDeployment given as JSON (for example from a YAML file).
pub fn parse_model_deployment(value: &Value) -> Result<ModelDeployment, ValidationError> {
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_owned();
    let invalid = |field: &str, message: String| ValidationError {
        name: name.clone(),
        errors: vec![FieldError {
            field: field.to_owned(),
            message,
        }],
    };
    let api_version = value.get("apiVersion").and_then(Value::as_str);
    let expected = format!("{GROUP}/{VERSION}");
    if api_version != Some(expected.as_str()) {
        return Err(invalid(
            "apiVersion",
            format!(
                "{} is not served; use apiVersion: {expected}",
                api_version.map_or("missing".to_owned(), |v| format!("\"{v}\""))
            ),
        ));
    }
    let kind = value.get("kind").and_then(Value::as_str);
    if kind != Some("ModelDeployment") {
        return Err(invalid(
            "kind",
            format!(
                "{} is not a ModelDeployment; use kind: ModelDeployment",
                kind.map_or("missing".to_owned(), |v| format!("\"{v}\""))
            ),
        ));
    }
    let unknown = unknown_fields(value);
    if !unknown.is_empty() {
        return Err(ValidationError {
            name,
            errors: unknown,
        });
    }
    let md: ModelDeployment = serde_json::from_value(value.clone())
        .map_err(|e| invalid("", format!("{e} (see docs/api.md for the fields)")))?;
    cel_errors(value, None).map_err(|errors| ValidationError { name, errors })?;
    Ok(md)
}

/// Check a typed ModelDeployment against the CRD's CEL rules (creation rules only).
pub fn validate(md: &ModelDeployment) -> Result<(), ValidationError> {
    let value = serde_json::to_value(md).expect("ModelDeployment serialises");
    cel_errors(&value, None).map_err(|errors| ValidationError {
        name: md
            .metadata
            .name
            .clone()
            .unwrap_or_else(|| "<unnamed>".into()),
        errors,
    })
}

/// Check an update: creation rules on `new` plus the transition rules against `old`.
pub fn validate_update(
    new: &ModelDeployment,
    old: &ModelDeployment,
) -> Result<(), ValidationError> {
    let new_v = serde_json::to_value(new).expect("ModelDeployment serialises");
    let old_v = serde_json::to_value(old).expect("ModelDeployment serialises");
    cel_errors(&new_v, Some(&old_v)).map_err(|errors| ValidationError {
        name: new
            .metadata
            .name
            .clone()
            .unwrap_or_else(|| "<unnamed>".into()),
        errors,
    })
}

fn cel_errors(value: &Value, old: Option<&Value>) -> Result<(), Vec<FieldError>> {
    let c = &*COMPILED;
    c.validator
        .validate_compiled(&c.schema, value, old)
        .map_err(|errs| {
            errs.iter()
                .map(|e| FieldError {
                    field: e.field_path.clone(),
                    message: e.message.clone(),
                })
                .collect()
        })
}

/// Every field of `value` that the CRD's schema does not declare, as the API server's strict
/// field validation reports them (`unknown field "spec.parallelism.pipline"`), each with the
/// fields that are known there and the closest one.
pub fn unknown_fields(value: &Value) -> Vec<FieldError> {
    let mut out = Vec::new();
    walk_unknown(&COMPILED.raw, value, "", &mut out);
    out
}

/// Fields of every object that the generated schema leaves out.
const ROOT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata"];

fn walk_unknown(schema: &Value, value: &Value, path: &str, out: &mut Vec<FieldError>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    let child = |name: &str| {
        if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        }
    };
    match value {
        Value::Object(fields) => {
            if let Some(Value::Object(props)) = schema.get("properties") {
                for (name, v) in fields {
                    // The root's apiVersion, kind and metadata are the API server's own.
                    if path.is_empty() && ROOT_FIELDS.contains(&name.as_str()) {
                        continue;
                    }
                    match props.get(name) {
                        Some(s) => walk_unknown(s, v, &child(name), out),
                        None => out.push(unknown_field(&child(name), name, props.keys())),
                    }
                }
            } else if let Some(s @ Value::Object(_)) = schema.get("additionalProperties") {
                for (name, v) in fields {
                    walk_unknown(s, v, &format!("{path}[{name}]"), out);
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    walk_unknown(s, v, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

fn unknown_field<'a>(
    path: &str,
    name: &str,
    known: impl Iterator<Item = &'a String>,
) -> FieldError {
    let known: Vec<&str> = known.map(String::as_str).collect();
    let closest = known
        .iter()
        .map(|k| (edit_distance(&name.to_lowercase(), &k.to_lowercase()), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min();
    let hint = closest.map_or(String::new(), |(_, k)| format!(" (did you mean \"{k}\"?)"));
    FieldError {
        field: path.to_owned(),
        message: format!(
            "unknown field \"{name}\"{hint}; the fields here are {} (see docs/api.md)",
            known.join(", ")
        ),
    }
}

/// Levenshtein distance in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::edit_distance;

    #[test]
    fn edit_distance_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edit_distance("pipline", "pipeline"), 1);
        assert_eq!(edit_distance("tensr", "tensor"), 1);
        assert_eq!(edit_distance("replicsa", "replicas"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
