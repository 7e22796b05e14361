//! YAML text -> [`LoadedPipeline`]. The YAML is first read into a generic value (with
//! serde-saphyr's limits on size, depth and alias expansion), then into the typed spec
//! through serde_path_to_error, so that every error names its field path; the line and
//! column come from [`Locations`], which survives serde's internal buffering.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::validate::{Parsed, ParsedStage, check};
use super::{
    LoadedPipeline, Locations, PipelineSpec, ResumeSpec, RuntimeSpec, SinkSpec, SourceSpec,
};
use crate::error::{Error, SpecIssue, SpecIssues, SpecLocation};
use crate::fields::from_value_at;
use crate::stages::{StageCommon, StageKind, StageSpec};

/// Pipeline files larger than this are refused before parsing.
pub const MAX_PIPELINE_BYTES: u64 = 1 << 20;

/// The sections of a pipeline file.
const TOP_KEYS: [&str; 6] = ["name", "source", "stages", "sink", "runtime", "resume"];

/// Read and parse a pipeline file (no semantic checks; see [`super::validate`]).
pub fn load_file(path: &Path) -> Result<LoadedPipeline, Error> {
    let text = read_spec_text(path, "pipeline file")?;
    parse_str(&text, path)
}

/// A spec file's text, refused when larger than [`MAX_PIPELINE_BYTES`] or not UTF-8;
/// `what` names the kind of file in messages (`pipeline file`).
pub fn read_spec_text(path: &Path, what: &str) -> Result<String, Error> {
    let whole_file =
        |message: String| Error::Spec(SpecIssues(vec![SpecIssue::whole_file(path, message)]));
    let meta =
        std::fs::metadata(path).map_err(|e| whole_file(format!("cannot read {what}: {e}")))?;
    if meta.len() > MAX_PIPELINE_BYTES {
        return Err(whole_file(format!(
            "{what} is {} bytes, more than the {MAX_PIPELINE_BYTES} allowed",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| whole_file(format!("cannot read {what}: {e}")))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| whole_file(format!("{what} is not valid UTF-8: {e}")))?;
    interpolate_env(&text, |name| std::env::var(name).ok()).map_err(|((line, column), message)| {
        Error::Spec(SpecIssues(vec![SpecIssue {
            location: SpecLocation {
                file: path.to_path_buf(),
                field: String::new(),
                line: Some(line),
                column: Some(column),
            },
            message,
        }]))
    })
}

/// Replaces `${NAME}` with the environment variable's value and `${NAME:-default}`
/// with the value or, when unset or empty, the default (as Vector and the shell do);
/// `$$` is a literal `$`. Lets a pipeline name machine-specific paths, such as the
/// models `scripts/setup.sh` installs (`${TRUSTFLOW_MINILM_DIR}`). An unset variable
/// without a default, or an unclosed `${`, is an error with its (line, column).
pub fn interpolate_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, ((usize, usize), String)> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    // (line, column) of the `$` that starts `rest`, both from 1.
    let line_of = |rest: &str| {
        let before = &text[..text.len() - rest.len()];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (
            before.matches('\n').count() + 1,
            before[line_start..].chars().count() + 1,
        )
    };
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(end) = body.find('}') else {
                return Err((line_of(&rest[at..]), "`${` without a closing `}`".into()));
            };
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err((
                    line_of(&rest[at..]),
                    format!("`${{{inner}}}`: `{name}` is not an environment variable name"),
                ));
            }
            match (lookup(name).filter(|v| !v.is_empty()), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err((
                        line_of(&rest[at..]),
                        format!(
                            "environment variable `{name}` is not set (write `${{{name}:-default}}` \
                             for a default, `$$` for a literal `$`)"
                        ),
                    ));
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// `paths: data/*.parquet` in a source section means a list of one.
pub fn paths_as_list(section: &mut Value) {
    if let Some(Value::String(one)) = section.get("paths").cloned()
        && let Some(map) = section.as_object_mut()
    {
        map.insert("paths".into(), Value::Array(vec![Value::String(one)]));
    }
}

/// Parse pipeline YAML; `file` is used for messages and relative paths.
pub fn parse_str(text: &str, file: &Path) -> Result<LoadedPipeline, Error> {
    let locations = Locations::index(text);
    let issue = |field: &str, message: String| locations.issue(file, field, message);

    // YAML 1.2 booleans only: `lowercase: yes` is an error, `name: no` a string.
    let options = serde_saphyr::options! { with_snippet: false, strict_booleans: true };
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
                message: format!("invalid YAML: {}", friendly_yaml_error(&e.to_string())),
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

    // Each section is read on its own so that one run reports a problem in every
    // section, not just the first serde meets.
    let mut issues = Vec::new();
    let mut misspelt = Vec::new();
    for key in top.keys() {
        if !TOP_KEYS.contains(&key.as_str()) {
            let hint = match closest(key, &TOP_KEYS) {
                Some(near) => {
                    misspelt.push(near);
                    format!("did you mean `{near}`?")
                }
                None => format!(
                    "expected one of {}",
                    TOP_KEYS.map(|k| format!("`{k}`")).join(", ")
                ),
            };
            issues.push(issue(key, format!("unknown field `{key}`; {hint}")));
        }
    }
    let mut section = |key: &str, required: bool| -> Option<Value> {
        match top.remove(key) {
            Some(v) => Some(v),
            // A misspelling was reported already; "missing" would say it twice.
            None if required && misspelt.contains(&key) => None,
            None if required => {
                issues.push(issue(
                    "",
                    format!("missing field `{key}`: a pipeline needs `source` and `sink`"),
                ));
                None
            }
            None => None,
        }
    };
    let name = section("name", false);
    let source = section("source", true);
    let stages_value = section("stages", false);
    let sink = section("sink", true);
    let runtime = section("runtime", false);
    let resume = section("resume", false);

    let mut typed_issues = Vec::new();
    let name: Option<Option<String>> = match name {
        Some(v) => typed(v, "name", &mut typed_issues),
        None => Some(None),
    };
    let source: Option<SourceSpec> = source.and_then(|mut v| {
        paths_as_list(&mut v);
        typed(v, "source", &mut typed_issues)
    });
    let sink: Option<SinkSpec> = sink.and_then(|v| typed(v, "sink", &mut typed_issues));
    let runtime: Option<RuntimeSpec> = match runtime {
        Some(v) => typed(v, "runtime", &mut typed_issues),
        None => Some(RuntimeSpec::default()),
    };
    let resume: Option<ResumeSpec> = match resume {
        Some(v) => typed(v, "resume", &mut typed_issues),
        None => Some(ResumeSpec::default()),
    };
    for (field, message) in typed_issues {
        issues.push(issue(&field, message));
    }

    let mut entries = Vec::new();
    match stages_value {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                let mut problems = Vec::new();
                entries.push(parse_stage(item, i, &mut problems));
                for (field, message) in problems {
                    issues.push(issue(&field, message));
                }
            }
        }
        Some(other) => issues.push(issue(
            "stages",
            format!("expected a list of stages, found {}", kind_of(&other)),
        )),
    }

    match (name, source, sink, runtime, resume) {
        (Some(name), Some(source), Some(sink), Some(runtime), Some(resume))
            if issues.is_empty() =>
        {
            let stages = entries
                .into_iter()
                .filter_map(|e| {
                    Some(StageSpec {
                        common: e.common?,
                        kind: e.kind?,
                    })
                })
                .collect();
            Ok(LoadedPipeline {
                file: file.to_path_buf(),
                spec: PipelineSpec {
                    name,
                    source,
                    stages,
                    sink,
                    runtime,
                    resume,
                },
                locations,
            })
        }
        (_, source, sink, runtime, _) => {
            // The semantic checks of `validate` on what did parse: one run reports a
            // range error beside a type error instead of after it is fixed.
            let parsed = Parsed {
                source: source.as_ref(),
                stages: entries
                    .iter()
                    .filter_map(|e| {
                        Some(ParsedStage {
                            index: e.index,
                            common: e.common.as_ref()?,
                            type_name: e.type_name,
                            kind: e.kind.as_ref(),
                        })
                    })
                    .collect(),
                sink: sink.as_ref(),
                runtime: runtime.as_ref(),
            };
            let base = match file.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            check(&parsed, base, &mut |field, message| {
                issues.push(issue(field, message))
            });
            issues.sort_by_key(|i| (i.location.line.unwrap_or(usize::MAX), i.location.column));
            Err(spec_error(issues))
        }
    }
}

/// `from_value_at`, with the error kept aside.
fn typed<T: DeserializeOwned>(
    value: Value,
    at: &str,
    issues: &mut Vec<(String, String)>,
) -> Option<T> {
    from_value_at(value, at).map_err(|e| issues.push(e)).ok()
}

fn spec_error(issues: Vec<SpecIssue>) -> Error {
    Error::Spec(SpecIssues(issues))
}

/// One entry of `stages:`, as far as it parsed.
struct StageEntry {
    index: usize,
    /// Its `name`, `workers` and `queue_depth`.
    common: Option<StageCommon>,
    /// Its `type`, when that names a registered stage.
    type_name: Option<&'static str>,
    /// The type's own settings.
    kind: Option<StageKind>,
}

/// Parse `stages[index]`, pushing every problem found to `problems`: the common keys and
/// the type's settings are read independently, so a bad `workers` does not hide an
/// unknown key.
fn parse_stage(item: Value, index: usize, problems: &mut Vec<(String, String)>) -> StageEntry {
    let at = format!("stages[{index}]");
    let mut entry = StageEntry {
        index,
        common: None,
        type_name: None,
        kind: None,
    };
    let Value::Object(mut map) = item else {
        problems.push((
            at,
            format!(
                "expected a stage mapping with a `type`, found {}",
                kind_of(&item)
            ),
        ));
        return entry;
    };
    let mut common = serde_json::Map::new();
    for key in StageCommon::keys() {
        if let Some(v) = map.remove(&key) {
            common.insert(key, v);
        }
    }
    entry.common = typed(Value::Object(common), &at, problems);
    let type_name = match map.remove("type") {
        Some(Value::String(s)) => s,
        Some(other) => {
            problems.push((
                format!("{at}.type"),
                format!("expected a stage type name, found {}", kind_of(&other)),
            ));
            return entry;
        }
        None => {
            problems.push((
                at,
                format!(
                    "missing field `type`; expected one of {}",
                    StageKind::TYPES.join(", ")
                ),
            ));
            return entry;
        }
    };
    entry.type_name = StageKind::TYPES.iter().copied().find(|t| *t == type_name);
    entry.kind = typed_with(
        StageKind::from_value(&type_name, Value::Object(map), &at),
        problems,
    );
    entry
}

/// `result`'s value, with its error kept aside.
fn typed_with<T>(
    result: Result<T, (String, String)>,
    issues: &mut Vec<(String, String)>,
) -> Option<T> {
    result.map_err(|e| issues.push(e)).ok()
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

/// The YAML library's messages name its own API and repeat the position we print.
fn friendly_yaml_error(message: &str) -> String {
    let mut m = message.to_string();
    if let Some(cut) = m.find(", set DuplicateKeyPolicy") {
        m.truncate(cut);
    }
    if m.starts_with("multiple YAML documents") {
        return "the file holds more than one YAML document (`---`); a pipeline file holds one"
            .into();
    }
    if m.contains("budget breached") || m.contains("recursion limit") {
        return format!(
            "the YAML is too large or too deeply nested for a pipeline file (a guard against \
             alias bombs): {m}"
        );
    }
    if let Some(at) = m.rfind(" at line ") {
        let tail = &m[at + " at line ".len()..];
        if tail
            .chars()
            .all(|c| c.is_ascii_digit() || ", column".contains(c))
        {
            m.truncate(at);
        }
    }
    m
}

/// The candidate within two edits of `word`, if exactly one is.
fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let near: Vec<&str> = candidates
        .iter()
        .copied()
        .filter(|c| edit_distance(word, c) <= 2)
        .collect();
    match near.as_slice() {
        [one] => Some(one),
        _ => None,
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
