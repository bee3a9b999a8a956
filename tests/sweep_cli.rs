//! `dmsae sweep` end to end on a small planted store (activations: sparse sums of orthonormal
//! atoms; gradients on a few of them), after a short `dmsae distill`:
//! - a model trained inside the one-pass sweep has exactly the weights `dmsae train` gives it
//!   alone with the same config, seed and core (for each series);
//! - distilled-core and random-core models carry their core (size, encoder rows, thresholds);
//!   the random core is drawn from cycle 0's candidates; the baseline has no core;
//! - sweep.json/sweep.md/plots come from the real run, `report` prints the table;
//! - a rerun skips finished models, a k list split across invocations fills one table;
//! - bad input fails on one line with exit 2.

mod common;

use common::{assert_one_line_error, dmsae, json, ok, read_safetensors};
use std::path::{Path, PathBuf};

const D: usize = 16;
const ATOMS: usize = 12;
const S: [usize; 3] = [1, 5, 9];
const N: usize = 64 * 128;

/// A store of `n` planted tokens of width `d` (`common::planted`) under `dir/store`.
fn make_store(dir: &Path, d: usize, n: usize) -> PathBuf {
    let atoms = ATOMS.min(d);
    let s: Vec<usize> = S.iter().copied().filter(|&i| i < atoms).collect();
    let (_, acts, grads) = common::planted(11, d, atoms, &s, n, 2.0);
    common::import_acts_grads(dir, &acts, &grads, d)
}

const CONFIG: &str = "width = 48\nk = 3\ngroup_fractions = [0.5]\nlr = 3e-3\nwarmup_steps = 10\n\
batch_tokens = 128\ndead_tokens = 20000\neval_fraction = 0.25\nsteps = 150\nlog_every = 50\ncpu_threads = 1\n";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn sweep_trains_in_one_pass_what_train_trains_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let store = make_store(&tmp.path().join("data"), D, N);
    let cfg = tmp.path().join("cfg.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let run = tmp.path().join("run");
    ok(&[
        "distill",
        "--shards",
        s(&store),
        "--config",
        s(&cfg),
        "--cycles",
        "2",
        // Selected in both cycles: a core within cycle 0's 24 candidates, from which the random
        // core is drawn (the union of the two selections need not fit).
        "--min-selected",
        "2",
        "--quiet",
        "--out",
        s(&run),
    ]);
    for p in [
        "core_size",
        "jaccard",
        "fvu",
        "dloss",
        "lineages",
        "attribution_cumulative",
    ] {
        let svg = std::fs::read_to_string(run.join("plots").join(format!("{p}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<polyline"), "{p}");
    }
    let core_file = run.join("distilled/core.safetensors");
    let core = read_safetensors(&core_file);
    let c = core["lineage"].0[0];
    assert!(c > 0, "the planted store gives a non-empty distilled core");

    let sweep = tmp.path().join("sweep");
    let sweep_args = |ks: &str, out: &Path| {
        vec![
            "sweep".to_string(),
            "--shards".into(),
            s(&store).into(),
            "--distill-run".into(),
            s(&run).into(),
            "--config".into(),
            s(&cfg).into(),
            "--k".into(),
            ks.into(),
            "--quiet".into(),
            "--out".into(),
            s(out).into(),
        ]
    };
    // A split k list: k 2 first, then 2,4 trains only the k-4 models.
    let r = ok(&sweep_args("2", &sweep));
    assert!(
        r.stdout
            .contains("trained in one pass: distilled-core-k2, baseline-k2, random-core-k2"),
        "{}",
        r.stdout
    );
    let r = ok(&sweep_args("2,4", &sweep));
    assert!(
        r.stdout
            .contains("already finished, skipped: distilled-core-k2, baseline-k2, random-core-k2"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("trained in one pass: distilled-core-k4, baseline-k4, random-core-k4"),
        "{}",
        r.stdout
    );
    let before = std::fs::read(sweep.join("baseline-k4/sae_weights.safetensors")).unwrap();
    let r = ok(&sweep_args("2,4", &sweep));
    assert!(!r.stdout.contains("trained in one pass"), "{}", r.stdout);
    // The core given as the run's distilled/ directory is the same core (known by content).
    let distilled = run.join("distilled");
    let r = ok(&[
        "sweep",
        "--shards",
        s(&store),
        "--core",
        s(&distilled),
        "--series",
        "distilled-core",
        "--config",
        s(&cfg),
        "--k",
        "4",
        "--quiet",
        "--out",
        s(&sweep),
    ]);
    assert!(
        r.stdout
            .contains("already finished, skipped: distilled-core-k4"),
        "{}",
        r.stdout
    );
    assert_eq!(
        before,
        std::fs::read(sweep.join("baseline-k4/sae_weights.safetensors")).unwrap()
    );

    // One pass changes nothing: each model equals `dmsae train` alone, bit for bit.
    let random_file = sweep.join("random-core.safetensors");
    for (name, k, core) in [
        ("distilled-core-k4", "4", Some(&core_file)),
        ("baseline-k4", "4", None),
        ("random-core-k2", "2", Some(&random_file)),
    ] {
        let alone = tmp.path().join(format!("alone-{name}"));
        let mut args = vec![
            "train",
            "--shards",
            s(&store),
            "--config",
            s(&cfg),
            "--k",
            k,
            "--quiet",
            "--out",
            s(&alone),
        ];
        if let Some(p) = core {
            args.extend(["--core", s(p)]);
        }
        ok(&args);
        let a = std::fs::read(alone.join("sae_weights.safetensors")).unwrap();
        let b = std::fs::read(sweep.join(name).join("sae_weights.safetensors")).unwrap();
        assert!(a == b, "{name}: the sweep's weights differ from train's");
        let (ea, eb) = (
            json(&alone.join("cfg.json")),
            json(&sweep.join(name).join("cfg.json")),
        );
        assert_eq!(ea["dmsae"]["eval"], eb["dmsae"]["eval"], "{name}");
    }

    // Cores: size, encoder rows and thresholds as given; the baseline has none.
    let random = read_safetensors(&random_file);
    let picked: Vec<usize> = random["lineage"].1.iter().map(|v| *v as usize).collect();
    let c0 = json(&run.join("cycle-0/cfg.json"));
    let first_group = c0["dmsae"]["group_sizes"][0].as_u64().unwrap() as usize;
    assert_eq!(picked.len(), c);
    assert!(picked.windows(2).all(|w| w[0] < w[1]) && *picked.last().unwrap() < first_group);
    let w0 = read_safetensors(&run.join("cycle-0/sae_weights.safetensors"));
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
    for (i, &j) in picked.iter().enumerate() {
        for r in 0..D {
            assert!(close(
                random["W_enc"].1[r * c + i],
                w0["W_enc"].1[r * 48 + j]
            ));
        }
        assert_eq!(random["threshold"].1[i], w0["threshold"].1[j]);
    }
    assert_ne!(
        random["W_enc"].1, core["W_enc"].1,
        "a random draw is not the distilled core"
    );
    for (name, file) in [("distilled-core", &core), ("random-core", &random)] {
        for k in [2, 4] {
            let dir = sweep.join(format!("{name}-k{k}"));
            let x = json(&dir.join("cfg.json"));
            assert_eq!(x["dmsae"]["core_size"], c);
            assert_eq!(x["dmsae"]["sweep_series"], name);
            assert_eq!(x["dmsae"]["k"], k);
            let w = read_safetensors(&dir.join("sae_weights.safetensors"));
            for i in 0..c {
                for r in 0..D {
                    assert!(
                        close(w["W_enc"].1[r * 48 + i], file["W_enc"].1[r * c + i]),
                        "{name}"
                    );
                }
                assert_eq!(w["threshold"].1[i], file["threshold"].1[i], "{name}");
            }
        }
    }
    let b = json(&sweep.join("baseline-k2/cfg.json"));
    assert_eq!(
        (
            b["dmsae"]["core_size"].as_u64(),
            b["dmsae"]["eval"]["l0_core"].as_f64()
        ),
        (Some(0), Some(0.0))
    );

    // The summary: six models, total L0 counts the core.
    let sj = json(&sweep.join("sweep.json"));
    let models = sj["models"].as_array().unwrap();
    let names: Vec<&str> = models
        .iter()
        .map(|m| m["model"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "distilled-core-k2",
            "distilled-core-k4",
            "baseline-k2",
            "baseline-k4",
            "random-core-k2",
            "random-core-k4"
        ]
    );
    for m in models {
        let v = |k: &str| m[k].as_f64().unwrap();
        assert!((v("l0_total") - v("l0_core") - v("l0_noncore")).abs() < 1e-9);
        assert!(v("fvu") > 0.0 && v("fvu") < 1.0, "{m}");
        assert!(m["first_order_dloss"].as_f64().is_some());
        if m["series"] != "baseline" {
            assert!(v("l0_core") > 0.0, "{m}");
        }
    }
    // At equal total L0: one row per model's L0, ascending; each model's own series reads its
    // own FVU there, and a series is empty outside its L0 range.
    let grid = sj["at_equal_l0"].as_array().unwrap();
    assert_eq!(grid.len(), models.len());
    let l0 = |r: &serde_json::Value| r["l0_total"].as_f64().unwrap();
    assert!(grid.windows(2).all(|w| l0(&w[0]) < l0(&w[1])));
    for m in models {
        let row = grid
            .iter()
            .find(|r| r["l0_total"] == m["l0_total"])
            .unwrap();
        assert_eq!(row["fvu"][m["series"].as_str().unwrap()], m["fvu"]);
    }
    let range = |series: &str| {
        let l0s = models.iter().filter(|m| m["series"] == series).map(l0);
        (
            l0s.clone().fold(f64::MAX, f64::min),
            l0s.fold(0.0, f64::max),
        )
    };
    for r in grid {
        for series in ["distilled-core", "baseline", "random-core"] {
            let (lo, hi) = range(series);
            let inside = (lo..=hi).contains(&l0(r));
            assert_eq!(r["fvu"][series].is_f64(), inside, "{series} at {}", l0(r));
        }
    }
    let md = std::fs::read_to_string(sweep.join("sweep.md")).unwrap();
    assert!(md.contains("| L0 total | FVU distilled-core | FVU baseline | FVU random-core |"));
    for p in ["fvu_vs_l0", "dloss_vs_l0"] {
        let svg = std::fs::read_to_string(sweep.join("plots").join(format!("{p}.svg"))).unwrap();
        assert_eq!(svg.matches("<polyline").count(), 3, "{p}");
    }
    let r = ok(&["report", s(&sweep)]);
    assert_eq!(
        r.stdout
            .lines()
            .filter(|l| l.starts_with("| baseline |"))
            .count(),
        2,
        "{}",
        r.stdout
    );

    // Bad input: one line, exit 2, naming what is wrong.
    let missing = tmp.path().join("nope.safetensors");
    let mut a = sweep_args("2", &tmp.path().join("bad1"));
    a.extend(["--core".into(), s(&missing).into()]);
    assert_one_line_error(&dmsae(&a), &["nope.safetensors"]);
    for ks in ["0", "", "2,,4", "x"] {
        assert_one_line_error(&dmsae(&sweep_args(ks, &tmp.path().join("bad2"))), &["--k"]);
    }
    let bad = tmp.path().join("bad4");
    assert_one_line_error(
        &dmsae(&sweep_args("2,200", &bad)),
        &["distilled-core-k200", "k = 200"],
    );
    assert!(
        !bad.exists(),
        "nothing is written before every model's config is checked"
    );
    let other = make_store(&tmp.path().join("other"), 8, 2048);
    let mut a = sweep_args("2", &tmp.path().join("bad3"));
    a[2] = s(&other).into();
    assert_one_line_error(&dmsae(&a), &["core.safetensors", "W_enc [8, c]"]);
    let mut a = sweep_args("2", &sweep);
    a.extend(["--width".into(), "40".into()]);
    // Every finished model in --out is checked first, in name order.
    assert_one_line_error(&dmsae(&a), &["baseline-k2/cfg.json", "another config"]);
    // A core regenerated at the same path is another core: known by content, not path.
    let core_path = run.join("distilled/core.safetensors");
    let saved = std::fs::read(&core_path).unwrap();
    let mut changed = saved.clone();
    let last = changed.len() - 1;
    changed[last] ^= 1;
    std::fs::write(&core_path, &changed).unwrap();
    assert_one_line_error(
        &dmsae(&sweep_args("2", &sweep)),
        &["distilled-core-k2", "another config or core"],
    );
    std::fs::write(&core_path, &saved).unwrap();

    // The benchmark retrains each model alone beside the one pass and finds the same bytes.
    let bench = tmp.path().join("bench");
    let mut a = sweep_args("2,4", &bench);
    a.extend([
        "--series".into(),
        "baseline".into(),
        "--compare-separate".into(),
    ]);
    let r = ok(&a);
    let rows: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("| baseline-k"))
        .collect();
    assert_eq!(rows.len(), 2, "{}", r.stdout);
    assert!(
        rows.iter().all(|l| l.ends_with("| yes, bit for bit |")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("one pass") && r.stdout.contains(": ratio "),
        "{}",
        r.stdout
    );
    assert!(!bench.join(".compare-separate").exists());
    assert_one_line_error(&dmsae(&a), &["--compare-separate", "already finished"]);

    // SIGTERM: every model checkpoints at the same step, exit 3; the rerun resumes them all in
    // one pass and ends where `train` ends alone.
    let cfg2 = tmp.path().join("cfg2.toml");
    std::fs::write(
        &cfg2,
        CONFIG.replace("steps = 150", "steps = 800") + "checkpoint_every = 100\n",
    )
    .unwrap();
    let cut = tmp.path().join("cut");
    let mut a = sweep_args("2", &cut);
    a[6] = s(&cfg2).into();
    a.extend(["--series".into(), "baseline,random-core".into()]);
    let r = common::sigterm_once_exists(&a, &cut.join("random-core-k2/checkpoint.json"));
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    for m in ["baseline-k2", "random-core-k2"] {
        assert!(
            cut.join(m).join("checkpoint.safetensors").exists()
                && !cut.join(m).join("sae_weights.safetensors").exists()
        );
    }
    let r = ok(&a);
    assert!(
        r.stderr
            .contains("sweep: resumed from the checkpoint at step "),
        "{}",
        r.stderr
    );
    let alone = tmp.path().join("alone-long");
    ok(&[
        "train",
        "--shards",
        s(&store),
        "--config",
        s(&cfg2),
        "--k",
        "2",
        "--quiet",
        "--out",
        s(&alone),
    ]);
    assert!(
        std::fs::read(alone.join("sae_weights.safetensors")).unwrap()
            == std::fs::read(cut.join("baseline-k2/sae_weights.safetensors")).unwrap(),
        "killed and resumed sweep differs from train alone"
    );
    assert!(!cut.join("baseline-k2/checkpoint.safetensors").exists());
}

/// Finished models are matched to the store by content: the same store under another spelling
/// of its path skips them; other data re-imported at the same path is refused on one line
/// naming the model, both for a model of this invocation and for one only the summary covers
/// (before anything trains).
#[test]
fn finished_sweep_models_are_matched_to_the_store_by_content() {
    let tmp = tempfile::tempdir().unwrap();
    let store = make_store(tmp.path(), D, 16 * 128);
    let cfg = tmp.path().join("cfg.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let out = tmp.path().join("sweep");
    let args = |store: &Path, ks: &str| {
        let a = [
            "sweep",
            "--shards",
            s(store),
            "--series",
            "baseline",
            "--k",
            ks,
        ];
        let b = ["--config", s(&cfg), "--quiet", "--out", s(&out)];
        a.iter()
            .chain(&b)
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
    };
    ok(&args(&store, "2"));
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&store, &link).unwrap();
    for spelling in [link, tmp.path().join(".").join("store")] {
        let r = ok(&args(&spelling, "2"));
        assert!(
            r.stdout.contains("already finished, skipped: baseline-k2"),
            "{}",
            r.stdout
        );
    }

    std::fs::remove_dir_all(&store).unwrap();
    let (_, acts, grads) = common::planted(12, D, ATOMS, &S, 16 * 128, 2.0);
    assert_eq!(
        common::import_acts_grads(tmp.path(), &acts, &grads, D),
        store
    );
    assert_one_line_error(
        &dmsae(&args(&store, "2")),
        &["baseline-k2", "another store"],
    );
    assert_one_line_error(
        &dmsae(&args(&store, "4")),
        &["baseline-k2", "another store"],
    );
    assert!(!out.join("baseline-k4").exists(), "trained before refusing");
}
