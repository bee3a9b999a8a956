//! `dmsae extract` end to end on the tiny Gemma-3 fixture (tests/fixtures/gemma3, with the
//! tokenizer and sample text written by tests/fixtures/gen_gemma_fixtures.py): what lands in
//! the store against the Python tokenizer's ids and the model run directly, worker splits,
//! gradient subsets, resuming, and refusals.

mod common;

use common::{assert_one_line_error, dmsae, ok};
use dmsae_extractor::tch::{Device, Kind, Tensor};
use dmsae_extractor::Model;
use dmsae_store::Store;
use std::path::{Path, PathBuf};

const T: usize = 16;
const BOS: u32 = 2;
const LAYER: usize = 1;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The sample's documents as the Python tokenizer encodes them.
fn sample_docs() -> Vec<Vec<u32>> {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("extract-sample.tokens.json")).unwrap(),
    )
    .unwrap()
}

/// Documents joined as documented: BOS between them, except where a document opens a
/// context (the context's own BOS is there).
fn packed_stream<'a>(docs: impl IntoIterator<Item = &'a Vec<u32>>) -> Vec<u32> {
    let mut stream = Vec::new();
    for d in docs {
        if stream.len() % (T - 1) != 0 {
            stream.push(BOS);
        }
        stream.extend(d);
    }
    stream
}

/// Contexts as documented: each BOS + the stream's next 15 tokens.
fn expected_contexts(n: usize) -> Vec<Vec<u32>> {
    let stream = packed_stream(&sample_docs());
    (0..n)
        .map(|c| {
            std::iter::once(BOS)
                .chain(stream[c * (T - 1)..(c + 1) * (T - 1)].iter().copied())
                .collect()
        })
        .collect()
}

fn extract_args(data: &Path, out: &Path, tokens: usize, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "extract",
        "--model",
        fixtures().join("gemma3").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--tokens",
        &tokens.to_string(),
        "--layer",
        &LAYER.to_string(),
        "--out",
        out.to_str().unwrap(),
        "--context",
        &T.to_string(),
        "--batch",
        "3",
        "--chunk-tokens",
        "16",
        "--shard-tokens",
        "32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Every row of a store, sorted by (context, position).
struct Rows {
    acts: Vec<f32>,
    grads: Vec<f32>,
    tokens: Vec<u32>,
    loss: Vec<f32>,
    position: Vec<u32>,
    context: Vec<u64>,
    flags: Vec<u8>,
}

fn read_store(dir: &Path) -> Rows {
    let s = Store::open(dir).unwrap();
    let n = s.total_tokens();
    let raw = |name: &str| s.read_rows(name, 0..n).unwrap();
    let f32s = |b: Vec<u8>| {
        b.chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<_>>()
    };
    let u32s = |b: Vec<u8>| {
        b.chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<_>>()
    };
    let (acts, grads, tokens, loss, position) = (
        f32s(raw("acts")),
        f32s(raw("grads")),
        u32s(raw("tokens")),
        f32s(raw("loss")),
        u32s(raw("position")),
    );
    let context: Vec<u64> = raw("context")
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let flags = raw("flags");
    let d = acts.len() / n as usize;
    let mut order: Vec<usize> = (0..n as usize).collect();
    order.sort_by_key(|&i| (context[i], position[i]));
    let rows = |v: &[f32]| {
        order
            .iter()
            .flat_map(|&i| v[i * d..(i + 1) * d].to_vec())
            .collect::<Vec<_>>()
    };
    Rows {
        acts: rows(&acts),
        grads: rows(&grads),
        tokens: order.iter().map(|&i| tokens[i]).collect(),
        loss: order.iter().map(|&i| loss[i]).collect(),
        position: order.iter().map(|&i| position[i]).collect(),
        context: order.iter().map(|&i| context[i]).collect(),
        flags: order.iter().map(|&i| flags[i]).collect(),
    }
}

/// ||a - b||_2 / ||b||_2
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

#[test]
fn extract_writes_what_the_model_and_tokenizer_give() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("store");
    let r = ok(&extract_args(
        &fixtures().join("extract-sample.jsonl"),
        &out,
        6 * T,
        // 5-position CE chunks straddle contexts; the direct forward below takes one chunk.
        &["--keep-bos", "--ce-chunk", "5"],
    ));
    assert!(
        r.stdout.contains("6 contexts, 96 rows written"),
        "{}",
        r.stdout
    );
    // "... over 0.41s (model 0.32s, waiting for the store writer 0.00s)": parts of the whole.
    // Read up to the "; " after it: the rate after the first batch follows, a plain number
    // below 1,000 tokens/s on a loaded machine.
    let secs: Vec<f64> = r
        .stdout
        .split("; ")
        .next()
        .unwrap()
        .split(['(', ' ', 's', ','])
        .filter_map(|w| w.parse().ok())
        .collect();
    let [.., total, model, wait] = secs[..] else {
        panic!("{}", r.stdout)
    };
    assert!(
        r.stdout.contains("waiting for the store writer")
            && model >= 0.0
            && wait >= 0.0
            && model + wait <= total + 0.02,
        "{}",
        r.stdout
    );
    let s = read_store(&out);
    let want = expected_contexts(6);
    assert_eq!(s.tokens, want.concat());
    assert_eq!(
        s.position,
        (0..6).flat_map(|_| 0..T as u32).collect::<Vec<_>>()
    );
    assert_eq!(
        s.context,
        (0..6u64)
            .flat_map(|c| std::iter::repeat_n(c, T))
            .collect::<Vec<_>>()
    );
    for (i, (&f, &tok)) in s.flags.iter().zip(&s.tokens).enumerate() {
        let last = i % T == T - 1;
        assert_eq!(
            f,
            1 | if last { 0 } else { 2 } | if tok == BOS { 4 } else { 0 },
            "row {i}"
        );
        assert_eq!(s.loss[i].is_nan(), last, "row {i}: loss {}", s.loss[i]);
    }
    // The same contexts through the model directly.
    let model = Model::load(&fixtures().join("gemma3"), Device::Cpu, Kind::Float).unwrap();
    let ids = Tensor::from_slice(&want.concat().iter().map(|&x| x as i64).collect::<Vec<_>>())
        .view([6, T as i64]);
    let o = model.forward_layer(&ids, LAYER, true).unwrap();
    let e_acts = rel_err(&s.acts, &to_vec(&o.resid));
    let e_grads = rel_err(&s.grads, &to_vec(o.grad.as_ref().unwrap()));
    let keep: Vec<usize> = (0..6 * T).filter(|i| i % T != T - 1).collect();
    let lw = to_vec(&o.loss);
    let e_loss = rel_err(
        &keep.iter().map(|&i| s.loss[i]).collect::<Vec<_>>(),
        &keep.iter().map(|&i| lw[i]).collect::<Vec<_>>(),
    );
    println!("store vs direct forward: acts {e_acts:.2e}, grads {e_grads:.2e}, loss {e_loss:.2e}");
    assert!(e_acts <= 1e-5 && e_grads <= 1e-5 && e_loss <= 1e-5);
    let m = Store::open(&out).unwrap().manifest;
    assert!(m.provenance["gradient"]
        .as_str()
        .unwrap()
        .contains("d(loss)/d(acts[t])"));
    assert_eq!(m.provenance["extract"]["layer"], LAYER);
    assert!(ok(&["store", "verify", out.to_str().unwrap()]).code == 0);
}

#[test]
fn workers_split_contexts_and_grad_subsets_skip_backward() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures().join("extract-sample.jsonl");
    let full = tmp.path().join("full");
    ok(&extract_args(&data, &full, 6 * T, &[]));
    let split = tmp.path().join("split");
    for w in ["0", "1"] {
        ok(&extract_args(
            &data,
            &split,
            6 * T,
            &["--workers", "2", "--worker", w, "--grad-every", "2"],
        ));
    }
    ok(&["store", "finalize", split.to_str().unwrap()]);
    let (a, b) = (read_store(&full), read_store(&split));
    // BOS rows are left out by default: the context-start BOS and one between documents.
    let want = expected_contexts(6);
    let n_rows = want.iter().flatten().filter(|&&t| t != BOS).count();
    assert_eq!(a.tokens.len(), n_rows);
    assert!(a.flags.iter().all(|f| f & 4 == 0) && !a.tokens.contains(&BOS));
    assert_eq!(
        (&a.tokens, &a.position, &a.context),
        (&b.tokens, &b.position, &b.context)
    );
    assert!(rel_err(&b.acts, &a.acts) <= 1e-5);
    let d = a.acts.len() / n_rows;
    let (mut ga, mut gb) = (Vec::new(), Vec::new());
    for i in 0..n_rows {
        let has = b.context[i] % 2 == 0;
        assert_eq!(b.flags[i] & 1 == 1, has, "row {i}");
        assert_eq!(a.flags[i] & !1, b.flags[i] & !1);
        let row = |g: &[f32]| g[i * d..(i + 1) * d].to_vec();
        if has {
            ga.extend(row(&a.grads));
            gb.extend(row(&b.grads));
        } else {
            assert!(
                row(&b.grads).iter().all(|&x| x == 0.0),
                "row {i}: grads not zero"
            );
        }
    }
    assert!(!ga.is_empty() && rel_err(&gb, &ga) <= 1e-5);
}

#[test]
fn short_data_keeps_rows_and_rerun_resumes_to_the_full_store() {
    let tmp = tempfile::tempdir().unwrap();
    let sample = fixtures().join("extract-sample.jsonl");
    let full = tmp.path().join("full");
    ok(&extract_args(&sample, &full, 8 * T, &[]));
    // Same command, but the data file first holds only the first four documents.
    let data = tmp.path().join("data.jsonl");
    let text = std::fs::read_to_string(&sample).unwrap();
    std::fs::write(
        &data,
        text.lines()
            .take(4)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let out = tmp.path().join("resumed");
    let r = dmsae(&extract_args(&data, &out, 8 * T, &[]));
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    let last = r.stderr.lines().last().unwrap();
    assert!(
        last.contains("data.jsonl")
            && last.contains("fewer than the 8 asked")
            && last.contains("kept what was written"),
        "{last}"
    );
    let partial = Store::open(&out).unwrap().total_tokens();
    assert!(partial > 0);
    // A kill after the last shard's rename, before its manifest entry: the manifest lacks it.
    let path = out.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let shards = m["shards"].as_array_mut().unwrap();
    assert!(shards.len() >= 2, "{shards:?}");
    let lost = shards.pop().unwrap();
    m["total_tokens"] = (partial - lost["tokens"].as_u64().unwrap()).into();
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    std::fs::write(&data, &text).unwrap();
    let r = ok(&extract_args(&data, &out, 8 * T, &[]));
    assert!(
        r.stdout.contains(&format!("resumed after {partial} rows"))
            && r.stderr.contains(lost["file"].as_str().unwrap()),
        "{}{}",
        r.stdout,
        r.stderr
    );
    let (a, b) = (read_store(&full), read_store(&out));
    assert_eq!(
        (&a.tokens, &a.position, &a.context, &a.flags),
        (&b.tokens, &b.position, &b.context, &b.flags)
    );
    assert!(rel_err(&b.acts, &a.acts) <= 1e-5 && rel_err(&b.grads, &a.grads) <= 1e-5);
    // A different extraction into the same store is refused.
    let r = dmsae(&extract_args(&data, &out, 8 * T, &["--keep-bos"]));
    assert_one_line_error(&r, &["resumed", "different extraction"]);
}

#[test]
fn extract_refusals_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    let sample = fixtures().join("extract-sample.jsonl");
    let mut a = extract_args(&sample, &out, 64, &[]);
    let li = a.iter().position(|x| x == "--layer").unwrap() + 1;
    a[li] = "4".into();
    assert_one_line_error(&dmsae(&a), &["--layer 4", "4 layers"]);
    let mi = a.iter().position(|x| x == "--model").unwrap() + 1;
    a[li] = "1".into();
    a[mi] = fixtures().join("gemma2-t5").to_str().unwrap().into();
    assert_one_line_error(&dmsae(&a), &["tokenizer.json", "missing"]);
    a[mi] = tmp.path().join("nope").to_str().unwrap().into();
    assert_one_line_error(&dmsae(&a), &["nope", "config.json"]);
    let bad = |name: &str, bytes: &[u8], names: &[&str]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let r = dmsae(&extract_args(
            &p,
            &tmp.path().join(format!("out-{name}")),
            64,
            &[],
        ));
        assert_one_line_error(&r, names);
    };
    bad(
        "notext.jsonl",
        b"{\"text\": \"ok\"}\n{\"body\": \"x\"}\n",
        &["notext.jsonl", "line 2", "no `text`"],
    );
    bad(
        "latin1.jsonl",
        b"{\"text\": \"caf\xe9\"}\n",
        &["latin1.jsonl", "line 1", "not UTF-8"],
    );
    bad("latin1.txt", b"caf\xe9", &["latin1.txt", "not UTF-8"]);
    bad(
        "empty.txt",
        b"",
        &["empty.txt", "not enough text for one context"],
    );
    assert!(
        !tmp.path().join("out-empty.txt").exists(),
        "a store was created for empty data"
    );
    assert_one_line_error(
        &dmsae(&extract_args(
            &tmp.path().join("missing.jsonl"),
            &out,
            64,
            &[],
        )),
        &["missing.jsonl"],
    );
    // A tokenizer that gives ids past the model's vocab_size (another model's).
    let other = tmp.path().join("other-tokenizer");
    std::fs::create_dir(&other).unwrap();
    for e in std::fs::read_dir(fixtures().join("gemma3")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), other.join(e.file_name())).unwrap();
    }
    let mut t = common::json(&other.join("tokenizer.json"));
    for (_, id) in t["model"]["vocab"].as_object_mut().unwrap() {
        if id.as_u64().unwrap() >= 300 {
            *id = (id.as_u64().unwrap() + 300).into();
        }
    }
    std::fs::write(other.join("tokenizer.json"), t.to_string()).unwrap();
    let mut a = extract_args(&sample, &tmp.path().join("s2"), 64, &[]);
    a[mi] = other.to_str().unwrap().into();
    assert_one_line_error(&dmsae(&a), &["tokenizer.json", "vocab_size 512"]);
    assert!(!tmp.path().join("s2").exists(), "a store was created");

    assert_one_line_error(
        &dmsae(&extract_args(&sample, &out, 64, &["--ce-chunk", "0"])),
        &["--ce-chunk 0"],
    );
    let mut a = extract_args(&sample, &out, 64, &[]);
    let ti = a.iter().position(|x| x == "--tokens").unwrap() + 1;
    a[ti] = "5X".into();
    let r = dmsae(&a);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("5X"), "{}", r.stderr);
}

#[test]
fn sigterm_stops_cleanly_and_rerun_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let one = std::fs::read_to_string(fixtures().join("extract-sample.jsonl")).unwrap();
    let data = tmp.path().join("big.jsonl");
    std::fs::write(&data, one.repeat(200)).unwrap();
    let out = tmp.path().join("s");
    let n_ctx = 1500;
    let mut args = extract_args(&data, &out, n_ctx * T, &[]);
    // Shards of 1024 rows: committing one rewrites the manifest, so tiny shards would be slow.
    for (flag, v) in [("--chunk-tokens", "256"), ("--shard-tokens", "1024")] {
        let i = args.iter().position(|a| a == flag).unwrap() + 1;
        args[i] = v.into();
    }
    // Stop it once its first shard is committed.
    let r = common::sigterm_once_exists(&args, &out.join("manifest.json"));
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .lines()
            .last()
            .unwrap()
            .contains("stopped by a signal"),
        "{}",
        r.stderr
    );
    ok(&["store", "verify", out.to_str().unwrap()]);
    let partial = Store::open(&out).unwrap().total_tokens();
    let r = ok(&args);
    assert!(
        r.stdout.contains(&format!("resumed after {partial} rows")),
        "{}",
        r.stdout
    );
    // Every context exactly once, in order, with the documented tokens.
    let s = read_store(&out);
    let docs = sample_docs();
    let stream = packed_stream((0..200).flat_map(|_| docs.iter()));
    let (mut toks, mut ctx) = (Vec::new(), Vec::new());
    for c in 0..n_ctx {
        for &t in &stream[c * (T - 1)..(c + 1) * (T - 1)] {
            if t != BOS {
                toks.push(t);
                ctx.push(c as u64);
            }
        }
    }
    assert!((partial as usize) < toks.len());
    assert_eq!(s.tokens, toks);
    assert_eq!(s.context, ctx);
}

#[test]
fn config_file_with_flag_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("x.toml");
    let out = tmp.path().join("s");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = {:?}\ntokens = \"0.048K\"\nlayer = 1\ncontext = 12\nbatch = 2\nkeep_bos = true\n",
            fixtures().join("gemma3"),
            fixtures().join("extract-sample.jsonl")
        ),
    )
    .unwrap();
    // "0.048K" is not a count: the error names the key.
    assert_one_line_error(
        &dmsae(&[
            "extract",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]),
        &["tokens", "0.048K"],
    );
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("\"0.048K\"", "48"),
    )
    .unwrap();
    ok(&[
        "extract",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--layer",
        "2",
    ]);
    let m = Store::open(&out).unwrap().manifest;
    assert_eq!(m.provenance["extract"]["layer"], 2);
    assert_eq!(m.provenance["extract"]["context"], 12);
    assert_eq!(m.provenance["extract"]["keep_bos"], true);
    assert_eq!(m.total_tokens, 48);
    // A flag turns the file's keep_bos off too.
    let out2 = tmp.path().join("s2");
    ok(&[
        "extract",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
        "--keep-bos=false",
    ]);
    let m = Store::open(&out2).unwrap().manifest;
    assert_eq!(m.provenance["extract"]["keep_bos"], false);
    assert!(m.total_tokens < 48);
    std::fs::write(&cfg, "layr = 3\n").unwrap();
    assert_one_line_error(
        &dmsae(&["extract", "--config", cfg.to_str().unwrap()]),
        &["x.toml", "layr"],
    );
    // The paper's config parses: its layer 12 is out of range for the 4-layer fixture.
    let paper = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/gemma-2-2b-l12.toml");
    let r = dmsae(&[
        "extract",
        "--config",
        paper.to_str().unwrap(),
        "--model",
        fixtures().join("gemma3").to_str().unwrap(),
        "--data",
        fixtures().join("extract-sample.jsonl").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--dtype",
        "f32",
    ]);
    assert_one_line_error(&r, &["--layer 12", "4 layers"]);
}

#[test]
fn nan_in_acts_or_grads_is_refused_naming_the_batch() {
    let src = fixtures().join("gemma3");
    for (tensor, what) in [
        ("model.layers.0.mlp.down_proj.weight", "acts"),
        ("model.layers.3.mlp.down_proj.weight", "grads"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        std::fs::create_dir(&model).unwrap();
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(src.join(f), model.join(f)).unwrap();
        }
        let mut ts = Vec::new();
        for e in std::fs::read_dir(&src).unwrap() {
            let p = e.unwrap().path();
            if p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("model-")
            {
                ts.extend(Tensor::read_safetensors(&p).unwrap());
            }
        }
        let i = ts.iter().position(|(n, _)| n == tensor).unwrap();
        let _ = ts[i].1.get(0).get(0).fill_(f64::NAN);
        Tensor::write_safetensors(&ts, model.join("model.safetensors")).unwrap();
        let out = tmp.path().join("s");
        let mut a = extract_args(&fixtures().join("extract-sample.jsonl"), &out, 6 * T, &[]);
        let mi = a.iter().position(|x| x == "--model").unwrap() + 1;
        a[mi] = model.to_str().unwrap().into();
        let r = dmsae(&a);
        assert_one_line_error(
            &r,
            &[
                "batch 0 (contexts 0..=2)",
                &format!("NaN or inf in {what}"),
                "not written",
            ],
        );
        assert!(
            !out.join("manifest.json").exists(),
            "{what}: a shard was written"
        );
    }
}

#[test]
fn parquet_text_and_pretokenized_ids_give_the_jsonl_contexts() {
    let tmp = tempfile::tempdir().unwrap();
    let want = expected_contexts(6).concat();
    for name in ["extract-sample.parquet", "extract-sample-ids.parquet"] {
        let out = tmp.path().join(name);
        ok(&extract_args(
            &fixtures().join(name),
            &out,
            6 * T,
            &["--keep-bos"],
        ));
        assert_eq!(read_store(&out).tokens, want, "{name}");
    }
    let r = dmsae(&extract_args(
        &fixtures().join("extract-nocolumn.parquet"),
        &tmp.path().join("x"),
        64,
        &[],
    ));
    assert_one_line_error(
        &r,
        &[
            "extract-nocolumn.parquet",
            "no `text` or `input_ids` column",
        ],
    );
    // A glob over both kinds: jsonl first in path order, then the parquet.
    let dir = tmp.path().join("mixed");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(fixtures().join("extract-sample.jsonl"), dir.join("a.jsonl")).unwrap();
    std::fs::copy(
        fixtures().join("extract-sample.parquet"),
        dir.join("b.parquet"),
    )
    .unwrap();
    let out = tmp.path().join("mixed-store");
    ok(&extract_args(&dir.join("*"), &out, 16 * T, &["--keep-bos"]));
    let s = read_store(&out);
    assert_eq!(s.tokens.len(), 16 * T);
    assert_eq!(&s.tokens[..6 * T], &want[..]);
}
