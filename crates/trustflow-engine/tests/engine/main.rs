//! The engine's integration tests, one binary: pipeline files and validation, the
//! model stages against reference outputs, JPEG parity. They need no libtorch.

mod backpressure;
mod caption;
mod clip_score;
mod jpeg_parity;
mod layering;
mod png_parity;
mod pseudo_label;
mod spec;
mod spec_cases;
mod uncertainty;
