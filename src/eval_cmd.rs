//! `dmsae eval`: splice SAE reconstructions into the model on held-out text; thin wrapper over
//! `dmsae_trainer::eval`.

use anyhow::{bail, Result};
use clap::Args;
use dmsae_extractor::data::Packer;
use dmsae_extractor::tch::{Device, Kind, Tensor};
use dmsae_extractor::{Config, Model};
use dmsae_trainer::eval::{self, EvalSae, Evaluator, Options};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Instant;

#[derive(Args)]
pub struct EvalArgs {
    /// HF checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// An SAE export (cfg.json + sae_weights.safetensors, e.g. a `dmsae train` run directory)
    /// or a directory of exports one level down (a sweep): all are evaluated in one pass.
    #[arg(long)]
    sae: PathBuf,
    /// Held-out text, in any form `dmsae extract --data` takes.
    #[arg(long)]
    data: PathBuf,
    /// Tokens to evaluate, with K/M/B suffixes; rounded up to whole contexts.
    #[arg(long, value_parser = crate::cli::parse_count)]
    tokens: u64,
    /// Decoder layer to splice at [default: from the exports' metadata.hook_name].
    #[arg(long)]
    layer: Option<usize>,
    /// Tokens per context, BOS included.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Contexts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Model dtype: f32, bf16 or f16 [default: f32 on cpu, bf16 on cuda].
    #[arg(long)]
    dtype: Option<String>,
    /// Splice BOS positions too (by default they keep the clean residual).
    #[arg(long)]
    keep_bos: bool,
    /// Where eval.json, eval.md (and for a sweep the plot) go [default: --sae].
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(a: EvalArgs) -> Result<ExitCode> {
    if a.context < 2 || a.batch == 0 {
        bail!("--context must be at least 2 and --batch positive");
    }
    let device = crate::cli::device(&a.device)?;
    let kind = match a.dtype.as_deref() {
        None if device == Device::Cpu => Kind::Float,
        None => Kind::BFloat16,
        Some("f32" | "float32") => Kind::Float,
        Some("bf16" | "bfloat16") => Kind::BFloat16,
        Some("f16" | "float16") => Kind::Half,
        Some(d) => bail!("--dtype {d}: expected f32, bf16 or f16"),
    };
    // Cheap checks before the weights are read.
    let config = Config::load(&a.model)?;
    let saes = eval::discover(&a.sae)?
        .iter()
        .map(|d| EvalSae::load(d, device))
        .collect::<Result<Vec<_>, _>>()?;
    let layer = eval::resolve_layer(&saes, a.layer, config.num_hidden_layers)?;
    for s in &saes {
        if s.d_in != config.hidden_size {
            bail!(
                "{}: d_in {} does not match the model's d_model {} ({})",
                s.dir.join("sae_weights.safetensors").display(),
                s.d_in,
                config.hidden_size,
                a.model.display()
            );
        }
    }
    let mut packer = Packer::for_model(
        &a.model,
        config.bos_token_id,
        config.vocab_size,
        &a.data,
        a.context,
    )?;
    let bos = packer.bos();
    let model = Model::load(&a.model, device, kind)?;
    let contexts = a.tokens.div_ceil(a.context as u64);
    let opts = Options {
        layer,
        keep_bos: a.keep_bos,
        bos,
    };
    let mut ev = Evaluator::new(&model, &saes, opts)?;
    let stop = crate::cli::stop_on_signals();
    let t0 = Instant::now();
    let tty = unsafe { libc::isatty(2) } == 1;
    let mut last_print: Option<f64> = None;
    let mut done = 0u64;
    while done < contexts {
        if stop.load(Ordering::SeqCst) {
            eprintln!("\ndmsae: eval stopped by a signal after {done} contexts; nothing written");
            return Ok(ExitCode::from(3));
        }
        let mut ids: Vec<i64> = Vec::new();
        let mut n = 0;
        while n < a.batch as u64 && done + n < contexts {
            let Some(c) = packer.next_context()? else {
                bail!(
                    "{}: the data holds {} contexts of {} tokens, fewer than the {contexts} asked for (--tokens {}); nothing written",
                    a.data.display(),
                    done + n,
                    a.context,
                    a.tokens
                );
            };
            ids.extend(c.iter().map(|&x| x as i64));
            n += 1;
        }
        let t = Tensor::from_slice(&ids).view([n as i64, a.context as i64]);
        ev.add_batch(&t)?;
        done += n;
        let secs = t0.elapsed().as_secs_f64();
        let every = if tty { 0.5 } else { 10.0 };
        if last_print.is_none_or(|t| secs - t >= every) || done == contexts {
            last_print = Some(secs);
            let line = format!(
                "eval: {done}/{contexts} contexts, {:.0} tokens/s, {} SAE(s)",
                (done * a.context as u64) as f64 / secs.max(1e-9),
                saes.len()
            );
            if tty {
                eprint!("\r{line}   ");
            } else {
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
        }
    }
    if tty {
        eprintln!();
    }
    let canon = |p: &PathBuf| {
        std::fs::canonicalize(p)
            .unwrap_or(p.clone())
            .display()
            .to_string()
    };
    let settings = json!({
        "model": canon(&a.model),
        "sae": canon(&a.sae),
        "data": canon(&a.data),
        "tokens": a.tokens,
        "context": a.context,
        "batch": a.batch,
        "dtype": format!("{kind:?}"),
        "device": a.device,
        "producer": format!("dmsae {} eval", env!("CARGO_PKG_VERSION")),
    });
    let report = ev.finish(settings)?;
    let out = a.out.unwrap_or(a.sae);
    let written = eval::write_outputs(&out, &report)?;
    print!("{}", eval::markdown(&report));
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
