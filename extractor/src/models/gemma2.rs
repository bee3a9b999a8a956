//! Gemma-2 (HF `Gemma2ForCausalLM`, transformers `models/gemma2/modeling_gemma2.py`):
//! sandwich-normed decoder layers alternating sliding-window and global attention, tanh
//! soft-caps on attention scores and final logits, scores scaled by `query_pre_attn_scalar`.

use super::common::{Attention, Decoder};
use crate::config::Config;
use crate::error::Result;
use crate::weights::Weights;

pub(crate) fn load(cfg: &Config, w: &Weights) -> Result<Decoder> {
    Decoder::build(cfg, w, "model.", |p| {
        Attention::new(cfg, w, p, false, cfg.attn_logit_softcapping)
    })
}
