//! The TRUST trainer on libtorch (`tch`). See docs/method.md sections 4-6.
//!
//! - [`spec`]: the training file (`trustflow train TRAIN.yaml`).
//! - [`data`]: enriched shards -> shuffled steps -> decoded, augmented tensors, through
//!   a bounded prefetch queue; [`scan`] checks the data before the first step.
//! - [`model`]: backbone (built-in CNN or TorchScript) + linear head.
//! - [`losses`]: the four terms of the TRUST objective, each its own function, and
//!   [`losses::trust_loss`], which validates a batch and sums the switched-on terms.
//! - [`sgd`], [`checkpoint`], [`metrics`]: the optimiser and schedule, resumable
//!   checkpoints, and what every epoch reports.
//! - [`trainer`]: the loop that ties them together; [`one_pass`]: its first epoch fed
//!   live by a pipeline.
//! - [`augment`]: weak and strong views; [`text_head`]: `fit-text`'s caption classifier.

pub mod augment;
pub mod checkpoint;
pub mod data;
pub mod losses;
pub mod metrics;
pub mod model;
pub mod one_pass;
pub mod scan;
pub mod sgd;
pub mod spec;
pub mod text_head;
pub mod trainer;

pub use losses::{LossError, LossTerms, LossValues, TrustBatch, trust_loss};
pub use spec::{LoadedTrain, TrainSpec, load_train_file};
pub use trainer::{TrainOptions, TrainProgress, TrainReport, TrainStatus, train, train_one_pass};
