//! YAML text -> [`LoadedPipeline`]. The YAML is first read into a generic value (with
//! serde-saphyr's limits on size, depth and alias expansion), then into the typed spec
//! through serde_path_to_error, so that every error names its field path; the line and
//! column come from [`Locations`], which survives serde's internal buffering.
//!
//! `${NAME}` environment variables are replaced in the parsed values (never in the raw
//! text, where a value could inject keys and a comment could fail): by
//! `interpolate_value` for pipeline files, and for the callers that parse the text
//! themselves (training files, bench specs) by [`read_spec_text`], which rewrites each
//! scalar value in place as a safely quoted one. Both share `interpolate_str`.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::locate::DollarScalar;
use super::validate::{Parsed, ParsedStage, check};
use super::{
    LoadedPipeline, Locations, PipelineSpec, ResumeSpec, RuntimeSpec, SinkSpec, SourceSpec,
};
use crate::error::{Error, SpecIssue, SpecIssues, SpecLocation};
use crate::fields::from_value_at;
use crate::stages::{StageCommon, StageKind, StageSpec};
use crate::storage::StorageSpec;

/// Pipeline files larger than this are refused before parsing.
pub const MAX_PIPELINE_BYTES: u64 = 1 << 20;

/// The sections of a pipeline file.
const TOP_KEYS: [&str; 7] = [
    "name", "source", "stages", "sink", "runtime", "resume", "storage",
];

/// Read and parse a pipeline file (no semantic checks; see [`super::validate`]).
pub fn load_file(path: &Path) -> Result<LoadedPipeline, Error> {
    // `${NAME}` is interpolated by `parse_str`, in the parsed values.
    let text = read_spec_file(path, "pipeline file")?;
    parse_str(&text, path)
}

/// A spec file's text, refused when larger than [`MAX_PIPELINE_BYTES`] or not UTF-8;
/// `what` names the kind of file in messages (`pipeline file`).
fn read_spec_file(path: &Path, what: &str) -> Result<String, Error> {
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
    String::from_utf8(bytes).map_err(|e| not_utf8(path, what, e.as_bytes(), e.utf8_error()))
}

/// A spec file that is not UTF-8, located at its first bad byte's line and column, with
/// a word on the encoding it seems to have.
fn not_utf8(path: &Path, what: &str, bytes: &[u8], e: std::str::Utf8Error) -> Error {
    let good = &bytes[..e.valid_up_to()];
    let line = 1 + good.iter().filter(|&&b| b == b'\n').count();
    let line_start = good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let column = 1 + String::from_utf8_lossy(&good[line_start..]).chars().count();
    let looks_like = match bytes {
        [0xFF, 0xFE, ..] | [0xFE, 0xFF, ..] => {
            "it looks like UTF-16 (it starts with a UTF-16 \
             byte-order mark)"
        }
        _ => "it looks like Latin-1 or another 8-bit encoding",
    };
    let mut issue = SpecIssue::whole_file(
        path,
        format!(
            "{what} is not valid UTF-8 (byte {} is not): {looks_like}; the file must be \
             UTF-8, so save it as UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8`)",
            e.valid_up_to()
        ),
    );
    issue.location.line = Some(line);
    issue.location.column = Some(column);
    Error::Spec(SpecIssues(vec![issue]))
}

/// A spec file's text as [`read_spec_file`] reads it, with `${NAME}` interpolated in its
/// scalar values by [`interpolate_env`], for callers that parse the YAML themselves
/// (training files, bench specs).
pub fn read_spec_text(path: &Path, what: &str) -> Result<String, Error> {
    let text = read_spec_file(path, what)?;
    let locations = Locations::index(&text);
    interpolate_text(&text, &locations, &env_lookup).map_err(|problems| {
        Error::Spec(SpecIssues(
            problems.into_iter().map(|p| p.issue(path)).collect(),
        ))
    })
}

/// The process environment; a value that is not UTF-8 counts as unset.
fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A `${...}` that cannot be replaced: where, and why.
struct EnvProblem {
    field: String,
    at: Option<(usize, usize)>,
    message: String,
}

impl EnvProblem {
    fn issue(self, file: &Path) -> SpecIssue {
        SpecIssue {
            location: SpecLocation {
                file: file.to_path_buf(),
                field: self.field,
                line: self.at.map(|a| a.0),
                column: self.at.map(|a| a.1),
            },
            message: self.message,
        }
    }
}

/// Replaces `${NAME}` in the scalar values of the YAML `text` (keys and comments are
/// left alone) and returns the new text; see [`interpolate_str`] for the syntax. A
/// value that could change the file's structure (a line break, `: `, quotes) is
/// written back as a double-quoted string, so it stays one value; a plain one
/// (`batch_size: ${N}`) stays plain and keeps the type YAML gives its new text. An
/// unset variable without a default, or an unclosed `${`, is an error with its (line,
/// column).
pub fn interpolate_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, ((usize, usize), String)> {
    let locations = Locations::index(text);
    interpolate_text(text, &locations, &lookup).map_err(|mut problems| {
        let first = problems.remove(0);
        (first.at.unwrap_or((1, 1)), first.message)
    })
}

/// [`interpolate_env`], reporting every problem.
fn interpolate_text(
    text: &str,
    locations: &Locations,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<EnvProblem>> {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut problems = Vec::new();
    for scalar in locations.dollar_scalars() {
        let problem = |offset, message| EnvProblem {
            field: scalar.path.clone(),
            at: Some(dollar_position(text, scalar, offset)),
            message,
        };
        let new = match interpolate_str(&scalar.value, lookup) {
            Ok(new) if new == scalar.value => continue,
            Ok(new) => new,
            Err((offset, message)) => {
                problems.push(problem(offset, message));
                continue;
            }
        };
        let Some(raw) = text.get(scalar.bytes.clone()) else {
            continue;
        };
        if scalar.bytes.start < copied {
            continue;
        }
        let replacement = if scalar.block {
            // A block's header (`|`, `>-`) lies outside its span, so its content is
            // interpolated as written, each line break of a value followed by the
            // block's indentation to keep the rest of the value inside the block.
            let indent = format!("\n{}", " ".repeat(scalar.at.1.saturating_sub(1)));
            let indented = |name: &str| lookup(name).map(|v| v.replace('\n', &indent));
            match interpolate_str(raw, &indented) {
                Ok(replacement) => replacement,
                Err((offset, message)) => {
                    problems.push(problem(offset, message));
                    continue;
                }
            }
        } else {
            encode_scalar(&new, scalar.plain, raw, scalar.at.1.saturating_sub(1))
        };
        out.push_str(&text[copied..scalar.bytes.start]);
        out.push_str(&replacement);
        copied = scalar.bytes.end;
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    out.push_str(&text[copied..]);
    Ok(out)
}

/// Interpolates every string value of `value` (a parsed spec file; keys are left
/// alone) in place, with [`interpolate_str`]. A value written plain in the file gets the
/// type YAML would give its new text (`batch_size: ${N}` is a number), so that a
/// pipeline reads as it would had the text been typed in; every other value stays a
/// string, whatever it holds. Problems are pushed with their field path.
fn interpolate_value(
    value: &mut Value,
    path: &str,
    text: &str,
    locations: &Locations,
    lookup: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<EnvProblem>,
) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                let field = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                interpolate_value(v, &field, text, locations, lookup, problems);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                interpolate_value(
                    v,
                    &format!("{path}[{i}]"),
                    text,
                    locations,
                    lookup,
                    problems,
                );
            }
        }
        Value::String(s) if s.contains('$') => {
            let scalar = locations.dollar_scalar(path);
            match interpolate_str(s, lookup) {
                Ok(new) if new == *s => {}
                Ok(new) => {
                    *value = match scalar {
                        Some(scalar) if scalar.plain => typed_plain(new),
                        _ => Value::String(new),
                    }
                }
                Err((offset, message)) => problems.push(EnvProblem {
                    field: path.to_string(),
                    at: scalar
                        .map(|scalar| dollar_position(text, scalar, offset))
                        .or_else(|| locations.find(path)),
                    message,
                }),
            }
        }
        _ => {}
    }
}

/// What YAML reads from the plain scalar `text`: a number, a boolean or null when it
/// spells one, else the string. Text that plain YAML could not hold as one value stays
/// a string.
fn typed_plain(text: String) -> Value {
    if !plain_safe(&text) {
        return Value::String(text);
    }
    let options = serde_saphyr::options! { with_snippet: false, strict_booleans: true };
    match serde_saphyr::from_str_with_options::<Value>(&text, options) {
        Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::Null)) => v,
        _ => Value::String(text),
    }
}

/// True when `value` written as a plain scalar reads back as itself, one value, in a
/// block or a flow collection: no line break, no indicator up front, no `: ` or ` #`,
/// no flow punctuation.
fn plain_safe(value: &str) -> bool {
    let Some(first) = value.chars().next() else {
        return false;
    };
    !"-?:,[]{}#&*!|>'\"%@`".contains(first)
        && !value.starts_with(char::is_whitespace)
        && !value.ends_with(char::is_whitespace)
        && !value.ends_with(':')
        && !value.contains(": ")
        && !value.contains(":\t")
        && !value.contains(" #")
        && !value.contains("\t#")
        && !value.chars().any(|c| c.is_control() || ",[]{}".contains(c))
}

/// `value` as the YAML text to put in place of `raw`, a flow scalar (plain or quoted)
/// that started at column `indent` (0-based). Plain when it was plain and can stay so;
/// else double-quoted, with as many (escaped) line breaks as `raw` had, so that every
/// later line keeps its number.
fn encode_scalar(value: &str, plain: bool, raw: &str, indent: usize) -> String {
    if plain && !raw.contains('\n') && plain_safe(value) {
        return value.to_string();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    // An escaped line break adds nothing to the value; the next line's indentation is
    // dropped too.
    for _ in 0..raw.matches('\n').count() {
        out.push_str("\\\n");
        out.push_str(&" ".repeat(indent + 1));
    }
    out.push('"');
    out
}

/// (line, column) of the `$` at byte `offset` of `scalar`'s value: exact when the
/// value is written as is on one line (plain, or quoted without escapes), else the
/// scalar's start.
fn dollar_position(text: &str, scalar: &DollarScalar, offset: usize) -> (usize, usize) {
    let raw = text.get(scalar.bytes.clone()).unwrap_or("");
    let inner = if scalar.plain {
        Some(raw)
    } else {
        raw.get(1..raw.len().saturating_sub(1))
            .filter(|_| raw.starts_with(['"', '\'']))
    };
    match (inner, scalar.value.get(..offset)) {
        (Some(inner), Some(before)) if inner == scalar.value && !raw.contains('\n') => {
            let quote = usize::from(!scalar.plain);
            (scalar.at.0, scalar.at.1 + quote + before.chars().count())
        }
        _ => scalar.at,
    }
}

/// Replaces `${NAME}` in one value with the environment variable's value and
/// `${NAME:-default}` with the value or, when unset or empty, the default (as Vector
/// and the shell do); `$$` is a literal `$`, and a `$` before anything else is kept.
/// A variable set to the empty string is set: `${NAME}` becomes empty. Lets a pipeline
/// name machine-specific paths, such as the models `scripts/setup.sh` installs
/// (`${TRUSTFLOW_MINILM_DIR}`). An unset variable without a default, a bad name or an
/// unclosed `${` is an error, with the byte offset of its `$`.
fn interpolate_str(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, (usize, String)> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let offset = text.len() - rest.len() + at;
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(end) = body.find('}') else {
                return Err((offset, "`${` without a closing `}`".into()));
            };
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if default.is_some_and(|d| d.contains("${")) {
                return Err((
                    offset,
                    format!(
                        "`${{{name}:-...}}`: a default cannot hold another `${{...}}` (nesting is \
                         not supported); give the default literally, or set `{name}`"
                    ),
                ));
            }
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err((
                    offset,
                    format!(
                        "`${{{inner}}}`: `{name}` is not an environment variable name (letters, \
                         digits and `_`, not starting with a digit)"
                    ),
                ));
            }
            match (lookup(name), default) {
                (Some(value), Some(default)) if value.is_empty() => out.push_str(default),
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err((
                        offset,
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
    let top = parse_yaml(text, file, &locations)?;

    // Each section is read on its own so that one run reports a problem in every
    // section, not just the first serde meets.
    let mut problems = Vec::new();
    let sections = Sections::read(top, &mut problems);
    let mut issues: Vec<SpecIssue> = problems.into_iter().map(|(f, m)| issue(&f, m)).collect();
    match sections.complete() {
        Some(spec) if issues.is_empty() => Ok(LoadedPipeline {
            file: file.to_path_buf(),
            spec,
            locations,
        }),
        _ => {
            // The semantic checks of `validate` on what did parse: one run reports a
            // range error beside a type error instead of after it is fixed.
            let base = match file.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            check(&sections.parsed(), base, &mut |field, message| {
                issues.push(issue(field, message))
            });
            issues.sort_by_key(|i| (i.location.line.unwrap_or(usize::MAX), i.location.column));
            Err(spec_error(issues))
        }
    }
}

/// The YAML of a pipeline file as a mapping, with `${NAME}` replaced.
fn parse_yaml(
    text: &str,
    file: &Path,
    locations: &Locations,
) -> Result<serde_json::Map<String, Value>, Error> {
    // YAML 1.2 booleans only: `lowercase: yes` is an error, `name: no` a string.
    let options = serde_saphyr::options! { with_snippet: false, strict_booleans: true };
    let mut value: Value = serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        let (line, column) = e.location().map_or((None, None), |l| {
            (Some(l.line() as usize), Some(l.column() as usize))
        });
        spec_error(vec![SpecIssue {
            location: SpecLocation {
                file: file.to_path_buf(),
                field: String::new(),
                line,
                column,
            },
            message: format!(
                "invalid YAML: {}{}",
                friendly_yaml_error(&e.to_string()),
                unquoted_variable_hint(text, line, column)
            ),
        }])
    })?;
    // `${NAME}` is replaced in the parsed values, never in the text: a comment cannot
    // fail, and a value holding a line break or `key: x` stays inside its string.
    let mut env_problems = Vec::new();
    interpolate_value(
        &mut value,
        "",
        text,
        locations,
        &env_lookup,
        &mut env_problems,
    );
    if !env_problems.is_empty() {
        // The values involved are unknown, so checking the rest would only add noise.
        return Err(spec_error(
            env_problems.into_iter().map(|p| p.issue(file)).collect(),
        ));
    }
    match value {
        Value::Object(top) => Ok(top),
        other => {
            let what = if other.is_null() {
                "empty"
            } else {
                "not a mapping"
            };
            Err(spec_error(vec![locations.issue(
                file,
                "",
                format!(
                    "pipeline file is {what}; expected a mapping with `source`, `stages` and \
                     `sink`"
                ),
            )]))
        }
    }
}

/// The top-level sections of a pipeline file, each typed on its own (`None`: missing
/// where required, or not of its type; the problem is reported).
struct Sections {
    name: Option<Option<String>>,
    source: Option<SourceSpec>,
    stages: Vec<StageEntry>,
    sink: Option<SinkSpec>,
    runtime: Option<RuntimeSpec>,
    resume: Option<ResumeSpec>,
    storage: Option<StorageSpec>,
}

impl Sections {
    /// Type every section of `top`, adding (field, message) for each problem: unknown
    /// top-level keys (with the nearest known one), missing required sections, type
    /// errors, and each stage entry's own problems.
    fn read(mut top: serde_json::Map<String, Value>, problems: &mut Vec<(String, String)>) -> Self {
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
                problems.push((key.clone(), format!("unknown field `{key}`; {hint}")));
            }
        }
        let mut required = |key: &str, problems: &mut Vec<(String, String)>| {
            let value = top.remove(key);
            // A misspelling was reported already; "missing" would say it twice.
            if value.is_none() && !misspelt.contains(&key) {
                problems.push((
                    String::new(),
                    format!("missing field `{key}`: a pipeline needs `source` and `sink`"),
                ));
            }
            value
        };
        let source = required("source", problems);
        let sink = required("sink", problems);
        let mut optional = |key: &str| top.remove(key);
        let (name, stages) = (optional("name"), optional("stages"));
        let (runtime, resume, storage) =
            (optional("runtime"), optional("resume"), optional("storage"));
        Sections {
            name: or_default(name, "name", problems),
            source: source.and_then(|mut v| {
                paths_as_list(&mut v);
                typed(v, "source", problems)
            }),
            stages: stage_entries(stages, problems),
            sink: sink.and_then(|v| typed(v, "sink", problems)),
            runtime: or_default(runtime, "runtime", problems),
            resume: or_default(resume, "resume", problems),
            storage: or_default(storage, "storage", problems),
        }
    }

    /// The whole spec, when every section parsed.
    fn complete(&self) -> Option<PipelineSpec> {
        let stages = self
            .stages
            .iter()
            .map(|e| {
                Some(StageSpec {
                    common: e.common.clone()?,
                    kind: e.kind.clone()?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(PipelineSpec {
            name: self.name.clone()?,
            source: self.source.clone()?,
            stages,
            sink: self.sink.clone()?,
            runtime: self.runtime.clone()?,
            resume: self.resume?,
            storage: self.storage.clone()?,
        })
    }

    /// What did parse, for the semantic checks.
    fn parsed(&self) -> Parsed<'_> {
        Parsed {
            source: self.source.as_ref(),
            stages: self
                .stages
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
            sink: self.sink.as_ref(),
            runtime: self.runtime.as_ref(),
            storage: self.storage.as_ref(),
        }
    }
}

/// An optional section: its default when absent, else typed (`None` on a type error).
fn or_default<T: DeserializeOwned + Default>(
    value: Option<Value>,
    at: &str,
    problems: &mut Vec<(String, String)>,
) -> Option<T> {
    match value {
        Some(v) => typed(v, at, problems),
        None => Some(T::default()),
    }
}

/// The `stages:` list, each entry split into its common keys and its type's config.
fn stage_entries(value: Option<Value>, problems: &mut Vec<(String, String)>) -> Vec<StageEntry> {
    match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| parse_stage(item, i, problems))
            .collect(),
        Some(other) => {
            problems.push((
                "stages".into(),
                format!("expected a list of stages, found {}", kind_of(&other)),
            ));
            Vec::new()
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

/// `${NAME}` is interpolated after parsing, so YAML reads it first, and in a flow
/// collection (`[...]`, `{...}`) its braces are punctuation: say so when the error
/// points at one.
fn unquoted_variable_hint(text: &str, line: Option<usize>, column: Option<usize>) -> &'static str {
    // The parser points at the `$` or at the `{` after it.
    let (before, at) = line
        .zip(column)
        .and_then(|(line, column)| {
            let text = text.lines().nth(line.checked_sub(1)?)?;
            let (byte, _) = text.char_indices().nth(column.checked_sub(1)?)?;
            Some((&text[..byte], &text[byte..]))
        })
        .unwrap_or(("", ""));
    if at.starts_with("${") || (at.starts_with('{') && before.ends_with('$')) {
        " (inside `[...]` or `{...}`, quote a value that uses `${NAME}`: `[\"${NAME}/a\"]`)"
    } else {
        ""
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "N" => Some("16".into()),
            "YES" => Some("true".into()),
            "EMPTY" => Some(String::new()),
            "LINES" => Some("a\nb: c".into()),
            "DIR" => Some("/data/x".into()),
            _ => None,
        }
    }

    /// (field, (line, column), message).
    type Problem = (String, Option<(usize, usize)>, String);

    /// Parse `text`, interpolate its values with [`env`], return the value or the
    /// problems.
    fn values(text: &str) -> Result<Value, Vec<Problem>> {
        let locations = Locations::index(text);
        let mut value: Value = serde_saphyr::from_str(text).unwrap();
        let mut problems = Vec::new();
        interpolate_value(&mut value, "", text, &locations, &env, &mut problems);
        if problems.is_empty() {
            Ok(value)
        } else {
            Err(problems
                .into_iter()
                .map(|p| (p.field, p.at, p.message))
                .collect())
        }
    }

    #[test]
    fn values_are_interpolated_where_they_were_parsed() {
        let v = values(
            "n: ${N}\nquoted: \"${N}\"\nyes: ${YES}\nempty: ${EMPTY}\nlines: ${LINES}\n\
             path: ${DIR}/*.parquet\ndollar: $$5 $x\n${N}: key\nlist: [\"${DIR}\", '${UNSET:-d}']\n\
             # ${UNSET} in a comment\n",
        )
        .unwrap();
        // Plain values get the type their new text has; quoted ones stay strings.
        assert_eq!(v["n"], 16);
        assert_eq!(v["quoted"], "16");
        assert_eq!(v["yes"], true);
        // Set to empty is set.
        assert_eq!(v["empty"], "");
        // A line break stays inside the value.
        assert_eq!(v["lines"], "a\nb: c");
        assert!(v.get("b").is_none());
        assert_eq!(v["path"], "/data/x/*.parquet");
        assert_eq!(v["dollar"], "$5 $x");
        assert_eq!(v["${N}"], "key");
        assert_eq!(v["list"], serde_json::json!(["/data/x", "d"]));
    }

    #[test]
    fn value_problems_name_the_field_and_the_dollar() {
        let problems =
            values("a: 1\nb:\n  c: x ${NOPE}\n  d: [\"${OPEN\"]\n  e: ${9X}\n").unwrap_err();
        let found: Vec<(&str, Option<(usize, usize)>)> = problems
            .iter()
            .map(|(f, at, _)| (f.as_str(), *at))
            .collect();
        assert_eq!(
            found,
            vec![
                ("b.c", Some((3, 8))),
                ("b.d[0]", Some((4, 8))),
                ("b.e", Some((5, 6))),
            ]
        );
        assert!(problems[0].2.contains("`NOPE` is not set"));
        assert!(problems[1].2.contains("without a closing"));
        assert!(problems[2].2.contains("not an environment variable name"));
    }

    #[test]
    fn a_nested_default_is_refused_not_kept_literally() {
        let problems = values("a: \"${UNSET_X:-${DIR}}/m\"\n").unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].2.contains("cannot hold another"),
            "{problems:?}"
        );
        // A literal default with no `${` stays fine.
        let v = values("a: \"${UNSET_X:-/opt/m}\"\n").unwrap();
        assert_eq!(v["a"], "/opt/m");
    }

    #[test]
    fn text_keeps_its_lines_for_multi_line_scalars() {
        let text = "a: plain ${LINES}\n  more\nb: \"q ${LINES}\n  more\"\nc: >\n  folded ${N}\n  text\nd: 1\n";
        let out = interpolate_env(text, env).unwrap();
        let v: Value = serde_saphyr::from_str(&out).unwrap();
        assert_eq!(v["a"], "plain a\nb: c more", "{out}");
        assert_eq!(v["b"], "q a\nb: c more", "{out}");
        assert_eq!(v["c"], "folded 16 text\n", "{out}");
        assert_eq!(v["d"], 1);
        assert_eq!(out.lines().count(), text.lines().count(), "{out}");
    }

    #[test]
    fn an_unquoted_variable_in_a_flow_list_gets_a_hint() {
        let err = parse_str(
            "source:\n  paths: [${DATA}/a.parquet]\nsink:\n  path: out\n",
            Path::new("p.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("p.yaml:2:12"), "{err}");
        assert!(err.contains("quote a value that uses `${NAME}`"), "{err}");
    }
}
