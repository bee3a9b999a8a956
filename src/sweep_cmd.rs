//! `dmsae sweep`: a thin wrapper over `dmsae_trainer::sweep`.

use crate::train_cmd::ModelFlags;
use anyhow::{bail, Result};
use clap::Args;
use dmsae_trainer::distill::{cycle_dir, CORE_FILE, DISTILLED_DIR};
use dmsae_trainer::sweep::{self, Series, SweepSpec};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct SweepArgs {
    /// Store directory (the one the distillation ran on, or another of the same layer).
    #[arg(long)]
    shards: PathBuf,
    /// A `dmsae distill` run: its distilled/core.safetensors, and cycle-0/ for the random core.
    #[arg(long)]
    distill_run: Option<PathBuf>,
    /// A core file, or a directory holding core.safetensors (instead of the run's distilled
    /// core); without --distill-run there is no random-core series.
    #[arg(long)]
    core: Option<PathBuf>,
    /// The k values (mean non-core L0), comma-separated: one model per series and k.
    #[arg(long)]
    k: String,
    /// Series to train, comma-separated: distilled-core, baseline, random-core (default: all
    /// that the inputs allow: no core, baseline only). Split across invocations into the same --out when the models do
    /// not fit in memory together.
    #[arg(long, value_delimiter = ',')]
    series: Vec<String>,
    /// Flags shared by every model (width, steps, seed, ...).
    #[command(flatten)]
    model: ModelFlags,
    /// Sweep directory: <series>-k<k>/ exports, sweep.json, sweep.md, plots/.
    #[arg(long)]
    out: PathBuf,
}

/// `16,32,64` -> [16, 32, 64]; every entry a positive integer.
fn parse_ks(s: &str) -> Result<Vec<usize>> {
    let ks: Option<Vec<usize>> = s
        .split(',')
        .map(|v| v.trim().parse().ok().filter(|&k| k > 0))
        .collect();
    match ks {
        Some(ks) if !ks.is_empty() => Ok(ks),
        _ => bail!("--k {s:?}: expected positive integers separated by commas, like 16,32,64"),
    }
}

pub fn run(a: SweepArgs) -> Result<ExitCode> {
    let ks = parse_ks(&a.k)?;
    let cfg = a.model.config()?;
    let core = a.core.as_deref().map(crate::cli::core_file).or_else(|| {
        a.distill_run
            .as_ref()
            .map(|r| r.join(DISTILLED_DIR).join(CORE_FILE))
    });
    let random_from = a.distill_run.as_ref().map(|r| cycle_dir(r, 0));
    let series = if a.series.is_empty() {
        Series::ALL
            .into_iter()
            .filter(|s| match s {
                Series::DistilledCore => core.is_some(),
                Series::Baseline => true,
                Series::RandomCore => random_from.is_some(),
            })
            .collect()
    } else {
        let mut v = Vec::new();
        for s in &a.series {
            match Series::parse(s) {
                Some(s) if !v.contains(&s) => v.push(s),
                Some(_) => {}
                None => bail!("--series {s}: expected distilled-core, baseline or random-core"),
            }
        }
        v
    };
    let device = crate::cli::device(&a.model.device)?;
    let stop = crate::cli::stop_on_signals();
    let n_models = series.len() * ks.len();
    let quiet = a.model.quiet;
    let outcome = sweep::sweep(
        SweepSpec {
            store: &a.shards,
            out: &a.out,
            cfg,
            ks,
            series,
            core,
            random_from,
            device,
            stop,
        },
        crate::train_cmd::progress_line(quiet, |p, rate, eta| {
            format!(
                "sweep: step {}/{} ({:.0}%)  {:.0} tokens/s (each read once, up to {n_models} models)  ETA {:.0}s",
                p.step,
                p.total_steps,
                100.0 * p.step as f64 / p.total_steps as f64,
                rate,
                eta
            )
        }),
    )?;
    if !quiet && !outcome.trained.is_empty() || outcome.interrupted {
        eprintln!();
    }
    if outcome.interrupted {
        eprintln!(
            "dmsae: interrupted; checkpoints in {}/*/ (rerun the same command to resume)",
            a.out.display()
        );
        return Ok(ExitCode::from(3));
    }
    if !outcome.skipped.is_empty() {
        println!("already finished, skipped: {}", outcome.skipped.join(", "));
    }
    if !outcome.trained.is_empty() {
        println!("trained in one pass: {}", outcome.trained.join(", "));
        println!(
            "{} tokens in {:.1} s ({:.0} tokens/s, each read once for {} models)",
            outcome.run_tokens,
            outcome.seconds,
            outcome.run_tokens as f64 / outcome.seconds.max(1e-9),
            outcome.trained.len()
        );
    }
    if let Some(s) = &outcome.summary {
        print!("{}", sweep::markdown(s));
    }
    println!("wrote {}", a.out.display());
    Ok(ExitCode::SUCCESS)
}
