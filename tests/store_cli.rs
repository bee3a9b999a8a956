//! `dmsae store ...` end to end on small stores the tests write themselves: round trips of every
//! codec, import's refusals, several concurrent writers into one store, and (through the library)
//! the streaming reader and random access.
//!
//! Every store here has several shards, several chunks per shard and a short last chunk.

use dmsae_store::{
    npy, ArraySpec, Codec, DType, Split, Store, StoreWriter, StreamOptions, WriterOptions,
};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;
use common::{args_of, assert_one_line_error, dmsae, finished, ok};
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Files (not folders) in `dir`; empty when `dir` does not exist.
fn files_in(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Deterministic pseudo-random numbers (xorshift64*), so no test depends on a seed crate.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// f32 to f16 bits for normal values in f16's range (truncating the mantissa).
fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let e = ((b >> 23) & 0xff) as i32 - 127 + 15;
    assert!((1..31).contains(&e), "{x} is outside f16's normal range");
    sign | ((e as u16) << 10) | ((b >> 13) & 0x3ff) as u16
}

/// Activation-like rows: each column has its own scale and sign, rows vary around it.
/// A few special values ride along (NaN, infinity, -0, a subnormal): they must survive bit
/// for bit, and the rows holding NaN or infinity must be left out of the stats.
fn float_rows(dtype: DType, n: usize, d: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(n * d * dtype.size());
    for t in 0..n {
        for c in 0..d {
            let scale = 2f64.powi((c % 7) as i32 - 3) * if c % 5 == 0 { -1.0 } else { 1.0 };
            let x = (scale * (1.0 + 0.5 * (rng.unit() - 0.5))) as f32;
            let special = match (t % 17, c) {
                (5, 3) => Some((f32::NAN, 0x7fc0u16, 0x7e00u16)),
                (11, 0) => Some((f32::INFINITY, 0x7f80, 0x7c00)),
                (9, 2) => Some((-0.0, 0x8000, 0x8000)),
                (13, 1) => Some((f32::from_bits(1), 0x0001, 0x0001)),
                _ => None,
            };
            match dtype {
                DType::Bf16 => {
                    let v = special.map_or((x.to_bits() >> 16) as u16, |s| s.1);
                    out.extend_from_slice(&v.to_le_bytes());
                }
                DType::F16 => {
                    let v = special.map_or_else(|| f16_bits(x), |s| s.2);
                    out.extend_from_slice(&v.to_le_bytes());
                }
                DType::F32 => out.extend_from_slice(&special.map_or(x, |s| s.0).to_le_bytes()),
                _ => unreachable!(),
            }
        }
    }
    out
}

fn npy_descr(dtype: DType) -> &'static str {
    match dtype {
        DType::Bf16 => "<u2",
        DType::F16 => "<f2",
        DType::F32 => "<f4",
        _ => unreachable!(),
    }
}

fn u32_bytes(v: impl IntoIterator<Item = u32>) -> Vec<u8> {
    v.into_iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Source arrays of one import, written as .npy files in `dir`.
struct Source {
    acts: PathBuf,
    grads: PathBuf,
    tokens: PathBuf,
    loss: PathBuf,
    dtype: DType,
}

impl Source {
    /// `n` tokens of width `d`; token ids are `first_id..first_id + n`; loss is NaN every 10th row.
    fn write(
        dir: &Path,
        tag: &str,
        dtype: DType,
        n: usize,
        d: usize,
        first_id: u32,
        seed: u64,
    ) -> Source {
        std::fs::create_dir_all(dir).unwrap();
        let p = |name: &str| dir.join(format!("{tag}{name}.npy"));
        let s = Source {
            acts: p("acts"),
            grads: p("grads"),
            tokens: p("tokens"),
            loss: p("loss"),
            dtype,
        };
        npy::write(
            &s.acts,
            npy_descr(dtype),
            &[n, d],
            &float_rows(dtype, n, d, seed),
        )
        .unwrap();
        npy::write(
            &s.grads,
            npy_descr(dtype),
            &[n, d],
            &float_rows(dtype, n, d, seed + 1000),
        )
        .unwrap();
        npy::write(
            &s.tokens,
            "<u4",
            &[n],
            &u32_bytes((0..n as u32).map(|i| first_id + i)),
        )
        .unwrap();
        let loss: Vec<u8> = (0..n)
            .flat_map(|t| {
                if t % 10 == 9 {
                    f32::NAN
                } else {
                    0.5 + (t % 7) as f32 * 0.25
                }
                .to_le_bytes()
            })
            .collect();
        npy::write(&s.loss, "<f4", &[n], &loss).unwrap();
        s
    }

    /// Arguments of `dmsae store import` for all four arrays.
    fn import_args(
        &self,
        out: &Path,
        codec: &str,
        chunk: usize,
        shard: usize,
        writer: &str,
    ) -> Vec<String> {
        let mut a: Vec<String> = [
            "store",
            "import",
            "--dtype",
            self.dtype.name(),
            "--codec",
            codec,
        ]
        .map(String::from)
        .to_vec();
        for (flag, p) in [
            ("--acts", &self.acts),
            ("--grads", &self.grads),
            ("--tokens", &self.tokens),
            ("--loss", &self.loss),
        ] {
            a.push(flag.into());
            a.push(p.display().to_string());
        }
        a.extend(["--out".into(), out.display().to_string()]);
        a.extend([
            "--chunk-tokens".into(),
            chunk.to_string(),
            "--shard-tokens".into(),
            shard.to_string(),
        ]);
        a.extend(["--writer".into(), writer.into()]);
        a
    }
}

/// Per-column mean and population variance, plus mean norm and mean squared norm, of the rows
/// without NaN or infinity, computed directly in f64.
struct Direct {
    count: u64,
    mean: Vec<f64>,
    var: Vec<f64>,
    mean_norm: f64,
    mean_sq_norm: f64,
}

fn direct_stats(dtype: DType, width: usize, bytes: &[u8]) -> Direct {
    let vals: Vec<f64> = bytes
        .chunks_exact(dtype.size())
        .map(|b| match dtype {
            DType::Bf16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16) as f64,
            DType::F16 => dmsae_store::f16_to_f32(u16::from_le_bytes([b[0], b[1]])) as f64,
            DType::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
            _ => unreachable!(),
        })
        .collect();
    let rows: Vec<&[f64]> = vals
        .chunks_exact(width)
        .filter(|r| r.iter().all(|x| x.is_finite()))
        .collect();
    let n = rows.len() as f64;
    let mean: Vec<f64> = (0..width)
        .map(|c| rows.iter().map(|r| r[c]).sum::<f64>() / n)
        .collect();
    let var: Vec<f64> = (0..width)
        .map(|c| rows.iter().map(|r| (r[c] - mean[c]).powi(2)).sum::<f64>() / n)
        .collect();
    let sq: Vec<f64> = rows
        .iter()
        .map(|r| r.iter().map(|x| x * x).sum::<f64>())
        .collect();
    Direct {
        count: rows.len() as u64,
        mean,
        var,
        mean_norm: sq.iter().map(|s| s.sqrt()).sum::<f64>() / n,
        mean_sq_norm: sq.iter().sum::<f64>() / n,
    }
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-9 * want.abs(),
        "{what}: stats say {got}, direct computation {want}"
    );
}

/// `key   value ...` line of `store inspect`: the words after the key.
fn inspect_field(text: &str, key: &str) -> Vec<String> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(key))
        .unwrap_or_else(|| panic!("no {key} line:\n{text}"));
    line.split_whitespace().skip(1).map(String::from).collect()
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

/// Import all four arrays, export them, and check everything the read-only commands print.
fn round_trip(dtype: DType, codec: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (n, d, chunk, shard) = (103, 24, 8, 40);
    let src = Source::write(&tmp.path().join("src"), "", dtype, n, d, 5000, 7);
    let store = tmp.path().join("store");
    let r = ok(&src.import_args(&store, codec, chunk, shard, "w0000"));
    assert!(
        r.stdout
            .contains(&format!("imported {n} tokens into 3 shard(s)")),
        "{}",
        r.stdout
    );

    // 40 + 40 + 23 tokens in chunks of 8: 5 + 5 + 3 chunks, the very last one short (23 = 2 x 8 + 7).
    let m: Value =
        serde_json::from_slice(&std::fs::read(store.join("manifest.json")).unwrap()).unwrap();
    let tokens: Vec<u64> = m["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(tokens, [40, 40, 23]);
    assert_eq!(
        m["arrays"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["codec"].as_str().unwrap())
            .collect::<Vec<_>>()[..2],
        [codec, codec]
    );

    let out = tmp.path().join("export");
    ok(&[
        "store".as_ref(),
        "export".as_ref(),
        store.as_os_str(),
        "--out-dir".as_ref(),
        out.as_os_str(),
    ]);
    for (name, src_path) in [
        ("acts", &src.acts),
        ("grads", &src.grads),
        ("tokens", &src.tokens),
        ("loss", &src.loss),
    ] {
        let got = std::fs::read(out.join(format!("{name}.npy"))).unwrap();
        assert!(
            got == std::fs::read(src_path).unwrap(),
            "{name}.npy differs from the imported file ({dtype:?} {codec})"
        );
    }

    let v = ok(&["store".as_ref(), "verify".as_ref(), store.as_os_str()]);
    assert!(
        v.stdout.starts_with("ok: 3 shards, 13 chunks, 103 tokens"),
        "{}",
        v.stdout
    );

    let i = ok(&["store".as_ref(), "inspect".as_ref(), store.as_os_str()]);
    assert_eq!(
        inspect_field(&i.stdout, "tokens")[..5],
        ["103", "in", "3", "shards,", "13"]
    );
    assert_eq!(
        inspect_field(&i.stdout, "d_model")[..5],
        ["24", "dtype", dtype.name(), "codec", codec]
    );

    let s = ok(&["store".as_ref(), "stats".as_ref(), store.as_os_str()]);
    let j = ok(&[
        "store".as_ref(),
        "stats".as_ref(),
        store.as_os_str(),
        "--json".as_ref(),
    ]);
    let stats: Value = serde_json::from_str(&j.stdout).unwrap();
    let acts_rows = npy::Npy::open(&src.acts).unwrap();
    let grads_rows = npy::Npy::open(&src.grads).unwrap();
    let loss_rows = npy::Npy::open(&src.loss).unwrap();
    for (name, dt, width, bytes) in [
        ("acts", dtype, d, acts_rows.data()),
        ("grads", dtype, d, grads_rows.data()),
        ("loss", DType::F32, 1, loss_rows.data()),
    ] {
        let want = direct_stats(dt, width, bytes);
        let got = &stats[name];
        assert_eq!(got["count"].as_u64(), Some(want.count), "{name} count");
        assert!(
            want.count < n as u64,
            "{name}: the NaN/infinity rows should be left out"
        );
        assert!(
            s.stdout.contains(&format!("{name}: {} rows", want.count)),
            "{}",
            s.stdout
        );
        for c in 0..width {
            assert_close(
                got["mean"][c].as_f64().unwrap(),
                want.mean[c],
                &format!("{name} mean[{c}]"),
            );
            assert_close(
                got["var"][c].as_f64().unwrap(),
                want.var[c],
                &format!("{name} var[{c}]"),
            );
        }
        assert_close(
            got["mean_norm"].as_f64().unwrap(),
            want.mean_norm,
            &format!("{name} mean_norm"),
        );
        assert_close(
            got["mean_sq_norm"].as_f64().unwrap(),
            want.mean_sq_norm,
            &format!("{name} mean_sq_norm"),
        );
    }
    assert!(
        stats.get("tokens").is_none(),
        "integer arrays have no stats"
    );
}

#[test]
fn round_trip_bf16_expsplit_is_bit_exact_and_stats_match() {
    round_trip(DType::Bf16, "expsplit");
}

#[test]
fn round_trip_f16_bytesplit_is_bit_exact_and_stats_match() {
    round_trip(DType::F16, "bytesplit");
}

#[test]
fn round_trip_f32_raw_is_bit_exact_and_stats_match() {
    round_trip(DType::F32, "raw");
}

#[test]
fn env_prints_torch_and_store_format_versions() {
    let r = ok(&["env"]);
    assert!(
        r.stdout.lines().any(|l| l.starts_with("torch 2.11")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.lines().any(|l| l == "store format version: 1"),
        "{}",
        r.stdout
    );
}

// ---------------------------------------------------------------------------------------------
// Import refuses bad input with one line naming the file, and writes nothing
// ---------------------------------------------------------------------------------------------

/// Run an import that must fail: exit 2, one line naming `culprit`, no store written.
fn assert_import_refused(args: &[String], out: &Path, culprit: &Path) {
    let r = dmsae(args);
    assert_one_line_error(&r, &[&culprit.display().to_string()]);
    let left: Vec<String> = files_in(out);
    assert!(
        left.is_empty(),
        "a refused import left {left:?} in {}",
        out.display()
    );
}

/// Import a small bf16 source after `damage` spoiled one of its files (returned): refused.
fn refused_after(damage: impl FnOnce(&Source) -> PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let src = Source::write(tmp.path(), "", DType::Bf16, 30, 8, 0, 1);
    let culprit = damage(&src);
    let out = tmp.path().join("store");
    assert_import_refused(
        &src.import_args(&out, "expsplit", 8, 16, "w0000"),
        &out,
        &culprit,
    );
}

#[test]
fn import_refuses_grads_of_another_shape() {
    refused_after(|src| {
        npy::write(
            &src.grads,
            "<u2",
            &[30, 9],
            &float_rows(DType::Bf16, 30, 9, 2),
        )
        .unwrap();
        src.grads.clone()
    });
}

#[test]
fn import_refuses_acts_of_another_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Source::write(tmp.path(), "", DType::F32, 30, 8, 0, 1);
    let out = tmp.path().join("store");
    // f32 files imported as bf16: the acts file is named, not silently reinterpreted.
    let mut args = src.import_args(&out, "expsplit", 8, 16, "w0000");
    let at = args.iter().position(|a| a == "--dtype").unwrap();
    args[at + 1] = "bf16".into();
    assert_import_refused(&args, &out, &src.acts);
}

#[test]
fn import_refuses_tokens_of_another_length() {
    refused_after(|src| {
        npy::write(&src.tokens, "<u4", &[29], &u32_bytes(0..29)).unwrap();
        src.tokens.clone()
    });
}

#[test]
fn import_refuses_a_missing_file() {
    refused_after(|src| {
        std::fs::remove_file(&src.loss).unwrap();
        src.loss.clone()
    });
}

#[test]
fn import_refuses_a_file_that_is_not_npy() {
    refused_after(|src| {
        std::fs::write(&src.tokens, "token,id\n1,2\n").unwrap();
        src.tokens.clone()
    });
}

#[test]
fn import_refuses_a_truncated_npy() {
    refused_after(|src| {
        let bytes = std::fs::read(&src.acts).unwrap();
        std::fs::write(&src.acts, &bytes[..bytes.len() - 3]).unwrap();
        src.acts.clone()
    });
}

#[test]
fn import_refuses_a_bad_token_id_late_in_a_large_input_before_writing_any_shard() {
    // More rows than one import step (65,536), so a check made only step by step would have
    // committed shards before reaching the bad id in the last row.
    let tmp = tempfile::tempdir().unwrap();
    let n = 70_000;
    let acts = tmp.path().join("acts.npy");
    npy::write(&acts, "<f4", &[n, 1], &vec![0u8; 4 * n]).unwrap();
    let tokens = tmp.path().join("tokens.npy");
    let ids: Vec<u8> = (0..n as i64)
        .map(|i| if i + 1 == n as i64 { -1 } else { i })
        .flat_map(|v| v.to_le_bytes())
        .collect();
    npy::write(&tokens, "<i8", &[n], &ids).unwrap();
    let out = tmp.path().join("store");
    let args = args_of(&[
        "store".as_ref(),
        "import".as_ref(),
        "--dtype".as_ref(),
        "f32".as_ref(),
        "--acts".as_ref(),
        acts.as_os_str(),
        "--tokens".as_ref(),
        tokens.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--chunk-tokens".as_ref(),
        "1024".as_ref(),
        "--shard-tokens".as_ref(),
        "8192".as_ref(),
    ]);
    let r = dmsae(&args);
    assert_one_line_error(&r, &[&tokens.display().to_string(), "row 69999"]);
    let left: Vec<String> = files_in(&out)
        .into_iter()
        .filter(|f| !f.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "a refused import left {left:?}");
}

// ---------------------------------------------------------------------------------------------
// Several writers into one store
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_writers_fill_one_store_and_finalize_rebuilds_the_same_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let sizes = [61usize, 50, 77, 40, 20];
    let mut first_id = 0u32;
    let mut children = Vec::new();
    let mut want_ids = BTreeSet::new();
    let sources: Vec<Source> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let s = Source::write(
                &tmp.path().join("src"),
                &format!("w{i}_"),
                DType::Bf16,
                n,
                16,
                first_id,
                100 + i as u64,
            );
            want_ids.extend(first_id..first_id + n as u32);
            first_id += n as u32;
            s
        })
        .collect();
    // The first four start before any is waited on; shards of 16 tokens make each commit
    // several times.
    for (i, s) in sources.iter().enumerate().take(4) {
        let args = s.import_args(&store, "expsplit", 4, 16, &format!("w{i}"));
        let child = Command::new(env!("CARGO_BIN_EXE_dmsae"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        children.push((args, child.expect("spawn dmsae")));
    }
    for (args, child) in children {
        let r = finished(child.wait_with_output().unwrap(), &args);
        assert_eq!(r.code, 0, "{args:?}:\n{}{}", r.stdout, r.stderr);
    }
    // Each writer's fold is cached so that a commit need not reread every footer. The caches
    // only save work: a damaged, missing or another writer's cache is rebuilt from the footers
    // (verify and finalize below recompute everything from the footers alone).
    let cache = |w: &str| store.join(format!(".partial-{w}"));
    std::fs::copy(cache("w1"), cache("w0")).unwrap(); // both hold 4 shards
    std::fs::remove_file(cache("w2")).unwrap();
    let mut b = std::fs::read(cache("w3")).unwrap();
    b[20] ^= 1;
    std::fs::write(cache("w3"), b).unwrap();
    ok(&sources[4].import_args(&store, "expsplit", 4, 16, "w4"));
    for w in ["w0", "w2", "w3"] {
        assert!(cache(w).exists(), "{w}'s cache rebuilt");
    }

    let manifest_path = store.join("manifest.json");
    let before: Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let files: Vec<&str> = before["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["file"].as_str().unwrap())
        .collect();
    let on_disk: Vec<String> = files_in(&store)
        .into_iter()
        .filter(|f| f.ends_with(".dmss"))
        .collect();
    assert_eq!(
        files, on_disk,
        "the manifest must list every committed shard, sorted"
    );
    let want_shards: usize = sizes.iter().map(|n| n.div_ceil(16)).sum();
    assert_eq!(files.len(), want_shards);
    for (i, n) in sizes.iter().enumerate() {
        assert_eq!(
            files
                .iter()
                .filter(|f| f.starts_with(&format!("w{i}-")))
                .count(),
            n.div_ceil(16),
            "writer w{i}"
        );
    }
    assert_eq!(
        before["total_tokens"].as_u64(),
        Some(sizes.iter().sum::<usize>() as u64)
    );
    let v = ok(&["store".as_ref(), "verify".as_ref(), store.as_os_str()]);
    assert!(
        v.stdout.starts_with(&format!("ok: {want_shards} shards")),
        "{}",
        v.stdout
    );

    let s = Store::open(&store).unwrap();
    let ids: BTreeSet<u32> = u32s(&s.read_rows("tokens", 0..s.total_tokens()).unwrap())
        .into_iter()
        .collect();
    assert_eq!(
        ids, want_ids,
        "every writer's tokens are in the store exactly once"
    );
    drop(s);

    std::fs::remove_file(&manifest_path).unwrap();
    let f = ok(&["store".as_ref(), "finalize".as_ref(), store.as_os_str()]);
    assert!(
        f.stdout
            .contains(&format!("manifest rebuilt from {want_shards} shards")),
        "{}",
        f.stdout
    );
    let after: Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    assert_eq!(
        after["shards"], before["shards"],
        "same shards, sizes and hashes"
    );
    assert_eq!(after["stats"], before["stats"], "same stats, bit for bit");
    assert_eq!(
        after, before,
        "finalize must rebuild exactly the manifest the writers left"
    );
    ok(&["store".as_ref(), "verify".as_ref(), store.as_os_str()]);
}

// ---------------------------------------------------------------------------------------------
// Library: the streaming reader and random access
// ---------------------------------------------------------------------------------------------

const STREAM_N: usize = 300;
const STREAM_D: usize = 4;
const FIRST_ID: u32 = 10_000;

/// 300 tokens with unique ids: shards of 64 (4 x 64 + 44), chunks of 8 (the last one short: 300 = 37 x 8 + 4).
fn stream_store(tmp: &Path) -> (Arc<Store>, Source) {
    let src = Source::write(
        &tmp.join("src"),
        "",
        DType::F32,
        STREAM_N,
        STREAM_D,
        FIRST_ID,
        3,
    );
    let store = tmp.join("store");
    ok(&src.import_args(&store, "bytesplit", 8, 64, "w0000"));
    let s = Store::open(&store).unwrap();
    assert_eq!((s.shards.len(), s.chunks().len()), (5, 38));
    (Arc::new(s), src)
}

fn opts(batch_tokens: usize, seed: u64) -> StreamOptions {
    StreamOptions {
        arrays: vec!["tokens".into(), "acts".into()],
        batch_tokens,
        seed,
        shuffle_tokens: 64,
        prefetch: 2,
        ..Default::default()
    }
}

/// Every batch of one stream: (rows, token ids, acts bytes).
fn batches(store: &Arc<Store>, o: StreamOptions) -> Vec<(usize, Vec<u32>, Vec<u8>)> {
    store
        .stream(o)
        .unwrap()
        .map(|b| {
            let b = b.unwrap();
            let ids = u32s(b.get("tokens").unwrap());
            assert_eq!(ids.len(), b.n);
            (
                b.n,
                ids,
                b.get("acts").map(<[u8]>::to_vec).unwrap_or_default(),
            )
        })
        .collect()
}

fn ids_of(b: &[(usize, Vec<u32>, Vec<u8>)]) -> Vec<u32> {
    b.iter()
        .flat_map(|(_, ids, _)| ids.iter().copied())
        .collect()
}

#[test]
fn stream_same_seed_gives_same_batches_and_other_seed_or_epoch_another_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = stream_store(tmp.path());
    let a = batches(&store, opts(16, 42));
    let b = batches(&store, opts(16, 42));
    assert_eq!(a, b, "same options must give the same batches");
    let c = batches(&store, opts(16, 43));
    assert_ne!(
        ids_of(&a),
        ids_of(&c),
        "another seed must give another order"
    );
    let d = batches(
        &store,
        StreamOptions {
            epoch: 1,
            ..opts(16, 42)
        },
    );
    assert_ne!(
        ids_of(&a),
        ids_of(&d),
        "another epoch must give another order"
    );
    let sorted = |mut v: Vec<u32>| {
        v.sort();
        v
    };
    assert_eq!(sorted(ids_of(&a)), sorted(ids_of(&c)));
}

#[test]
fn stream_all_yields_every_token_exactly_once_per_epoch_with_its_own_row() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, src) = stream_store(tmp.path());
    let acts = npy::Npy::open(&src.acts).unwrap();
    let rb = 4 * STREAM_D;
    for epoch in 0..2 {
        let bs = batches(
            &store,
            StreamOptions {
                epoch,
                ..opts(16, 7)
            },
        );
        let mut ids = ids_of(&bs);
        assert_ne!(
            ids,
            (FIRST_ID..FIRST_ID + STREAM_N as u32).collect::<Vec<_>>(),
            "epoch {epoch} is not shuffled"
        );
        // The acts row that travels with each id is that token's row.
        for (_, bid, bacts) in &bs {
            for (k, id) in bid.iter().enumerate() {
                let t = (id - FIRST_ID) as usize;
                assert_eq!(
                    bacts[k * rb..(k + 1) * rb],
                    acts.data()[t * rb..(t + 1) * rb],
                    "token {id}"
                );
            }
        }
        ids.sort();
        assert_eq!(
            ids,
            (FIRST_ID..FIRST_ID + STREAM_N as u32).collect::<Vec<_>>(),
            "epoch {epoch}"
        );
    }
}

#[test]
fn stream_without_shuffle_keeps_store_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = stream_store(tmp.path());
    let bs = batches(
        &store,
        StreamOptions {
            shuffle: false,
            ..opts(32, 0)
        },
    );
    assert_eq!(
        ids_of(&bs),
        (FIRST_ID..FIRST_ID + STREAM_N as u32).collect::<Vec<_>>()
    );
}

#[test]
fn stream_batches_are_full_but_the_last_and_drop_last_drops_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = stream_store(tmp.path());
    let sizes = |o: StreamOptions| batches(&store, o).iter().map(|b| b.0).collect::<Vec<_>>();
    let mut want = vec![16; STREAM_N / 16];
    assert_eq!(
        sizes(StreamOptions {
            drop_last: true,
            ..opts(16, 1)
        }),
        want
    );
    want.push(STREAM_N % 16);
    assert_eq!(sizes(opts(16, 1)), want);
    // A batch larger than the shuffle buffer, and one that divides the store evenly.
    assert_eq!(sizes(opts(100, 1)), [100, 100, 100]);
    assert_eq!(
        sizes(StreamOptions {
            drop_last: true,
            ..opts(128, 1)
        }),
        [128, 128]
    );
    assert_eq!(sizes(opts(128, 1)), [128, 128, 44]);
}

#[test]
fn stream_train_and_eval_are_disjoint_whole_chunks_and_cover_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = stream_store(tmp.path());
    let frac = 0.25;
    let split = |split| {
        let o = StreamOptions {
            split,
            eval_fraction: frac,
            ..opts(16, 5)
        };
        ids_of(&batches(&store, o))
            .into_iter()
            .collect::<BTreeSet<u32>>()
    };
    let (train, eval, all) = (split(Split::Train), split(Split::Eval), split(Split::All));
    assert!(
        !train.is_empty() && !eval.is_empty(),
        "38 chunks at 25% should give both splits some"
    );
    assert!(train.is_disjoint(&eval));
    assert_eq!(train.union(&eval).copied().collect::<BTreeSet<_>>(), all);
    assert_eq!(all.len(), STREAM_N);
    // Eval is exactly the chunks `is_eval_chunk` picks.
    let mut want_eval = BTreeSet::new();
    for c in store.chunks() {
        if dmsae_store::is_eval_chunk(&store.shards[c.shard].file_name(), c.chunk, frac) {
            let s = store.chunk_start(c) as u32;
            want_eval.extend(FIRST_ID + s..FIRST_ID + s + store.chunk_tokens(c) as u32);
        }
    }
    assert_eq!(eval, want_eval);
}

#[test]
fn stream_drop_bos_removes_position_zero_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let n = 150u32;
    let arrays = vec![
        ArraySpec::new("acts", DType::F32, 2, Codec::Raw),
        ArraySpec::new("tokens", DType::U32, 1, Codec::Bytesplit),
        ArraySpec::new("position", DType::U32, 1, Codec::Bytesplit),
    ];
    let wopts = WriterOptions {
        chunk_tokens: 8,
        shard_tokens: 48,
        ..Default::default()
    };
    let mut w = StoreWriter::create(&dir, arrays, wopts).unwrap();
    // Contexts of 7 tokens, so BOS rows fall at every offset within chunks and shards.
    let pos = |t: u32| t % 7;
    for part in [0..60u32, 60..n] {
        let acts: Vec<u8> = part
            .clone()
            .flat_map(|t| [t as f32, -(t as f32)])
            .flat_map(f32::to_le_bytes)
            .collect();
        w.append(&[
            &acts,
            &u32_bytes(part.clone()),
            &u32_bytes(part.clone().map(pos)),
        ])
        .unwrap();
    }
    assert_eq!(w.finish().unwrap().len(), 4);
    let store = Arc::new(Store::open(&dir).unwrap());

    let non_bos: BTreeSet<u32> = (0..n).filter(|&t| pos(t) != 0).collect();
    for (arrays, drop_bos) in [
        (vec!["tokens"], true),
        (vec!["tokens", "position"], true),
        (vec!["tokens"], false),
    ] {
        let o = StreamOptions {
            arrays: arrays.iter().map(|a| a.to_string()).collect(),
            drop_bos,
            ..opts(10, 3)
        };
        let mut seen = BTreeSet::new();
        for b in store.stream(o).unwrap() {
            let b = b.unwrap();
            let ids = u32s(b.get("tokens").unwrap());
            if let Some(p) = b.get("position") {
                assert_eq!(
                    u32s(p),
                    ids.iter().map(|&t| pos(t)).collect::<Vec<_>>(),
                    "position travels with its row"
                );
            }
            for id in ids {
                assert!(seen.insert(id), "token {id} twice");
            }
        }
        if drop_bos {
            assert_eq!(seen, non_bos, "arrays {arrays:?}");
        } else {
            assert_eq!(seen, (0..n).collect(), "drop_bos off keeps every row");
        }
    }
}

#[test]
fn read_rows_across_chunk_and_shard_boundaries_equals_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, src) = stream_store(tmp.path());
    let acts = npy::Npy::open(&src.acts).unwrap();
    let tokens = npy::Npy::open(&src.tokens).unwrap();
    let rb = 4 * STREAM_D;
    let n = STREAM_N as u64;
    // Chunk boundaries every 8, shard boundaries at 64, 128, 192, 256.
    let ranges = [
        0..n,
        0..1,
        7..9,
        8..16,
        60..70,
        63..65,
        64..128,
        5..250,
        255..257,
        290..n,
        n - 1..n,
        100..100,
        n..n,
    ];
    for r in ranges {
        let got = store.read_rows("acts", r.clone()).unwrap();
        assert_eq!(
            got,
            acts.data()[r.start as usize * rb..r.end as usize * rb],
            "acts {r:?}"
        );
        let got = store.read_rows("tokens", r.clone()).unwrap();
        assert_eq!(
            got,
            tokens.data()[r.start as usize * 4..r.end as usize * 4],
            "tokens {r:?}"
        );
    }
    assert!(store.read_rows("acts", 10..n + 1).is_err());
    assert!(store.read_rows("nope", 0..1).is_err());
}
