//! The structural part of the CRD's OpenAPI schema, checked the way the API server checks a
//! write: types, required fields, enums, bounds on numbers, string lengths, list and map sizes.
//! (CEL rules are checked by [`super::validate`]; only the spec has them.)
//!
//! The controller checks every status against it before writing, so a status the API server
//! would refuse (and with it every later status write) is caught and logged with the field,
//! and the tests hold every status they produce to it.

use serde_json::Value;

/// Every violation of `schema` by `value`, as `path: what`.
pub fn violations(schema: &Value, value: &Value) -> Vec<String> {
    let mut out = Vec::new();
    check(schema, value, "", &mut out);
    out
}

/// The status part of the ModelDeployment CRD's schema (built once).
pub fn status_schema() -> &'static Value {
    static SCHEMA: std::sync::LazyLock<Value> =
        std::sync::LazyLock::new(|| super::crd::spec_schema()["properties"]["status"].clone());
    &SCHEMA
}

/// The violations of the status schema by `status`.
pub fn status_violations(status: &super::ModelDeploymentStatus) -> Vec<String> {
    let value = serde_json::to_value(status).expect("a status serialises");
    violations(status_schema(), &value)
        .into_iter()
        .map(|v| format!("status{v}"))
        .collect()
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    }
}

fn check(schema: &Value, v: &Value, path: &str, out: &mut Vec<String>) {
    if v.is_null() {
        if schema["nullable"] != Value::Bool(true) {
            out.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == Value::Bool(true) {
        if !(v.is_string() || v.is_i64() || v.is_u64()) {
            out.push(format!("{path}: must be an integer or a string"));
        }
        return;
    }
    if let Some(t) = schema["type"].as_str()
        && !type_ok(t, v)
    {
        out.push(format!("{path}: must be of type {t}"));
        return;
    }
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(v)
    {
        out.push(format!(
            "{path}: {v} is not one of {}",
            Value::Array(options.clone())
        ));
    }
    if let Some(s) = v.as_str()
        && let Some(max) = schema["maxLength"].as_u64()
        && s.chars().count() as u64 > max
    {
        out.push(format!(
            "{path}: {} characters, more than maxLength {max}",
            s.chars().count()
        ));
    }
    if let Some(n) = v.as_f64() {
        if let Some(max) = schema["maximum"].as_f64()
            && n > max
        {
            out.push(format!("{path}: {n} is greater than maximum {max}"));
        }
        if let Some(min) = schema["minimum"].as_f64()
            && n < min
        {
            out.push(format!("{path}: {n} is less than minimum {min}"));
        }
    }
    if let Some(items) = v.as_array() {
        if let Some(max) = schema["maxItems"].as_u64()
            && items.len() as u64 > max
        {
            out.push(format!(
                "{path}: {} items, more than maxItems {max}",
                items.len()
            ));
        }
        for (i, item) in items.iter().enumerate() {
            check(&schema["items"], item, &format!("{path}[{i}]"), out);
        }
    }
    if let Some(obj) = v.as_object() {
        if let Some(max) = schema["maxProperties"].as_u64()
            && obj.len() as u64 > max
        {
            out.push(format!(
                "{path}: {} properties, more than maxProperties {max}",
                obj.len()
            ));
        }
        for r in schema["required"].as_array().into_iter().flatten() {
            if let Some(r) = r.as_str()
                && !obj.contains_key(r)
            {
                out.push(format!("{path}.{r}: required"));
            }
        }
        let props = schema["properties"].as_object();
        for (k, item) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(s, item, &format!("{path}.{k}"), out),
                None if schema["additionalProperties"].is_object() => check(
                    &schema["additionalProperties"],
                    item,
                    &format!("{path}.{k}"),
                    out,
                ),
                // Unknown fields are pruned by the API server, not refused.
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_what_the_api_server_refuses() {
        let schema = json!({"type": "object", "required": ["a"], "properties": {
            "a": {"type": "string", "maxLength": 3},
            "b": {"type": "array", "maxItems": 1, "items": {"type": "integer", "maximum": 5}},
            "c": {"type": "string", "enum": ["x", "y"]},
            "d": {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": 1}
        }});
        assert!(
            violations(
                &schema,
                &json!({"a": "abc", "b": [5], "c": "x", "d": {"k": "v"}})
            )
            .is_empty()
        );
        let v = violations(
            &schema,
            &json!({"b": [6, 1], "c": "z", "d": {"k": 1, "l": "v"}}),
        );
        assert_eq!(v.len(), 6, "{v:?}");
        assert!(v.contains(&".a: required".to_owned()), "{v:?}");
        assert!(v.iter().any(|e| e.starts_with(".b: 2 items")), "{v:?}");
        assert!(
            v.iter().any(|e| e.starts_with(".b[0]: 6 is greater")),
            "{v:?}"
        );
        assert!(
            v.iter().any(|e| e.starts_with(".c: \"z\" is not one of")),
            "{v:?}"
        );
        assert!(v.iter().any(|e| e.starts_with(".d: 2 properties")), "{v:?}");
        assert!(
            v.iter()
                .any(|e| e.starts_with(".d.k: must be of type string")),
            "{v:?}"
        );
        let long = violations(&schema, &json!({"a": "abcd"}));
        assert_eq!(long, [".a: 4 characters, more than maxLength 3"]);
    }

    #[test]
    fn an_empty_status_is_accepted() {
        assert_eq!(
            status_violations(&crate::api::ModelDeploymentStatus::default()),
            Vec::<String>::new()
        );
    }
}
