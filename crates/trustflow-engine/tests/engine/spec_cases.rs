//! The broken pipeline files of the spec tests, each with the one problem it must be
//! reported with; the engine checks them through the library, the CLI tests through
//! `trustflow validate`.

/// Which step rejected a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `parse_str`: YAML syntax, shape, types, unknown or missing keys.
    Parse,
    /// `validate`: values that parse but make no sense.
    Validate,
}

/// One broken pipeline and the single problem it must be reported with.
pub struct Case {
    pub name: &'static str,
    pub yaml: &'static str,
    pub phase: Phase,
    /// Exact field path of the issue.
    pub field: &'static str,
    /// 1-based line and column the issue points at...
    pub line: usize,
    pub column: usize,
    /// ...which is where this text starts in `yaml` (checked, so the table stays honest).
    pub token: &'static str,
    /// Fragments the message must contain (what was found, what was expected).
    pub message: &'static [&'static str],
}

pub const UNKNOWN_FIELDS: &[Case] = &[
    Case {
        name: "unknown top-level field (sinks)",
        yaml: "\
source:
  paths: [data.parquet]
sinks:
  path: out
",
        phase: Phase::Parse,
        field: "sinks",
        line: 3,
        column: 1,
        token: "sinks:",
        message: &["unknown field `sinks`", "did you mean `sink`?"],
    },
    Case {
        name: "unknown field in source (colums)",
        yaml: "\
source:
  paths: [data.parquet]
  colums:
    caption: text
sink:
  path: out
",
        phase: Phase::Parse,
        field: "source.colums",
        line: 3,
        column: 3,
        token: "colums:",
        message: &["unknown field `colums`", "`columns`"],
    },
    Case {
        name: "unknown field in source.columns (imag)",
        yaml: "\
source:
  paths: [data.parquet]
  columns:
    id: key
    imag: jpg
sink:
  path: out
",
        phase: Phase::Parse,
        field: "source.columns.imag",
        line: 5,
        column: 5,
        token: "imag:",
        message: &["unknown field `imag`", "`image`"],
    },
    Case {
        name: "unknown field in a decode stage (max_pixel)",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: clean_caption
  - type: decode
    max_pixel: 1000000
sink:
  path: out
",
        phase: Phase::Parse,
        field: "stages[1].max_pixel",
        line: 6,
        column: 5,
        token: "max_pixel:",
        message: &["unknown field `max_pixel`", "`max_pixels`"],
    },
    Case {
        name: "unknown field in sink (compresion)",
        yaml: "\
source:
  paths: [data.parquet]
sink:
  path: out
  compresion: zstd
",
        phase: Phase::Parse,
        field: "sink.compresion",
        line: 5,
        column: 3,
        token: "compresion:",
        message: &["unknown field `compresion`", "`compression`"],
    },
    Case {
        name: "unknown field in runtime (queue)",
        yaml: "\
source:
  paths: [data.parquet]
sink:
  path: out
runtime:
  batch_size: 64
  queue: 3
",
        phase: Phase::Parse,
        field: "runtime.queue",
        line: 7,
        column: 3,
        token: "queue:",
        message: &["unknown field `queue`", "`queue_depth`"],
    },
    Case {
        name: "a key nested under its own name (runtime.runtime)",
        yaml: "\
source:
  paths: [data.parquet]
sink:
  path: out
runtime:
  runtime:
    batch_size: 4
",
        phase: Phase::Parse,
        field: "runtime.runtime",
        line: 6,
        column: 3,
        token: "runtime:",
        message: &["unknown field `runtime`", "`batch_size`"],
    },
];

pub const WRONG_TYPES: &[Case] = &[
    Case {
        name: "workers: two",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: decode
    workers: two
sink:
  path: out
",
        phase: Phase::Parse,
        field: "stages[0].workers",
        line: 5,
        column: 5,
        token: "workers: two",
        message: &["string \"two\"", "expected a whole number >= 0"],
    },
    Case {
        name: "workers: -1",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: decode
    workers: -1
sink:
  path: out
",
        phase: Phase::Parse,
        field: "stages[0].workers",
        line: 5,
        column: 5,
        token: "workers: -1",
        message: &["-1", "expected a whole number >= 0"],
    },
    Case {
        name: "batch_size: \"big\"",
        yaml: "\
source:
  paths: [data.parquet]
sink:
  path: out
runtime:
  batch_size: \"big\"
",
        phase: Phase::Parse,
        field: "runtime.batch_size",
        line: 6,
        column: 3,
        token: "batch_size:",
        message: &["string \"big\"", "expected a whole number >= 0"],
    },
    Case {
        name: "paths: a mapping instead of a list",
        yaml: "\
source:
  paths: {data: parquet}
sink:
  path: out
",
        phase: Phase::Parse,
        field: "source.paths",
        line: 2,
        column: 3,
        token: "paths:",
        message: &["map", "expected a list"],
    },
    Case {
        name: "strip: a string instead of a list",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: clean_caption
    strip: urls
sink:
  path: out
",
        phase: Phase::Parse,
        field: "stages[0].strip",
        line: 5,
        column: 5,
        token: "strip:",
        message: &["string \"urls\"", "expected a list"],
    },
    Case {
        name: "a list item of the wrong variant (formats: [jpeg, gif])",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: decode
    formats: [jpeg, gif]
sink:
  path: out
",
        phase: Phase::Parse,
        field: "stages[0].formats[1]",
        line: 5,
        column: 21,
        token: "gif]",
        message: &["unknown variant `gif`", "`jpeg`, `png`, `webp`"],
    },
    Case {
        name: "unknown enum value (image_layout: jpeg)",
        yaml: "\
source:
  paths: [data.parquet]
  image_layout: jpeg
sink:
  path: out
",
        phase: Phase::Parse,
        field: "source.image_layout",
        line: 3,
        column: 3,
        token: "image_layout:",
        message: &["unknown variant `jpeg`", "`hf_struct`"],
    },
    Case {
        name: "stages: a mapping instead of a list",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  type: decode
sink:
  path: out
",
        phase: Phase::Parse,
        field: "stages",
        line: 3,
        column: 1,
        token: "stages:",
        message: &["expected a list of stages", "found a mapping"],
    },
    Case {
        name: "a stage that is a string",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - decode
sink:
  path: out
",
        phase: Phase::Parse,
        field: "stages[0]",
        line: 4,
        column: 5,
        token: "decode",
        message: &["expected a stage mapping with a `type`", "found a string"],
    },
    Case {
        name: "a stage type that is a number",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: 3
sink:
  path: out
",
        phase: Phase::Parse,
        field: "stages[0].type",
        line: 4,
        column: 5,
        token: "type: 3",
        message: &["expected a stage type name", "found a number"],
    },
    Case {
        name: "a model file path of the wrong type (clip_score vision_model: [a])",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: clip_score
    model: models/clip
    vision_model: [a]
sink:
  path: out
",
        phase: Phase::Parse,
        field: "stages[0].vision_model",
        line: 6,
        column: 5,
        token: "vision_model:",
        message: &["invalid type: sequence", "expected a string"],
    },
    Case {
        name: "a text head path of the wrong type (pseudo_label head: 5)",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: pseudo_label
    head: 5
sink:
  path: out
",
        phase: Phase::Parse,
        field: "stages[0].head",
        line: 5,
        column: 5,
        token: "head: 5",
        message: &["integer `5`", "expected a string"],
    },
];

pub const MISSING_OR_UNKNOWN: &[Case] = &[
    Case {
        name: "no sink",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: decode
",
        phase: Phase::Parse,
        // A missing key is reported on its parent: here the whole file.
        field: "",
        line: 1,
        column: 1,
        token: "source:",
        message: &["missing field `sink`"],
    },
    Case {
        name: "no source.paths",
        yaml: "\
source:
  filter: \"label > 3\"
sink:
  path: out
",
        phase: Phase::Parse,
        field: "source",
        line: 1,
        column: 1,
        token: "source:",
        message: &["missing field `paths`"],
    },
    Case {
        name: "stage without type",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: decode
  - name: clean
    workers: 2
sink:
  path: out
",
        phase: Phase::Parse,
        field: "stages[1]",
        line: 5,
        column: 5,
        token: "name: clean",
        message: &["missing field `type`", "decode, clean_caption"],
    },
    Case {
        name: "unknown stage type (decoder)",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: decoder
sink:
  path: out
",
        phase: Phase::Parse,
        field: "stages[0].type",
        line: 4,
        column: 5,
        token: "type: decoder",
        message: &["unknown stage type `decoder`", "decode, clean_caption"],
    },
];

pub const IMPOSSIBLE_VALUES: &[Case] = &[
    Case {
        name: "queue_depth: 0",
        yaml: "\
source:
  paths: [data.parquet]
sink:
  path: out
runtime:
  queue_depth: 0
",
        phase: Phase::Validate,
        field: "runtime.queue_depth",
        line: 6,
        column: 3,
        token: "queue_depth: 0",
        message: &["impossible queue size 0", "expected 1 to 4096 batches"],
    },
    Case {
        name: "queue_depth: 100000",
        yaml: "\
source:
  paths: [data.parquet]
sink:
  path: out
runtime:
  queue_depth: 100000
",
        phase: Phase::Validate,
        field: "runtime.queue_depth",
        line: 6,
        column: 3,
        token: "queue_depth: 100000",
        message: &["impossible queue size 100000", "expected 1 to 4096 batches"],
    },
    Case {
        name: "batch_size: 0",
        yaml: "\
source:
  paths: [data.parquet]
sink:
  path: out
runtime:
  batch_size: 0
",
        phase: Phase::Validate,
        field: "runtime.batch_size",
        line: 6,
        column: 3,
        token: "batch_size: 0",
        message: &["expected 1 to 1048576 rows, found 0"],
    },
    Case {
        name: "stage workers: 0",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: decode
    workers: 0
sink:
  path: out
",
        phase: Phase::Validate,
        field: "stages[0].workers",
        line: 5,
        column: 5,
        token: "workers: 0",
        message: &["expected 1 to 256 workers, found 0"],
    },
    Case {
        name: "stage queue_depth: 0",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: decode
  - type: clean_caption
    queue_depth: 0
sink:
  path: out
",
        phase: Phase::Validate,
        field: "stages[1].queue_depth",
        line: 6,
        column: 5,
        token: "queue_depth: 0",
        message: &["impossible queue size 0"],
    },
    Case {
        name: "duplicate stage names (both default to decode)",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: decode
  - type: decode
sink:
  path: out
",
        phase: Phase::Validate,
        // No `name:` key to point at: the second stage's entry.
        field: "stages[1].name",
        line: 5,
        column: 5,
        token: "type: decode",
        message: &[
            "stage name `decode` is already used by stages[0]",
            "set `name:`",
        ],
    },
    Case {
        name: "reserved stage name sink",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: decode
    name: sink
sink:
  path: out
",
        phase: Phase::Validate,
        field: "stages[0].name",
        line: 5,
        column: 5,
        token: "name: sink",
        message: &["stage name `sink` is reserved"],
    },
    Case {
        name: "reserved stage name source",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - name: source
    type: clean_caption
sink:
  path: out
",
        phase: Phase::Validate,
        field: "stages[0].name",
        line: 4,
        column: 5,
        token: "name: source",
        message: &["stage name `source` is reserved"],
    },
    Case {
        name: "stage name with a space",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: decode
    name: my stage
sink:
  path: out
",
        phase: Phase::Validate,
        field: "stages[0].name",
        line: 5,
        column: 5,
        token: "name: my stage",
        message: &["`my stage`", "letters, digits"],
    },
    Case {
        name: "drop_columns: [id]",
        yaml: "\
source:
  paths: [data.parquet]
sink:
  path: out
  drop_columns: [image, id]
",
        phase: Phase::Validate,
        field: "sink.drop_columns[1]",
        line: 5,
        column: 25,
        token: "id]",
        message: &["the `id` column cannot be dropped"],
    },
    Case {
        name: "empty paths: []",
        yaml: "\
source:
  paths: []
sink:
  path: out
",
        phase: Phase::Validate,
        field: "source.paths",
        line: 2,
        column: 3,
        token: "paths: []",
        message: &["expected at least one shard file or glob pattern"],
    },
    Case {
        name: "an empty path in the list",
        yaml: "\
source:
  paths:
    - data.parquet
    - \"\"
sink:
  path: out
",
        phase: Phase::Validate,
        field: "source.paths[1]",
        line: 4,
        column: 7,
        token: "\"\"",
        message: &["found an empty string"],
    },
    Case {
        name: "an invalid glob pattern",
        yaml: "\
source:
  paths: [\"shards/[.parquet\"]
sink:
  path: out
",
        phase: Phase::Validate,
        field: "source.paths[0]",
        line: 2,
        column: 11,
        token: "\"shards/[",
        message: &["invalid glob pattern"],
    },
    Case {
        name: "empty filter string",
        yaml: "\
source:
  paths: [data.parquet]
  filter: \"  \"
sink:
  path: out
",
        phase: Phase::Validate,
        field: "source.filter",
        line: 3,
        column: 3,
        token: "filter:",
        message: &["expected an SQL predicate, found an empty string"],
    },
    Case {
        name: "max_image_file_bytes: 0",
        yaml: "\
source:
  paths: [data.parquet]
  max_image_file_bytes: 0
sink:
  path: out
",
        phase: Phase::Validate,
        field: "source.max_image_file_bytes",
        line: 3,
        column: 3,
        token: "max_image_file_bytes: 0",
        message: &["expected a positive number of bytes"],
    },
    Case {
        name: "decode max_pixels: 0",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: decode
    max_pixels: 0
sink:
  path: out
",
        phase: Phase::Validate,
        field: "stages[0].max_pixels",
        line: 5,
        column: 5,
        token: "max_pixels: 0",
        message: &["must be greater than 0"],
    },
    Case {
        name: "decode formats listed twice",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: decode
    formats: [png, png]
sink:
  path: out
",
        phase: Phase::Validate,
        field: "stages[0].formats",
        line: 5,
        column: 5,
        token: "formats:",
        message: &["`png` is listed more than once"],
    },
    Case {
        name: "clean_caption min_chars > max_chars",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: decode
  - type: clean_caption
    max_chars: 5
    min_chars: 10
sink:
  path: out
",
        phase: Phase::Validate,
        field: "stages[1].min_chars",
        line: 7,
        column: 5,
        token: "min_chars: 10",
        message: &["is 10 but max_chars is 5", "no caption could be kept"],
    },
    Case {
        name: "empty sink path",
        yaml: "\
source:
  paths: [data.parquet]
sink:
  path: \"\"
",
        phase: Phase::Validate,
        field: "sink.path",
        line: 4,
        column: 3,
        token: "path:",
        message: &["expected an output folder, found an empty string"],
    },
    Case {
        name: "row_group_bytes too small",
        yaml: "\
source:
  paths: [data.parquet]
sink:
  path: out
  row_group_bytes: 10
",
        phase: Phase::Validate,
        field: "sink.row_group_bytes",
        line: 5,
        column: 3,
        token: "row_group_bytes: 10",
        message: &["expected at least 1024 bytes, found 10"],
    },
    Case {
        name: "clip_score without a model folder or its files",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: clip_score
    tokenizer: tok.json
sink:
  path: out
",
        phase: Phase::Validate,
        field: "stages[0].model",
        line: 4,
        column: 5,
        token: "type: clip_score",
        message: &[
            "is required (an export folder) unless every file is given",
            "missing: vision_model, text_model, config, preprocessor_config",
        ],
    },
    Case {
        name: "caption with a blank tokenizer path",
        yaml: "\
source:
  paths: [data.parquet]
stages:
  - type: caption
    model: models/captioner
    tokenizer: \"\"
sink:
  path: out
",
        phase: Phase::Validate,
        field: "stages[0].tokenizer",
        line: 6,
        column: 5,
        token: "tokenizer:",
        message: &["must not be empty"],
    },
];
