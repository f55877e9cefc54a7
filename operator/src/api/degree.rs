//! `"auto"` or a positive integer, as used by `spec.parallelism.tensor` and `.pipeline`.

use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A parallel degree: chosen by the planner (`auto`) or pinned by the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ParallelDegree {
    #[default]
    Auto,
    Fixed(u32),
}

impl ParallelDegree {
    /// Whether the planner chooses.
    pub fn is_auto(&self) -> bool {
        *self == ParallelDegree::Auto
    }

    /// The pinned value, if any.
    pub fn fixed(self) -> Option<u32> {
        match self {
            ParallelDegree::Auto => None,
            ParallelDegree::Fixed(n) => Some(n),
        }
    }
}

impl fmt::Display for ParallelDegree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParallelDegree::Auto => f.write_str("auto"),
            ParallelDegree::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for ParallelDegree {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ParallelDegree::Auto => s.serialize_str("auto"),
            ParallelDegree::Fixed(n) => s.serialize_u32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for ParallelDegree {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ParallelDegree;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""auto" or a positive integer"#)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                match u32::try_from(v) {
                    Ok(n) if n >= 1 => Ok(ParallelDegree::Fixed(n)),
                    _ => Err(E::custom(format!(
                        r#"{v} is not a valid degree; use "auto" or an integer from 1 to 64"#
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        r#"{v} is not a valid degree; use "auto" or an integer from 1 to 64"#
                    ))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if v == "auto" {
                    Ok(ParallelDegree::Auto)
                } else {
                    Err(E::custom(format!(
                        r#""{v}" is not a valid degree; use "auto" or an integer (without quotes) from 1 to 64"#
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for ParallelDegree {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ParallelDegree".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // Structural int-or-string; the value rules ("auto" or 1..=64) are CEL rules added by
        // `crd()`, so they come with a message that names the value and the fix.
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "default": "auto",
            "description": "\"auto\" or a positive integer"
        })
    }
}
