//! The TRUST trainer on libtorch (`tch`). See ../shared/METHOD.md sections 4-6.
//!
//! So far: [`losses`], the four terms of the TRUST objective (source CE, CLIP-weighted
//! pseudo-label CE, (1 - w)-weighted self-training CE on strong views, and the
//! soft-contrastive loss with caption-similarity weights), each its own function, plus
//! [`losses::trust_loss`], which validates a batch and sums the switched-on terms.

pub mod augment;
pub mod losses;
pub mod text_head;

pub use losses::{LossError, LossTerms, LossValues, TrustBatch, trust_loss};
