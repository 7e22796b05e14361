//! The integration tests of the `trustflow` package (the binary, the trainer, the
//! benchmark tools), linked as one test binary: each binary links datafusion and
//! libtorch, so one link instead of one per file. The engine's own tests live in
//! crates/trustflow-engine/tests.

mod augment;
mod cli_spec;
mod common;
mod demo;
mod digits;
mod engine;
mod faults;
mod faults_input;
mod faults_writers;
mod fit_text;
mod harness;
mod layering;
mod losses;
mod metrics;
mod one_pass;
mod report;
mod s3;
mod s3_scale;
mod train;
mod untrusted;
