//! The supported architectures and the forward pass the extraction needs.

pub(crate) mod common;
pub mod gemma2;
pub mod gemma3;
mod splice;

pub use common::LayerOutput;
pub use splice::{CleanPass, SpliceLosses};

use crate::config::{Arch, Config};
use crate::error::Result;
use crate::weights::Weights;
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub struct Model {
    pub config: Config,
    decoder: common::Decoder,
}

impl Model {
    /// Load an HF checkpoint directory (`config.json` plus safetensors) in `kind` on `device`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Model> {
        let config = Config::load(dir)?;
        let w = Weights::open(dir, device, kind)?;
        let decoder = match config.arch {
            Arch::Gemma2 => gemma2::load(&config, &w)?,
            Arch::Gemma3 => gemma3::load(&config, &w)?,
        };
        Ok(Model { config, decoder })
    }

    pub fn num_layers(&self) -> usize {
        self.config.num_hidden_layers
    }

    pub fn d_model(&self) -> usize {
        self.config.hidden_size
    }

    pub fn device(&self) -> Device {
        self.decoder.device
    }

    pub fn kind(&self) -> Kind {
        self.decoder.kind
    }

    /// Full float32 logits `[B, T, vocab]` for int64 ids `[B, T]`.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        self.decoder.logits(ids)
    }

    /// The output of decoder layer `layer` (0-indexed) before the final norm (HF
    /// `hidden_states[layer + 1]` for all but the last layer, where transformers stores the
    /// normed output), the per-token next-token loss and, with `grad`, d(sum of the loss over
    /// each context)/d(resid).
    pub fn forward_layer(&self, ids: &Tensor, layer: usize, grad: bool) -> Result<LayerOutput> {
        self.decoder
            .forward_layer(ids, layer, grad, &mut crate::profile::Laps::off())
    }

    /// `forward_layer`, its phases closed on `laps` (see `extract::BATCH_PHASES`).
    pub fn forward_layer_timed(
        &self,
        ids: &Tensor,
        layer: usize,
        grad: bool,
        laps: &mut crate::profile::Laps,
    ) -> Result<LayerOutput> {
        self.decoder.forward_layer(ids, layer, grad, laps)
    }

    /// Positions per cross-entropy chunk hold about `elems` logits (default 2^26 on the CPU,
    /// 2^28 on CUDA).
    pub fn set_ce_chunk_elems(&mut self, elems: usize) {
        self.decoder.ce_chunk_elems = elems.max(1);
    }

    /// Layers `0..=layer` once, then the clean rest of the model; with `grad`, also
    /// d(sum of next-token CE over each context)/d(residual after `layer`). See `splice`.
    pub fn clean_pass(&self, ids: &Tensor, layer: usize, grad: bool) -> Result<CleanPass> {
        self.decoder.clean_pass(ids, layer, grad)
    }

    /// Per-position clean CE, and CE and KL(clean ‖ variant) for each variant: a `[B, T, d]`
    /// tensor that replaces the residual after the clean pass's layer.
    pub fn splice(&self, clean: &CleanPass, variants: &[Tensor]) -> Result<SpliceLosses> {
        self.decoder.splice(clean, variants)
    }
}
