//! `dmsae train`: a thin wrapper over `dmsae_trainer::train`.

use anyhow::Result;
use clap::Args;
use dmsae_trainer::train::{Progress, RunOptions};
use dmsae_trainer::{train, TrainConfig};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Flags of every training command (`train`, `train-cycle`, `distill`, `sweep`), each
/// overriding the config file; k is per command (one value, or the sweep's list).
#[derive(Args)]
pub struct ModelFlags {
    /// TOML file of TrainConfig keys (attribution keys in a `[distill]` table); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Dictionary size d_sae, core included.
    #[arg(long)]
    width: Option<usize>,
    /// Training steps (batches; per cycle when distilling).
    #[arg(long, conflicts_with = "tokens")]
    steps: Option<u64>,
    /// Training tokens, with K/M/B suffixes, rounded up to whole batches (per cycle when distilling).
    #[arg(long, value_parser = crate::cli::parse_count)]
    tokens: Option<u64>,
    /// Seed of the initialisation and of the stream order (cycle N of a distillation uses
    /// seed + N; a sweep's random core is drawn with it).
    #[arg(long)]
    seed: Option<u64>,
    /// Tokens per batch.
    #[arg(long)]
    batch: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// `ModelFlags` and one k: `train`, `train-cycle` and `distill`.
#[derive(Args)]
pub struct TrainFlags {
    #[command(flatten)]
    pub model: ModelFlags,
    /// Mean non-core L0 of BatchTopK.
    #[arg(long)]
    k: Option<usize>,
}

impl std::ops::Deref for TrainFlags {
    type Target = ModelFlags;
    fn deref(&self) -> &ModelFlags {
        &self.model
    }
}

impl TrainFlags {
    pub fn config(&self) -> Result<TrainConfig> {
        let mut cfg = self.model.config()?;
        cfg.k = self.k.unwrap_or(cfg.k);
        Ok(cfg)
    }
}

impl ModelFlags {
    pub fn config(&self) -> Result<TrainConfig> {
        let mut cfg = match &self.config {
            Some(p) => TrainConfig::load(p)?,
            None => TrainConfig::default(),
        };
        cfg.width = self.width.unwrap_or(cfg.width);
        cfg.batch_tokens = self.batch.unwrap_or(cfg.batch_tokens);
        cfg.seed = self.seed.unwrap_or(cfg.seed);
        if let Some(v) = self.steps {
            (cfg.steps, cfg.tokens) = (v, None);
        }
        if self.tokens.is_some() {
            cfg.tokens = self.tokens;
        }
        Ok(cfg)
    }

    /// The progress line on stderr, at most twice a second, prefixed by `label`.
    pub fn progress(&self, label: String) -> impl FnMut(&Progress) + '_ {
        progress_line(self.quiet, label.clone(), move |p, rate, eta| {
            let s = p.stats;
            // The figures are the newest read back, usually the step before (step 0: none yet).
            let figures = match s.step {
                0 => String::new(),
                _ => format!(
                    "  loss {:.4}  FVU {:.4}  L0 {:.1}+{:.1}",
                    s.loss, s.fvu, s.l0_core, s.l0_noncore
                ),
            };
            format!(
                "{label}step {}/{} ({:.0}%)  {:.0} tokens/s{figures}  ETA {:.0}s",
                p.step,
                p.total_steps,
                100.0 * p.step as f64 / p.total_steps as f64,
                rate,
                eta
            )
        })
    }
}

/// A progress line on stderr, redrawn at most twice a second (and at the last step); `line`
/// gets the progress, tokens/s and the ETA in seconds. A run that continues a checkpoint says
/// so once, quiet or not, so a job's log shows where it picked up.
pub fn progress_line(
    quiet: bool,
    label: String,
    mut line: impl FnMut(&Progress, f64, f64) -> String,
) -> impl FnMut(&Progress) {
    let (mut last, mut first) = (Instant::now(), true);
    move |p| {
        if std::mem::take(&mut first) && p.step > p.run_steps {
            eprintln!(
                "{label}resumed from the checkpoint at step {}",
                p.step - p.run_steps
            );
        }
        if quiet || (last.elapsed().as_secs_f64() < 0.5 && p.step != p.total_steps) {
            return;
        }
        last = Instant::now();
        let rate = p.run_tokens as f64 / p.elapsed_s.max(1e-9);
        let eta = p.elapsed_s / p.run_steps.max(1) as f64 * (p.total_steps - p.step) as f64;
        let _ = write!(std::io::stderr(), "\r{}   ", line(p, rate, eta));
    }
}

#[derive(Args)]
pub struct TrainArgs {
    /// Store directory (from `dmsae store import` or the extractor).
    #[arg(long)]
    shards: PathBuf,
    /// Core to start from: safetensors with `W_enc` [d_in, c] and `b_enc` [c], model units,
    /// pre-activation x W_enc + b_enc (no b_dec; a cycle's core.safetensors), optional
    /// `threshold`; or a directory holding core.safetensors (RUN/distilled, RUN/cycle-N).
    #[arg(long)]
    core: Option<PathBuf>,
    /// Run directory: metrics.jsonl, cfg.json, sae_weights.safetensors.
    #[arg(long)]
    out: PathBuf,
    /// Continue from OUT/checkpoint.* when present (same config, store and core); otherwise start.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    train: TrainFlags,
}

pub fn run(a: TrainArgs) -> Result<ExitCode> {
    let cfg = a.train.config()?;
    let core = a.core.as_deref().map(crate::cli::core_file);
    let device = crate::cli::device(&a.train.device)?;
    let stop = crate::cli::stop_on_signals();
    let summary = train::train(
        &a.shards,
        &a.out,
        cfg,
        RunOptions {
            core: core.as_deref(),
            resume: a.resume,
            device,
            stop,
        },
        a.train.progress(String::new()),
    )?;
    if !a.train.quiet {
        eprintln!();
    }
    if summary.interrupted {
        eprintln!(
            "dmsae: interrupted at step {}; checkpoint in {} (rerun with --resume)",
            summary.steps,
            a.out.display()
        );
        return Ok(ExitCode::from(3));
    }
    println!(
        "trained {} steps, {} tokens in {:.1} s ({:.0} tokens/s here); normalisation scale {:.6e}",
        summary.steps,
        summary.tokens,
        summary.seconds,
        summary.run_tokens as f64 / summary.seconds.max(1e-9),
        summary.scale
    );
    match &summary.eval {
        Some(e) => println!(
            "eval: {} tokens  FVU {:.4} (BatchTopK {:.4})  MSE {:.4e}  L0 {:.2} core + {:.2} non-core = {:.2}  dead {:.3}  dense {:.3}{}",
            e.tokens,
            e.fvu,
            e.fvu_batchtopk,
            e.mse,
            e.l0_core,
            e.l0_noncore,
            e.l0_total,
            e.dead_fraction,
            e.dense_fraction,
            e.first_order_dloss.map_or(String::new(), |g| format!(
                "  first-order dloss {g:.4e}{}",
                e.mean_loss.map_or(String::new(), |l| format!(" (mean loss {l:.4})"))
            ))
        ),
        None => println!("eval: the store holds no held-out tokens"),
    }
    println!("wrote {}", a.out.display());
    Ok(ExitCode::SUCCESS)
}
