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
    /// Benchmark: after the sweep, train each model it trained again alone (in a scratch
    /// directory, removed after) and print both timings side by side, with their ratio.
    #[arg(long)]
    compare_separate: bool,
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
    // --compare-separate's scratch models (declared first: the specs borrow them).
    let scratch = a.out.join(".compare-separate");
    let alone_dirs: Vec<_> = (series.iter())
        .flat_map(|&s| ks.iter().map(move |&k| (s, k, sweep::model_dir_name(s, k))))
        .map(|(s, k, name)| (s, k, scratch.join(&name), name))
        .collect();
    let spec = |out, ks, series| SweepSpec {
        store: &a.shards,
        out,
        cfg: cfg.clone(),
        ks,
        series,
        core: core.clone(),
        random_from: random_from.clone(),
        device,
        stop,
    };
    let outcome = sweep::sweep(
        spec(&a.out, ks.clone(), series.clone()),
        crate::train_cmd::progress_line(quiet, "sweep: ".into(), |p, rate, eta| {
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
    if a.compare_separate {
        if outcome.trained.is_empty() {
            bail!("--compare-separate: every model in {} was already finished, so there is no sweep pass to time; use a new --out", a.out.display());
        }
        let mut alone = Vec::new();
        for (s, k, dir, name) in &alone_dirs {
            if !outcome.trained.contains(name) {
                continue;
            }
            let _ = std::fs::remove_dir_all(dir);
            if !quiet {
                eprintln!("compare-separate: training {name} alone");
            }
            let o = sweep::sweep(spec(dir, vec![*k], vec![*s]), |_| {})?;
            if o.interrupted {
                eprintln!(
                    "dmsae: interrupted during --compare-separate; the sweep itself is finished"
                );
                return Ok(ExitCode::from(3));
            }
            let file = |d: &std::path::Path| {
                std::fs::read(d.join(name).join(dmsae_trainer::export::WEIGHTS_FILE))
            };
            let same = file(&a.out)? == file(dir)?;
            alone.push((name.clone(), o.run_tokens, o.seconds, same));
        }
        std::fs::remove_dir_all(&scratch)?;
        print!(
            "{}",
            compare_table(outcome.run_tokens, outcome.seconds, &alone)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The sweep's one pass against each model trained alone: tokens/s per model, total seconds
/// and their ratio (training time only; evals and exports excluded on both sides).
fn compare_table(tokens: u64, seconds: f64, alone: &[(String, u64, f64, bool)]) -> String {
    let rate = |t: u64, s: f64| t as f64 / s.max(1e-9);
    let n = alone.len();
    let mut md = format!(
        "\nbenchmark: one pass for {n} models against each trained alone (same store, config, seeds)\n| model | alone: s | alone: tokens/s | in the sweep: tokens/s per model | same weights |\n|---|---|---|---|---|\n"
    );
    for (name, t, s, same) in alone {
        md.push_str(&format!(
            "| {name} | {s:.1} | {:.0} | {:.0} | {} |\n",
            rate(*t, *s),
            rate(tokens, seconds),
            if *same { "yes, bit for bit" } else { "NO" }
        ));
    }
    let total: f64 = alone.iter().map(|a| a.2).sum();
    let read: u64 = alone.iter().map(|a| a.1).sum();
    md.push_str(&format!(
        "one pass {seconds:.1} s vs one at a time {total:.1} s: ratio {:.2} ({:.2}x the model-tokens/s); the store read for {tokens} tokens vs {read}\n",
        seconds / total.max(1e-9),
        total / seconds.max(1e-9)
    ));
    md
}
