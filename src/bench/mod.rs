//! Benchmark tooling:
//! - corpora: the realistic corpus generator (`bench gen`, [`corpus`]), the synthetic
//!   enriched training corpus ([`train_corpus`]) and the digits benchmark's three real
//!   image domains ([`digits`]);
//! - measurements: the harness over Parquet shards with the Python baseline and
//!   scaling series ([`harness`]), end to end vs the model-only ceiling ([`ceiling`])
//!   and vs the decode-only one ([`decode_ceiling`]),
//!   the accuracy grid of the TRUST ablations ([`accuracy`]), and enrichment then
//!   training against one pass ([`one_pass`]);
//! - [`plot`]: PNG charts of their reports.
#[cfg(feature = "train")]
pub mod accuracy;
pub mod ceiling;
pub mod corpus;
pub mod decode_ceiling;
pub mod digits;
pub mod harness;
#[cfg(feature = "train")]
pub mod one_pass;
pub mod plot;
pub mod train_corpus;
