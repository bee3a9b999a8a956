//! `dmsae eval` end to end: a sweep of SAEs spliced into the tiny Gemma-3 fixture against the
//! transformers references of tests/fixtures/gen_eval_fixtures.py (tests/fixtures/eval/), an
//! identity-like SAE, bad input, SIGTERM, and (ignored, needs DMSAE_REAL_GEMMA3) the real
//! Gemma-3-270M.

mod common;

use common::{assert_one_line_error, dmsae, ok};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

fn eval_args(
    model: &Path,
    sae: &Path,
    data: &Path,
    tokens: u64,
    context: u64,
    out: &Path,
) -> Vec<String> {
    [
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--sae",
        sae.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--tokens",
        &tokens.to_string(),
        "--context",
        &context.to_string(),
        "--batch",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn close(got: &Value, want: f64, tol: f64, what: &str) {
    let g = got.as_f64().unwrap_or_else(|| panic!("{what}: {got}"));
    assert!(
        (g - want).abs() <= tol,
        "{what}: dmsae {g}, transformers {want} (|diff| {:.3e} > {tol:.1e})",
        (g - want).abs()
    );
}

/// Every figure of `eval.json` against the transformers reference `want`; CE, KL and the
/// first-order estimate within `tol` nats, FVU within `tol` relative, L0 exactly.
fn compare(got: &Value, want: &Value, tol: f64) -> f64 {
    let mut worst: f64 = 0.0;
    let mut c = |g: &Value, w: f64, tol: f64, what: &str| {
        close(g, w, tol, what);
        worst = worst.max((g.as_f64().unwrap() - w).abs());
    };
    let (clean, zero) = (
        want["clean_ce"].as_f64().unwrap(),
        want["zero_ce"].as_f64().unwrap(),
    );
    c(&got["clean_ce"], clean, tol, "clean CE");
    c(&got["zero_ce"], zero, tol, "zero CE");
    c(
        &got["zero_kl"],
        want["zero_kl"].as_f64().unwrap(),
        tol,
        "zero KL",
    );
    let saes = got["saes"].as_array().unwrap();
    let names: Vec<&str> = saes.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["sae-a", "sae-b", "sae-c"]);
    for s in saes {
        let n = s["name"].as_str().unwrap();
        let w = &want["saes"][n];
        let f = |k: &str| w[k].as_f64().unwrap();
        c(&s["ce"], f("ce"), tol, &format!("{n} CE"));
        c(&s["kl"], f("kl"), tol, &format!("{n} KL"));
        c(
            &s["first_order_delta_ce"],
            f("first_order_delta_ce"),
            tol,
            &format!("{n} first-order"),
        );
        c(
            &s["delta_ce"],
            f("ce") - clean,
            2.0 * tol,
            &format!("{n} delta CE"),
        );
        let rec = (zero - f("ce")) / (zero - clean);
        // Recovered divides by CE_zero - CE_clean: its tolerance scales with 1 / that gap.
        close(
            &s["ce_recovered"],
            rec,
            4.0 * tol / (zero - clean).abs(),
            &format!("{n} recovered"),
        );
        close(
            &s["fvu"],
            f("fvu"),
            tol * f("fvu").max(1.0),
            &format!("{n} FVU"),
        );
        close(&s["l0_core"], f("l0_core"), 1e-9, &format!("{n} L0 core"));
        close(
            &s["l0_noncore"],
            f("l0_noncore"),
            1e-9,
            &format!("{n} L0 non-core"),
        );
        close(
            &s["l0_total"],
            f("l0_core") + f("l0_noncore"),
            1e-9,
            &format!("{n} L0 total"),
        );
    }
    // The correlation across the sweep, from the reference figures.
    let pairs: Vec<(f64, f64)> = ["sae-a", "sae-b", "sae-c"]
        .iter()
        .map(|n| {
            let w = &want["saes"][n];
            (
                w["first_order_delta_ce"].as_f64().unwrap(),
                w["ce"].as_f64().unwrap() - clean,
            )
        })
        .collect();
    close(
        &got["first_order_pearson"],
        pearson(&pairs),
        1e-3,
        "Pearson",
    );
    worst
}

fn pearson(p: &[(f64, f64)]) -> f64 {
    let n = p.len() as f64;
    let (ma, mb) = (
        p.iter().map(|x| x.0).sum::<f64>() / n,
        p.iter().map(|x| x.1).sum::<f64>() / n,
    );
    let cov: f64 = p.iter().map(|(a, b)| (a - ma) * (b - mb)).sum();
    let va: f64 = p.iter().map(|(a, _)| (a - ma).powi(2)).sum();
    let vb: f64 = p.iter().map(|(_, b)| (b - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

#[test]
fn sweep_matches_transformers_on_the_tiny_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixtures().join("eval");
    let want = read_json(&dir.join("expected.json"));
    let (ctx, n) = (
        want["context"].as_u64().unwrap(),
        want["contexts"].as_u64().unwrap(),
    );
    for (flag, key) in [(None, "exclude_bos"), (Some("--keep-bos"), "keep_bos")] {
        let out = tmp.path().join(key);
        let mut args = eval_args(
            &fixtures().join("gemma3"),
            &dir,
            &dir.join("data.jsonl"),
            n * ctx,
            ctx,
            &out,
        );
        args.extend(flag.map(String::from));
        let r = ok(&args);
        let got = read_json(&out.join("eval.json"));
        assert_eq!(got["layer"], want["layer"], "layer from metadata.hook_name");
        assert_eq!(got["keep_bos"], flag.is_some());
        assert_eq!(got["contexts"].as_u64(), Some(n));
        assert_eq!(got["target_tokens"].as_u64(), Some(n * (ctx - 1)));
        let bos = want["bos"].as_u64().unwrap();
        let ids: Vec<u64> = want["ids"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()))
            .collect();
        let spliced = ids.iter().filter(|&&x| flag.is_some() || x != bos).count() as u64;
        assert_eq!(got["spliced_tokens"].as_u64(), Some(spliced), "{key}");
        let worst = compare(&got, &want[key], 1e-4);
        eprintln!("{key}: largest |dmsae - transformers| {worst:.2e} nats");
        let series: Vec<&str> = got["saes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["series"].as_str().unwrap())
            .collect();
        assert_eq!(series, ["distilled-core", "baseline", "random-core"]);
        // The table on stdout is eval.md; the plot has one series per kind.
        let md = std::fs::read_to_string(out.join("eval.md")).unwrap();
        assert!(r.stdout.starts_with(&md), "{}", r.stdout);
        assert!(md.contains("| L0 total | CE recovered baseline | CE recovered distilled-core |"));
        assert_eq!(ok(&["report", out.to_str().unwrap()]).stdout, md);
        assert!(md.contains(if flag.is_some() {
            "spliced too"
        } else {
            "excluded from the splice"
        }));
        let svg = std::fs::read_to_string(out.join("plots/ce_recovered_vs_l0.svg")).unwrap();
        for s in series {
            assert!(svg.contains(s), "plot lacks series {s}");
        }
    }
}

/// Write a width-2d export with W_enc = [I, -I], W_dec = [I; -I] and zero biases and
/// thresholds: x_hat = ReLU(x) - ReLU(-x) = x.
fn identity_export(dir: &Path, d: usize, hook: Option<&str>) {
    identity_export_with(dir, d, hook, 0.0, serde_json::json!({}));
}

/// The same with every b_dec entry `b_dec` and `extra` merged into cfg.json.
fn identity_export_with(dir: &Path, d: usize, hook: Option<&str>, b_dec: f32, extra: Value) {
    std::fs::create_dir_all(dir).unwrap();
    let eye = |sign: f32, rows: usize, cols: usize, transpose: bool| -> Vec<f32> {
        let mut v = vec![0f32; rows * cols];
        for i in 0..d {
            let (r, c) = if transpose {
                (i + if sign < 0.0 { d } else { 0 }, i)
            } else {
                (i, i + if sign < 0.0 { d } else { 0 })
            };
            v[r * cols + c] = sign;
        }
        v
    };
    let add = |a: Vec<f32>, b: Vec<f32>| a.iter().zip(&b).map(|(x, y)| x + y).collect::<Vec<f32>>();
    let w_enc = add(eye(1.0, d, 2 * d, false), eye(-1.0, d, 2 * d, false));
    let w_dec = add(eye(1.0, 2 * d, d, true), eye(-1.0, 2 * d, d, true));
    let tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = vec![
        ("W_enc", vec![d, 2 * d], w_enc),
        ("W_dec", vec![2 * d, d], w_dec),
        ("b_enc", vec![2 * d], vec![0.0; 2 * d]),
        ("b_dec", vec![d], vec![b_dec; d]),
        ("threshold", vec![2 * d], vec![0.0; 2 * d]),
    ];
    write_safetensors(&dir.join("sae_weights.safetensors"), &tensors);
    let mut cfg = serde_json::json!({
        "architecture": "jumprelu", "d_in": d, "d_sae": 2 * d,
        "metadata": { "hook_name": hook },
        "dmsae": { "core_size": 8, "k": 4 },
    });
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(dir.join("cfg.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
}

fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0;
    for (n, shape, v) in tensors {
        header.insert(
            n.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + 4 * v.len()]}),
        );
        off += 4 * v.len();
    }
    let mut h = serde_json::to_string(&header).unwrap().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    for (_, _, v) in tensors {
        bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn identity_sae_recovers_everything_and_writes_next_to_the_export() {
    let tmp = tempfile::tempdir().unwrap();
    let sae = tmp.path().join("identity");
    identity_export(&sae, 64, Some("blocks.2.hook_resid_post"));
    let data = fixtures().join("extract-sample.jsonl");
    let mut args = eval_args(&fixtures().join("gemma3"), &sae, &data, 64, 16, &sae);
    let i = args.iter().position(|a| a == "--out").unwrap();
    args.drain(i..i + 2);
    ok(&args);
    let got = read_json(&sae.join("eval.json"));
    assert_eq!(got["layer"], 2);
    let s = &got["saes"][0];
    let clean = got["clean_ce"].as_f64().unwrap();
    assert!(
        (got["zero_ce"].as_f64().unwrap() - clean).abs() > 1e-3,
        "{got}"
    );
    close(&s["ce"], clean, 1e-6, "spliced CE = clean CE");
    close(&s["ce_recovered"], 1.0, 1e-5, "recovered");
    close(&s["kl"], 0.0, 1e-7, "KL");
    close(&s["fvu"], 0.0, 1e-12, "FVU");
    close(
        &s["l0_total"],
        64.0,
        1e-9,
        "L0: one of each pair of latents",
    );
    // A single SAE gets no plot and no correlation.
    assert!(!sae.join("plots/ce_recovered_vs_l0.svg").exists());
    assert!(got["first_order_pearson"].is_null());

    // SAELens' apply_b_dec_to_input: with it (the default) the encoder reads x - b_dec and the
    // shifted identity is still exact; without it, x, and the reconstruction is off by b_dec.
    for (apply, exact) in [(true, true), (false, false)] {
        let dir = tmp.path().join(format!("shifted-{apply}"));
        let extra = serde_json::json!({ "apply_b_dec_to_input": apply });
        identity_export_with(&dir, 64, Some("blocks.2.hook_resid_post"), 0.5, extra);
        let out = tmp.path().join(format!("out-{apply}"));
        ok(&eval_args(
            &fixtures().join("gemma3"),
            &dir,
            &data,
            64,
            16,
            &out,
        ));
        let fvu = read_json(&out.join("eval.json"))["saes"][0]["fvu"]
            .as_f64()
            .unwrap();
        assert_eq!(
            fvu < 1e-12,
            exact,
            "apply_b_dec_to_input {apply}: FVU {fvu}"
        );
    }
}

#[test]
fn bad_input_is_a_one_line_error_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("gemma3");
    let data = fixtures().join("extract-sample.jsonl");
    let out = tmp.path().join("out");
    let run = |sae: &Path, extra: &[&str]| {
        let mut a = eval_args(&model, sae, &data, 32, 16, &out);
        a.extend(extra.iter().map(|s| s.to_string()));
        let r = dmsae(&a);
        assert!(!out.exists(), "wrote output after an error: {}", r.stderr);
        r
    };

    let narrow = tmp.path().join("narrow");
    identity_export(&narrow, 32, Some("blocks.1.hook_resid_post"));
    let r = run(&narrow, &[]);
    assert_one_line_error(
        &r,
        &["narrow/sae_weights.safetensors", "d_in 32", "d_model 64"],
    );

    let missing = tmp.path().join("missing");
    identity_export(&missing, 64, Some("blocks.1.hook_resid_post"));
    std::fs::remove_file(missing.join("sae_weights.safetensors")).unwrap();
    assert_one_line_error(
        &run(&missing, &[]),
        &["missing/sae_weights.safetensors", "missing"],
    );

    let deep = tmp.path().join("deep");
    identity_export(&deep, 64, Some("blocks.4.hook_resid_post"));
    assert_one_line_error(&run(&deep, &[]), &["layer 4 out of range", "4 layers"]);

    let nohook = tmp.path().join("nohook");
    identity_export(&nohook, 64, None);
    assert_one_line_error(&run(&nohook, &[]), &["--layer"]);
    assert_one_line_error(&run(&nohook, &["--layer", "7"]), &["layer 7 out of range"]);

    let l1 = tmp.path().join("l1");
    identity_export(&l1, 64, Some("blocks.1.hook_resid_post"));
    assert_one_line_error(
        &run(&l1, &["--layer", "2"]),
        &["l1/cfg.json", "layer 1", "layer 2"],
    );

    let scaled = tmp.path().join("scaled");
    let extra = serde_json::json!({ "normalize_activations": "expected_average_only_in" });
    identity_export_with(&scaled, 64, Some("blocks.1.hook_resid_post"), 0.0, extra);
    assert_one_line_error(
        &run(&scaled, &[]),
        &[
            "scaled/cfg.json",
            "normalize_activations",
            "expected_average_only_in",
        ],
    );

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_one_line_error(&run(&empty, &[]), &["empty", "no SAE export"]);

    std::fs::write(l1.join("sae_weights.safetensors"), b"not safetensors").unwrap();
    assert_one_line_error(&run(&l1, &[]), &["l1/sae_weights.safetensors"]);

    let big = tmp.path().join("big");
    identity_export(&big, 64, Some("blocks.1.hook_resid_post"));
    let r = dmsae(&eval_args(&model, &big, &data, 100_000, 16, &out));
    // Found only after evaluating what there is, so progress lines come first.
    let last = r.stderr.lines().last().unwrap();
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        last.starts_with("dmsae: error: ")
            && last.contains("extract-sample.jsonl")
            && last.contains("fewer than"),
        "{}",
        r.stderr
    );
    assert!(!out.exists());
}

#[test]
fn sigterm_stops_without_writing() {
    use std::io::Read;
    let tmp = tempfile::tempdir().unwrap();
    let one = std::fs::read_to_string(fixtures().join("extract-sample.jsonl")).unwrap();
    let data = tmp.path().join("big.jsonl");
    std::fs::write(&data, one.repeat(400)).unwrap();
    let sae = tmp.path().join("sae");
    identity_export(&sae, 64, Some("blocks.1.hook_resid_post"));
    let out = tmp.path().join("out");
    let args = eval_args(&fixtures().join("gemma3"), &sae, &data, 3000 * 16, 16, &out);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dmsae"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first progress report: the signal handler is installed by then.
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("eval: ") {
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "exited early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(3), "{rest}");
    assert!(
        rest.contains("stopped by a signal") && rest.contains("nothing written"),
        "{rest}"
    );
    assert!(!out.exists());
}

/// `DMSAE_REAL_GEMMA3=DIR cargo test --release --test eval_cli -- --ignored --nocapture`, DIR
/// from gen_real_gemma3_reference.py with DIR/eval-reference from
/// `gen_eval_fixtures.py --real DIR`: 4 contexts of 128 tokens at layer 9, float32 CPU.
#[test]
#[ignore = "needs DMSAE_REAL_GEMMA3 (see tests/fixtures/gen_eval_fixtures.py)"]
fn real_gemma3_270m_matches_transformers() {
    let dir = PathBuf::from(std::env::var("DMSAE_REAL_GEMMA3").expect("DMSAE_REAL_GEMMA3=DIR"));
    let refdir = dir.join("eval-reference");
    let want = read_json(&refdir.join("expected.json"));
    let (ctx, n) = (
        want["context"].as_u64().unwrap(),
        want["contexts"].as_u64().unwrap(),
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let t0 = std::time::Instant::now();
    let r = ok(&eval_args(
        &dir,
        &refdir,
        &refdir.join("data.jsonl"),
        n * ctx,
        ctx,
        &out,
    ));
    eprintln!(
        "{}{}dmsae eval: {:.1}s",
        r.stdout,
        r.stderr,
        t0.elapsed().as_secs_f64()
    );
    let got = read_json(&out.join("eval.json"));
    let worst = compare(&got, &want["exclude_bos"], 2e-4);
    eprintln!("largest |dmsae - transformers| {worst:.2e} nats");
}
