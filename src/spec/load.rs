//! YAML text -> [`LoadedPipeline`]. The YAML is first read into a generic value (with
//! serde-saphyr's limits on size, depth and alias expansion), then into the typed spec
//! through serde_path_to_error, so that every error names its field path; the line and
//! column come from [`Locations`], which survives serde's internal buffering.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{LoadedPipeline, Locations, PipelineSpec};
use crate::error::{Error, SpecIssue, SpecIssues, SpecLocation};
use crate::stages::{StageKind, StageSpec};

/// Pipeline files larger than this are refused before parsing.
pub const MAX_PIPELINE_BYTES: u64 = 1 << 20;

/// Keys every stage entry may carry besides its type's own settings.
const STAGE_COMMON_KEYS: [&str; 3] = ["name", "workers", "queue_depth"];

/// Read and parse a pipeline file (no semantic checks; see [`super::validate`]).
pub fn load_file(path: &Path) -> Result<LoadedPipeline, Error> {
    let whole_file = |message: String| {
        Error::Spec(SpecIssues(vec![SpecIssue {
            location: SpecLocation {
                file: path.to_path_buf(),
                field: String::new(),
                line: None,
                column: None,
            },
            message,
        }]))
    };
    let meta = std::fs::metadata(path)
        .map_err(|e| whole_file(format!("cannot read pipeline file: {e}")))?;
    if meta.len() > MAX_PIPELINE_BYTES {
        return Err(whole_file(format!(
            "pipeline file is {} bytes, more than the {MAX_PIPELINE_BYTES} allowed",
            meta.len()
        )));
    }
    let bytes =
        std::fs::read(path).map_err(|e| whole_file(format!("cannot read pipeline file: {e}")))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| whole_file(format!("pipeline file is not valid UTF-8: {e}")))?;
    parse_str(&text, path)
}

/// Parse pipeline YAML; `file` is used for messages and relative paths.
pub fn parse_str(text: &str, file: &Path) -> Result<LoadedPipeline, Error> {
    let locations = Locations::index(text);
    let issue = |field: &str, message: String| locations.issue(file, field, message);

    let options = serde_saphyr::options! { with_snippet: false };
    let value: Value = match serde_saphyr::from_str_with_options(text, options) {
        Ok(v) => v,
        Err(e) => {
            let (line, column) = e.location().map_or((None, None), |l| {
                (Some(l.line() as usize), Some(l.column() as usize))
            });
            return Err(Error::Spec(SpecIssues(vec![SpecIssue {
                location: SpecLocation {
                    file: file.to_path_buf(),
                    field: String::new(),
                    line,
                    column,
                },
                message: format!("invalid YAML: {e}"),
            }])));
        }
    };
    let Value::Object(mut top) = value else {
        let what = if value.is_null() {
            "empty"
        } else {
            "not a mapping"
        };
        return Err(spec_error(vec![issue(
            "",
            format!(
                "pipeline file is {what}; expected a mapping with `source`, `stages` and `sink`"
            ),
        )]));
    };

    let mut issues = Vec::new();
    let mut stages = Vec::new();
    match top.remove("stages") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                match parse_stage(item, &format!("stages[{i}]")) {
                    Ok(stage) => stages.push(stage),
                    Err((field, message)) => issues.push(issue(&field, message)),
                }
            }
        }
        Some(other) => issues.push(issue(
            "stages",
            format!("expected a list of stages, found {}", kind_of(&other)),
        )),
    }
    top.insert("stages".into(), Value::Array(Vec::new()));

    let spec = match from_value_at::<PipelineSpec>(Value::Object(top), "") {
        Ok(mut spec) => {
            spec.stages = stages;
            Some(spec)
        }
        Err((field, message)) => {
            issues.insert(0, issue(&field, message));
            None
        }
    };
    match spec {
        Some(spec) if issues.is_empty() => Ok(LoadedPipeline {
            file: file.to_path_buf(),
            spec,
            locations,
        }),
        _ => Err(spec_error(issues)),
    }
}

fn spec_error(issues: Vec<SpecIssue>) -> Error {
    Error::Spec(SpecIssues(issues))
}

fn parse_stage(item: Value, at: &str) -> Result<StageSpec, (String, String)> {
    let Value::Object(mut map) = item else {
        return Err((
            at.to_string(),
            format!(
                "expected a stage mapping with a `type`, found {}",
                kind_of(&item)
            ),
        ));
    };
    let mut common = serde_json::Map::new();
    for key in STAGE_COMMON_KEYS {
        if let Some(v) = map.remove(key) {
            common.insert(key.to_string(), v);
        }
    }
    let type_name = match map.remove("type") {
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err((
                format!("{at}.type"),
                format!("expected a stage type name, found {}", kind_of(&other)),
            ));
        }
        None => {
            return Err((
                at.to_string(),
                format!(
                    "missing field `type`; expected one of {}",
                    StageKind::TYPES.join(", ")
                ),
            ));
        }
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Common {
        name: Option<String>,
        workers: Option<usize>,
        queue_depth: Option<usize>,
    }
    let common: Common = from_value_at(Value::Object(common), at)?;
    let kind = StageKind::from_value(&type_name, Value::Object(map), at)?;
    Ok(StageSpec {
        name: common.name,
        workers: common.workers,
        queue_depth: common.queue_depth,
        kind,
    })
}

/// Deserialize `value` into `T`; on failure return the full field path (under
/// `prefix`) and serde's message.
pub(crate) fn from_value_at<T: DeserializeOwned>(
    value: Value,
    prefix: &str,
) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = e.path().to_string();
        if path == "." {
            path.clear();
        }
        let message = e.inner().to_string();
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

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}
