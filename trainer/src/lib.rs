//! Stage 2 of dmsae: Matryoshka BatchTopK SAEs with a shared core, trained from a store
//! without the language model.

pub mod attribution;
pub mod compare;
pub mod config;
pub mod distill;
pub mod eval;
pub mod export;
pub mod plot;
pub mod sae;
pub mod sweep;
pub mod train;

pub use config::{ConfigError, TrainConfig};
pub use dmsae_extractor::profile;
pub use sae::{Core, Sae, StepStats, Trainer};
pub use tch;
pub mod synthetic;
