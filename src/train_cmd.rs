//! `dmsae train`: a thin wrapper over `dmsae_trainer::train`.

use anyhow::Result;
use clap::Args;
use dmsae_trainer::train::RunOptions;
use dmsae_trainer::{train, TrainConfig};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Args)]
pub struct TrainArgs {
    /// Store directory (from `dmsae store import` or the extractor).
    #[arg(long)]
    shards: PathBuf,
    /// Dictionary size d_sae, core included (overrides the config file).
    #[arg(long)]
    width: Option<usize>,
    /// Mean non-core L0 of BatchTopK (overrides the config file).
    #[arg(long)]
    k: Option<usize>,
    /// Core to start from: safetensors with `W_enc` [d_in, c] and `b_enc` [c], model units.
    #[arg(long)]
    core: Option<PathBuf>,
    /// TOML file of TrainConfig keys; flags given here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run directory: metrics.jsonl, cfg.json, sae_weights.safetensors.
    #[arg(long)]
    out: PathBuf,
    /// Training steps (batches).
    #[arg(long, conflicts_with = "tokens")]
    steps: Option<u64>,
    /// Training tokens, with K/M/B suffixes (rounded up to whole batches).
    #[arg(long, value_parser = crate::cli::parse_count)]
    tokens: Option<u64>,
    /// Seed of the initialisation and of the stream order (overrides the config file).
    #[arg(long)]
    seed: Option<u64>,
    /// Tokens per batch.
    #[arg(long)]
    batch: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Continue from OUT/checkpoint.* when present (same config, store and core); otherwise start.
    #[arg(long)]
    resume: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: TrainArgs) -> Result<ExitCode> {
    let mut cfg = match &a.config {
        Some(p) => TrainConfig::load(p)?,
        None => TrainConfig::default(),
    };
    if let Some(v) = a.width {
        cfg.width = v;
    }
    if let Some(v) = a.k {
        cfg.k = v;
    }
    if let Some(v) = a.steps {
        (cfg.steps, cfg.tokens) = (v, None);
    }
    if a.tokens.is_some() {
        cfg.tokens = a.tokens;
    }
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.batch {
        cfg.batch_tokens = v;
    }
    let device = crate::cli::device(&a.device)?;
    let stop = crate::cli::stop_on_signals();
    let mut last = Instant::now();
    let mut err = std::io::stderr();
    let summary = train::train(
        &a.shards,
        &a.out,
        cfg,
        RunOptions {
            core: a.core.as_deref(),
            resume: a.resume,
            device,
            stop,
        },
        |p| {
            if a.quiet || (last.elapsed().as_secs_f64() < 0.5 && p.step != p.total_steps) {
                return;
            }
            last = Instant::now();
            let rate = p.run_tokens as f64 / p.elapsed_s.max(1e-9);
            let eta = p.elapsed_s / p.run_steps.max(1) as f64 * (p.total_steps - p.step) as f64;
            let _ = write!(
            err,
            "\rstep {}/{} ({:.0}%)  {:.0} tokens/s  loss {:.4}  FVU {:.4}  L0 {:.1}+{:.1}  ETA {:.0}s   ",
            p.step,
            p.total_steps,
            100.0 * p.step as f64 / p.total_steps as f64,
            rate,
            p.stats.loss,
            p.stats.fvu,
            p.stats.l0_core,
            p.stats.l0_noncore,
            eta
        );
        },
    )?;
    if !a.quiet {
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
