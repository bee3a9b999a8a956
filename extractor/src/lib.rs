//! Stage 1 of dmsae: runs the language model through libtorch (tch) and writes activations and
//! gradients into a store. For now it holds the libtorch runtime set-up; the models and the
//! extraction loop come with the extractor issue.

pub mod runtime;
