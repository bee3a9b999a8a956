//! Gemma-3 text (HF `Gemma3ForCausalLM` / the text tower of `Gemma3ForConditionalGeneration`,
//! transformers `models/gemma3/modeling_gemma3.py`): Gemma-2's layer with RMSNorm on queries and
//! keys, a RoPE base per layer type (local layers `rope_local_base_freq`), 5 local : 1 global.
//! transformers' Gemma-3 attention ignores `attn_logit_softcapping`, so this does too; the final
//! logit soft-cap applies when the config sets one.

use super::common::{Attention, Decoder};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::weights::Weights;

pub(crate) fn load(cfg: &Config, w: &Weights) -> Result<Decoder> {
    Decoder::build(cfg, w, &prefix(w)?, |p| {
        Attention::new(cfg, w, p, true, None)
    })
}

/// `model.` for text checkpoints; multimodal ones nest the text model (`model.language_model.`
/// in transformers 5, `language_model.model.` before).
fn prefix(w: &Weights) -> Result<String> {
    for p in ["model.", "model.language_model.", "language_model.model."] {
        if w.contains(&format!("{p}embed_tokens.weight")) {
            return Ok(p.to_string());
        }
    }
    Err(Error::Weights {
        path: w.source().to_path_buf(),
        msg: "no embed_tokens.weight under model., model.language_model. or language_model.model."
            .into(),
    })
}
