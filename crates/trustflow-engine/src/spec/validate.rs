//! Semantic checks on a parsed spec that need no data: ranges, names, references.
//! All problems are collected and reported together, each at its field's line.

use std::path::{Path, PathBuf};

use super::{LoadedPipeline, RuntimeSpec, SinkSpec, SourceSpec};
use crate::error::{Error, SpecIssues};
use crate::stages::{StageCommon, StageKind};

/// Upper bounds that catch typos (`queue_depth: 40000`) before they eat the memory.
pub const MAX_BATCH_SIZE: usize = 1 << 20;
pub const MAX_QUEUE_DEPTH: usize = 4096;
pub const MAX_WORKERS: usize = 256;
/// Most operators and parenthesis levels in `source.filter` ([`filter_size`]). DataFusion
/// walks the expression tree recursively, a frame per level, so a filter of 100,000
/// `OR` terms would exhaust any stack and abort the process; the binary's threads have
/// stacks sized for this many levels.
pub const MAX_FILTER_SIZE: usize = 2500;

/// Check everything that can be checked without opening a shard.
pub fn validate(p: &LoadedPipeline) -> Result<(), Error> {
    let spec = &p.spec;
    let parsed = Parsed {
        source: Some(&spec.source),
        stages: spec
            .stages
            .iter()
            .enumerate()
            .map(|(index, stage)| ParsedStage {
                index,
                common: &stage.common,
                type_name: Some(stage.kind.type_name()),
                kind: Some(&stage.kind),
            })
            .collect(),
        sink: Some(&spec.sink),
        runtime: Some(&spec.runtime),
        storage: Some(&spec.storage),
    };
    let mut issues = Vec::new();
    check(&parsed, p.base_dir(), &mut |field, message| {
        issues.push(p.issue(field, message))
    });
    if issues.is_empty() {
        Ok(())
    } else {
        // In file order, as an editor would list them.
        issues.sort_by_key(|i| (i.location.line.unwrap_or(usize::MAX), i.location.column));
        Err(Error::Spec(SpecIssues(issues)))
    }
}

/// The sections of a pipeline file as far as they parsed. [`validate`] checks a whole
/// spec; the loader checks what parsed of a file that did not, so that a type error in
/// one place does not hide a range error in another.
pub(super) struct Parsed<'a> {
    pub source: Option<&'a SourceSpec>,
    /// The stage entries whose common keys parsed, by their index in the file.
    pub stages: Vec<ParsedStage<'a>>,
    pub sink: Option<&'a SinkSpec>,
    pub runtime: Option<&'a RuntimeSpec>,
    pub storage: Option<&'a crate::storage::StorageSpec>,
}

pub(super) struct ParsedStage<'a> {
    pub index: usize,
    pub common: &'a StageCommon,
    /// The `type`, when it names a registered stage.
    pub type_name: Option<&'a str>,
    /// The type's own settings, when they parsed.
    pub kind: Option<&'a StageKind>,
}

/// Report every problem of what parsed through `issue(field, message)`; relative paths
/// resolve against `base`, the pipeline file's folder.
pub(super) fn check(parsed: &Parsed, base: &Path, issue: &mut dyn FnMut(&str, String)) {
    if let Some(source) = parsed.source {
        check_source(source, "source", base, issue);
    }
    let mut check = |ok: bool, field: &str, message: String| {
        if !ok {
            issue(field, message);
        }
    };

    if let Some(rt) = parsed.runtime {
        check(
            (1..=MAX_BATCH_SIZE).contains(&rt.batch_size),
            "runtime.batch_size",
            format!(
                "expected 1 to {MAX_BATCH_SIZE} rows, found {}",
                rt.batch_size
            ),
        );
        check(
            (1..=MAX_QUEUE_DEPTH).contains(&rt.queue_depth),
            "runtime.queue_depth",
            format!(
                "impossible queue size {}: expected 1 to {MAX_QUEUE_DEPTH} batches",
                rt.queue_depth
            ),
        );
    }

    let mut seen = std::collections::HashMap::new();
    for stage in &parsed.stages {
        let at = format!("stages[{}]", stage.index);
        // Without a known type, the default name is unknown too.
        if let Some(name) = stage.common.name.as_deref().or(stage.type_name) {
            let name_ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            check(
                name_ok,
                &format!("{at}.name"),
                format!("stage name `{name}` must be non-empty letters, digits, `_` or `-`"),
            );
            check(
                !matches!(name, "source" | "sink"),
                &format!("{at}.name"),
                format!("stage name `{name}` is reserved; choose another"),
            );
            if let Some(first) = seen.insert(name.to_string(), stage.index) {
                check(
                    false,
                    &format!("{at}.name"),
                    format!(
                        "stage name `{name}` is already used by stages[{first}]; names must be \
                         unique (set `name:` on one of them)"
                    ),
                );
            }
        }
        if let Some(w) = stage.common.workers {
            check(
                (1..=MAX_WORKERS).contains(&w),
                &format!("{at}.workers"),
                format!("expected 1 to {MAX_WORKERS} workers, found {w}"),
            );
        }
        if let Some(d) = stage.common.queue_depth {
            check(
                (1..=MAX_QUEUE_DEPTH).contains(&d),
                &format!("{at}.queue_depth"),
                format!("impossible queue size {d}: expected 1 to {MAX_QUEUE_DEPTH} batches"),
            );
        }
        if let Some(kind) = stage.kind {
            for (field, message) in kind.config().validate() {
                check(false, &format!("{at}.{field}"), message);
            }
        }
    }

    if let Some(sink) = parsed.sink {
        check(
            !sink.path.trim().is_empty(),
            "sink.path",
            "expected an output folder, found an empty string".into(),
        );
        if crate::storage::is_remote(Path::new(&sink.path))
            && let Err(e) = crate::storage::ObjectUri::parse(&sink.path)
        {
            check(false, "sink.path", e.to_string());
        }
        if !sink.path.trim().is_empty()
            && !crate::storage::is_remote(Path::new(&sink.path))
            && let Some(message) = output_folder_problem(&resolve(base, &sink.path))
        {
            check(false, "sink.path", message);
        }
        check(
            sink.row_group_rows >= 1,
            "sink.row_group_rows",
            "expected at least 1 row per row group".into(),
        );
        check(
            sink.row_group_bytes >= 1024,
            "sink.row_group_bytes",
            format!(
                "expected at least 1024 bytes, found {}",
                sink.row_group_bytes
            ),
        );
        for (i, col) in sink.drop_columns.iter().enumerate() {
            check(
                col != crate::columns::ID,
                &format!("sink.drop_columns[{i}]"),
                "the `id` column cannot be dropped: it identifies rows across outputs".into(),
            );
        }
        if sink.train_mode == super::TrainMode::OnePass {
            check(
                sink.train.is_some(),
                "sink.train_mode",
                "`one_pass` feeds the trainer of `sink.train`, which is not set".into(),
            );
            check(
                !sink.drop_columns.iter().any(|c| c == crate::columns::IMAGE),
                "sink.drop_columns",
                "`one_pass` training reads the images back from the output in later epochs: \
                 `image` cannot be dropped"
                    .into(),
            );
        }
        if let Some(depth) = sink.train_queue_depth {
            check(
                depth >= 1,
                "sink.train_queue_depth",
                format!("expected at least 1, found {depth}"),
            );
        }
    }
    if let Some(storage) = parsed.storage {
        check(
            storage.part_bytes >= crate::storage::MIN_PART_BYTES,
            "storage.part_bytes",
            format!(
                "expected at least {} (5 MiB, S3's smallest part), found {}",
                crate::storage::MIN_PART_BYTES,
                storage.part_bytes
            ),
        );
        if let Some(endpoint) = &storage.endpoint {
            check(
                endpoint.starts_with("http://") || endpoint.starts_with("https://"),
                "storage.endpoint",
                format!("expected an http:// or https:// URL, found `{endpoint}`"),
            );
        }
    }
}

/// `relative` against `base`, as [`super::SpecOrigin::resolve`] does.
fn resolve(base: &Path, relative: &str) -> PathBuf {
    let p = Path::new(relative);
    if p.is_absolute() || crate::storage::is_remote(p) {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Why `out` cannot become the output folder, when the file system already says so: it
/// is a file, or the nearest part of it that exists is (creating the folder would fail
/// at run time, after planning; the sink creates what is missing).
fn output_folder_problem(out: &Path) -> Option<String> {
    let existing = out.ancestors().find(|a| a.symlink_metadata().is_ok())?;
    if existing.is_dir() {
        return None;
    }
    let what = if existing.is_file() {
        "a file"
    } else {
        "not a folder"
    };
    Some(if existing == out {
        format!(
            "{} is {what}; expected a folder for the output shards",
            out.display()
        )
    } else {
        format!(
            "{} lies under {}, which is {what}; expected a folder for the output shards",
            out.display(),
            existing.display()
        )
    })
}

/// Report the problems of a source section (`section`: `source` in a pipeline file;
/// `source`, `target` or `eval` in a training file) through `issue(field, message)`;
/// relative paths resolve against `base`.
pub fn check_source(
    source: &SourceSpec,
    section: &str,
    base: &Path,
    issue: &mut dyn FnMut(&str, String),
) {
    let mut check = |ok: bool, field: &str, message: String| {
        if !ok {
            issue(field, message);
        }
    };
    check(
        !source.paths.is_empty(),
        &format!("{section}.paths"),
        "expected at least one shard file or glob pattern".into(),
    );
    for (i, path) in source.paths.iter().enumerate() {
        check(
            !path.trim().is_empty(),
            &format!("{section}.paths[{i}]"),
            "expected a file path or glob pattern, found an empty string".into(),
        );
        if crate::storage::is_remote(Path::new(path)) {
            if let Err(e) = crate::storage::ObjectUri::parse(path) {
                check(false, &format!("{section}.paths[{i}]"), e.to_string());
            }
            continue;
        }
        // An existing path is read literally, whatever its name holds (`odd[.parquet`).
        if let Err(e) = glob::Pattern::new(path)
            && !resolve(base, path).exists()
        {
            check(
                false,
                &format!("{section}.paths[{i}]"),
                format!("invalid glob pattern: {e}"),
            );
        }
    }
    if let Some(filter) = &source.filter {
        check(
            !filter.trim().is_empty(),
            &format!("{section}.filter"),
            "expected an SQL predicate, found an empty string (remove the key to read all \
             rows)"
                .into(),
        );
        let size = filter_size(filter);
        check(
            size <= MAX_FILTER_SIZE,
            &format!("{section}.filter"),
            format!(
                "expected at most {MAX_FILTER_SIZE} operators (AND, OR, NOT, comparisons, \
                 arithmetic) and levels of parentheses, found {size}; for a long list of \
                 values write `column IN ('a', 'b', ...)`"
            ),
        );
    }
    check(
        source.max_image_file_bytes > 0,
        &format!("{section}.max_image_file_bytes"),
        "expected a positive number of bytes".into(),
    );
}

/// An upper bound on the depth of the expression tree of the SQL predicate `sql`: its
/// operators (words such as `AND`, `OR`, `NOT`, `LIKE`, and runs of symbols such as `=`
/// or `<>`) plus its deepest parenthesis nesting. Quoted text is skipped, and the items
/// of `IN (...)` lists, which DataFusion keeps flat, cost nothing. Counted without
/// recursion, so a huge filter is refused before anything walks it.
fn filter_size(sql: &str) -> usize {
    const SYMBOLS: &str = "=<>!+-*/%|&^~";
    const WORDS: [&str; 8] = ["and", "or", "not", "like", "ilike", "is", "between", "in"];
    let (mut operators, mut depth, mut deepest) = (0usize, 0usize, 0usize);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // A doubled quote inside a literal just closes and reopens it.
            '\'' | '"' => {
                for d in chars.by_ref() {
                    if d == c {
                        break;
                    }
                }
            }
            '(' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' => depth = depth.saturating_sub(1),
            c if SYMBOLS.contains(c) => {
                operators += 1;
                while chars.next_if(|d| SYMBOLS.contains(*d)).is_some() {}
            }
            c if c.is_alphanumeric() || c == '_' => {
                let mut word = String::from(c);
                while let Some(d) = chars.next_if(|d| d.is_alphanumeric() || *d == '_') {
                    word.push(d);
                }
                if WORDS.iter().any(|w| w.eq_ignore_ascii_case(&word)) {
                    operators += 1;
                }
            }
            _ => {}
        }
    }
    operators + deepest
}

#[cfg(test)]
mod tests {
    use super::filter_size;

    #[test]
    fn filter_size_counts_operators_and_nesting_outside_quotes() {
        assert_eq!(filter_size("split = 'train'"), 1);
        assert_eq!(filter_size("a = 1 OR a = 2 or (b <> 'x AND y')"), 6);
        assert_eq!(filter_size("id IN ('a', 'b', 'c')"), 2);
        assert_eq!(filter_size("lower(\"Odd Name\") LIKE 'it''s = <>'"), 2);
        assert_eq!(filter_size("((((x))))"), 4);
        assert_eq!(filter_size("origin_x >= -5"), 2);
    }
}
