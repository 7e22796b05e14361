//! Model-side building blocks shared by stages: image decoding with safety limits,
//! ONNX Runtime sessions, CLIP image preprocessing, tokenisation and the text head.
pub mod clip_preprocess;
pub mod files;
pub mod image;
pub mod onnx;
pub mod text;
pub mod text_head;
