//! Pipeline files, from the user's side: every way a file can be wrong is reported as
//! `Error::Spec` at the exact field path and at the line and column where the user
//! wrote it (parse, validate and plan phases), the example pipelines stay valid, the
//! checked-in JSON Schema matches the types, and no input makes the loader panic.
//!
//! The YAML of each case is written out in full, so the positions asserted below can
//! be checked by eye; `check_cases` also checks that the asserted position really is
//! where the named token sits in the text.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::spec_cases::*;
use proptest::prelude::*;
use serde_json::Value;
use trustflow_engine::Error;
use trustflow_engine::error::{SpecIssue, SpecIssues};
use trustflow_engine::plan::{Overrides, load_and_plan};
use trustflow_engine::spec::{MAX_PIPELINE_BYTES, json_schema, load_file, parse_str, validate};
use trustflow_testutil::{assert_contains, example_pipelines};

const FILE: &str = "broken.yaml";
const MANIFEST_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// A minimal valid pipeline: the broken cases are small variations of it.
const VALID: &str = "\
source:
  paths: [data.parquet]
stages:
  - type: decode
  - type: clean_caption
sink:
  path: out
";

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

/// Parse `text` as `broken.yaml`, validate it if it parses, and return the phase that
/// failed with its issues. Panics if the text is valid or the error is not a spec error.
/// Each issue's field and line, in the order reported.
fn fields_and_lines(issues: &[SpecIssue]) -> Vec<(&str, Option<usize>)> {
    issues
        .iter()
        .map(|i| (i.location.field.as_str(), i.location.line))
        .collect()
}

fn problems(text: &str) -> (Phase, Vec<SpecIssue>) {
    let (phase, result) = match parse_str(text, Path::new(FILE)) {
        Err(e) => (Phase::Parse, Err(e)),
        Ok(pipeline) => (Phase::Validate, validate(&pipeline)),
    };
    match result {
        Ok(()) => panic!("expected problems, but this pipeline is valid:\n{text}"),
        Err(Error::Spec(SpecIssues(issues))) => {
            assert!(
                !issues.is_empty(),
                "Error::Spec without issues for:\n{text}"
            );
            (phase, issues)
        }
        Err(other) => panic!("expected Error::Spec, got {other:?} for:\n{text}"),
    }
}

fn text_at(yaml: &str, line: usize, column: usize) -> &str {
    let text = yaml.lines().nth(line - 1).unwrap_or("");
    text.char_indices()
        .nth(column - 1)
        .map_or("", |(byte, _)| &text[byte..])
}

fn check_cases(cases: &[Case]) {
    for case in cases {
        let name = case.name;
        assert!(
            text_at(case.yaml, case.line, case.column).starts_with(case.token),
            "{name}: test table is wrong: `{}` is not at {}:{} of\n{}",
            case.token,
            case.line,
            case.column,
            case.yaml
        );
        let (phase, issues) = problems(case.yaml);
        assert_eq!(phase, case.phase, "{name}: rejected by the wrong phase");
        assert_eq!(
            issues.len(),
            1,
            "{name}: expected exactly one problem, got {issues:#?}"
        );
        let issue = &issues[0];
        let at = &issue.location;
        assert_eq!(at.file, Path::new(FILE), "{name}: file");
        assert_eq!(at.field, case.field, "{name}: field path");
        assert_eq!(
            (at.line, at.column),
            (Some(case.line), Some(case.column)),
            "{name}: position of `{}` (issue: {issue})",
            case.token
        );
        for fragment in case.message {
            assert!(
                issue.message.contains(fragment),
                "{name}: message {:?} should contain {fragment:?}",
                issue.message
            );
        }
        // The rendered form users see: `file:line:col: field `x`: message`.
        let field = match case.field {
            "" => String::new(),
            field => format!(" field `{field}`:"),
        };
        let expected = format!(
            "{FILE}:{}:{}:{field} {}",
            case.line, case.column, issue.message
        );
        assert_eq!(issue.to_string(), expected, "{name}: rendered issue");
    }
}

fn samples() -> PathBuf {
    Path::new(MANIFEST_DIR).join("pipelines/samples")
}

/// Write `yaml` to `dir/pipeline.yaml` and plan it; returns the file and the result.
fn plan_in(dir: &Path, yaml: &str) -> (PathBuf, Result<trustflow_engine::plan::Plan, Error>) {
    let file = dir.join("pipeline.yaml");
    std::fs::write(&file, yaml).unwrap();
    let result = load_and_plan(&file, &Overrides::default());
    (file, result)
}

/// The single spec issue of a plan error.
fn single_spec_issue(result: Result<trustflow_engine::plan::Plan, Error>) -> SpecIssue {
    match result {
        Ok(_) => panic!("expected the plan to fail"),
        Err(Error::Spec(SpecIssues(mut issues))) => {
            assert_eq!(issues.len(), 1, "expected one issue, got {issues:#?}");
            issues.remove(0)
        }
        Err(other) => panic!("expected Error::Spec, got {other:?}"),
    }
}

#[test]
fn the_base_pipeline_is_valid() {
    // Every case below breaks exactly one thing of this file.
    let pipeline = parse_str(VALID, Path::new(FILE)).expect("VALID parses");
    validate(&pipeline).expect("VALID validates");
    assert_eq!(pipeline.spec.stages.len(), 2);
}

// ---------------------------------------------------------------------------------
// Parse phase: unknown keys, wrong types, missing keys, unknown stage types
// ---------------------------------------------------------------------------------

#[test]
fn unknown_fields_are_reported_at_their_key() {
    check_cases(UNKNOWN_FIELDS);
}

#[test]
fn wrong_types_are_reported_with_what_was_expected() {
    check_cases(WRONG_TYPES);
}

#[test]
fn missing_keys_and_unknown_stage_types() {
    check_cases(MISSING_OR_UNKNOWN);
}

#[test]
fn unknown_stage_type_message_lists_every_registered_type() {
    let (_, issues) = problems(MISSING_OR_UNKNOWN[3].yaml);
    for ty in trustflow_engine::stages::StageKind::TYPES {
        assert_contains(&issues[0].message, &[ty]);
    }
}

// ---------------------------------------------------------------------------------
// Validate phase: values that parse but are impossible
// ---------------------------------------------------------------------------------

#[test]
fn impossible_values_are_caught_by_validate() {
    check_cases(IMPOSSIBLE_VALUES);
}

#[test]
fn validate_reports_every_problem_at_its_own_line() {
    let yaml = "\
source:
  paths: [data.parquet, \"\"]
  filter: \"\"
stages:
  - type: decode
    workers: 0
    max_pixels: 0
  - type: decode
    queue_depth: 0
sink:
  path: \"\"
  drop_columns: [id]
runtime:
  batch_size: 0
  queue_depth: 0
";
    let (phase, issues) = problems(yaml);
    assert_eq!(phase, Phase::Validate);
    let found: BTreeSet<(String, Option<usize>)> = issues
        .iter()
        .map(|i| (i.location.field.clone(), i.location.line))
        .collect();
    let expected: BTreeSet<(String, Option<usize>)> = [
        ("source.paths[1]", 2),
        ("source.filter", 3),
        ("stages[0].workers", 6),
        ("stages[0].max_pixels", 7),
        ("stages[1].name", 8),
        ("stages[1].queue_depth", 9),
        ("sink.path", 11),
        ("sink.drop_columns[0]", 12),
        ("runtime.batch_size", 14),
        ("runtime.queue_depth", 15),
    ]
    .into_iter()
    .map(|(f, l)| (f.to_string(), Some(l)))
    .collect();
    assert_eq!(issues.len(), 10, "{issues:#?}");
    assert_eq!(found, expected);
    // Each problem on its own line, so each is reported separately.
    let lines: BTreeSet<_> = issues.iter().map(|i| i.location.line).collect();
    assert_eq!(lines.len(), issues.len());

    // The error renders every issue, each as `file:line:col: field `x`: message`.
    let shown = Error::Spec(SpecIssues(issues.clone())).to_string();
    assert!(shown.starts_with("10 problems in pipeline file"), "{shown}");
    assert_contains(
        &shown,
        &[
            "broken.yaml:6:5: field `stages[0].workers`: expected 1 to 256 workers, found 0",
            "broken.yaml:15:3: field `runtime.queue_depth`: impossible queue size 0",
        ],
    );
}

#[test]
fn parse_reports_problems_of_several_stages_together() {
    let yaml = "\
source:
  paths: [data.parquet]
stages:
  - type: decode
    max_pixel: 1
  - type: clean_caption
    strip: urls
  - type: decoder
sink:
  path: out
  compresion: zstd
";
    let (phase, issues) = problems(yaml);
    assert_eq!(phase, Phase::Parse);
    let mut found = fields_and_lines(&issues);
    found.sort();
    assert_eq!(
        found,
        vec![
            ("sink.compresion", Some(11)),
            ("stages[0].max_pixel", Some(5)),
            ("stages[1].strip", Some(7)),
            ("stages[2].type", Some(8)),
        ],
        "{issues:#?}"
    );
}

#[test]
fn a_type_error_does_not_hide_range_errors_elsewhere() {
    // One wrong type (runtime) and one impossible value (a stage): both at once.
    let yaml = "\
source:
  paths: [data.parquet]
stages:
  - type: decode
    workers: 0
sink:
  path: out
runtime:
  batch_size: \"x\"
";
    let (phase, issues) = problems(yaml);
    assert_eq!(phase, Phase::Parse);
    let found = fields_and_lines(&issues);
    assert_eq!(
        found,
        vec![
            ("stages[0].workers", Some(5)),
            ("runtime.batch_size", Some(9))
        ],
        "{issues:#?}"
    );
    assert_contains(&issues[0].message, &["expected 1 to 256 workers, found 0"]);
    assert_contains(&issues[1].message, &["invalid type", "string \"x\""]);

    // Inside one stage entry: a bad common key, a misspelt setting and an impossible
    // value of a sibling stage; and a section that did not parse beside one that did.
    let yaml = "\
source:
  paths: [data.parquet]
  filter: \"\"
stages:
  - type: decode
    workers: 0
    max_pixel: 1
  - type: clean_caption
    queue_depth: 0
sink:
  path: out
  row_group_rows: nope
";
    let (_, issues) = problems(yaml);
    let found = fields_and_lines(&issues);
    assert_eq!(
        found,
        vec![
            ("source.filter", Some(3)),
            ("stages[0].workers", Some(6)),
            ("stages[0].max_pixel", Some(7)),
            ("stages[1].queue_depth", Some(9)),
            ("sink.row_group_rows", Some(12)),
        ],
        "{issues:#?}"
    );
}

#[test]
fn a_sink_path_that_is_a_file_is_refused_by_validate() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("taken"), b"x").unwrap();
    let file = dir.path().join("p.yaml");
    for (path, expect) in [
        (
            "taken",
            "is a file; expected a folder for the output shards",
        ),
        (
            "taken/out",
            "which is a file; expected a folder for the output shards",
        ),
    ] {
        let yaml = VALID.replace("  path: out\n", &format!("  path: {path}\n"));
        let pipeline = parse_str(&yaml, &file).unwrap();
        let Err(Error::Spec(SpecIssues(issues))) = validate(&pipeline) else {
            panic!("sink.path `{path}` passed validate");
        };
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert_eq!(issues[0].location.field, "sink.path");
        assert_eq!(issues[0].location.line, Some(7));
        assert_contains(
            &issues[0].message,
            &[&dir.path().join("taken").display().to_string(), expect],
        );
    }
    // A folder that does not exist yet is fine: the sink creates it.
    let yaml = VALID.replace("  path: out\n", "  path: new/deeper\n");
    validate(&parse_str(&yaml, &file).unwrap()).unwrap();
}

// ---------------------------------------------------------------------------------
// YAML syntax and file shape
// ---------------------------------------------------------------------------------

#[test]
fn invalid_yaml_is_reported_with_a_line() {
    struct Syntax {
        name: &'static str,
        yaml: &'static str,
        lines: std::ops::RangeInclusive<usize>,
        message: &'static str,
    }
    let cases = [
        Syntax {
            name: "bad indentation",
            yaml: "\
source:
  paths: [data.parquet]
 sink:
  path: out
",
            lines: 3..=3,
            message: "invalid YAML",
        },
        Syntax {
            // The bracket opens on line 2; the parser notices on line 3.
            name: "unclosed bracket",
            yaml: "\
source:
  paths: [data.parquet
sink:
  path: out
",
            lines: 2..=3,
            message: "invalid YAML",
        },
        Syntax {
            name: "tab indentation",
            yaml: "source:\n\tpaths: [data.parquet]\nsink:\n  path: out\n",
            lines: 2..=2,
            message: "tabs",
        },
        Syntax {
            name: "duplicate key",
            yaml: "\
source:
  paths: [data.parquet]
sink:
  path: out
sink:
  path: elsewhere
",
            lines: 5..=5,
            message: "duplicate mapping key: sink",
        },
        Syntax {
            name: "two documents",
            yaml: "\
source:
  paths: [data.parquet]
sink:
  path: out
---
source:
  paths: [other.parquet]
",
            lines: 5..=6,
            message: "more than one YAML document",
        },
    ];
    for case in cases {
        let (phase, issues) = problems(case.yaml);
        assert_eq!(phase, Phase::Parse, "{}", case.name);
        assert_eq!(issues.len(), 1, "{}: {issues:#?}", case.name);
        let issue = &issues[0];
        let line = issue
            .location
            .line
            .unwrap_or_else(|| panic!("{}: no line in {issue}", case.name));
        assert!(
            case.lines.contains(&line),
            "{}: line {line}, expected {:?} ({issue})",
            case.name,
            case.lines
        );
        assert!(issue.location.column.is_some(), "{}", case.name);
        assert_contains(&issue.message, &[case.message]);
        assert_contains(&issue.to_string(), &[&format!("{FILE}:{line}:")]);
    }
}

#[test]
fn files_that_are_not_a_mapping() {
    for (name, yaml, what) in [
        ("empty file", "", "pipeline file is empty"),
        (
            "comments only",
            "# nothing here\n",
            "pipeline file is empty",
        ),
        ("explicit null", "~\n", "pipeline file is empty"),
        (
            "a list",
            "- source\n- sink\n",
            "pipeline file is not a mapping",
        ),
        (
            "a scalar",
            "just some text\n",
            "pipeline file is not a mapping",
        ),
    ] {
        let (phase, issues) = problems(yaml);
        assert_eq!(phase, Phase::Parse, "{name}");
        assert_eq!(issues.len(), 1, "{name}: {issues:#?}");
        let issue = &issues[0];
        assert_eq!(issue.location.field, "", "{name}");
        assert_contains(
            &issue.message,
            &[
                what,
                "expected a mapping with `source`, `stages` and `sink`",
            ],
        );
    }
}

// ---------------------------------------------------------------------------------
// load_file: what is wrong with the file itself
// ---------------------------------------------------------------------------------

/// The single issue of a `load_file` error, checking that it names `file`.
fn load_issue(file: &Path) -> SpecIssue {
    let err = match load_file(file) {
        Ok(_) => panic!("{} should not load", file.display()),
        Err(e) => e,
    };
    assert_contains(&err.to_string(), &[&file.display().to_string()]);
    match err {
        Error::Spec(SpecIssues(mut issues)) => {
            assert_eq!(issues.len(), 1, "{issues:#?}");
            let issue = issues.remove(0);
            assert_eq!(issue.location.file, file);
            issue
        }
        other => panic!("expected Error::Spec, got {other:?}"),
    }
}

#[test]
fn non_utf8_file_is_refused_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("latin1.yaml");
    std::fs::write(
        &file,
        b"source:\n  paths: [caf\xe9.parquet]\nsink:\n  path: out\n",
    )
    .unwrap();
    let issue = load_issue(&file);
    assert_contains(
        &issue.message,
        &["not valid UTF-8", "Latin-1", "must be UTF-8"],
    );
    // Where: line 2, after `  paths: [caf`.
    assert_eq!(
        (issue.location.line, issue.location.column),
        (Some(2), Some(14))
    );
    // A UTF-16 file is named as such.
    let utf16 = dir.path().join("utf16.yaml");
    let mut bytes = vec![0xFF, 0xFE];
    bytes.extend("source:\n".encode_utf16().flat_map(|u| u.to_le_bytes()));
    std::fs::write(&utf16, bytes).unwrap();
    let issue = load_issue(&utf16);
    assert_contains(&issue.message, &["UTF-16", "must be UTF-8"]);
    assert_eq!(issue.location.line, Some(1));
}

#[test]
fn oversized_file_is_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("huge.yaml");
    // Valid YAML (a comment), so only the size can be the reason.
    let mut text = VALID.to_string();
    text.push('#');
    text.push_str(&"x".repeat(MAX_PIPELINE_BYTES as usize + 1 - text.len()));
    assert_eq!(text.len() as u64, MAX_PIPELINE_BYTES + 1);
    std::fs::write(&file, &text).unwrap();
    let issue = load_issue(&file);
    assert_contains(
        &issue.message,
        &[&format!(
            "is {} bytes, more than the {MAX_PIPELINE_BYTES} allowed",
            MAX_PIPELINE_BYTES + 1
        )],
    );

    // One byte less is exactly the limit, which is allowed.
    text.pop();
    std::fs::write(&file, &text).unwrap();
    let loaded = load_file(&file).expect("a file of exactly MAX_PIPELINE_BYTES loads");
    assert_eq!(loaded.spec.stages.len(), 2);
}

#[test]
fn missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let issue = load_issue(&dir.path().join("nope.yaml"));
    assert_contains(&issue.message, &["cannot read pipeline file"]);
}

#[test]
fn load_file_locates_issues_in_that_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, IMPOSSIBLE_VALUES[0].yaml).unwrap();
    let pipeline = load_file(&file).unwrap();
    let err = validate(&pipeline).unwrap_err();
    assert_contains(
        &err.to_string(),
        &[&format!(
            "{}:6:3: field `runtime.queue_depth`: impossible queue size 0",
            file.display()
        )],
    );
}

// ---------------------------------------------------------------------------------
// Hostile YAML: alias bombs and deep nesting fail fast
// ---------------------------------------------------------------------------------

/// "Billion laughs": 9 levels of 9 aliases each (9^9 = 387 million strings).
fn billion_laughs(used_by: &str) -> String {
    let mut text = String::from("l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for level in 1..=9 {
        let refs = vec![format!("*l{}", level - 1); 9].join(", ");
        text.push_str(&format!("l{level}: &l{level} [{refs}]\n"));
    }
    text.push_str(used_by);
    text
}

/// Run `parse_str` on another thread; fail if it takes longer than `limit`.
fn parse_within(text: String, limit: Duration) -> (Result<(), Error>, Duration) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        let result = parse_str(&text, Path::new(FILE)).map(|_| ());
        let _ = tx.send((result, start.elapsed()));
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("parse_str did not return within {limit:?}"))
}

#[test]
fn alias_bomb_fails_fast() {
    for used_by in [
        // Expanded where a list of strings is expected...
        "source:\n  paths: *l9\nsink:\n  path: out\n",
        // ...and under keys nothing reads.
        "source:\n  paths: [a.parquet]\nsink:\n  path: out\n",
    ] {
        let text = billion_laughs(used_by);
        // A hang guard, not a timing assertion: a real expansion would take hours and
        // exhaust memory, the budget refuses it in well under a second.
        let (result, _) = parse_within(text, Duration::from_secs(60));
        match result {
            Err(Error::Spec(SpecIssues(issues))) => {
                assert_eq!(issues.len(), 1, "{issues:#?}");
                assert_contains(&issues[0].message, &["invalid YAML", "budget"]);
                assert!(issues[0].location.line.is_some());
            }
            other => panic!("expected a spec error, got {other:?}"),
        }
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    for text in [
        format!("source: {}\n", "[".repeat(100_000)),
        format!("source: {}\n", "{a: ".repeat(50_000)),
        format!(
            "source:\n  paths: {}x{}\n",
            "[".repeat(500),
            "]".repeat(500)
        ),
    ] {
        let (result, _) = parse_within(text, Duration::from_secs(20));
        match result {
            Err(Error::Spec(SpecIssues(issues))) => {
                assert_contains(&issues[0].message, &["invalid YAML"]);
            }
            other => panic!("expected a spec error, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------
// Plan phase: columns, filter and shards checked against the committed samples
// ---------------------------------------------------------------------------------

#[test]
fn mapped_column_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "\
source:
  paths: [{}/bytes]
  columns: {{caption: text}}
stages:
  - type: decode
sink:
  path: out
",
        samples().display()
    );
    let issue = single_spec_issue(plan_in(dir.path(), &yaml).1);
    assert_eq!(issue.location.field, "source.columns.caption");
    assert_eq!(
        (issue.location.line, issue.location.column),
        (Some(3), Some(13))
    );
    assert_contains(
        &issue.message,
        &[
            "part-00000.parquet",
            "column `text` not found in the shard",
            // The available columns, with their types.
            "id (Utf8)",
            "caption (Utf8)",
            "label (Int64)",
        ],
    );
}

#[test]
fn mapped_column_of_the_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "\
source:
  paths: [{}/bytes]
  columns:
    label: caption
sink:
  path: out
",
        samples().display()
    );
    let issue = single_spec_issue(plan_in(dir.path(), &yaml).1);
    assert_eq!(issue.location.field, "source.columns.label");
    assert_eq!(
        (issue.location.line, issue.location.column),
        (Some(4), Some(5))
    );
    assert_contains(
        &issue.message,
        &[
            "column `caption` has type Utf8",
            "expected an integer column",
        ],
    );
}

#[test]
fn filter_on_a_column_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "\
source:
  paths: [{}/bytes]
  filter: \"nosuchcol > 3\"
sink:
  path: out
",
        samples().display()
    );
    let issue = single_spec_issue(plan_in(dir.path(), &yaml).1);
    assert_eq!(issue.location.field, "source.filter");
    assert_eq!(issue.location.line, Some(3));
    assert_contains(&issue.message, &["invalid filter", "nosuchcol"]);
}

#[test]
fn filter_with_an_sql_syntax_error() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "\
source:
  paths: [{}/bytes]
  filter: \"label >\"
sink:
  path: out
",
        samples().display()
    );
    let issue = single_spec_issue(plan_in(dir.path(), &yaml).1);
    assert_eq!(issue.location.field, "source.filter");
    assert_eq!(issue.location.line, Some(3));
    assert_contains(&issue.message, &["invalid filter"]);
}

#[test]
fn dropping_a_column_the_output_does_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "\
source:
  paths: [{}/bytes]
stages:
  - type: decode
  - type: clean_caption
sink:
  path: out
  drop_columns: [image, nope]
",
        samples().display()
    );
    let issue = single_spec_issue(plan_in(dir.path(), &yaml).1);
    assert_eq!(issue.location.field, "sink.drop_columns[1]");
    assert_eq!(
        (issue.location.line, issue.location.column),
        (Some(8), Some(25))
    );
    // Lists what there is, stage outputs included.
    assert_contains(
        &issue.message,
        &["no column `nope` to drop", "caption_clean", "width"],
    );
}

#[test]
fn a_stage_whose_input_column_is_not_mapped() {
    // The img2dataset preset maps `jpg`, which the bytes shards do not have.
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "\
source:
  paths: [{}/bytes]
  preset: img2dataset
stages:
  - type: clean_caption
  - type: decode
sink:
  path: out
",
        samples().display()
    );
    let issue = single_spec_issue(plan_in(dir.path(), &yaml).1);
    assert_eq!(issue.location.field, "stages[1]");
    assert_eq!(issue.location.line, Some(6));
    assert_contains(
        &issue.message,
        &["stage `decode`", "needs input column `image`"],
    );
}

#[test]
fn glob_matching_nothing_names_the_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "source:\n  paths: [\"shards/*.parquet\"]\nsink:\n  path: out\n";
    std::fs::create_dir(dir.path().join("shards")).unwrap();
    let (_, result) = plan_in(dir.path(), yaml);
    let issue = single_spec_issue(result);
    assert_eq!(issue.location.field, "source.paths[0]");
    assert_eq!(issue.location.line, Some(2));
    assert_contains(
        &issue.message,
        &["`shards/*.parquet` matches no Parquet shard"],
    );
}

#[test]
fn a_file_that_is_not_parquet_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("x.parquet"),
        b"definitely not a parquet file\n",
    )
    .unwrap();
    let (_, result) = plan_in(
        dir.path(),
        "source:\n  paths: [x.parquet]\nsink:\n  path: out\n",
    );
    match result {
        Err(Error::Input { path, message }) => {
            assert_eq!(path, dir.path().join("x.parquet"));
            assert_contains(&message, &["not a readable Parquet file"]);
        }
        Err(other) => panic!("expected Error::Input, got {other:?}"),
        Ok(_) => panic!("garbage planned as a Parquet shard"),
    }
}

#[test]
fn a_parquet_file_with_a_truncated_footer_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let whole = std::fs::read(samples().join("bytes/part-00000.parquet")).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &whole[..whole.len() - 100]).unwrap();
    let (_, result) = plan_in(
        dir.path(),
        "source:\n  paths: [cut.parquet]\nsink:\n  path: out\n",
    );
    match result {
        Err(Error::Input { path, message }) => {
            assert_eq!(path, cut);
            assert_contains(&message, &["not a readable Parquet file"]);
        }
        Err(other) => panic!("expected Error::Input, got {other:?}"),
        Ok(_) => panic!("a truncated shard planned"),
    }
}

// ---------------------------------------------------------------------------------
// The example pipelines, and the binary's view of broken ones
// ---------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------
// JSON Schema drift
// ---------------------------------------------------------------------------------

fn checked_in_schema() -> String {
    std::fs::read_to_string(Path::new(MANIFEST_DIR).join("schemas/pipeline.schema.json"))
        .expect("schemas/pipeline.schema.json is checked in")
}

#[test]
fn checked_in_schema_is_current() {
    let generated = json_schema();
    let on_disk = checked_in_schema();
    if generated != on_disk {
        let first_diff = generated
            .lines()
            .zip(on_disk.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || "one is a prefix of the other".to_string(),
                |i| format!("first difference at line {}", i + 1),
            );
        panic!(
            "schemas/pipeline.schema.json is out of date ({first_diff}); regenerate it with\n    \
             cargo run -- schema --out schemas/pipeline.schema.json"
        );
    }
}

fn property_names(schema: &Value, into: &mut BTreeSet<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Object(props)) = map.get("properties") {
                into.extend(props.keys().cloned());
            }
            map.values().for_each(|v| property_names(v, into));
        }
        Value::Array(items) => items.iter().for_each(|v| property_names(v, into)),
        _ => {}
    }
}

fn mapping_keys(value: &Value, into: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            into.extend(map.keys().cloned());
            map.values().for_each(|v| mapping_keys(v, into));
        }
        Value::Array(items) => items.iter().for_each(|v| mapping_keys(v, into)),
        _ => {}
    }
}

#[test]
fn schema_describes_the_pipeline_types() {
    let schema: Value = serde_json::from_str(&json_schema()).expect("the schema is JSON");
    let top: BTreeSet<&str> = schema["properties"]
        .as_object()
        .expect("top-level properties")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        top,
        BTreeSet::from([
            "name", "source", "stages", "sink", "runtime", "resume", "storage"
        ])
    );
    assert_eq!(schema["additionalProperties"], Value::Bool(false));
    let required: BTreeSet<&str> = schema["required"]
        .as_array()
        .expect("required")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(required, BTreeSet::from(["source", "sink"]));

    // Stage entries are one of the registered types, selected by `type`.
    let variants = schema["$defs"]["StageSpec"]["oneOf"]
        .as_array()
        .expect("StageSpec.oneOf");
    let types: BTreeSet<&str> = variants
        .iter()
        .filter_map(|v| v["properties"]["type"]["const"].as_str())
        .collect();
    for expected in ["decode", "clean_caption", "clip_score", "uncertainty"] {
        assert!(
            types.contains(expected),
            "schema lacks stage type {expected}"
        );
    }
    assert_eq!(
        types,
        trustflow_engine::stages::StageKind::TYPES
            .iter()
            .copied()
            .collect()
    );
    // A config with flattened blocks (image settings) is referenced from `$defs`.
    let decode = match variants[0]["$ref"].as_str() {
        Some(path) => &schema["$defs"][path.trim_start_matches("#/$defs/")],
        None => &variants[0],
    };
    assert_eq!(
        decode["properties"]["max_pixels"]["type"], "integer",
        "decode settings are described"
    );

    // Every key the example pipelines use is a property somewhere in the schema.
    let mut described = BTreeSet::new();
    property_names(&schema, &mut described);
    for file in example_pipelines() {
        let text = std::fs::read_to_string(&file).unwrap();
        let value: Value = serde_saphyr::from_str(&text).unwrap();
        let mut used = BTreeSet::new();
        mapping_keys(&value, &mut used);
        let missing: Vec<_> = used.difference(&described).collect();
        assert!(
            missing.is_empty(),
            "{}: keys {missing:?} are not in the schema",
            file.display()
        );
    }
}

// ---------------------------------------------------------------------------------
// Fuzzing: nothing panics, and every reported issue is well-formed
// ---------------------------------------------------------------------------------

/// Parse and validate `text`; every issue must have a message and, when located, a
/// position inside the text.
fn check_never_panics(text: &str) -> Result<(), TestCaseError> {
    let result = parse_str(text, Path::new(FILE)).and_then(|p| validate(&p));
    let issues = match result {
        Ok(()) => return Ok(()),
        Err(Error::Spec(SpecIssues(issues))) => issues,
        Err(other) => return Err(TestCaseError::fail(format!("not a spec error: {other:?}"))),
    };
    prop_assert!(!issues.is_empty());
    // YAML breaks lines at `\r\n`, `\n` and a lone `\r` (str::lines ignores the last).
    let line_count = text
        .replace("\r\n", "\n")
        .split(['\n', '\r'])
        .count()
        .max(1);
    for issue in &issues {
        let at = &issue.location;
        prop_assert!(!issue.message.trim().is_empty(), "empty message: {issue:?}");
        prop_assert_eq!(at.line.is_some(), at.column.is_some(), "{:?}", issue);
        if let Some(line) = at.line {
            prop_assert!(
                (1..=line_count).contains(&line),
                "line {} outside 1..={} in {:?}",
                line,
                line_count,
                issue
            );
        }
        if let Some(column) = at.column {
            prop_assert!(column >= 1, "column 0 in {:?}", issue);
        }
    }
    Ok(())
}

fn demo_yaml() -> String {
    std::fs::read_to_string(Path::new(MANIFEST_DIR).join("pipelines/demo.yaml")).unwrap()
}

/// One edit of a pipeline file's text. Line indices wrap around the current length.
#[derive(Debug, Clone)]
enum Mutation {
    DeleteLine(usize),
    DuplicateLine(usize),
    /// Add (positive) or remove (negative) leading spaces.
    Reindent(usize, i8),
    /// Replace what follows the line's first `: ` (or `- `) with this text.
    ReplaceValue(usize, String),
    /// Put an anchor `&a` in front of the line's value.
    Anchor(usize),
    /// Replace the line's value with the alias `*a`.
    Alias(usize),
}

fn value_start(line: &str) -> Option<usize> {
    line.find(": ")
        .map(|i| i + 2)
        .or_else(|| line.find("- ").map(|i| i + 2))
        .or_else(|| line.ends_with(':').then_some(line.len()))
}

fn apply(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for m in mutations {
        if lines.is_empty() {
            break;
        }
        let n = lines.len();
        match m {
            Mutation::DeleteLine(i) => {
                lines.remove(i % n);
            }
            Mutation::DuplicateLine(i) => {
                let line = lines[i % n].clone();
                lines.insert(i % n, line);
            }
            Mutation::Reindent(i, delta) => {
                let line = &mut lines[i % n];
                if *delta >= 0 {
                    line.insert_str(0, &" ".repeat(*delta as usize));
                } else {
                    let spaces = line.len() - line.trim_start_matches(' ').len();
                    line.drain(..spaces.min(delta.unsigned_abs() as usize));
                }
            }
            Mutation::ReplaceValue(i, value) => {
                let line = &mut lines[i % n];
                if let Some(at) = value_start(line) {
                    line.truncate(at);
                    if line.ends_with(':') {
                        line.push(' ');
                    }
                    line.push_str(value);
                }
            }
            Mutation::Anchor(i) => {
                let line = &mut lines[i % n];
                if let Some(at) = value_start(line) {
                    line.insert_str(at, if line.ends_with(':') { " &a" } else { "&a " });
                }
            }
            Mutation::Alias(i) => {
                let line = &mut lines[i % n];
                if let Some(at) = value_start(line) {
                    line.truncate(at);
                    line.push_str(if line.ends_with(':') { " *a" } else { "*a" });
                }
            }
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

fn value_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("~".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("\"\"".to_string()),
        Just("99999999999999999999999".to_string()),
        Just("sink".to_string()),
        Just("[id]".to_string()),
        Just("*a".to_string()),
        Just("&a [x, *a]".to_string()),
        "[a-z0-9_ ]{1,12}",
        "[ -~]{0,16}",
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let line = 0usize..64;
    prop_oneof![
        line.clone().prop_map(Mutation::DeleteLine),
        line.clone().prop_map(Mutation::DuplicateLine),
        (line.clone(), -4i8..=4).prop_map(|(i, d)| Mutation::Reindent(i, d)),
        (line.clone(), value_text()).prop_map(|(i, v)| Mutation::ReplaceValue(i, v)),
        line.clone().prop_map(Mutation::Anchor),
        line.prop_map(Mutation::Alias),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        check_never_panics(&text)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        check_never_panics(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn yaml_like_text_never_panics(text in "([a-z_]{1,8}|[ \n:\\-\\[\\]{},&*!|>'\"#?~0-9]){0,120}") {
        check_never_panics(&text)?;
    }

    #[test]
    fn mutated_demo_pipeline_never_panics(
        mutations in proptest::collection::vec(mutation(), 1..5)
    ) {
        let text = apply(&demo_yaml(), &mutations);
        check_never_panics(&text)?;
    }
}

#[test]
fn mutations_change_the_text() {
    // Guard for the fuzzer above: its edits really edit.
    let demo = demo_yaml();
    assert_eq!(apply(&demo, &[]), demo);
    for m in [
        Mutation::DeleteLine(5),
        Mutation::DuplicateLine(5),
        Mutation::Reindent(5, 2),
        Mutation::ReplaceValue(5, "zzz".into()),
        Mutation::Anchor(5),
        Mutation::Alias(5),
    ] {
        assert_ne!(apply(&demo, std::slice::from_ref(&m)), demo, "{m:?}");
    }
}

// ---------------------------------------------------------------------------------
// Known bugs in src (ignored until fixed; run them with
// `cargo test -p trustflow-engine --test engine spec:: -- --ignored`)
// ---------------------------------------------------------------------------------

#[test]
fn an_alias_used_as_a_key_keeps_later_positions() {
    // `*key` is the key `filter`; the keys after it must keep their own lines.
    let yaml = "\
name: &key filter
source:
  paths: [data.parquet]
  *key : \"x > 1\"
  null_labels: drop
sink:
  path: out
";
    let (_, issues) = problems(yaml);
    assert_eq!(issues.len(), 1, "{issues:#?}");
    assert_eq!(issues[0].location.field, "source.null_labels");
    assert_eq!(issues[0].location.line, Some(5), "{}", issues[0]);
}

#[test]
fn a_relative_glob_in_a_folder_whose_name_has_glob_characters() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("run[1]");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(
        samples().join("bytes/part-00000.parquet"),
        folder.join("part-00000.parquet"),
    )
    .unwrap();
    // The literal file name works...
    let (_, plain) = plan_in(
        &folder,
        "source:\n  paths: [part-00000.parquet]\nsink:\n  path: ../out\n",
    );
    assert!(plain.is_ok(), "{:?}", plain.err());
    // ...and so must a pattern relative to the same folder.
    let (_, globbed) = plan_in(
        &folder,
        "source:\n  paths: [\"*.parquet\"]\nsink:\n  path: ../out\n",
    );
    let plan = globbed.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.source.shards.len(), 1);
}

#[test]
fn the_stage_schema_rejects_unknown_keys() {
    // `max_pixel: 5` in a decode stage is an error (see UNKNOWN_FIELDS); an editor using
    // the schema should flag it too. With `oneOf` variants plus shared properties that
    // takes `unevaluatedProperties: false` on StageSpec.
    let schema: Value = serde_json::from_str(&json_schema()).unwrap();
    assert_eq!(
        schema["$defs"]["StageSpec"]["unevaluatedProperties"],
        Value::Bool(false),
        "{:#}",
        schema["$defs"]["StageSpec"]
    );
}

#[test]
fn environment_variables_are_interpolated() {
    use trustflow_engine::spec::interpolate_env;
    let env = |name: &str| match name {
        "MODELS" => Some("/opt/models".to_string()),
        "EMPTY" => Some(String::new()),
        "N" => Some("16".to_string()),
        _ => None,
    };
    assert_eq!(
        interpolate_env("model: ${MODELS}/clip\n", env).unwrap(),
        "model: /opt/models/clip\n"
    );
    assert_eq!(
        interpolate_env("a: ${UNSET:-x/y}\nb: ${EMPTY:-d}\n", env).unwrap(),
        "a: x/y\nb: d\n"
    );
    assert_eq!(
        interpolate_env("filter: price > $$5 and $x\n", env).unwrap(),
        "filter: price > $5 and $x\n"
    );
    // Set to the empty string is set: `${EMPTY}` is empty, not an error. Plain values
    // stay plain, so a number is still a number.
    assert_eq!(
        interpolate_env("a: \"${EMPTY}\"\nn: ${N}\n", env).unwrap(),
        "a: \"\"\nn: 16\n"
    );
    let (at, message) = interpolate_env("a: 1\nb: ${NOPE}\n", env).unwrap_err();
    assert_eq!(at, (2, 4));
    assert_contains(&message, &["`NOPE` is not set"]);
    let (at, message) = interpolate_env("a: ${OPEN\n", env).unwrap_err();
    assert_eq!(at, (1, 4));
    assert_contains(&message, &["without a closing"]);
    assert!(interpolate_env("a: ${9X}", env).is_err());
}

/// Parse YAML text the way the trainer reads its files after `read_spec_text`.
fn yaml_value(text: &str) -> Value {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{e}:\n{text}"))
}

#[test]
fn interpolation_cannot_change_the_structure_of_a_file() {
    use trustflow_engine::spec::interpolate_env;
    let evil = "x\nsink:\n  path: /tmp/elsewhere\nextra: 1";
    let env = |name: &str| match name {
        "EVIL" => Some(evil.to_string()),
        "QUOTE" => Some("it's \"quoted\" \\ here".to_string()),
        "COLON" => Some("a: b # not a comment".to_string()),
        _ => None,
    };
    let text = "\
# ${UNSET} in a comment is not interpolated
name: ${EVIL}
sink:
  path: '${QUOTE}'
colon: ${COLON}
paths: [\"${EVIL}\", '${UNSET:-a, b}']
${UNSET}: keys are left alone
after: 7
block: |
  first ${EVIL}
  last
";
    let out = interpolate_env(text, env).unwrap();
    let value = yaml_value(&out);
    assert_eq!(value["name"], evil, "{out}");
    assert_eq!(value["sink"]["path"], "it's \"quoted\" \\ here");
    assert_eq!(value["colon"], "a: b # not a comment");
    assert_eq!(value["paths"][0], evil);
    assert_eq!(value["paths"][1], "a, b");
    assert_eq!(value["block"], format!("first {evil}\nlast\n"));
    assert_eq!(value["${UNSET}"], "keys are left alone");
    assert_eq!(value["after"], 7);
    assert!(value.get("extra").is_none(), "{out}");
    // Every line keeps its number, so later errors still point at the right line
    // (a block scalar, whose value takes as many lines as it has, comes last).
    assert_eq!(
        out.lines().position(|l| l.starts_with("after:")),
        text.lines().position(|l| l.starts_with("after:"))
    );
}

#[test]
fn a_variable_in_a_comment_of_a_pipeline_file_is_no_error() {
    let yaml = "\
# models come from ${TF_TEST_UNSET_IN_COMMENT}
source:
  paths: [data.parquet]  # or ${TF_TEST_UNSET_IN_COMMENT}/*.parquet
  filter: \"price > $$5\"
sink:
  path: out
";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(FILE);
    std::fs::write(&file, yaml).unwrap();
    let pipeline = load_file(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pipeline.spec.source.filter.as_deref(), Some("price > $5"));
}

#[test]
fn an_unset_variable_is_reported_at_its_field() {
    let yaml = "\
source:
  paths: [data.parquet]
stages:
  - type: decode
sink:
  path: \"${TF_TEST_UNSET_OUT}/out\"
  compression: ${TF_TEST_UNSET_CODEC}
";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(FILE);
    std::fs::write(&file, yaml).unwrap();
    let Err(Error::Spec(SpecIssues(issues))) = load_file(&file) else {
        panic!("unset variables were accepted");
    };
    let found: Vec<(&str, Option<usize>, Option<usize>)> = issues
        .iter()
        .map(|i| {
            (
                i.location.field.as_str(),
                i.location.line,
                i.location.column,
            )
        })
        .collect();
    assert_eq!(
        found,
        vec![
            ("sink.path", Some(6), Some(10)),
            ("sink.compression", Some(7), Some(16)),
        ],
        "{issues:#?}"
    );
    assert_contains(
        &issues[0].to_string(),
        &[
            "broken.yaml:6:10: field `sink.path`",
            "`TF_TEST_UNSET_OUT` is not set",
        ],
    );
}

#[test]
fn pipeline_files_read_environment_variables() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("env.yaml");
    std::fs::write(
        &file,
        "source:\n  paths: [\"${TF_TEST_SHARDS}/*.parquet\"]\nsink:\n  path: out\n",
    )
    .unwrap();
    let err = trustflow_engine::spec::load_file(&file)
        .unwrap_err()
        .to_string();
    assert_contains(&err, &["env.yaml:2:12", "`TF_TEST_SHARDS` is not set"]);
}

#[test]
fn existing_paths_with_glob_characters_are_literal() {
    let dir = tempfile::tempdir().unwrap();
    let sample = samples().join("bytes/part-00000.parquet");
    std::fs::create_dir(dir.path().join("data[2024]")).unwrap();
    std::fs::copy(&sample, dir.path().join("data[2024]/part-0.parquet")).unwrap();
    std::fs::copy(&sample, dir.path().join("shard[1].parquet")).unwrap();
    // `[` without its `]` is not even a valid pattern; as a file name it is fine.
    std::fs::copy(&sample, dir.path().join("odd[.parquet")).unwrap();
    // A glob that names no existing path is still expanded: `shard[0-9]` matches `shard1`.
    std::fs::copy(&sample, dir.path().join("shard1.parquet")).unwrap();
    for (paths, expect) in [
        ("shard[1].parquet", "shard[1].parquet"),
        ("data[2024]", "data[2024]/part-0.parquet"),
        ("data[2024]/part-0.parquet", "data[2024]/part-0.parquet"),
        ("odd[.parquet", "odd[.parquet"),
        ("shard[0-9].parquet", "shard1.parquet"),
    ] {
        let (_, result) = plan_in(
            dir.path(),
            &format!("source:\n  paths: [\"{paths}\"]\nsink:\n  path: out\n"),
        );
        let plan = result.unwrap_or_else(|e| panic!("{paths}: {e}"));
        let shards: Vec<_> = plan.source.shards.iter().map(|s| s.path.clone()).collect();
        assert_eq!(shards, vec![dir.path().join(expect)], "{paths}");
    }
}

#[test]
fn a_missing_shard_file_is_said_not_to_exist() {
    let dir = tempfile::tempdir().unwrap();
    let (_, result) = plan_in(
        dir.path(),
        "source:\n  paths: [gone.parquet]\nsink:\n  path: out\n",
    );
    let issue = single_spec_issue(result);
    assert_eq!(issue.location.field, "source.paths[0]");
    assert_eq!(issue.location.line, Some(2));
    assert_contains(&issue.message, &["gone.parquet", "does not exist"]);
    assert!(!issue.message.contains("schema"), "{issue}");
}

#[test]
fn a_filter_too_large_to_evaluate_is_refused_by_validate() {
    let terms = |n: usize| {
        (0..n)
            .map(|i| format!("id = 'a{i}'"))
            .collect::<Vec<_>>()
            .join(" OR ")
    };
    let with_filter = |filter: String| {
        VALID.replace(
            "  paths: [data.parquet]\n",
            &format!("  paths: [data.parquet]\n  filter: \"{filter}\"\n"),
        )
    };
    // 1,000 terms pass; 20,000 would need a tree 20,000 levels deep.
    let ok = parse_str(&with_filter(terms(1000)), Path::new(FILE)).unwrap();
    validate(&ok).unwrap();
    let (phase, issues) = problems(&with_filter(terms(20_000)));
    assert_eq!(phase, Phase::Validate);
    assert_eq!(issues.len(), 1, "{issues:#?}");
    assert_eq!(issues[0].location.field, "source.filter");
    assert_eq!(issues[0].location.line, Some(3));
    assert_contains(
        &issues[0].message,
        &["expected at most 2500 operators", "found 39999", "IN ("],
    );
}
