//! Training hyperparameters. Every default is a key; the comment beside it says where it comes
//! from in ../shared/paper/METHOD.md: (paper), (review), (anchor: reference implementations) or
//! (ours).

use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Dictionary size d_sae, core included. METHOD.md "Width 65,536 (paper)".
    pub width: usize,
    /// Mean non-core L0: BatchTopK keeps k*B non-core activations per batch. METHOD.md "Default
    /// k = 64 for tests" (the paper's distillation runs appear to use 320).
    pub k: usize,
    /// Non-core Matryoshka group sizes as fractions of the non-core width; the last group takes
    /// the rest. METHOD.md "1/32, 1/16, 1/8, 1/4, rest (anchor: dictionary_learning)".
    pub group_fractions: Vec<f64>,
    /// Tokens per step. METHOD.md "batch 2048-4096 tokens (anchor)".
    pub batch_tokens: usize,
    /// Adam learning rate. METHOD.md "Adam lr 3e-4 (anchor)".
    pub lr: f64,
    /// METHOD.md "betas 0.9, 0.999 (anchor)".
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    /// PyTorch's Adam default (ours: METHOD.md is silent).
    pub adam_eps: f64,
    /// Linear warm-up from 0. METHOD.md "warm-up 1000 steps (anchor)".
    pub warmup_steps: u64,
    /// Linear decay to 0 over this last fraction of the run. METHOD.md "linear decay over the
    /// last 20 % (anchor)".
    pub decay_fraction: f64,
    /// Global gradient-norm clip. METHOD.md "grad-norm clip 1.0 (anchor)".
    pub grad_clip: f64,
    /// AuxK weight. METHOD.md "AuxK, alpha = 1/32 (anchor)".
    pub auxk_alpha: f64,
    /// Dead latents used per token by AuxK; None means d_model / 2. METHOD.md "k_aux = d/2
    /// (anchor)".
    pub k_aux: Option<usize>,
    /// A latent is dead after this many training tokens without firing. METHOD.md "dead after
    /// 10M tokens without firing (anchor)".
    pub dead_tokens: u64,
    /// EMA decay of the inference threshold (the smallest kept non-core activation). METHOD.md
    /// "a per-SAE threshold learned as an EMA (anchor)"; 0.999 is dictionary_learning's value.
    /// Ours: capped at 1 - 10/steps, so the EMA spans at most the last tenth of a short run.
    pub threshold_beta: f64,
    /// The training encoder's product and bias in bf16, the pre-activations left in bf16 (the
    /// codes go back to the model's float32); None: on CUDA only. Exports, evals and
    /// attribution stay float32. Ours, from the issue's "bf16 matrix products on the GPU where
    /// they do not hurt": on the real Gemma-3-270M sample (width 1,024, k 32, 3 seeds, on CPU)
    /// it moved the held-out FVU by +0.0002 to +0.0003, against 0.012 between seeds; on an
    /// H100 (demo store, width 1,024, k 32, 2 seeds) by +0.0002 and +0.0003, against 0.010
    /// between seeds, and at the sizes it made the step 1.9x faster (2.8x with AuxK).
    #[serde(skip_serializing_if = "Option::is_none")] // runs from before the key compare equal
    pub encoder_bf16: Option<bool>,
    /// AuxK's reconstruction as one dense [B, n_dead] x [n_dead, d] product over the dead
    /// latents (bf16 when the encoder product is) instead of gathering each token's k_aux
    /// decoder rows; None: when the encoder product is bf16 and k_aux >= width / 256. Ours: at
    /// the paper's sizes (k_aux 1,152, width 65,536, batch 4,096) with every latent dead the
    /// gathers and their backward move ~130 GB a step and the products cost ~3.7 TFLOP
    /// (estimates for an H100, not measured); on the 2-core CPU, at k_aux 320 and width 4,096,
    /// the gathers measured cheaper (369 against 508 ms a step, float32; the product was then
    /// over every latent).
    #[serde(skip_serializing_if = "Option::is_none")] // runs from before the key compare equal
    pub auxk_dense: Option<bool>,
    /// The training decoder's forward reads W_dec's rows in bf16 (a copy the fused update
    /// writes beside the float32 rows), the sums float32; its backward and W_dec's gradient
    /// stay float32, and exports, evals and attribution decode in float32. Where the fused
    /// decoder runs, it halves the forward's row reads (2.4 GB a step at the paper's sizes).
    /// None: where that decoder runs on CUDA; a resumed run keeps its checkpoint's. Ours, from
    /// the "bf16 ... where they do not hurt": on the real Gemma-3-270M sample (width
    /// 1,024, k 32, 5 seeds, on CPU, where the ATen path rounds the rows as the kernel does)
    /// the held-out FVU moved by -0.00003 to +0.00003 after 64K tokens (0.012 between seeds)
    /// and by -0.00005 to +0.00017 after 256K (0.0035 between seeds). Not yet timed or
    /// measured on a GPU.
    #[serde(skip_serializing_if = "Option::is_none")] // runs from before the key compare equal
    pub decoder_bf16: Option<bool>,
    /// Adam's moments stored in bf16, rounded stochastically, where float32 moments make the
    /// update move 28 bytes a parameter and these 20 (and hold 2.4 GB at the paper's width
    /// where these hold 1.2). Needs dmsae's fused CUDA update (extractor/kernels/adam.cu).
    /// None: bf16 where that update runs (a CUDA device), float32 elsewhere; a resumed run
    /// keeps its checkpoint's. Ours, for the step budget: on the H200, held-out FVU on
    /// real Gemma-3-270M activations was 0.16503 and 0.17477 with them (two seeds) and 0.16500
    /// and 0.17477 without (README).
    #[serde(skip_serializing_if = "Option::is_none")] // runs from before the key compare equal
    pub adam_bf16_moments: Option<bool>,
    /// W_enc's gradient written in bf16 by the sparse encoder-gradient kernel and read so by
    /// the fused update (encoder_grad.cu, adam.cu): 4 fewer bytes a parameter each way, 1.2 GB
    /// less moved a step at the paper's sizes. Each column's sum is rounded once; the clip's
    /// norm is the rounded gradient's. None: on CUDA; where those kernels do not run (the CPU,
    /// a step with many latents dead), float32. Ours: with the gradients of W_enc and W_dec
    /// rounded to bf16 on the CPU (the real Gemma-3-270M sample, width 1,024, k 32, 3 seeds)
    /// the held-out FVU moved by at most 0.00002, against 0.012 between seeds
    /// (docs/BENCHMARKS.md). Not yet timed on a GPU.
    #[serde(skip_serializing_if = "Option::is_none")] // runs from before the key compare equal
    pub encoder_grad_bf16: Option<bool>,
    /// W_dec's gradient in bf16, as `encoder_grad_bf16`'s (bag_decode.cu's backward writes
    /// it, rounded once a sum, and its figures for the update's projection and clip are the
    /// rounded gradient's; adam.cu's decoder update reads it). None: on CUDA, where those
    /// kernels run. Ours: the FVU measurement above (both gradients rounded). Not yet timed
    /// on a GPU.
    #[serde(skip_serializing_if = "Option::is_none")] // runs from before the key compare equal
    pub decoder_grad_bf16: Option<bool>,
    /// The training step's Matryoshka parts (the sparse decoder's output, [B, 1 + G, d]) in
    /// bf16, each float32 sum rounded once, and so their gradient, which the decoder's
    /// backward reads: an entry reads a row of it, 2.4 GB a step in float32 at the paper's
    /// sizes. The loss's sums stay float32. None: on CUDA, where bag_decode.cu runs; float32
    /// elsewhere. Ours: with the parts (and their gradient) rounded to bf16 on the CPU (the
    /// real Gemma-3-270M sample, width 1,024, k 32, 5 seeds) the held-out FVU moved by
    /// -0.00003 to +0.00006, against 0.012 between seeds (docs/BENCHMARKS.md). Not yet timed
    /// on a GPU.
    #[serde(skip_serializing_if = "Option::is_none")] // runs from before the key compare equal
    pub parts_bf16: Option<bool>,
    /// A given core is held fixed (encoder rows and b_enc). METHOD.md "frozen or trainable ...
    /// make it a key (default frozen)".
    pub core_frozen: bool,
    /// Training length in steps (`tokens` wins when both are set). Ours.
    pub steps: u64,
    pub tokens: Option<u64>,
    /// Seed of the initialisation and of the stream order. Ours.
    pub seed: u64,
    /// Metrics line every this many steps. Ours.
    pub log_every: u64,
    /// Fraction of store chunks held out for the final eval (the store's split). Ours.
    pub eval_fraction: f64,
    /// At most this many held-out tokens in the final eval. Ours.
    pub eval_tokens: u64,
    /// A latent firing on more than this fraction of tokens counts as dense. Ours (SAEBench
    /// reports the fraction above 10 %).
    pub dense_fraction: f64,
    /// Rows in the stream's shuffle buffer. Ours.
    pub shuffle_tokens: usize,
    /// Write a checkpoint every this many steps (0: only on SIGTERM/SIGINT). Ours.
    pub checkpoint_every: u64,
    /// libtorch intra-op threads on CPU; None: one less than the cores, leaving one to the
    /// store's decoders (ours: spinning OpenMP threads on a busy 2-core machine made steps
    /// 16x slower, measured).
    pub cpu_threads: Option<usize>,
    /// Attribution and core selection (`dmsae train-cycle`, `distill`): a `[distill]` table.
    pub distill: DistillConfig,
}

/// How per-token attributions become one score per latent.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// Mean over tokens of |a_j(t)|. METHOD.md "Default (ours)".
    MeanAbs,
    /// The `quantile` of |a_j(t)| over tokens. METHOD.md "The paper uses a high quantile (q unknown)".
    Quantile,
    /// Mean of a_j(t); negative scores count as 0 in the selection.
    SignedMean,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    /// Tokens with valid gradients used for attribution, drawn from the train split in a
    /// seeded shuffle; never the eval split, which the cycle's held-out metrics use. Ours.
    pub attribution_tokens: u64,
    pub aggregate: Aggregate,
    /// q for `aggregate = "quantile"`. Ours (the paper's q is unknown).
    pub quantile: f64,
    /// Keep the smallest prefix of candidates, by score, reaching this fraction of the total.
    /// METHOD.md "default tau = 0.9 (unconfirmed)".
    pub tau: f64,
    /// The distilled core: lineages selected in at least this many cycles. Ours: 2, selected
    /// again after its decoder, every other latent and the seed were re-initialised, the
    /// weakest test of stability that a one-off selection has not passed.
    pub min_selected: u32,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            attribution_tokens: 1 << 18,
            aggregate: Aggregate::MeanAbs,
            quantile: 0.99,
            tau: 0.9,
            min_selected: 2,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            width: 65_536,
            k: 64,
            group_fractions: vec![1.0 / 32.0, 1.0 / 16.0, 1.0 / 8.0, 1.0 / 4.0],
            batch_tokens: 4096,
            lr: 3e-4,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            warmup_steps: 1000,
            decay_fraction: 0.2,
            grad_clip: 1.0,
            auxk_alpha: 1.0 / 32.0,
            k_aux: None,
            dead_tokens: 10_000_000,
            threshold_beta: 0.999,
            encoder_bf16: None,
            decoder_bf16: None,
            auxk_dense: None,
            adam_bf16_moments: None,
            encoder_grad_bf16: None,
            decoder_grad_bf16: None,
            parts_bf16: None,
            core_frozen: true,
            steps: 30_000,
            tokens: None,
            seed: 0,
            log_every: 100,
            eval_fraction: 0.01,
            eval_tokens: 1 << 20,
            dense_fraction: 0.1,
            shuffle_tokens: 1 << 16,
            checkpoint_every: 1000,
            cpu_threads: None,
            distill: DistillConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Not valid TOML for a `TrainConfig` (unknown keys are refused).
    #[error("{path}: {msg}")]
    Parse {
        path: std::path::PathBuf,
        msg: String,
    },
    /// A value out of range.
    #[error("config: {0}")]
    Invalid(String),
}

impl TrainConfig {
    pub fn load(path: &Path) -> Result<TrainConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            msg: e.message().replace('\n', " "),
        })
    }

    /// Steps of the run, from `tokens` when given.
    pub fn total_steps(&self) -> u64 {
        match self.tokens {
            Some(t) => t.div_ceil(self.batch_tokens as u64).max(1),
            None => self.steps,
        }
    }

    /// Learning rate at `step` (0-based): linear warm-up, flat, linear decay to 0.
    pub fn lr_at(&self, step: u64) -> f64 {
        let total = self.total_steps() as f64;
        let warm = ((step + 1) as f64 / self.warmup_steps.max(1) as f64).min(1.0);
        let decay_start = total * (1.0 - self.decay_fraction);
        let decay = if self.decay_fraction > 0.0 && step as f64 >= decay_start {
            ((total - step as f64) / (total - decay_start)).clamp(0.0, 1.0)
        } else {
            1.0
        };
        self.lr * warm * decay
    }

    /// Non-core group sizes for `noncore` latents: floor(fraction * noncore) each, the rest last.
    pub fn group_sizes(&self, noncore: usize) -> Result<Vec<usize>, ConfigError> {
        let mut sizes: Vec<usize> = self
            .group_fractions
            .iter()
            .map(|f| (f * noncore as f64).floor() as usize)
            .collect();
        let used: usize = sizes.iter().sum();
        if sizes.contains(&0) || used >= noncore {
            return Err(ConfigError::Invalid(format!(
                "group_fractions {:?} of {noncore} non-core latents give an empty group",
                self.group_fractions
            )));
        }
        sizes.push(noncore - used);
        Ok(sizes)
    }

    pub fn validate(&self, core: usize) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if core >= self.width {
            return bad(format!(
                "core size {core} leaves no non-core latents in width {}",
                self.width
            ));
        }
        if self.k == 0 || self.k > self.width - core {
            return bad(format!(
                "k = {} must be in 1..={}",
                self.k,
                self.width - core
            ));
        }
        if self.batch_tokens == 0 || self.total_steps() == 0 {
            return bad("batch_tokens and steps must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.threshold_beta) || !(0.0..=1.0).contains(&self.decay_fraction)
        {
            return bad("threshold_beta must be in [0, 1) and decay_fraction in [0, 1]".into());
        }
        if self.group_fractions.iter().any(|f| !(*f > 0.0 && *f < 1.0)) {
            return bad(format!(
                "group_fractions {:?} must lie in (0, 1)",
                self.group_fractions
            ));
        }
        let dc = &self.distill;
        if !(dc.tau > 0.0 && dc.tau <= 1.0 && (0.0..=1.0).contains(&dc.quantile)) {
            return bad("distill.tau must be in (0, 1] and distill.quantile in [0, 1]".into());
        }
        if dc.attribution_tokens == 0 || dc.min_selected == 0 {
            return bad("distill.attribution_tokens and min_selected must be at least 1".into());
        }
        self.group_sizes(self.width - core).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_refuses_unknown_keys() {
        let c: TrainConfig = toml::from_str("width = 128\nk = 4\ncore_frozen = false").unwrap();
        assert_eq!((c.width, c.k, c.core_frozen, c.lr), (128, 4, false, 3e-4));
        assert!(toml::from_str::<TrainConfig>("widht = 3").is_err());
        let c: TrainConfig =
            toml::from_str("[distill]\ntau = 0.5\naggregate = \"signed_mean\"").unwrap();
        assert_eq!(
            (c.distill.tau, c.distill.aggregate),
            (0.5, Aggregate::SignedMean)
        );
        assert!(toml::from_str::<TrainConfig>("[distill]\ntua = 0.5").is_err());
    }

    #[test]
    fn groups_follow_method_fractions() {
        let c = TrainConfig::default();
        // 65,536 - 0: 2048, 4096, 8192, 16384, rest 34816.
        assert_eq!(
            c.group_sizes(65_536).unwrap(),
            vec![2048, 4096, 8192, 16384, 34816]
        );
        assert!(c.group_sizes(16).is_err());
    }

    #[test]
    fn schedule_warms_up_and_decays_to_zero() {
        let c = TrainConfig {
            steps: 100,
            warmup_steps: 10,
            ..Default::default()
        };
        assert!((c.lr_at(0) - 3e-5).abs() < 1e-12);
        assert_eq!(c.lr_at(50), 3e-4);
        assert_eq!(c.lr_at(80), 3e-4);
        assert!((c.lr_at(90) - 1.5e-4).abs() < 1e-12);
        assert!(c.lr_at(99) < 2e-5);
    }
}
