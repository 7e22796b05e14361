//! `trustflow validate` and `trustflow schema` as a user sees them: every example
//! pipeline validates, every broken case of the engine's spec tests is reported with its
//! file, line and column, and the schema printed is the generated one.

use crate::common::{self, assert_contains, example_pipelines, repo_root};
use trustflow_engine::plan::{Overrides, load_and_plan};
use trustflow_engine::spec::json_schema;

#[path = "../../crates/trustflow-engine/tests/engine/spec_cases.rs"]
#[allow(dead_code)]
mod spec_cases;
use spec_cases::*;

#[test]
fn every_example_pipeline_validates_and_plans() {
    for file in example_pipelines() {
        let shown = file.display().to_string();
        let out = run_bin(&["validate", &shown]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "trustflow validate {shown} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_contains(&stdout, &[&format!("ok: {shown} is valid")]);

        let plan =
            load_and_plan(&file, &Overrides::default()).unwrap_or_else(|e| panic!("{shown}: {e}"));
        assert!(!plan.source.shards.is_empty(), "{shown}: no shards");
        assert_eq!(plan.stages.len(), plan.pipeline.spec.stages.len());
    }
}

#[test]
fn binary_rejects_every_broken_case_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let tables = [
        UNKNOWN_FIELDS,
        WRONG_TYPES,
        MISSING_OR_UNKNOWN,
        IMPOSSIBLE_VALUES,
    ];
    for (i, case) in tables.iter().flat_map(|t| t.iter()).enumerate() {
        let file = dir.path().join(format!("case{i}.yaml"));
        std::fs::write(&file, case.yaml).unwrap();
        let shown = file.display().to_string();
        let out = run_bin(&["validate", &shown]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: exit 0", case.name);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", case.name);
        let at = if case.field.is_empty() {
            format!("{shown}:{}:{}: ", case.line, case.column)
        } else {
            format!(
                "{shown}:{}:{}: field `{}`: ",
                case.line, case.column, case.field
            )
        };
        assert!(
            stderr.contains(&at),
            "{}: stderr should contain {at:?}:\n{stderr}",
            case.name
        );
        assert!(out.stdout.is_empty(), "{}: printed a plan", case.name);
    }
}

#[test]
fn binary_prints_file_line_column_for_a_typo() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.yaml");
    std::fs::write(&file, UNKNOWN_FIELDS[0].yaml).unwrap();
    let shown = file.display().to_string();
    let out = run_bin(&["validate", &shown]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_contains(
        &stderr,
        &[
            "error: 1 problem in pipeline file",
            &format!("{shown}:3:1: field `sinks`: unknown field `sinks`"),
        ],
    );
}

#[test]
fn schema_command_prints_the_same_schema() {
    let out = run_bin(&["schema"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), json_schema());
}

fn run_bin(args: &[&str]) -> std::process::Output {
    common::bin()
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run the trustflow binary")
}
