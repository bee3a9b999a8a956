//! `dmsae store ...`: thin wrappers over `dmsae_store`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use dmsae_store::{codec, npy, ArraySpec, Codec, DType, Store, StoreWriter, WriterOptions};
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Subcommand)]
pub enum StoreCmd {
    /// Summarise a store: arrays, tokens, shards, sizes, provenance.
    Inspect { dir: PathBuf },
    /// Check every checksum and every manifest/footer cross-check; lists all problems (exit 1).
    Verify { dir: PathBuf },
    /// Print the streaming statistics (norms, per-dimension mean and variance).
    Stats {
        dir: PathBuf,
        /// Print the manifest's stats object as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild manifest.json from the shard files (after several writers, or a lost manifest).
    Finalize { dir: PathBuf },
    /// Write a store from .npy arrays (bf16 as uint16 bit patterns).
    Import(ImportArgs),
    /// Write a store's arrays back as .npy files (`<name>.npy`; bf16 as uint16 bit patterns).
    Export {
        dir: PathBuf,
        #[arg(long)]
        out_dir: PathBuf,
        /// Comma-separated array names (default: all).
        #[arg(long, value_delimiter = ',')]
        arrays: Vec<String>,
    },
    /// Measure codec ratio and encode/decode speed on real activations (prints figures).
    Bench(BenchArgs),
}

#[derive(Args)]
pub struct ImportArgs {
    /// Activations [tokens, d_model].
    #[arg(long)]
    acts: PathBuf,
    /// Gradients, same shape and dtype as the activations.
    #[arg(long)]
    grads: Option<PathBuf>,
    /// Token ids [tokens], any integer type (stored as u32).
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Per-token loss [tokens], float32.
    #[arg(long)]
    loss: Option<PathBuf>,
    /// Element type of acts/grads: bf16 (.npy of uint16 bit patterns), f16 or f32.
    #[arg(long)]
    dtype: String,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1024)]
    chunk_tokens: usize,
    /// Tokens per shard, rounded up to whole chunks.
    #[arg(long, default_value_t = 1 << 18)]
    shard_tokens: u64,
    /// raw, bytesplit or expsplit (float arrays; integers use bytesplit unless raw).
    #[arg(long, default_value = "expsplit")]
    codec: String,
    /// zstd level.
    #[arg(long, default_value_t = 3)]
    level: i32,
    /// Shard name prefix; distinct per concurrent writer.
    #[arg(long, default_value = "w0000")]
    writer: String,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Directory with acts.npy and grads.npy (bf16 as uint16), e.g. ../shared/data/gemma3-270m-l9-licenses.
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 1024)]
    chunk_tokens: usize,
    #[arg(long, default_value_t = 3)]
    level: i32,
    /// Seconds to spend per timing (at least one pass).
    #[arg(long, default_value_t = 0.5)]
    seconds: f64,
}

pub fn run(cmd: StoreCmd) -> Result<ExitCode> {
    match cmd {
        StoreCmd::Inspect { dir } => inspect(&dir),
        StoreCmd::Verify { dir } => {
            let problems = dmsae_store::verify(&dir);
            for p in &problems {
                println!("{p}");
            }
            if problems.is_empty() {
                let s = Store::open(&dir)?;
                println!(
                    "ok: {} shards, {} chunks, {} tokens, every checksum verified",
                    s.shards.len(),
                    s.chunks().len(),
                    s.total_tokens()
                );
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("dmsae: {}: {} problem(s)", dir.display(), problems.len());
                Ok(ExitCode::from(1))
            }
        }
        StoreCmd::Stats { dir, json } => stats(&dir, json),
        StoreCmd::Finalize { dir } => {
            let m = dmsae_store::finalize(&dir)?;
            println!(
                "{}: manifest rebuilt from {} shards, {} tokens",
                dir.display(),
                m.shards.len(),
                m.total_tokens
            );
            Ok(ExitCode::SUCCESS)
        }
        StoreCmd::Import(a) => import(a),
        StoreCmd::Export {
            dir,
            out_dir,
            arrays,
        } => export(&dir, &out_dir, &arrays),
        StoreCmd::Bench(a) => bench(a),
    }
}

fn inspect(dir: &Path) -> Result<ExitCode> {
    let s = Store::open(dir)?;
    let m = &s.manifest;
    let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    let raw: u64 = m.arrays.iter().map(|a| a.row_bytes() as u64).sum::<u64>() * m.total_tokens;
    let mut o = std::io::stdout().lock();
    writeln!(o, "store        {}", dir.display())?;
    writeln!(o, "format       dmsae-store v{}", m.format_version)?;
    writeln!(
        o,
        "d_model      {}  dtype {}  codec {} (zstd level {})",
        m.d_model,
        m.dtype.name(),
        m.codec.name(),
        m.level
    )?;
    writeln!(
        o,
        "tokens       {}  in {} shards, {} chunks of {}",
        m.total_tokens,
        m.shards.len(),
        s.chunks().len(),
        m.chunk_tokens
    )?;
    writeln!(
        o,
        "size         {bytes} bytes on disk, {raw} raw ({:.3} of raw)",
        bytes as f64 / raw.max(1) as f64
    )?;
    writeln!(o, "arrays")?;
    for a in &m.arrays {
        writeln!(
            o,
            "  {:<10} {:<5} width {:<6} codec {}",
            a.name,
            a.dtype.name(),
            a.width,
            a.codec.name()
        )?;
    }
    writeln!(o, "provenance")?;
    for (k, v) in &m.provenance {
        let v = v.to_string();
        // (`str::floor_char_boundary` would need Rust 1.91; the MSRV is 1.89.)
        let cut = (0..=97).rev().find(|&i| v.is_char_boundary(i)).unwrap_or(0);
        let v = if v.len() > 100 {
            format!("{}...", &v[..cut])
        } else {
            v
        };
        writeln!(o, "  {k}: {v}")?;
    }
    writeln!(o, "shards")?;
    for sh in &m.shards {
        writeln!(
            o,
            "  {}  {} tokens  {} bytes  blake3 {}",
            sh.file,
            sh.tokens,
            sh.bytes,
            &sh.blake3[..16]
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn stats(dir: &Path, json: bool) -> Result<ExitCode> {
    let m = dmsae_store::Manifest::load(dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&m.stats)?);
        return Ok(ExitCode::SUCCESS);
    }
    for (name, s) in &m.stats {
        let w = s.mean.len() as f64;
        println!("{name}: {} rows", s.count);
        println!(
            "  mean norm {:.6e}   mean squared norm {:.6e}",
            s.mean_norm, s.mean_sq_norm
        );
        if s.mean_sq_norm > 0.0 {
            println!(
                "  scale to E||x||^2 = width: multiply by {:.6e}",
                (w / s.mean_sq_norm).sqrt()
            );
        }
        let mut dims: Vec<usize> = (0..s.mean.len()).collect();
        dims.sort_by(|&a, &b| {
            (s.mean[b].powi(2) + s.var[b]).total_cmp(&(s.mean[a].powi(2) + s.var[a]))
        });
        println!("  mean variance {:.6e}", s.var.iter().sum::<f64>() / w);
        let top: Vec<String> = dims
            .iter()
            .take(5)
            .map(|&d| format!("{d} (mean {:.3e}, var {:.3e})", s.mean[d], s.var[d]))
            .collect();
        println!("  largest dims: {}", top.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

fn npy_descr(d: DType) -> &'static str {
    match d {
        DType::Bf16 | DType::U16 => "<u2",
        DType::F16 => "<f2",
        DType::F32 => "<f4",
        DType::U8 => "|u1",
        DType::U32 => "<u4",
        DType::I32 => "<i4",
        DType::U64 => "<u8",
    }
}

/// Token ids of any integer .npy type, as u32 little-endian bytes.
fn tokens_u32(t: &npy::Npy, lo: usize, hi: usize) -> Result<Vec<u8>> {
    let s = t.item_size();
    let raw = &t.data()[lo * s..hi * s];
    let mut out = Vec::with_capacity(4 * (hi - lo));
    for (i, b) in raw.chunks_exact(s).enumerate() {
        let v: i128 = match t.descr.as_str() {
            "|u1" => b[0] as i128,
            "|i1" => b[0] as i8 as i128,
            "<u2" => u16::from_le_bytes([b[0], b[1]]) as i128,
            "<i2" => i16::from_le_bytes([b[0], b[1]]) as i128,
            "<u4" => u32::from_le_bytes(b.try_into()?) as i128,
            "<i4" => i32::from_le_bytes(b.try_into()?) as i128,
            "<u8" => u64::from_le_bytes(b.try_into()?) as i128,
            "<i8" => i64::from_le_bytes(b.try_into()?) as i128,
            d => bail!("{}: token ids must be integers, not {d}", t.path.display()),
        };
        let v = u32::try_from(v).map_err(|_| {
            anyhow::anyhow!(
                "{}: token id {v} at row {} is not a u32",
                t.path.display(),
                lo + i
            )
        })?;
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

fn import(a: ImportArgs) -> Result<ExitCode> {
    let dtype = DType::parse(&a.dtype)
        .filter(|d| d.is_float())
        .with_context(|| format!("--dtype {}: expected bf16, f16 or f32", a.dtype))?;
    let codec = Codec::parse(&a.codec)
        .with_context(|| format!("--codec {}: expected raw, bytesplit or expsplit", a.codec))?;
    let acts = npy::Npy::open(&a.acts)?;
    if acts.shape.len() != 2 {
        bail!(
            "{}: acts must be 2-D [tokens, d_model], got shape {:?}",
            a.acts.display(),
            acts.shape
        );
    }
    let (n, d) = (acts.shape[0], acts.shape[1]);
    if n == 0 {
        bail!("{}: no rows", a.acts.display());
    }
    let want = npy_descr(dtype);
    let check = |x: &npy::Npy, shape: &[usize], descr: &str| -> Result<()> {
        if x.shape != shape || x.descr != descr {
            bail!(
                "{}: expected {descr} of shape {shape:?}, got {} of shape {:?}",
                x.path.display(),
                x.descr,
                x.shape
            );
        }
        Ok(())
    };
    check(&acts, &[n, d], want)?;
    let int_codec = if codec == Codec::Raw {
        Codec::Raw
    } else {
        Codec::Bytesplit
    };
    let mut arrays = vec![ArraySpec::new("acts", dtype, d, codec)];
    let grads = a.grads.as_deref().map(npy::Npy::open).transpose()?;
    if let Some(g) = &grads {
        check(g, &[n, d], want)?;
        arrays.push(ArraySpec::new("grads", dtype, d, codec));
    }
    let tokens = a.tokens.as_deref().map(npy::Npy::open).transpose()?;
    if let Some(t) = &tokens {
        if t.shape != [n] {
            bail!(
                "{}: expected shape [{n}], got {:?}",
                t.path.display(),
                t.shape
            );
        }
        arrays.push(ArraySpec::new("tokens", DType::U32, 1, int_codec));
    }
    let loss = a.loss.as_deref().map(npy::Npy::open).transpose()?;
    if let Some(l) = &loss {
        check(l, &[n], "<f4")?;
        arrays.push(ArraySpec::new("loss", DType::F32, 1, int_codec));
    }
    let mut provenance = serde_json::Map::new();
    provenance.insert(
        "producer".into(),
        format!("dmsae {} store import", env!("CARGO_PKG_VERSION")).into(),
    );
    let inputs: serde_json::Map<_, _> = [
        ("acts", Some(&a.acts)),
        ("grads", a.grads.as_ref()),
        ("tokens", a.tokens.as_ref()),
        ("loss", a.loss.as_ref()),
    ]
    .into_iter()
    .filter_map(|(k, p)| {
        p.map(|p| {
            (
                k.to_string(),
                serde_json::Value::from(p.display().to_string()),
            )
        })
    })
    .collect();
    provenance.insert("inputs".into(), inputs.into());
    let opts = WriterOptions {
        chunk_tokens: a.chunk_tokens,
        shard_tokens: a.shard_tokens,
        level: a.level,
        writer: a.writer,
        provenance,
        ..Default::default()
    };
    let step = 1 << 16;
    // The loop below commits shards as it goes: refuse a bad token id before writing anything.
    if let Some(t) = &tokens {
        for lo in (0..n).step_by(step) {
            tokens_u32(t, lo, (lo + step).min(n))?;
        }
    }
    let mut w = StoreWriter::create(&a.out, arrays, opts)?;
    for lo in (0..n).step_by(step) {
        let hi = (lo + step).min(n);
        let rb = d * dtype.size();
        let mut cols: Vec<Vec<u8>> = vec![acts.data()[lo * rb..hi * rb].to_vec()];
        if let Some(g) = &grads {
            cols.push(g.data()[lo * rb..hi * rb].to_vec());
        }
        if let Some(t) = &tokens {
            cols.push(tokens_u32(t, lo, hi)?);
        }
        if let Some(l) = &loss {
            cols.push(l.data()[lo * 4..hi * 4].to_vec());
        }
        w.append(&cols.iter().map(Vec::as_slice).collect::<Vec<_>>())?;
    }
    let shards = w.finish()?;
    let bytes: u64 = shards.iter().map(|s| s.bytes).sum();
    println!(
        "{}: imported {n} tokens into {} shard(s), {bytes} bytes",
        a.out.display(),
        shards.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn export(dir: &Path, out_dir: &Path, names: &[String]) -> Result<ExitCode> {
    let s = Store::open(dir)?;
    std::fs::create_dir_all(out_dir).with_context(|| out_dir.display().to_string())?;
    let specs: Vec<ArraySpec> = if names.is_empty() {
        s.manifest.arrays.clone()
    } else {
        names
            .iter()
            .map(|n| s.array(n).map(|(_, a)| a.clone()))
            .collect::<Result<_, _>>()?
    };
    let n = s.total_tokens() as usize;
    for a in &specs {
        let (ai, _) = s.array(&a.name)?;
        let shape: Vec<usize> = if a.width == 1 {
            vec![n]
        } else {
            vec![n, a.width]
        };
        let path = out_dir.join(format!("{}.npy", a.name));
        npy::write_with(&path, npy_descr(a.dtype), &shape, |out| {
            for c in s.chunks() {
                let rows = s.read_chunk(c, ai)?;
                out.write_all(&rows)
                    .map_err(|e| dmsae_store::StoreError::Io {
                        path: path.clone(),
                        err: e,
                    })?;
            }
            Ok(())
        })?;
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Tokens/s of the training stream (shuffled, checksums on) over a store of the sample, for
/// `acts` alone (training) and `acts` + `grads` (attribution).
fn stream_bench(acts: &npy::Npy, grads: &npy::Npy, a: &BenchArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("dmsae-bench-{}", std::process::id()));
    let d = acts.shape[1];
    let arrays = vec![
        ArraySpec::new("acts", DType::Bf16, d, Codec::Expsplit),
        ArraySpec::new("grads", DType::Bf16, d, Codec::Expsplit),
    ];
    let opts = WriterOptions {
        chunk_tokens: a.chunk_tokens,
        level: a.level,
        ..Default::default()
    };
    let result = (|| -> Result<()> {
        let mut w = StoreWriter::create(&dir, arrays, opts)?;
        w.append(&[acts.data(), grads.data()])?;
        w.finish()?;
        let store = std::sync::Arc::new(Store::open(&dir)?);
        for names in [vec!["acts"], vec!["acts", "grads"]] {
            let mut tokens = 0usize;
            let mut epoch = 0;
            let t = Instant::now();
            while epoch == 0 || t.elapsed().as_secs_f64() < a.seconds {
                let so = dmsae_store::StreamOptions {
                    arrays: names.iter().map(|n| n.to_string()).collect(),
                    batch_tokens: 1024,
                    shuffle_tokens: 4096,
                    epoch,
                    ..Default::default()
                };
                for b in store.stream(so)? {
                    tokens += b?.n;
                }
                epoch += 1;
            }
            println!(
                "stream {:<12} {:>10.0} tokens/s (batches of 1024, shuffled, checksums on, {} threads)",
                names.join("+"),
                tokens as f64 / t.elapsed().as_secs_f64(),
                rayon::current_num_threads()
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A lower bound, as a fraction of raw bf16, for any coder that models the sign+mantissa byte
/// order-0 and the exponent order-0 per column: where expsplit stands against ideal coding.
/// With `context`, the sign+mantissa byte is modelled given its exponent and the exponent given
/// its column and the previous token's exponent there, counted in-sample (so optimistic): what a
/// context-modelling coder could hope for at best.
fn entropy_bound(data: &[u8], d: usize, context: bool) -> f64 {
    let vals: Vec<u16> = data
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    let (exp, sm) = (
        |v: u16| ((v >> 7) & 0xff) as u64,
        |v: u16| (((v >> 8) & 0x80) | (v & 0x7f)) as u64,
    );
    let sm_bits = conditional_entropy_bits(
        vals.iter()
            .map(|&v| (if context { exp(v) } else { 0 }, sm(v))),
    );
    let exp_bits = conditional_entropy_bits(vals.iter().enumerate().map(|(i, &v)| {
        let prev = if context && i >= d {
            1 + exp(vals[i - d])
        } else {
            0
        };
        (((i % d) as u64) << 9 | prev, exp(v))
    }));
    (sm_bits + exp_bits) / (data.len() as f64 * 8.0)
}

/// Total bits of H(symbol | context) over (context, symbol < 2^16) pairs, from their counts.
fn conditional_entropy_bits(pairs: impl Iterator<Item = (u64, u64)>) -> f64 {
    let mut keys: Vec<u64> = pairs.map(|(c, s)| c << 16 | s).collect();
    keys.sort_unstable();
    let n_log_n = |c: usize| c as f64 * (c as f64).log2();
    // sum over contexts of [n_c log n_c - sum over symbols of n_cs log n_cs]
    let (mut bits, mut i) = (0.0, 0);
    while i < keys.len() {
        let ctx = keys[i] >> 16;
        let start = i;
        while i < keys.len() && keys[i] >> 16 == ctx {
            let run = i;
            while i < keys.len() && keys[i] == keys[run] {
                i += 1;
            }
            bits -= n_log_n(i - run);
        }
        bits += n_log_n(i - start);
    }
    bits
}

/// Run `f` repeatedly for about `seconds`; returns seconds per run.
fn time_it(seconds: f64, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    let mut runs = 0u32;
    while runs == 0 || t.elapsed().as_secs_f64() < seconds {
        f();
        runs += 1;
    }
    t.elapsed().as_secs_f64() / runs as f64
}

fn bench(a: BenchArgs) -> Result<ExitCode> {
    let load = |name: &str| -> Result<npy::Npy> {
        let x = npy::Npy::open(&a.data.join(format!("{name}.npy")))?;
        if x.descr != "<u2" || x.shape.len() != 2 {
            bail!("{}: expected a 2-D uint16 (bf16) array", x.path.display());
        }
        Ok(x)
    };
    let (acts, grads) = (load("acts")?, load("grads")?);
    let d = acts.shape[1];
    let ct = a.chunk_tokens;
    println!(
        "store codec bench: {} (bf16, d={d}), chunks of {ct} tokens, zstd level {}",
        a.data.display(),
        a.level
    );
    println!("machine: {} logical cores; MB/s are of raw bf16 bytes; decode includes BLAKE3 verification", std::thread::available_parallelism().map_or(0, |n| n.get()));
    println!(
        "{:<12} {:<10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "data", "codec", "ratio", "vs zstd", "enc 1c", "enc 2c", "dec 1c", "dec 2c"
    );
    let sets: [(&str, Vec<&npy::Npy>); 3] = [
        ("acts", vec![&acts]),
        ("grads", vec![&grads]),
        ("acts+grads", vec![&acts, &grads]),
    ];
    for (label, arrs) in sets {
        let chunks: Vec<&[u8]> = arrs
            .iter()
            .flat_map(|x| x.data().chunks(ct * d * 2))
            .collect();
        let raw: usize = chunks.iter().map(|c| c.len()).sum();
        let plain: usize = chunks
            .par_iter()
            .map(|c| zstd::bulk::compress(c, a.level).unwrap().len())
            .sum();
        for codec in [Codec::Raw, Codec::Bytesplit, Codec::Expsplit] {
            let spec = ArraySpec::new("acts", DType::Bf16, d, codec);
            let enc_with = |threads: usize| -> Result<(f64, Vec<Vec<u8>>)> {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()?;
                let mut out = Vec::new();
                let secs = time_it(a.seconds, || {
                    out = pool.install(|| {
                        chunks
                            .par_iter()
                            .map(|c| codec::encode(&spec, a.level, c, c.len() / (2 * d)))
                            .collect()
                    });
                });
                Ok((secs, out))
            };
            let (e1, enc) = enc_with(1)?;
            let (e2, _) = enc_with(2)?;
            let hashes: Vec<blake3::Hash> = enc.iter().map(|b| blake3::hash(b)).collect();
            let dec_with = |threads: usize| -> Result<f64> {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()?;
                let mut ok = true;
                let secs = time_it(a.seconds, || {
                    ok &= pool.install(|| {
                        enc.par_iter().zip(&hashes).zip(&chunks).all(|((b, h), c)| {
                            blake3::hash(b) == *h
                                && codec::decode(&spec, b, c.len() / (2 * d))
                                    .is_ok_and(|v| v.len() == c.len())
                        })
                    });
                });
                if !ok {
                    bail!("decode failed in the benchmark");
                }
                Ok(secs)
            };
            let (d1, d2) = (dec_with(1)?, dec_with(2)?);
            let stored: usize = enc.iter().map(Vec::len).sum();
            let mbs = |s: f64| raw as f64 / s / 1e6;
            println!(
                "{label:<12} {:<10} {:>8.4} {:>10.4} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
                codec.name(),
                stored as f64 / raw as f64,
                stored as f64 / plain as f64,
                mbs(e1),
                mbs(e2),
                mbs(d1),
                mbs(d2)
            );
        }
        println!(
            "{label:<12} {:<10} {:>8.4}",
            "zstd-plain",
            plain as f64 / raw as f64
        );
        let bound = |context| {
            arrs.iter()
                .map(|x| entropy_bound(x.data(), d, context))
                .sum::<f64>()
                / arrs.len() as f64
        };
        println!("{label:<12} {:<10} {:>8.4}  (order-0 entropy of sign+mantissa, plus exponent given its column)", "bound", bound(false));
        println!("{label:<12} {:<10} {:>8.4}  (sign+mantissa given exponent, exponent given column and previous token's exponent; in-sample)", "bound-ctx", bound(true));
    }
    stream_bench(&acts, &grads, &a)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::conditional_entropy_bits;

    #[test]
    fn conditional_entropy_counts_what_the_context_leaves_open() {
        // The symbol is the context's low bit plus a fair coin: 1 bit per pair given the
        // context, 2 bits without it.
        let pairs = |ctx: bool| {
            (0..4096u64).map(move |i| (if ctx { i % 2 } else { 0 }, (i % 2) * 2 + (i / 2) % 2))
        };
        assert!((conditional_entropy_bits(pairs(true)) / 4096.0 - 1.0).abs() < 1e-12);
        assert!((conditional_entropy_bits(pairs(false)) / 4096.0 - 2.0).abs() < 1e-12);
        // A symbol the context fixes costs nothing.
        assert_eq!(conditional_entropy_bits((0..100u64).map(|i| (i, i))), 0.0);
    }
}
