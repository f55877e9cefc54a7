//! Client-side validation of ModelDeployments, giving the API server's answers offline.
//!
//! Two layers, in the order the API server applies them: the typed decode (field types, enums,
//! unknown fields; the server's strict field validation) and the CRD's CEL rules, evaluated with
//! kube's `cel` support against the generated schema with its defaults applied. `plan` and the
//! controller use this, so a spec the API server would refuse is refused here with the same
//! message.

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
    schema: CompiledSchema,
    validator: Validator,
}

static COMPILED: LazyLock<Compiled> = LazyLock::new(|| Compiled {
    schema: compile_schema(&spec_schema()),
    validator: Validator::new(),
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
