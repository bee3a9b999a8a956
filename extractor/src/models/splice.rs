//! Splicing: the residual after decoder layer L replaced by something else (an SAE's
//! reconstruction, zeros) and the rest of the model run on it, for `dmsae eval`.
//!
//! Layers `0..=L` run once per batch; the clean pass (optionally with the loss gradient at L)
//! keeps its final-normed hidden states, and every variant runs layers `L+1..N` and the final
//! norm once. Cross-entropy and KL(clean ‖ variant) then go over chunks of positions: the clean
//! log-softmax is computed once per chunk and compared with each variant's, so float32 logits
//! exist for one chunk at a time (the vocabulary is 262k for Gemma-3).

use super::common::{Ctx, Decoder, Prefix};
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

/// The clean pass of one batch, from which variants are spliced.
pub struct CleanPass {
    /// Output of decoder layer L, `[B, T, d_model]`, model dtype.
    pub resid: Tensor,
    /// d(sum of next-token CE over each context)/d(`resid`), `[B, T, d_model]`, model dtype.
    pub grad: Option<Tensor>,
    layer: usize,
    ids: Tensor,
    ctx: Ctx,
    /// Clean final-normed hidden states `[B, T, d_model]`.
    hn: Tensor,
}

/// Per-position figures, `[B, T]` float32, NaN at the last position (no next token).
pub struct SpliceLosses {
    pub clean: Tensor,
    /// Next-token CE per variant, in the order the variants were given.
    pub loss: Vec<Tensor>,
    /// KL(clean ‖ variant) of the next-token distributions, per variant.
    pub kl: Vec<Tensor>,
}

impl Decoder {
    pub(crate) fn clean_pass(&self, ids: &Tensor, layer: usize, grad: bool) -> Result<CleanPass> {
        let Prefix {
            ids,
            ctx,
            resid,
            b,
            t,
        } = self.prefix(ids, layer)?;
        let n = self.layers.len();
        if !grad {
            let _g = tch::no_grad_guard();
            let hn = self.norm.forward(&self.run_layers(
                resid.shallow_clone(),
                layer + 1..n,
                &ctx,
            )?)?;
            return Ok(CleanPass {
                resid,
                grad: None,
                layer,
                ids,
                ctx,
                hn,
            });
        }
        // As in `forward_layer`: the graph starts at a detached copy of the residual.
        let leaf = resid.f_detach()?.f_set_requires_grad(true)?;
        let hn =
            self.norm
                .forward(&self.run_layers(leaf.shallow_clone(), layer + 1..n, &ctx)?)?;
        let (_, g_hn) = self.chunked_ce(&hn, &ids, true)?;
        let g_hn = g_hn.expect("chunked_ce with grad returns the gradient");
        let surrogate = hn.f_mul(&g_hn.f_view([b, t, -1])?)?.f_sum(Kind::Float)?;
        let mut gs = Tensor::f_run_backward(&[surrogate], &[&leaf], false, false)?;
        Ok(CleanPass {
            resid,
            grad: Some(gs.remove(0)),
            layer,
            ids,
            ctx,
            hn: hn.f_detach()?,
        })
    }

    pub(crate) fn splice(&self, clean: &CleanPass, variants: &[Tensor]) -> Result<SpliceLosses> {
        let _g = tch::no_grad_guard();
        let size = clean.resid.size();
        let (b, t, d) = (size[0], size[1], size[2]);
        let n = self.layers.len();
        let mut hns = Vec::with_capacity(variants.len());
        for (i, v) in variants.iter().enumerate() {
            if v.size() != size {
                return Err(Error::Usage(format!(
                    "splice variant {i} is {:?}, the residual {size:?}",
                    v.size()
                )));
            }
            let v = v.f_to_device(self.device)?.f_to_kind(self.kind)?;
            let h = self.run_layers(v, clean.layer + 1..n, &clean.ctx)?;
            hns.push(self.norm.forward(&h)?.f_reshape([b * t, d])?);
        }
        let rows = b * t;
        let dev = self.device;
        let tgt = Tensor::f_cat(
            &[
                clean.ids.f_narrow(1, 1, t - 1)?,
                Tensor::f_zeros([b, 1], (Kind::Int64, dev))?,
            ],
            1,
        )?
        .f_reshape([rows])?;
        let vocab = self.head_weight().size()[0];
        // About five chunk-sized float32 tensors live at once (clean log-probs, probs, the
        // variant's log-probs and two temporaries): a quarter of the CE chunk each, the chunk
        // at most 2^28 logits (extraction's 2^30 on CUDA are bf16 and overwritten in place).
        let chunk = (self.ce_chunk_elems.min(1 << 28) as i64 / vocab / 4).max(1);
        let flat = clean.hn.f_reshape([rows, d])?;
        let mut clean_ce = Vec::new();
        let mut ce: Vec<Vec<Tensor>> = variants.iter().map(|_| Vec::new()).collect();
        let mut kl: Vec<Vec<Tensor>> = variants.iter().map(|_| Vec::new()).collect();
        let mut s = 0;
        while s < rows {
            let c = chunk.min(rows - s);
            let tg = tgt.f_narrow(0, s, c)?.f_unsqueeze(1)?;
            let logp = |x: &Tensor| -> Result<Tensor> {
                let l = self
                    .logits_rows(&x.f_narrow(0, s, c)?)?
                    .f_to_kind(Kind::Float)?;
                Ok(l.f_log_softmax(-1, Kind::Float)?)
            };
            let nll = |lp: &Tensor| -> Result<Tensor> {
                Ok(lp.f_gather(1, &tg, false)?.f_squeeze_dim(1)?.f_neg()?)
            };
            let lp0 = logp(&flat)?;
            let p0 = lp0.f_exp()?;
            clean_ce.push(nll(&lp0)?);
            for (j, h) in hns.iter().enumerate() {
                let lp = logp(h)?;
                ce[j].push(nll(&lp)?);
                kl[j].push(p0.f_mul(&lp0.f_sub(&lp)?)?.f_sum_dim_intlist(
                    [-1i64].as_slice(),
                    false,
                    Kind::Float,
                )?);
            }
            s += c;
        }
        let last = Tensor::f_zeros([b, t], (Kind::Bool, dev))?;
        let _ = last.f_narrow(1, t - 1, 1)?.f_fill_(1)?;
        let finish = |parts: &[Tensor]| -> Result<Tensor> {
            Ok(Tensor::f_cat(parts, 0)?
                .f_view([b, t])?
                .f_masked_fill(&last, f64::NAN)?)
        };
        Ok(SpliceLosses {
            clean: finish(&clean_ce)?,
            loss: ce.iter().map(|p| finish(p)).collect::<Result<_>>()?,
            kl: kl.iter().map(|p| finish(p)).collect::<Result<_>>()?,
        })
    }
}
