//! `dmsae train-cycle`, `dmsae distill` and `dmsae report`: thin wrappers over
//! `dmsae_trainer::distill`.

use crate::train_cmd::TrainFlags;
use anyhow::{Context, Result};
use clap::Args;
use dmsae_trainer::distill::{self, CycleSummary};
use dmsae_trainer::TrainConfig;
use std::path::PathBuf;
use std::process::ExitCode;

/// Flags shared by `train-cycle` and `distill`.
#[derive(Args)]
pub struct CycleFlags {
    /// Store directory with `acts` and `grads`.
    #[arg(long)]
    shards: PathBuf,
    #[command(flatten)]
    train: TrainFlags,
    /// Fraction of the candidates' total score the selection keeps (distill.tau).
    #[arg(long)]
    tau: Option<f64>,
    /// Training-split tokens with gradients used for attribution, with K/M/B suffixes.
    #[arg(long, value_parser = crate::cli::parse_count)]
    attribution_tokens: Option<u64>,
}

impl CycleFlags {
    fn config(&self) -> Result<TrainConfig> {
        let mut cfg = self.train.config()?;
        cfg.distill.tau = self.tau.unwrap_or(cfg.distill.tau);
        cfg.distill.attribution_tokens = self
            .attribution_tokens
            .unwrap_or(cfg.distill.attribution_tokens);
        Ok(cfg)
    }
}

fn print_cycle(s: &CycleSummary, quiet: bool) {
    if !quiet {
        eprintln!();
    }
    let e = &s.eval;
    println!(
        "cycle {}: core {} -> {} (Jaccard {}), {} attribution tokens{}, FVU {:.4}, L0 {:.2} core + {:.2} non-core, first-order dloss {}",
        s.cycle,
        s.core_in.len(),
        s.core_size,
        s.jaccard_prev.map_or("-".into(), |j| format!("{j:.3}")),
        s.attribution_tokens,
        match s.attribution_tokens_per_s {
            r if r > 0.0 => format!(" ({r:.0} tokens/s)"),
            _ => String::new(),
        },
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
    let device = crate::cli::device(&a.flags.train.device)?;
    let stop = crate::cli::stop_on_signals();
    let s = distill::train_cycle(
        &a.flags.shards,
        &a.out,
        &cfg,
        a.core.as_deref(),
        device,
        stop,
        a.flags.train.progress(String::new()),
    )?;
    let Some(s) = s else {
        eprintln!(
            "\ndmsae: interrupted; checkpoint in {} (rerun to resume)",
            a.out.display()
        );
        return Ok(ExitCode::from(3));
    };
    print_cycle(&s, a.flags.train.quiet);
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
    let device = crate::cli::device(&a.flags.train.device)?;
    let stop = crate::cli::stop_on_signals();
    let quiet = a.flags.train.quiet;
    let mut progress: Vec<_> = (0..a.cycles)
        .map(|n| a.flags.train.progress(format!("cycle {n}: ")))
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
    /// A `dmsae distill` run directory (writes RUN/plots/), a `dmsae sweep` directory, or a
    /// `dmsae eval --out` directory.
    run: PathBuf,
}

pub fn report(a: ReportArgs) -> Result<ExitCode> {
    let sweep_file = a.run.join(dmsae_trainer::sweep::SWEEP_FILE);
    if sweep_file.exists() {
        let bytes =
            std::fs::read(&sweep_file).with_context(|| format!("{}", sweep_file.display()))?;
        let s: serde_json::Value =
            serde_json::from_slice(&bytes).with_context(|| format!("{}", sweep_file.display()))?;
        print!("{}", dmsae_trainer::sweep::markdown(&s));
        dmsae_trainer::sweep::plots(&a.run, &s)?;
        if let Some(md) = dmsae_trainer::eval::report_section(&a.run)? {
            print!("\n{md}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let path = a.run.join(distill::SUMMARY_FILE);
    if !path.exists() {
        if let Some(md) = dmsae_trainer::eval::report_section(&a.run)? {
            print!("{md}");
            return Ok(ExitCode::SUCCESS);
        }
    }
    let bytes = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
    let s: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{}", path.display()))?;
    print!("{}", distill::markdown(&s));
    // Plots follow the summary, so a run from before they existed gets them too.
    distill::plots(&a.run, &s)?;
    if let Some(md) = dmsae_trainer::eval::report_section(&a.run)? {
        print!("\n{md}");
    }
    Ok(ExitCode::SUCCESS)
}
