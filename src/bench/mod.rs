//! Benchmark tooling: the corpus generator (`trustflow bench gen`).
pub mod corpus;
