//! The tools on top of the engine and the trainer: benchmark harnesses, corpus
//! generators and the digits demo's pieces ([`bench`]), and the terminal progress
//! display of the `trustflow` binary ([`progress`]).

pub mod bench;
pub mod progress;
