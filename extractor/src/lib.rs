//! Stage 1 of dmsae: runs the language model through libtorch (tch) and writes activations and
//! gradients into a store. Models: Gemma-2 and Gemma-3 text, loaded from HF checkpoints.

pub mod config;
pub mod data;
pub mod error;
pub mod extract;
pub mod kernels;
pub mod models;
pub mod profile;
pub mod runtime;
pub mod weights;

pub use config::Config;
pub use error::{Error, Result};
pub use models::{CleanPass, LayerOutput, Model, SpliceLosses};
// The tch the models are written against, for callers building inputs.
pub use tch;
