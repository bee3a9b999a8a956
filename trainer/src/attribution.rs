//! Attribution of the innermost reconstruction's latents from stored gradients (never the LLM),
//! and the core selection of METHOD.md "Attribution and core selection".
//!
//! For a candidate latent j (the core and the first non-core group) and a token t:
//! a_j(t) = f_j(t) * (g(t) . u_j), u_j = d_j / ||d_j||.
//!
//! Units: the SAE runs on x_n = s x (train.rs) and g = dL/dx is stored in model units. The
//! codes f_j are the same in both units (export.rs folds s into the weights, not the codes) and
//! u_j is a direction, the same in both, so a_j needs no conversion: f comes from `encode(s x)`,
//! g is used as stored. The latent's model-unit decoder row is d_j / s (unit d_j), so the
//! first-order change of the loss when j leaves the reconstruction is -a_j(t) / s; one factor
//! for every latent, which the selection (a ratio) does not see.

use crate::config::{Aggregate, TrainConfig};
use crate::sae::Sae;
use crate::train::TrainError;
use dmsae_store::{Split, Store, StreamOptions};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Per-token codes and attributions of the first `n` latents: (f_bn, a_bn).
pub fn token_attributions(sae: &Sae, xn_bd: &Tensor, g_bd: &Tensor, n: usize) -> (Tensor, Tensor) {
    // Only the candidates are encoded (a few % of the width at the paper's scale).
    let f_bn = sae.encode_first(xn_bd, n);
    let d_nd = sae.w_dec.narrow(0, 0, n as i64);
    let u_nd = &d_nd
        / d_nd
            .square()
            .sum_dim_intlist(-1, true, None)
            .sqrt()
            .clamp_min(1e-12);
    let a_bn = &f_bn * g_bd.to_kind(f_bn.kind()).matmul(&u_nd.tr());
    (f_bn, a_bn)
}

/// Running sums over attribution tokens, one entry per candidate latent.
pub struct Accumulator {
    pub tokens: u64,
    sum_abs: Tensor,
    sum: Tensor,
    fires: Tensor,
    sum_f: Tensor,
    /// |a| of every token, kept only for a quantile.
    abs_rows: Option<Vec<Tensor>>,
}

/// One score per candidate, with the activation statistics of the attribution table.
#[derive(Clone, Debug)]
pub struct Scores {
    pub tokens: u64,
    pub score: Vec<f64>,
    /// Fraction of attribution tokens on which the latent fires.
    pub frequency: Vec<f64>,
    /// Mean activation over the tokens on which it fires (0 when it never does).
    pub mean_activation: Vec<f64>,
}

impl Accumulator {
    pub fn new(n: usize, keep_rows: bool, device: Device) -> Accumulator {
        let z = || Tensor::zeros([n as i64], (Kind::Double, device));
        Accumulator {
            tokens: 0,
            sum_abs: z(),
            sum: z(),
            fires: z(),
            sum_f: z(),
            abs_rows: keep_rows.then(Vec::new),
        }
    }

    pub fn add(&mut self, f_bn: &Tensor, a_bn: &Tensor) {
        let a = a_bn.to_kind(Kind::Double);
        self.sum_abs += a.abs().sum_dim_intlist(0, false, None);
        self.sum += a.sum_dim_intlist(0, false, None);
        self.fires += f_bn
            .gt(0.0)
            .to_kind(Kind::Double)
            .sum_dim_intlist(0, false, None);
        self.sum_f += f_bn.to_kind(Kind::Double).sum_dim_intlist(0, false, None);
        if let Some(rows) = &mut self.abs_rows {
            rows.push(a_bn.abs().to_kind(Kind::Float).to_device(Device::Cpu));
        }
        self.tokens += a_bn.size()[0] as u64;
    }

    pub fn finish(self, aggregate: Aggregate, q: f64) -> Scores {
        let v = |t: &Tensor| Vec::<f64>::try_from(t.to_device(Device::Cpu)).expect("f64 vector");
        let n = self.tokens.max(1) as f64;
        let score = match aggregate {
            Aggregate::MeanAbs => v(&(&self.sum_abs / n)),
            Aggregate::SignedMean => v(&(&self.sum / n)),
            Aggregate::Quantile => {
                let rows = self.abs_rows.expect("rows kept for a quantile");
                quantile_columns(&Tensor::cat(&rows, 0), q)
            }
        };
        let fires = v(&self.fires);
        let sum_f = v(&self.sum_f);
        Scores {
            tokens: self.tokens,
            score,
            frequency: fires.iter().map(|c| c / n).collect(),
            mean_activation: sum_f
                .iter()
                .zip(&fires)
                .map(|(s, c)| if *c > 0.0 { s / c } else { 0.0 })
                .collect(),
        }
    }
}

/// The q-quantile of each column, linear between order statistics (numpy's default).
fn quantile_columns(t_tn: &Tensor, q: f64) -> Vec<f64> {
    let t = t_tn.size()[0];
    if t == 0 {
        return vec![0.0; t_tn.size()[1] as usize];
    }
    let (sorted, _) = t_tn.to_kind(Kind::Double).sort(0, false);
    let pos = q * (t - 1) as f64;
    let (lo, frac) = (pos.floor() as i64, pos - pos.floor());
    let hi = (lo + 1).min(t - 1);
    let v = sorted.get(lo) * (1.0 - frac) + sorted.get(hi) * frac;
    Vec::try_from(v).expect("f64 vector")
}

/// The attribution tokens' stream: training-split batches of acts and grads, only tokens with
/// gradients when the store says which have them, shuffled by the seed so a budget smaller
/// than the store samples all of it rather than its first shards. Never the eval split, so
/// the held-out metrics a cycle reports are on tokens that did not choose its core.
fn attribution_stream(
    store: &Arc<Store>,
    cfg: &TrainConfig,
) -> Result<dmsae_store::BatchStream, TrainError> {
    let bad = |msg: String| TrainError::Unusable {
        path: store.dir.clone(),
        msg,
    };
    store
        .array("grads")
        .map_err(|_| bad("no `grads` array: attribution needs stored gradients".into()))?;
    let so = StreamOptions {
        arrays: vec!["acts".into(), "grads".into()],
        batch_tokens: cfg.batch_tokens,
        seed: cfg.seed,
        split: Split::Train,
        eval_fraction: cfg.eval_fraction,
        require_grads: store.array("flags").is_ok(),
        shuffle: true,
        ..Default::default()
    };
    Ok(store.stream(so)?)
}

fn no_attribution_tokens(store: &Arc<Store>, cfg: &TrainConfig) -> TrainError {
    TrainError::Unusable {
        path: store.dir.clone(),
        msg: format!(
            "no training tokens with gradients (eval_fraction {})",
            cfg.eval_fraction
        ),
    }
}

/// Refuse, before a cycle trains, a store and config that leave attribution nothing to score.
pub fn check_attribution_data(store: &Arc<Store>, cfg: &TrainConfig) -> Result<(), TrainError> {
    match attribution_stream(store, cfg)?.next() {
        Some(b) => b.map(|_| ()).map_err(Into::into),
        None => Err(no_attribution_tokens(store, cfg)),
    }
}

/// Scores of the candidates (core + first non-core group) over up to
/// `cfg.distill.attribution_tokens` training-split tokens with valid gradients.
pub fn attribute(
    store: &Arc<Store>,
    sae: &Sae,
    scale: f64,
    cfg: &TrainConfig,
) -> Result<Scores, TrainError> {
    let dc = &cfg.distill;
    let n = sae.core + sae.groups[0];
    let (d, dev) = (sae.d_in as i64, sae.device());
    let mut acc = Accumulator::new(n, dc.aggregate == Aggregate::Quantile, dev);
    for b in attribution_stream(store, cfg)? {
        let b = b?;
        let take = (dc.attribution_tokens - acc.tokens).min(b.n as u64) as i64;
        let rows = |name: &str| crate::train::rows(&b, name, d as usize, dev).narrow(0, 0, take);
        tch::no_grad(|| {
            let (f, a) = token_attributions(sae, &(rows("acts") * scale), &rows("grads"), n);
            acc.add(&f, &a);
        });
        if acc.tokens >= dc.attribution_tokens {
            break;
        }
    }
    if acc.tokens == 0 {
        return Err(no_attribution_tokens(store, cfg));
    }
    Ok(acc.finish(dc.aggregate, dc.quantile))
}

/// Indices (ascending) of the smallest set of top-scoring candidates whose scores reach `tau`
/// of the total. Sorted by score, descending, ties by index; negative scores count as 0 and
/// are never kept; all scores 0 keeps none.
pub fn select(score: &[f64], tau: f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..score.len()).filter(|&j| score[j] > 0.0).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    // Summed in the same order as the prefix, so tau = 1 reaches it exactly.
    let total: f64 = order.iter().map(|&j| score[j]).sum();
    let mut cum = 0.0;
    let mut keep = Vec::new();
    for j in order {
        if cum >= tau * total {
            break;
        }
        cum += score[j];
        keep.push(j);
    }
    keep.sort_unstable();
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64], cols: i64) -> Tensor {
        Tensor::from_slice(v).view([-1, cols]).to_kind(Kind::Float)
    }

    /// d = 2, core 1, groups [1, 1]: candidates are latents 0 and 1. Decoder row 0 is [2, 0]
    /// (not unit, so the normalisation shows), scale s = 2. Three tokens, by hand:
    /// x_n = [2,-1], [-2,3], [1,1] give f = [2,0], [0,3], [1,1] on the candidates;
    /// g = [.5,3], [1,-1], [-1,2] give a = [1,0], [0,-3], [-1,2].
    fn hand() -> (Sae, Tensor, Tensor) {
        let p = |v: &[f64], c: i64| t(v, c);
        let sae = Sae {
            d_in: 2,
            core: 1,
            groups: vec![1, 1],
            k: 1,
            w_enc: p(&[1., 0., 1., 0., 1., 1.], 3),
            b_enc: Tensor::zeros([3], (Kind::Float, Device::Cpu)),
            w_dec: p(&[2., 0., 0., 1., 0.7, 0.7], 2),
            b_dec: Tensor::zeros([2], (Kind::Float, Device::Cpu)),
            threshold: 0.0,
            core_threshold: Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        };
        let x = t(&[1., -0.5, -1., 1.5, 0.5, 0.5], 2);
        let g = t(&[0.5, 3., 1., -1., -1., 2.], 2);
        (sae, x, g)
    }

    fn scores(agg: Aggregate, q: f64) -> Scores {
        let (sae, x, g) = hand();
        let (f, a) = token_attributions(&sae, &(x * 2.0), &g, 2);
        let want = t(&[1., 0., 0., -3., -1., 2.], 2);
        assert!(a.allclose(&want, 1e-6, 1e-6, false), "{a}");
        let mut acc = Accumulator::new(2, agg == Aggregate::Quantile, Device::Cpu);
        // Two batches, so the sums run across batches.
        acc.add(&f.narrow(0, 0, 1), &a.narrow(0, 0, 1));
        acc.add(&f.narrow(0, 1, 2), &a.narrow(0, 1, 2));
        acc.finish(agg, q)
    }

    fn close(a: &[f64], b: &[f64]) {
        assert!(
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6),
            "{a:?} vs {b:?}"
        );
    }

    #[test]
    fn aggregates_match_hand_computation() {
        let s = scores(Aggregate::MeanAbs, 0.0);
        assert_eq!(s.tokens, 3);
        close(&s.score, &[2. / 3., 5. / 3.]);
        close(&s.frequency, &[2. / 3., 2. / 3.]);
        close(&s.mean_activation, &[1.5, 2.0]);
        close(&scores(Aggregate::SignedMean, 0.0).score, &[0.0, -1. / 3.]);
        // |a| sorted: [0, 1, 1] and [0, 2, 3].
        close(&scores(Aggregate::Quantile, 0.5).score, &[1.0, 2.0]);
        close(&scores(Aggregate::Quantile, 0.75).score, &[1.0, 2.5]);
        close(&scores(Aggregate::Quantile, 1.0).score, &[1.0, 3.0]);
    }

    #[test]
    fn selection_keeps_the_smallest_prefix_reaching_tau() {
        let s = [3.0, 1.0, 4.0, 1.0, 5.0];
        // Total 14. tau 0.5: 5 + 4 = 9 >= 7.
        assert_eq!(select(&s, 0.5), vec![2, 4]);
        // tau 0.9: 5 + 4 + 3 = 12 < 12.6; the tie at 1 goes to the lower index.
        assert_eq!(select(&s, 0.9), vec![0, 1, 2, 4]);
        assert_eq!(select(&s, 1.0), vec![0, 1, 2, 3, 4]);
        // Negative scores are never kept and do not count in the total (2).
        assert_eq!(select(&[-2.0, 1.0, 1.0], 0.9), vec![1, 2]);
        assert_eq!(select(&[-2.0, 1.0, 1.0], 0.5), vec![1]);
        assert!(select(&[0.0, 0.0], 0.9).is_empty());
        assert!(select(&[], 0.9).is_empty());
    }

    /// A width-16 SAE (k 2, one group of 4) with b_enc 0.1 and threshold 0.3, and its config.
    fn tiny_sae(d: usize, eval_fraction: f64) -> (TrainConfig, Sae) {
        let cfg = TrainConfig {
            width: 16,
            k: 2,
            group_fractions: vec![0.25],
            eval_fraction,
            batch_tokens: 64,
            seed: 4,
            ..Default::default()
        };
        let mut sae = Sae::new(d, None, &cfg, Kind::Float, Device::Cpu).unwrap();
        tch::no_grad(|| {
            let _ = sae.b_enc.fill_(0.1);
        });
        sae.threshold = 0.3;
        (cfg, sae)
    }

    /// A raw f32 store of `acts` and `grads` rows of width `d` (and `flags` when given), in
    /// chunks of 50 tokens.
    fn store(
        dir: &std::path::Path,
        d: usize,
        x: &[f32],
        g: &[f32],
        flags: Option<&[u8]>,
    ) -> Arc<Store> {
        use dmsae_store::{ArraySpec, Codec, DType, StoreWriter, WriterOptions};
        let mut arrays = vec![
            ArraySpec::new("acts", DType::F32, d, Codec::Raw),
            ArraySpec::new("grads", DType::F32, d, Codec::Raw),
        ];
        if flags.is_some() {
            arrays.push(ArraySpec::new("flags", DType::U8, 1, Codec::Raw));
        }
        let opts = WriterOptions {
            chunk_tokens: 50,
            ..Default::default()
        };
        let mut w = StoreWriter::create(dir, arrays, opts).unwrap();
        let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|f| f.to_le_bytes()).collect() };
        let (xb, gb) = (bytes(x), bytes(g));
        let mut cols: Vec<&[u8]> = vec![&xb, &gb];
        cols.extend(flags);
        w.append(&cols).unwrap();
        w.finish().unwrap();
        Arc::new(Store::open(dir).unwrap())
    }

    /// `attribute` on a store: only training rows with flags bit 0 count, the budget caps the
    /// tokens, and the mean |a| equals a direct f64 computation from the weights and rows.
    #[test]
    fn attribute_uses_training_rows_with_valid_gradients_up_to_the_budget() {
        use crate::synthetic::sparse_dictionary;
        tch::set_num_threads(1);
        let (d, n) = (6usize, 400usize);
        let (_, x) = sparse_dictionary(d, 8, 2, n, 0.05, 1);
        let (_, g) = sparse_dictionary(d, 8, 3, n, 0.5, 2);
        // Every third row has no valid gradient (bit 0 clear); none is BOS.
        let flags: Vec<u8> = (0..n).map(|i| if i % 3 == 0 { 2 } else { 3 }).collect();
        let tmp = tempfile::tempdir().unwrap();
        let store = store(tmp.path(), d, &x, &g, Some(&flags));
        let (_, scale) = crate::train::scale_of(&store).unwrap();
        let (mut cfg, sae) = tiny_sae(d, 0.0);
        let x_bd = Tensor::from_slice(&x).view([n as i64, d as i64]) * scale;
        let (f, _) = token_attributions(&sae, &x_bd, &x_bd, 4);
        assert!(f.allclose(&sae.encode(&x_bd).narrow(1, 0, 4), 1e-5, 1e-6, false));
        assert!(f.gt(0.0).any().int64_value(&[]) == 1 && f.eq(0.0).any().int64_value(&[]) == 1);
        let valid = flags.iter().filter(|f| *f & 1 == 1).count() as u64;
        let all = attribute(&store, &sae, scale, &cfg).unwrap();
        assert_eq!((all.tokens, all.score.len()), (valid, 4));

        // Direct: the stream yields chunks in order when unshuffled; mean |a| over valid rows.
        let v = |t: &Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).view([-1])).unwrap();
        let (we, be, wd, bd) = (v(&sae.w_enc), v(&sae.b_enc), v(&sae.w_dec), v(&sae.b_dec));
        let mut want = [0.0f64; 4];
        for t in (0..n).filter(|t| flags[*t] & 1 == 1) {
            for (j, w) in want.iter_mut().enumerate() {
                let pre = be[j]
                    + (0..d)
                        .map(|i| (x[t * d + i] as f64 * scale - bd[i]) * we[i * 16 + j])
                        .sum::<f64>();
                let f = if pre > 0.3 { pre } else { 0.0 };
                let norm = (0..d).map(|i| wd[j * d + i].powi(2)).sum::<f64>().sqrt();
                let gu = (0..d)
                    .map(|i| g[t * d + i] as f64 * wd[j * d + i])
                    .sum::<f64>()
                    / norm;
                *w += (f * gu).abs() / valid as f64;
            }
        }
        for (a, b) in all.score.iter().zip(want) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
                "{:?} vs {want:?}",
                all.score
            );
        }
        assert!(want.iter().any(|w| *w > 0.0));

        cfg.distill.attribution_tokens = 100;
        assert_eq!(attribute(&store, &sae, scale, &cfg).unwrap().tokens, 100);
        cfg.eval_fraction = 1.0;
        let e = attribute(&store, &sae, scale, &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no training tokens"), "{e}");
    }

    /// Attribution reads only the train split: changing the gradients of the held-out rows
    /// (which the eval's first-order dloss does see) leaves every score as it was, while
    /// changing the training rows' gradients moves them.
    #[test]
    fn attribution_never_reads_the_rows_the_eval_reports_on() {
        use crate::sae::Trainer;
        use crate::synthetic::sparse_dictionary;
        tch::set_num_threads(1);
        let (d, n, frac) = (6usize, 800usize, 0.3);
        let (_, x) = sparse_dictionary(d, 8, 2, n, 0.05, 1);
        let (_, g) = sparse_dictionary(d, 8, 3, n, 0.5, 2);
        let tmp = tempfile::tempdir().unwrap();
        let a = store(&tmp.path().join("a"), d, &x, &g, None);
        // Rows of the held-out chunks.
        let mut held = vec![false; n];
        for c in a.chunks() {
            if dmsae_store::is_eval_chunk(&a.shards[c.shard].file_name(), c.chunk, frac) {
                let s = a.chunk_start(c) as usize;
                held[s..s + a.chunk_tokens(c)].fill(true);
            }
        }
        let held_n = held.iter().filter(|h| **h).count();
        assert!(held_n > 0 && held_n < n, "{held_n} of {n} rows held out");
        // The same store with other gradients on the held-out rows (b) or on the others (c).
        let (_, other) = sparse_dictionary(d, 8, 3, n, 0.5, 9);
        let mix = |on_held: bool| -> Vec<f32> {
            (0..n * d)
                .map(|i| {
                    if held[i / d] == on_held {
                        other[i] * 3.0
                    } else {
                        g[i]
                    }
                })
                .collect()
        };
        let b = store(&tmp.path().join("b"), d, &x, &mix(true), None);
        let c = store(&tmp.path().join("c"), d, &x, &mix(false), None);
        let (_, scale) = crate::train::scale_of(&a).unwrap();
        let (cfg, sae) = tiny_sae(d, frac);
        let t = Trainer::new(sae, cfg.clone(), false);
        let scores = |s: &Arc<Store>| {
            let r = attribute(s, &t.sae, scale, &cfg).unwrap();
            (r.tokens, r.score)
        };
        let dloss = |s: &Arc<Store>| {
            let m = crate::train::evaluate(s, &t, scale, &cfg).unwrap().unwrap();
            m.first_order_dloss.unwrap()
        };
        let sa = scores(&a);
        assert_eq!(
            sa.0,
            (n - held_n) as u64,
            "every training row, no held-out one"
        );
        assert!(sa.1.iter().any(|v| *v > 0.0));
        assert_eq!(sa, scores(&b), "held-out gradients moved the attribution");
        assert_ne!(
            sa,
            scores(&c),
            "training gradients left the attribution unchanged"
        );
        assert_ne!(dloss(&a), dloss(&b));
        assert_eq!(dloss(&a), dloss(&c));
    }
}
