//! `dmsae train` end to end: synthetic activations from a known sparse dictionary go through
//! `dmsae store import` and `dmsae train`; the export must recover the dictionary and encode
//! in model units.

mod common;

use common::{assert_one_line_error, dmsae, ok};
use dmsae_trainer::synthetic::{recovery, sparse_dictionary};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

const D: usize = 32;
/// Model-unit scale of the synthetic activations: the trainer must normalise it away and fold
/// it back on export.
const UNITS: f32 = 7.0;

/// The export's tensors as f32 (they are all F32).
fn read_safetensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    assert!(
        common::safetensors_dtypes(path).iter().all(|d| d == "F32"),
        "{}",
        path.display()
    );
    common::read_safetensors(path)
        .into_iter()
        .map(|(k, (shape, v))| (k, (shape, v.into_iter().map(|x| x as f32).collect())))
        .collect()
}

fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let (mut header, mut data) = (serde_json::Map::new(), Vec::new());
    for (name, shape, vals) in tensors {
        let lo = data.len();
        vals.iter()
            .for_each(|v| data.extend_from_slice(&v.to_le_bytes()));
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [lo, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// Import `rows` [n, D] (model units) as a raw f32 store with small chunks, so the eval split has some.
fn import(dir: &Path, rows: &[f32]) -> std::path::PathBuf {
    common::import_f32_rows(dir, rows, D, &["--codec", "raw"])
}

/// SAELens JumpReLU encode + decode in plain f64: FVU of the export on `rows`.
fn export_fvu(w: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, rows: &[f32]) -> f64 {
    let (we, wd, be, bd, th) = (
        &w["W_enc"].1,
        &w["W_dec"].1,
        &w["b_enc"].1,
        &w["b_dec"].1,
        &w["threshold"].1,
    );
    let f = be.len();
    let n = rows.len() / D;
    let mut mean = [0f64; D];
    rows.chunks_exact(D).for_each(|x| {
        x.iter()
            .zip(&mut mean)
            .for_each(|(v, m)| *m += *v as f64 / n as f64)
    });
    let (mut err, mut var) = (0.0, 0.0);
    for x in rows.chunks_exact(D) {
        let mut x_hat: Vec<f64> = bd.iter().map(|v| *v as f64).collect();
        for j in 0..f {
            let pre = be[j] as f64
                + (0..D)
                    .map(|i| (x[i] - bd[i]) as f64 * we[i * f + j] as f64)
                    .sum::<f64>();
            if pre > th[j] as f64 && pre > 0.0 {
                (0..D).for_each(|i| x_hat[i] += pre * wd[j * D + i] as f64);
            }
        }
        err += x
            .iter()
            .zip(&x_hat)
            .map(|(a, b)| (*a as f64 - b).powi(2))
            .sum::<f64>();
        var += x
            .iter()
            .zip(&mean)
            .map(|(a, m)| (*a as f64 - m).powi(2))
            .sum::<f64>();
    }
    err / var
}

const CONFIG: &str = "lr = 3e-3\nwarmup_steps = 20\nbatch_tokens = 256\ndead_tokens = 20000\neval_fraction = 0.1\nlog_every = 100\n";

#[test]
fn train_recovers_a_synthetic_dictionary_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let (dict, mut rows) = sparse_dictionary(D, 48, 4, 64 * 256, 0.02, 11);
    rows.iter_mut().for_each(|v| *v *= UNITS);
    let store = import(tmp.path(), &rows);
    let cfg = tmp.path().join("small.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let out = tmp.path().join("run");
    let t = std::time::Instant::now();
    let r = ok(&[
        "train",
        "--shards",
        store.to_str().unwrap(),
        "--width",
        "96",
        "--k",
        "4",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "1500",
        "--seed",
        "0",
    ]);
    eprintln!(
        "{}{}(wall {:.1} s)",
        r.stdout,
        r.stderr,
        t.elapsed().as_secs_f64()
    );
    assert!(
        r.stderr.contains("tokens/s") && r.stderr.contains("ETA"),
        "no progress line: {}",
        r.stderr
    );

    let cfg_json: Value =
        serde_json::from_slice(&std::fs::read(out.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["architecture"], "jumprelu");
    assert_eq!(
        (cfg_json["d_in"].as_u64(), cfg_json["d_sae"].as_u64()),
        (Some(D as u64), Some(96))
    );
    let ours = &cfg_json["dmsae"];
    assert_eq!(ours["core_size"], 0);
    assert_eq!(ours["k"], 4);
    assert_eq!(ours["group_sizes"], serde_json::json!([3, 6, 12, 24, 51]));
    assert_eq!(ours["store"]["total_tokens"], 64 * 256);
    // E||x||^2 of the import is about UNITS^2 * 4.3, so the scale is about sqrt(32 / 212).
    let scale = ours["norm_scale"].as_f64().unwrap();
    assert!(
        (scale - (32.0f64 / (49.0 * 4.33)).sqrt()).abs() < 0.03,
        "scale {scale}"
    );

    let w = read_safetensors(&out.join("sae_weights.safetensors"));
    let shapes: Vec<(&str, Vec<usize>)> = w
        .iter()
        .map(|(k, (s, _))| (k.as_str(), s.clone()))
        .collect();
    assert_eq!(
        shapes,
        vec![
            ("W_dec", vec![96, D]),
            ("W_enc", vec![D, 96]),
            ("b_dec", vec![D]),
            ("b_enc", vec![96]),
            ("threshold", vec![96])
        ]
    );
    let rec = recovery(&dict, &w["W_dec"].1, D);
    let fvu = export_fvu(&w, &rows[..4096 * D]);
    eprintln!("recovery {rec:.4}, export FVU in model units {fvu:.4}");
    assert!(rec >= 0.9, "mean max cosine {rec}");
    assert!(fvu < 0.15, "FVU {fvu}");

    let lines: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 16, "15 train lines and the eval");
    for k in [
        "mse",
        "fvu",
        "l0_core",
        "l0_noncore",
        "l0_total",
        "dead_fraction",
        "dense_fraction",
        "data_wait_s",
        "tokens_per_s",
    ] {
        assert!(lines[0][k].is_number(), "no {k} in {}", lines[0]);
    }
    assert!(
        (lines[14]["l0_noncore"].as_f64().unwrap() - 4.0).abs() < 1e-9,
        "BatchTopK keeps k*B"
    );
    let eval = &lines[15]["eval"];
    assert!(eval["tokens"].as_u64().unwrap() >= 256, "{eval}");
    assert!(
        (eval["fvu"].as_f64().unwrap() - fvu).abs() < 0.03,
        "eval FVU {} vs export FVU {fvu}",
        eval["fvu"]
    );
    assert!(
        (eval["l0_noncore"].as_f64().unwrap() - 4.0).abs() < 1.0,
        "threshold L0 {}",
        eval["l0_noncore"]
    );

    // A given core, frozen: its encoder columns and anchored biases come out unchanged (model
    // units).
    let c = 8;
    let (we, be) = (&w["W_enc"].1, &w["b_enc"].1);
    let core_w: Vec<f32> = (0..D)
        .flat_map(|i| we[i * 96..i * 96 + c].to_vec())
        .collect();
    let core = tmp.path().join("core.safetensors");
    write_safetensors(
        &core,
        &[
            ("W_enc", vec![D, c], core_w.clone()),
            ("b_enc", vec![c], be[..c].to_vec()),
        ],
    );
    let out2 = tmp.path().join("run-core");
    ok(&[
        "train",
        "--shards",
        store.to_str().unwrap(),
        "--width",
        "96",
        "--k",
        "4",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
        "--steps",
        "200",
        "--core",
        core.to_str().unwrap(),
        "--quiet",
    ]);
    let w2 = read_safetensors(&out2.join("sae_weights.safetensors"));
    let (we2, be2, th2) = (&w2["W_enc"].1, &w2["b_enc"].1, &w2["threshold"].1);
    for i in 0..D {
        for j in 0..c {
            assert!(
                (we2[i * 96 + j] - core_w[i * c + j]).abs()
                    <= 1e-5 * core_w[i * c + j].abs().max(1.0)
            );
        }
    }
    // The core file's b_enc is anchored to x (x W_enc + b_enc); the export's is SAELens'
    // (x - b_dec) W_enc + b_enc.
    let bd2 = &w2["b_dec"].1;
    for j in 0..c {
        let shift: f32 = (0..D).map(|i| bd2[i] * we2[i * 96 + j]).sum();
        assert!(
            (be2[j] - shift - be[j]).abs() <= 1e-4 * be[j].abs().max(1.0),
            "b_enc[{j}]"
        );
    }
    assert!(th2[..c].iter().all(|t| *t == 0.0) && th2[c..].iter().all(|t| *t > 0.0));
    let cfg2: Value =
        serde_json::from_slice(&std::fs::read(out2.join("cfg.json")).unwrap()).unwrap();
    let l0_core = cfg2["dmsae"]["eval"]["l0_core"].as_f64().unwrap();
    assert!(l0_core > 0.0 && l0_core <= c as f64, "core L0 {l0_core}");
    assert_eq!(
        (
            cfg2["dmsae"]["core_size"].as_u64(),
            cfg2["dmsae"]["group_sizes"][0].as_u64()
        ),
        (Some(8), Some(2))
    );
}

#[test]
fn train_refuses_bad_input_on_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, rows) = sparse_dictionary(D, 16, 2, 2048, 0.0, 1);
    let store = import(tmp.path(), &rows);
    let s = store.to_str().unwrap();
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "widht = 64\n").unwrap();
    let r = dmsae(&[
        "train",
        "--shards",
        s,
        "--config",
        bad.to_str().unwrap(),
        "--out",
        o,
    ]);
    assert_one_line_error(&r, &["bad.toml", "widht"]);
    let core = tmp.path().join("core.safetensors");
    write_safetensors(
        &core,
        &[
            ("W_enc", vec![D + 1, 2], vec![0.5; (D + 1) * 2]),
            ("b_enc", vec![2], vec![0.0; 2]),
        ],
    );
    // `train` of a width-64, k-2 SAE into `o`, plus `extra`.
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train", "--shards", s, "--width", "64", "--k", "2", "--out", o,
        ];
        args.extend_from_slice(extra);
        dmsae(&args)
    };
    let r = train(&["--core", core.to_str().unwrap(), "--steps", "1"]);
    assert_one_line_error(&r, &["core.safetensors", "W_enc"]);
    let r = dmsae(&[
        "train", "--shards", s, "--width", "8", "--k", "2", "--out", o, "--steps", "1",
    ]);
    assert_one_line_error(&r, &["empty group"]);
    let missing = tmp.path().join("nope");
    let r = dmsae(&[
        "train",
        "--shards",
        missing.to_str().unwrap(),
        "--width",
        "64",
        "--k",
        "2",
        "--out",
        o,
    ]);
    assert_one_line_error(&r, &["nope"]);
    for dev in ["tpu", "cuda:99"] {
        assert_one_line_error(&train(&["--device", dev]), &[dev]);
    }
    // A learning rate that overflows the weights: stopped at the first non-finite step.
    let wild = tmp.path().join("wild.toml");
    std::fs::write(&wild, "lr = 1e30\nwarmup_steps = 0\nbatch_tokens = 256\n").unwrap();
    let r = train(&["--steps", "50", "--config", wild.to_str().unwrap()]);
    assert_one_line_error(&r, &["run", "training diverged at step", "lower lr"]);
    assert!(!out.join("cfg.json").exists());
}

/// `dmsae train` killed with SIGKILL after a periodic checkpoint, then resumed: metrics.jsonl
/// holds every logged step exactly once (the lines before the checkpoint were on disk when it
/// was written).
/// `dmsae train` of a width-128, k-4 SAE, quietly.
fn small_train_args(store: &Path, cfg: &Path, steps: u64, out: &Path) -> Vec<String> {
    let steps = steps.to_string();
    common::args_of(&[
        "train",
        "--shards",
        store.to_str().unwrap(),
        "--width",
        "128",
        "--k",
        "4",
        "--config",
        cfg.to_str().unwrap(),
        "--steps",
        &steps,
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ])
}

#[test]
fn a_hard_kill_after_a_checkpoint_keeps_every_metrics_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, rows) = sparse_dictionary(D, 48, 4, 16 * 256, 0.02, 3);
    let store = import(tmp.path(), &rows);
    let cfg = tmp.path().join("c.toml");
    // A line every 10 steps, a checkpoint every 10: the log's buffer (8 KiB, ~18 lines) would
    // hold the first checkpoint's lines until step ~180, far past the kill.
    assert!(CONFIG.contains("log_every = 100\n"));
    let c = CONFIG.replace(
        "log_every = 100\n",
        "log_every = 10\ncheckpoint_every = 10\n",
    );
    std::fs::write(&cfg, c).unwrap();
    let out = tmp.path().join("run");
    let steps = 1000u64;
    let args = small_train_args(&store, &cfg, steps, &out);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dmsae"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !out.join("checkpoint.json").exists() {
        assert!(t.elapsed().as_secs() < 60, "no checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // SAFETY: signalling our own child by its id.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) },
        0
    );
    child.wait().unwrap();
    assert!(
        !out.join("cfg.json").exists(),
        "the run finished before the kill"
    );
    let ckpt = common::read_safetensors(&out.join("checkpoint.safetensors"));
    eprintln!(
        "killed after the checkpoint at step {}",
        ckpt["position"].1[0]
    );
    let mut resume = args.clone();
    resume.push("--resume".into());
    ok(&resume);
    let lines: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let logged: Vec<u64> = lines
        .iter()
        .filter(|l| l["kind"] == "train")
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = (10..=steps).step_by(10).collect();
    assert_eq!(
        logged, want,
        "train steps in metrics.jsonl after kill -9 + resume"
    );
    assert_eq!(lines.iter().filter(|l| l["kind"] == "eval").count(), 1);
}

/// `DMSAE_KINETO`: libtorch's profiler over steps 2..5 writes its table of ops (on the CPU;
/// kernels on CUDA): per-step times of the encoder's product and Adam must be there.
#[test]
fn kineto_profiles_a_window_of_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, rows) = sparse_dictionary(D, 48, 4, 4 * 256, 0.02, 3);
    let store = import(tmp.path(), &rows);
    let cfg = tmp.path().join("c.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let table = tmp.path().join("kineto.tsv");
    let args = small_train_args(&store, &cfg, 8, &tmp.path().join("run"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dmsae"))
        .args(&args)
        .env("DMSAE_KINETO", &table)
        .env("DMSAE_KINETO_FROM", "2")
        .env("DMSAE_KINETO_UNITS", "3")
        .output()
        .unwrap();
    let r = common::finished(out, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("units 2..5 profiled"), "{}", r.stderr);
    let text = std::fs::read_to_string(&table).unwrap();
    assert!(text.starts_with("# 3 units over "), "{text}");
    let calls = |op: &str| -> f64 {
        text.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f.len() == 4 && f[3] == op).then(|| f[1].parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no {op} in\n{text}"))
    };
    // One fused Adam call a step; the encoder's product at least once a step.
    assert_eq!(calls("aten::_fused_adam_"), 1.0, "{text}");
    assert!(calls("aten::matmul") >= 1.0, "{text}");
}
