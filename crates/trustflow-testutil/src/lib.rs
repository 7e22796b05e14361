//! Helpers for the integration tests of every workspace member: reading Parquet outputs
//! back, the repository's fixtures, and the check for the ONNX Runtime library that
//! `scripts/setup.sh` installs. Panics are the point here: these run in tests only.

pub mod s3;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::concat_batches;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// The repository's root folder (fixtures, pipelines, schemas), whichever member's
/// tests ask.
/// The workspace's root, found at run time from the crate under test (cargo sets
/// `CARGO_MANIFEST_DIR` for the test process) rather than from where this crate was
/// compiled: one target folder serves several checkouts, and cargo may reuse a build
/// of this crate made in another one.
pub fn repo_root() -> PathBuf {
    let compiled = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .and_then(|dir| {
            dir.ancestors()
                .find(|d| d.join("Cargo.lock").is_file())
                .map(Path::to_path_buf)
        })
        .unwrap_or(compiled)
}

pub fn read_parquet(path: &Path) -> RecordBatch {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let schema = builder.schema().clone();
    let batches: Vec<RecordBatch> = builder
        .build()
        .expect("reader")
        .collect::<Result<_, _>>()
        .expect("batches");
    concat_batches(&schema, &batches).expect("concat")
}

/// Values of a string column (nulls as None).
pub fn strings(batch: &RecordBatch, name: &str) -> Vec<Option<String>> {
    let col = batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"));
    let col = arrow::compute::cast(col, &arrow::datatypes::DataType::Utf8).expect("cast");
    let col = col.as_string::<i32>();
    (0..col.len())
        .map(|i| col.is_valid(i).then(|| col.value(i).to_string()))
        .collect()
}

pub fn ids(batch: &RecordBatch) -> Vec<String> {
    strings(batch, "id").into_iter().flatten().collect()
}

/// Every shard file of a corpus folder, sorted.
pub fn shard_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .filter(|p| !p.to_string_lossy().ends_with(".quarantine.parquet"))
        .collect();
    files.sort();
    files
}

/// id -> (error_stage, error) over every quarantine shard of an output folder.
pub fn quarantined(out: &Path) -> BTreeMap<String, (String, String)> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(out).expect("read out").flatten() {
        let path = entry.path();
        if path.to_string_lossy().ends_with(".quarantine.parquet") {
            let batch = read_parquet(&path);
            // Quarantined rows are as they came: the id column has the shard's name
            // (`key` in img2dataset shards), and a null id stays null.
            let id_column = ["id", "key"]
                .into_iter()
                .find(|c| batch.column_by_name(c).is_some())
                .expect("an id column in the quarantine");
            let ids = strings(&batch, id_column);
            let stages = strings(&batch, "error_stage");
            let errors = strings(&batch, "error");
            for (row, ((id, stage), error)) in ids.into_iter().zip(stages).zip(errors).enumerate() {
                found.insert(
                    id.unwrap_or_else(|| format!("<null id, row {row}>")),
                    (stage.expect("stage"), error.expect("error")),
                );
            }
        }
    }
    found
}

pub fn report(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("_report.json")).expect("report");
    serde_json::from_str(&text).expect("report json")
}

/// Model tests need the ONNX Runtime library that scripts/setup.sh installs.
pub fn require_ort() {
    let path = std::env::var("ORT_DYLIB_PATH").unwrap_or_default();
    assert!(
        Path::new(&path).is_file(),
        "these tests need ONNX Runtime: run `source scripts/setup.sh` first (ORT_DYLIB_PATH={path:?})"
    );
}

/// A JSON array of numbers from a reference fixture, as f32.
pub fn floats(value: &serde_json::Value) -> Vec<f32> {
    value
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|v| v.as_f64().expect("a number") as f32)
        .collect()
}

/// A JSON array of number arrays, as rows of f32.
pub fn rows_f32(value: &serde_json::Value) -> Vec<Vec<f32>> {
    value
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(floats)
        .collect()
}

/// Fails naming the haystack and the first fragment it lacks.
pub fn assert_contains(haystack: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            haystack.contains(needle),
            "{haystack:?} should contain {needle:?}"
        );
    }
}

/// Every example pipeline under `pipelines/` (not its subfolders), sorted.
pub fn example_pipelines() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "expected the example pipelines, found {files:?}"
    );
    files
}

/// Which top-level modules each top-level module of a crate's `src` refers to
/// (`crate::x`, `crate::{x, y}`, and `super::x` from a top-level file), comments aside.
/// What the layering tests check.
pub fn module_graph(src: &Path) -> BTreeMap<String, std::collections::BTreeSet<String>> {
    fn files(dir: &Path, into: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                files(&path, into);
            } else if path.extension().is_some_and(|e| e == "rs") {
                into.push(path);
            }
        }
    }
    fn names_after(code: &str, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let before_ok = rest[..at]
                .chars()
                .last()
                .is_none_or(|c| !c.is_alphanumeric() && c != '_');
            rest = &rest[at + prefix.len()..];
            if !before_ok {
                continue;
            }
            let ident = |text: &str| -> String {
                text.trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect()
            };
            match rest.strip_prefix('{') {
                Some(inner) => out.extend(
                    inner
                        .split('}')
                        .next()
                        .unwrap_or("")
                        .split(',')
                        .map(ident)
                        .filter(|n| !n.is_empty() && n != "self"),
                ),
                None => out.push(ident(rest)),
            }
        }
        out
    }
    let mut all = Vec::new();
    files(src, &mut all);
    let mut graph: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for file in all {
        let relative = file.strip_prefix(src).expect("under src");
        let parts: Vec<String> = relative
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        let module = parts[0].clone();
        if module == "lib" || module == "main" {
            continue;
        }
        let top_level = parts.len() == 1 || (parts.len() == 2 && parts[1] == "mod");
        let code: String = std::fs::read_to_string(&file)
            .expect("read source")
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut refs = names_after(&code, "crate::");
        if top_level {
            refs.extend(names_after(&code, "super::"));
        }
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(refs.into_iter().filter(|r| *r != module));
    }
    // Keep references to modules only (not to items re-exported at the crate root, nor
    // `super::Item` inside a module's own `mod tests`).
    let modules: std::collections::BTreeSet<String> = graph.keys().cloned().collect();
    for uses in graph.values_mut() {
        uses.retain(|u| modules.contains(u));
    }
    graph
}

/// A cycle in `graph`, as the modules along it, if there is one.
pub fn find_cycle(
    graph: &BTreeMap<String, std::collections::BTreeSet<String>>,
) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|p| p == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}
