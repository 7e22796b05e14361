//! trustflow's engine: streaming image-caption pipelines over Parquet shards.
//!
//! Layers, lowest first (a module uses only modules of lower layers; the `layering`
//! test checks it, and docs/architecture.md draws the map):
//! 1. `error`;
//! 2. `columns` (canonical column names, output file names), `digest` (file
//!    fingerprints), `fields` (deserialising settings with field paths), `storage`
//!    (S3-compatible object stores: `s3://` URIs, credentials, the HTTP client);
//! 3. `models` (image decoding, CLIP preprocessing, ONNX sessions, tokenisers, the text
//!    head);
//! 4. `stages` (one file per stage, one registry line each), `quarantine`;
//! 5. `spec` (YAML -> typed, validated pipeline, whose stage entries are the stages'
//!    own configs);
//! 6. `runtime` (bounded queues, workers, metrics, cancellation; driven through the
//!    small `BatchSource`/`Sink` traits, so it knows nothing about Parquet);
//! 7. `source` (Parquet shards -> canonical batches), `sink` (exactly-once shard
//!    output, quarantine, manifests);
//! 8. `plan` (validation phases 3 and 4: shard footers, stage building and schema
//!    chaining; the resolved plan);
//! 9. `run` (resume, execution, the report) and `inspect`.

pub mod columns;
pub mod digest;
pub mod error;
pub mod fields;
pub mod inspect;
pub mod models;
pub mod plan;
pub mod quarantine;
pub mod report;
pub mod run;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod spec;
pub mod stages;
pub mod stats;
pub mod storage;

pub use error::{Error, Result};
