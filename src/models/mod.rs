//! Model-side building blocks shared by stages: image decoding with safety limits.
pub mod image;
