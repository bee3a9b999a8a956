//! `dmsae extract`: run a checkpoint over text and write layer-L activations, loss gradients,
//! token ids, losses and positions into a store.

use anyhow::{bail, Context, Result};
use clap::Args;
use dmsae_extractor::data::Packer;
use dmsae_extractor::extract::{self, Options, Outcome, Progress};
use dmsae_extractor::tch::{Device, Kind};
use dmsae_extractor::{Config, Model};
use dmsae_store::{Manifest, StoreWriter, WriterOptions};
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
pub struct ExtractArgs {
    /// TOML file with any of the keys below (snake_case: model, data, tokens, layer, out,
    /// context, batch, device, dtype, workers, keep_bos, grad_every, shard_tokens,
    /// chunk_tokens, ce_chunk); flags given here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// HF checkpoint directory: config.json, model.safetensors (or sharded with
    /// model.safetensors.index.json), tokenizer.json.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Text: a .jsonl file (one object with `text` per line), a parquet file (`text` or
    /// pre-tokenized `input_ids` column), a plain-text file (one document, read in ~1 MiB
    /// pieces cut after blank lines), a directory (its .jsonl, .txt and .parquet files), or a
    /// glob such as 'data/part-*.parquet' (sorted path order).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Tokens to run through the model, all workers together, with K/M/B suffixes (500M);
    /// rounded up to whole contexts.
    #[arg(long, value_parser = crate::cli::parse_count)]
    tokens: Option<u64>,
    /// Decoder layer whose output is stored, 0-indexed, before the final norm (HF hidden_states[L+1] for L < N-1).
    #[arg(long)]
    layer: Option<usize>,
    /// Output store directory (created; an earlier run of the same command is resumed).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Tokens per context, BOS included [default: 1024].
    #[arg(long)]
    context: Option<usize>,
    /// Contexts per forward pass [default: 8].
    #[arg(long)]
    batch: Option<usize>,
    /// cpu, cuda or cuda:N [default: cpu].
    #[arg(long)]
    device: Option<String>,
    /// Model and stored dtype: f32, bf16 or f16 [default: f32 on cpu, bf16 on cuda].
    #[arg(long)]
    dtype: Option<String>,
    /// Number of workers splitting the contexts, e.g. the SLURM array size [default: 1].
    #[arg(long)]
    workers: Option<u64>,
    /// This worker's index, 0-based; it takes contexts with id % workers == worker [default: 0].
    #[arg(long)]
    worker: Option<u64>,
    /// Store BOS positions too (left out by default); `--keep-bos=false` overrides a config
    /// file's `keep_bos = true`.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    keep_bos: Option<bool>,
    /// Compute gradients only for contexts with id % K == 0 (flags bit 0 says which rows
    /// have them; other rows hold zeros); 0: no gradients at all [default: 1].
    #[arg(long)]
    grad_every: Option<u64>,
    /// Rows per store shard [default: 262144].
    #[arg(long)]
    shard_tokens: Option<u64>,
    /// Rows per store chunk, the unit of random access and checksums [default: 1024].
    #[arg(long)]
    chunk_tokens: Option<usize>,
    /// Positions per cross-entropy chunk, whose logits exist at once (rounded down to a
    /// multiple of 128 above 128) [default: as many as hold 2^26 logits on cpu, 2^30 on cuda
    /// (4,096 positions, 2 GiB in bf16, at Gemma's 256k vocabulary); fewer save memory].
    #[arg(long)]
    ce_chunk: Option<usize>,
}

/// The `--config` file: the flags' names in snake_case, all optional.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    model: Option<PathBuf>,
    data: Option<PathBuf>,
    tokens: Option<toml::Value>,
    layer: Option<usize>,
    out: Option<PathBuf>,
    context: Option<usize>,
    batch: Option<usize>,
    device: Option<String>,
    dtype: Option<String>,
    workers: Option<u64>,
    worker: Option<u64>,
    keep_bos: Option<bool>,
    grad_every: Option<u64>,
    shard_tokens: Option<u64>,
    chunk_tokens: Option<usize>,
    ce_chunk: Option<usize>,
}

/// Flags over the config file over defaults.
struct Resolved {
    model: PathBuf,
    data: PathBuf,
    tokens: u64,
    layer: usize,
    out: PathBuf,
    context: usize,
    batch: usize,
    device: String,
    dtype: Option<String>,
    workers: u64,
    worker: u64,
    keep_bos: bool,
    grad_every: u64,
    shard_tokens: u64,
    chunk_tokens: usize,
    ce_chunk: Option<usize>,
}

fn resolve(a: ExtractArgs) -> Result<Resolved> {
    let f: FileConfig = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
            toml::from_str(&text).map_err(|e| {
                anyhow::anyhow!("{}: {}", p.display(), e.to_string().replace('\n', " "))
            })?
        }
        None => FileConfig::default(),
    };
    let need = |name: &str| anyhow::anyhow!("--{name} is required (as a flag or in --config)");
    let tokens = match (a.tokens, f.tokens) {
        (Some(n), _) => Some(n),
        (None, Some(toml::Value::Integer(n))) if n > 0 => Some(n as u64),
        (None, Some(toml::Value::String(s))) => {
            Some(crate::cli::parse_count(&s).map_err(|e| anyhow::anyhow!("tokens: {e}"))?)
        }
        (None, Some(v)) => bail!("tokens = {v}: expected a positive count like 500000 or \"500M\""),
        (None, None) => None,
    };
    Ok(Resolved {
        model: a.model.or(f.model).ok_or_else(|| need("model"))?,
        data: a.data.or(f.data).ok_or_else(|| need("data"))?,
        tokens: tokens.ok_or_else(|| need("tokens"))?,
        layer: a.layer.or(f.layer).ok_or_else(|| need("layer"))?,
        out: a.out.or(f.out).ok_or_else(|| need("out"))?,
        context: a.context.or(f.context).unwrap_or(1024),
        batch: a.batch.or(f.batch).unwrap_or(8),
        device: a.device.or(f.device).unwrap_or_else(|| "cpu".into()),
        dtype: a.dtype.or(f.dtype),
        workers: a.workers.or(f.workers).unwrap_or(1),
        worker: a.worker.or(f.worker).unwrap_or(0),
        keep_bos: a.keep_bos.or(f.keep_bos).unwrap_or(false),
        grad_every: a.grad_every.or(f.grad_every).unwrap_or(1),
        shard_tokens: a.shard_tokens.or(f.shard_tokens).unwrap_or(1 << 18),
        chunk_tokens: a.chunk_tokens.or(f.chunk_tokens).unwrap_or(1024),
        ce_chunk: a.ce_chunk.or(f.ce_chunk),
    })
}

fn parse_kind(s: &str) -> Result<Kind> {
    match s {
        "f32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" => Ok(Kind::Half),
        _ => bail!("--dtype {s}: expected f32, bf16 or f16"),
    }
}

fn hash_file(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p).with_context(|| p.display().to_string())?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// BLAKE3 over the checkpoint's `*.safetensors` files (name, then bytes), in name order.
fn hash_weights(dir: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| dir.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let mut h = blake3::Hasher::new();
    for p in files {
        h.update(p.file_name().unwrap().as_encoded_bytes());
        let mut f = std::fs::File::open(&p).with_context(|| p.display().to_string())?;
        std::io::copy(&mut f, &mut h).with_context(|| p.display().to_string())?;
    }
    Ok(h.finalize().to_hex().to_string())
}

fn human(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2}B", n / 1e9),
        n if n >= 1e6 => format!("{:.2}M", n / 1e6),
        n if n >= 1e3 => format!("{:.1}K", n / 1e3),
        n => format!("{n:.0}"),
    }
}

pub fn run(a: ExtractArgs) -> Result<ExitCode> {
    let a = resolve(a)?;
    if a.context < 2 {
        bail!(
            "--context {}: a context holds BOS and at least one more token",
            a.context
        );
    }
    if a.batch == 0 || a.workers == 0 || a.worker >= a.workers {
        bail!(
            "--batch must be positive and --worker ({}) below --workers ({})",
            a.worker,
            a.workers
        );
    }
    let device = crate::cli::device(&a.device)?;
    let kind = match &a.dtype {
        Some(d) => parse_kind(d)?,
        None if device == Device::Cpu => Kind::Float,
        None => Kind::BFloat16,
    };
    // Everything that can be refused is checked before the store is touched, cheap checks
    // before the weights are read.
    let config = Config::load(&a.model)?;
    if a.layer >= config.num_hidden_layers {
        bail!(
            "--layer {}: {} has {} layers (0..={})",
            a.layer,
            a.model.display(),
            config.num_hidden_layers,
            config.num_hidden_layers - 1
        );
    }
    let mut packer = Packer::for_model(
        &a.model,
        config.bos_token_id,
        config.vocab_size,
        &a.data,
        a.context,
    )?;
    let bos = packer.bos();
    let tokenizer_blake3 = hash_file(&packer.tokenizer().path)?;
    let mut model = Model::load(&a.model, device, kind)?;
    if let Some(rows) = a.ce_chunk {
        if rows == 0 {
            bail!("--ce-chunk 0: a cross-entropy chunk holds at least one position");
        }
        model.set_ce_chunk_elems(rows * config.vocab_size);
    }
    let contexts = a.tokens.div_ceil(a.context as u64);

    let model_dir = std::fs::canonicalize(&a.model).unwrap_or(a.model.clone());
    let config_json: Value =
        serde_json::from_str(&std::fs::read_to_string(a.model.join("config.json"))?)?;
    let run_params = json!({
        "model": model_dir.display().to_string(),
        "config_blake3": hash_file(&a.model.join("config.json"))?,
        "weights_blake3": hash_weights(&a.model)?,
        "tokenizer_blake3": tokenizer_blake3,
        "data": std::fs::canonicalize(&a.data).unwrap_or(a.data.clone()).display().to_string(),
        "packing": extract::PACKING_VERSION,
        "layer": a.layer,
        "context": a.context,
        "batch": a.batch,
        "tokens": a.tokens,
        "dtype": format!("{kind:?}"),
        "keep_bos": a.keep_bos,
        "grad_every": a.grad_every,
        "workers": a.workers,
    });
    let writer_name = format!("w{:04}", a.worker);
    if Manifest::path(&a.out).exists() {
        let m = Manifest::load(&a.out)?;
        match m.provenance.get("extract") {
            Some(old) if *old == run_params => {}
            Some(old) => {
                let diff: Vec<String> = run_params
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter(|(k, v)| old.get(k.as_str()) != Some(*v))
                    .map(|(k, v)| {
                        format!("{k} {} -> {v}", old.get(k.as_str()).unwrap_or(&Value::Null))
                    })
                    .collect();
                bail!(
                    "{}: written by a different extraction ({}); use a new --out",
                    a.out.display(),
                    diff.join(", ")
                )
            }
            None => bail!("{}: not a store written by dmsae extract", a.out.display()),
        }
    }
    let mut provenance = serde_json::Map::new();
    provenance.insert(
        "producer".into(),
        format!("dmsae {} extract", env!("CARGO_PKG_VERSION")).into(),
    );
    provenance.insert("extract".into(), run_params);
    provenance.insert("model_config".into(), config_json);
    provenance.insert(
        "hook".into(),
        format!(
            "blocks.{}.hook_resid_post (output of decoder layer {0} before the final norm; equal to HF hidden_states[{}] for L < N-1)",
            a.layer,
            a.layer + 1
        )
        .into(),
    );
    provenance.insert("gradient".into(), extract::GRADIENT_DEFINITION.into());
    provenance.insert(
        "packing".into(),
        "documents tokenized without special tokens, joined into one stream with BOS between documents; \
         each context is BOS + the next context-1 stream tokens (a document that opens a context has only that BOS); a tail shorter than a context is unused; \
         context id = index in data order, worker i of n takes ids with id % n == i"
            .into(),
    );
    provenance.insert(
        "rows".into(),
        format!(
            "context order, positions ascending; BOS positions {}; loss NaN at the last position (no target)",
            if a.keep_bos { "kept" } else { "left out" }
        )
        .into(),
    );
    let opts = WriterOptions {
        chunk_tokens: a.chunk_tokens,
        shard_tokens: a.shard_tokens,
        writer: writer_name,
        provenance,
        ..Default::default()
    };
    let dtype = extract::store_dtype(kind)?;
    let mut writer = StoreWriter::create(&a.out, extract::arrays(model.d_model(), dtype), opts)?;
    // The files on disk, not the manifest, say where this worker stopped (see StoreWriter).
    let skip_rows = writer.resumed_rows();
    if !writer.adopted().is_empty() {
        eprintln!(
            "{}: added {} to the manifest (committed before a kill, not yet listed)",
            a.out.display(),
            writer.adopted().join(", ")
        );
    }

    let o = Options {
        layer: a.layer,
        context: a.context,
        batch: a.batch,
        contexts,
        keep_bos: a.keep_bos,
        grad_every: a.grad_every,
        workers: a.workers,
        worker: a.worker,
        skip_rows,
    };
    let stop = crate::cli::stop_on_signals();
    let tty = unsafe { libc::isatty(2) } == 1;
    let mut last_print: Option<f64> = None;
    let mut last = Progress::default();
    let mut show = |p: &Progress| {
        last = p.clone();
        let done = p.contexts >= p.contexts_total;
        if !done && last_print.is_some_and(|t| p.seconds - t < if tty { 0.5 } else { 10.0 }) {
            return;
        }
        last_print = Some(p.seconds);
        let rate = p.tokens_computed as f64 / p.seconds.max(1e-9);
        let left = (p.contexts_total - p.contexts.min(p.contexts_total)) as f64 * o.context as f64;
        let eta = if rate > 0.0 {
            format!("{:.0}s", left / rate)
        } else {
            "?".into()
        };
        let pct = 100.0 * p.contexts as f64 / p.contexts_total.max(1) as f64;
        let line = format!(
            "extract: {pct:5.1}% {}/{} contexts, {} tokens/s, ETA {eta}",
            p.contexts,
            p.contexts_total,
            human(rate)
        );
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
        let _ = std::io::stderr().flush();
    };
    let outcome = extract::run(&model, &mut packer, &mut writer, &o, bos, stop, &mut show);
    if tty {
        eprintln!();
    }
    // Commit what was computed, also after an error in a later batch: no batch is half written.
    let shards = writer.finish()?;
    let outcome = outcome.map_err(|e| memory_hint(e.into(), a.batch))?;
    let rows: u64 = shards.iter().map(|s| s.tokens).sum();
    let secs = last.seconds.max(1e-9);
    println!(
        "{}: worker {} of {}: {} contexts, {rows} rows written this run (layer {}, {}), {} tokens/s over {secs:.2}s (model {:.2}s, waiting for the store writer {:.2}s){}",
        a.out.display(),
        a.worker,
        a.workers,
        last.contexts,
        a.layer,
        if skip_rows > 0 { format!("resumed after {skip_rows} rows") } else { "fresh".into() },
        human(last.tokens_computed as f64 / secs),
        last.model_seconds,
        last.writer_wait_seconds,
        last.rate_after_first()
            .map_or(String::new(), |r| format!("; {} tokens/s after the first batch", human(r)))
    );
    match outcome {
        Outcome::Done => Ok(ExitCode::SUCCESS),
        Outcome::DataExhausted { contexts_in_data } => bail!(
            "{}: the data holds {contexts_in_data} contexts of {} tokens, fewer than the {contexts} asked for (--tokens {}); kept what was written",
            a.data.display(),
            a.context,
            a.tokens
        ),
        Outcome::Stopped => {
            eprintln!("dmsae: stopped by a signal; run the same command again to continue");
            Ok(ExitCode::from(3))
        }
    }
}

/// An out-of-memory error, with what gives the device's memory back in front of it.
fn memory_hint(e: anyhow::Error, batch: usize) -> anyhow::Error {
    let msg = format!("{e:#}");
    // CUDA's caching allocator says the first, torch's CPU allocator the second.
    match msg.contains("out of memory") || msg.contains("can't allocate memory") {
        true => e.context(format!(
            "out of device memory at --batch {batch} (what was written is kept): a smaller \
             --batch, --ce-chunk 1024, or DMSAE_TRANSPOSED_BACKWARD=0 DMSAE_TRANSPOSED_HEAD=0 \
             (the transposed weights, 3.2 GB at Gemma-2-2B layer 12) take less"
        )),
        false => e,
    }
}

#[cfg(test)]
mod tests {
    use super::memory_hint;
    use dmsae_extractor::tch;

    #[test]
    fn an_allocation_failure_says_what_takes_less_memory() {
        let oom = tch::Tensor::f_empty([1i64 << 60], (tch::Kind::Float, tch::Device::Cpu))
            .map(|_| ())
            .map_err(dmsae_extractor::Error::from)
            .unwrap_err();
        let msg = format!("{:#}", memory_hint(oom.into(), 8));
        assert!(
            msg.starts_with("out of device memory at --batch 8"),
            "{msg}"
        );
        assert!(msg.contains("--ce-chunk 1024"), "{msg}");
        // What main prints: libtorch's C++ frames cut off, one line.
        let line = crate::one_line(&msg);
        assert!(msg.contains("\nframe #") && !line.contains('\n'), "{line}");
        assert!(line.ends_with("(Cannot allocate memory)"), "{line}");
        let other = anyhow::anyhow!("data.jsonl: line 3: not valid JSON");
        assert_eq!(
            format!("{:#}", memory_hint(other, 8)),
            "data.jsonl: line 3: not valid JSON"
        );
    }
}
