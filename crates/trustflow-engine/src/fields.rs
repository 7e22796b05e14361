//! Deserialising settings with field paths: every error names the field it is about
//! (`stages[1].formats[0]`) in words a pipeline author understands. Used by the spec
//! loader for whole files and by the stage registry for each stage's own settings.

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Deserialize `value` into `T`; on failure return the full field path (under
/// `prefix`) and serde's message.
pub fn from_value_at<T: DeserializeOwned>(
    value: Value,
    prefix: &str,
) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = e.path().to_string();
        if path == "." {
            path.clear();
        }
        let message = friendly_serde_error(&e.inner().to_string());
        // serde names an unknown key in the message only; make it part of the path so
        // the location points at the offending line.
        if let Some(key) = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
            && !path.ends_with(key)
        {
            path = if path.is_empty() {
                key.to_string()
            } else {
                format!("{path}.{key}")
            };
        }
        let full = match (prefix.is_empty(), path.is_empty()) {
            (true, _) => path,
            (false, true) => prefix.to_string(),
            (false, false) => format!("{prefix}.{path}"),
        };
        (full, message)
    })
}

/// serde speaks Rust (`usize`, `struct SourceSpec`); users wrote YAML.
fn friendly_serde_error(message: &str) -> String {
    let mut m = message.to_string();
    for rust in ["usize", "u64", "u32", "u16", "u8"] {
        m = m.replace(&format!("expected {rust}"), "expected a whole number >= 0");
    }
    for spec in [
        "SourceSpec",
        "SinkSpec",
        "RuntimeSpec",
        "ColumnMap",
        "StageCommon",
    ] {
        m = m.replace(&format!("expected struct {spec}"), "expected a mapping");
    }
    if m.contains("expected a sequence") {
        m = m.replace("expected a sequence", "expected a list, e.g. `[a, b]`");
    }
    m.replace("floating point", "number")
}

/// The top-level property names of `T`'s JSON Schema, flattened fields included, in
/// declaration order: the keys a mapping deserialized into `T` may hold.
pub fn schema_property_names<T: schemars::JsonSchema>() -> Vec<String> {
    let schema = serde_json::to_value(schemars::schema_for!(T)).unwrap_or_default();
    let mut names: Vec<String> = Vec::new();
    let parts = std::iter::once(&schema).chain(
        schema
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten(),
    );
    for part in parts {
        if let Some(Value::Object(props)) = part.get("properties") {
            for key in props.keys() {
                if !names.contains(key) {
                    names.push(key.clone());
                }
            }
        }
    }
    names
}

/// [`from_value_at`] for types whose unknown keys serde cannot refuse itself (structs
/// with `#[serde(flatten)]` blocks, which rule out `deny_unknown_fields`): the keys are
/// checked against `known` (the type's [`schema_property_names`]) first, with serde's
/// own wording.
pub fn from_value_checked<T: DeserializeOwned>(
    value: Value,
    prefix: &str,
    known: &[String],
) -> Result<T, (String, String)> {
    if let Value::Object(map) = &value
        && let Some(unknown) = map.keys().find(|k| !known.contains(k))
    {
        let quoted: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
        let expected = match quoted.as_slice() {
            [] => "there are no fields".to_string(),
            [one] => format!("expected {one}"),
            [a, b] => format!("expected {a} or {b}"),
            all => format!("expected one of {}", all.join(", ")),
        };
        let path = if prefix.is_empty() {
            unknown.clone()
        } else {
            format!("{prefix}.{unknown}")
        };
        return Err((path, format!("unknown field `{unknown}`, {expected}")));
    }
    from_value_at(value, prefix)
}
