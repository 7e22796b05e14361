//! Benchmark tooling: the corpus generator (`trustflow bench gen`) and the synthetic
//! enriched training corpus for the TRUST trainer ([`train_corpus`]).
pub mod corpus;
pub mod train_corpus;
