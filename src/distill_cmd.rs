//! `dmsae train-cycle`, `dmsae distill` and `dmsae report`: thin wrappers over
//! `dmsae_trainer::distill`.

use anyhow::{Context, Result};
use clap::Args;
use dmsae_trainer::distill::{self, CycleSummary};
use dmsae_trainer::train::Progress;
use dmsae_trainer::TrainConfig;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Flags shared by `train-cycle` and `distill`.
#[derive(Args)]
pub struct CycleFlags {
    /// Store directory with `acts` and `grads`.
    #[arg(long)]
    shards: PathBuf,
    /// TOML file of TrainConfig keys (attribution keys in a `[distill]` table); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Dictionary size d_sae, core included.
    #[arg(long)]
    width: Option<usize>,
    /// Mean non-core L0 of BatchTopK.
    #[arg(long)]
    k: Option<usize>,
    /// Training steps per cycle.
    #[arg(long, conflicts_with = "tokens")]
    steps: Option<u64>,
    /// Training tokens per cycle, with K/M/B suffixes.
    #[arg(long, value_parser = crate::cli::parse_count)]
    tokens: Option<u64>,
    /// Base seed; cycle N trains with seed + N.
    #[arg(long)]
    seed: Option<u64>,
    /// Tokens per batch.
    #[arg(long)]
    batch: Option<usize>,
    /// Fraction of the candidates' total score the selection keeps (distill.tau).
    #[arg(long)]
    tau: Option<f64>,
    /// Held-out tokens with gradients used for attribution, with K/M/B suffixes.
    #[arg(long, value_parser = crate::cli::parse_count)]
    attribution_tokens: Option<u64>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

impl CycleFlags {
    fn config(&self) -> Result<TrainConfig> {
        let mut cfg = match &self.config {
            Some(p) => TrainConfig::load(p)?,
            None => TrainConfig::default(),
        };
        let set = |dst: &mut usize, v: Option<usize>| {
            if let Some(v) = v {
                *dst = v
            }
        };
        set(&mut cfg.width, self.width);
        set(&mut cfg.k, self.k);
        set(&mut cfg.batch_tokens, self.batch);
        if let Some(v) = self.steps {
            (cfg.steps, cfg.tokens) = (v, None);
        }
        if self.tokens.is_some() {
            cfg.tokens = self.tokens;
        }
        if let Some(v) = self.seed {
            cfg.seed = v;
        }
        if let Some(v) = self.tau {
            cfg.distill.tau = v;
        }
        if let Some(v) = self.attribution_tokens {
            cfg.distill.attribution_tokens = v;
        }
        Ok(cfg)
    }

    fn progress(&self, label: String) -> impl FnMut(&Progress) + '_ {
        let mut last = Instant::now();
        move |p| {
            if self.quiet || (last.elapsed().as_secs_f64() < 0.5 && p.step != p.total_steps) {
                return;
            }
            last = Instant::now();
            let rate = p.run_tokens as f64 / p.elapsed_s.max(1e-9);
            let _ = write!(
                std::io::stderr(),
                "\r{label}step {}/{}  {:.0} tokens/s  FVU {:.4}  L0 {:.1}+{:.1}   ",
                p.step,
                p.total_steps,
                rate,
                p.stats.fvu,
                p.stats.l0_core,
                p.stats.l0_noncore
            );
        }
    }
}

fn print_cycle(s: &CycleSummary, quiet: bool) {
    if !quiet {
        eprintln!();
    }
    let e = &s.eval;
    println!(
        "cycle {}: core {} -> {} (Jaccard {}), {} attribution tokens, FVU {:.4}, L0 {:.2} core + {:.2} non-core, first-order dloss {}",
        s.cycle,
        s.core_in.len(),
        s.core_size,
        s.jaccard_prev.map_or("-".into(), |j| format!("{j:.3}")),
        s.attribution_tokens,
        e["fvu"].as_f64().unwrap_or(f64::NAN),
        e["l0_core"].as_f64().unwrap_or(f64::NAN),
        e["l0_noncore"].as_f64().unwrap_or(f64::NAN),
        e["first_order_dloss"].as_f64().map_or("-".into(), |g| format!("{g:.4e}")),
    );
}

#[derive(Args)]
pub struct TrainCycleArgs {
    #[command(flatten)]
    flags: CycleFlags,
    /// The previous cycle's directory (its core.safetensors and cycle.json); none for cycle 0.
    #[arg(long)]
    core: Option<PathBuf>,
    /// Cycle directory: the SAE export, attribution.csv, core.safetensors, cycle.json.
    #[arg(long)]
    out: PathBuf,
}

pub fn train_cycle(a: TrainCycleArgs) -> Result<ExitCode> {
    let cfg = a.flags.config()?;
    let device = crate::cli::device(&a.flags.device)?;
    let stop = crate::cli::stop_on_signals();
    let s = distill::train_cycle(
        &a.flags.shards,
        &a.out,
        &cfg,
        a.core.as_deref(),
        device,
        stop,
        a.flags.progress(String::new()),
    )?;
    let Some(s) = s else {
        eprintln!(
            "\ndmsae: interrupted; checkpoint in {} (rerun to resume)",
            a.out.display()
        );
        return Ok(ExitCode::from(3));
    };
    print_cycle(&s, a.flags.quiet);
    println!("wrote {}", a.out.display());
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct DistillArgs {
    #[command(flatten)]
    flags: CycleFlags,
    /// Number of cycles.
    #[arg(long, default_value_t = 7)]
    cycles: u64,
    /// The distilled core: lineages selected in at least this many cycles (distill.min_selected).
    #[arg(long)]
    min_selected: Option<u32>,
    /// Run directory: cycle-N/, distilled/core.safetensors, summary.json, summary.md.
    #[arg(long)]
    out: PathBuf,
}

pub fn distill(a: DistillArgs) -> Result<ExitCode> {
    let mut cfg = a.flags.config()?;
    if let Some(r) = a.min_selected {
        cfg.distill.min_selected = r;
    }
    let device = crate::cli::device(&a.flags.device)?;
    let stop = crate::cli::stop_on_signals();
    let quiet = a.flags.quiet;
    let mut progress: Vec<_> = (0..a.cycles)
        .map(|n| a.flags.progress(format!("cycle {n}: ")))
        .collect();
    let summary = distill::distill(
        &a.flags.shards,
        &a.out,
        &cfg,
        a.cycles,
        device,
        stop,
        |s| print_cycle(s, quiet),
        |n, p| progress[n as usize](p),
    )?;
    let Some(summary) = summary else {
        eprintln!("\ndmsae: interrupted; rerun the same command to resume");
        return Ok(ExitCode::from(3));
    };
    let d = &summary["distilled"];
    println!(
        "distilled core: {} lineages selected in at least {} of {} cycles{}",
        d["size"],
        d["min_selected"],
        a.cycles,
        d["core_file"]
            .as_str()
            .map_or(String::new(), |f| format!(", {f}"))
    );
    println!("wrote {}", a.out.display());
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ReportArgs {
    /// A `dmsae distill` run directory.
    run: PathBuf,
}

pub fn report(a: ReportArgs) -> Result<ExitCode> {
    let path = a.run.join(distill::SUMMARY_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
    let s: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{}", path.display()))?;
    print!("{}", distill::markdown(&s));
    Ok(ExitCode::SUCCESS)
}
