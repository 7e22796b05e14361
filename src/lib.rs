//! trustflow: streaming image-caption pipelines over Parquet shards for TRUST domain
//! adaptation. See README.md for the user's view and ../shared/DESIGN.md for the shape.
//!
//! Layers, from the outside in: `spec` (YAML -> typed, validated pipeline), `source`
//! (Parquet shards -> canonical Arrow batches), `runtime` (bounded queues, workers,
//! metrics, cancellation), `stages` (one file per stage), `models` (image decoding and,
//! later, ONNX sessions), `sink` (exactly-once shard output, quarantine, manifests).

pub mod bench;
pub mod columns;
pub mod error;
pub mod inspect;
pub mod models;
pub mod plan;
pub mod quarantine;
pub mod run;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod spec;
pub mod stages;
pub mod train;

pub use error::{Error, Result};
