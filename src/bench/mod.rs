//! Benchmark tooling: the corpus generator (`trustflow bench gen`), the synthetic
//! enriched training corpus for the TRUST trainer ([`train_corpus`]), and the
//! end-to-end vs model-only comparison ([`ceiling`]).
pub mod ceiling;
pub mod corpus;
pub mod train_corpus;
