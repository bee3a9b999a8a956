//! Distillation with a planted answer: activations are sparse sums of a known orthonormal
//! dictionary, and the stored gradients load only on a known subset S of its atoms. Through
//! `dmsae store import` and `dmsae distill`, with the default frozen core, every cycle must
//! select S (precision and recall at least 0.9), later cycles must keep S's lineages, and the
//! distilled core (lineages selected in every cycle) must be S.
//! Also: only encoder columns carry over between cycles, `train-cycle` repeats a cycle, finished
//! cycles are reused, and a changed config is refused.

mod common;

use common::{assert_one_line_error, dmsae, json, ok, read_safetensors};
use std::path::{Path, PathBuf};

const D: usize = 32;
const ATOMS: usize = 24;
/// The planted answer: the atoms the loss gradient sees.
const S: [usize; 4] = [2, 7, 13, 19];
/// Model units of the activations, so the normalisation is exercised.
const UNITS: f32 = 3.0;
const N: usize = 64 * 256;

/// (temp dir, atoms, the planted store, a distill config holding `config`) for one test.
fn planted_run(config: &str) -> (tempfile::TempDir, Vec<Vec<f64>>, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let (atoms, acts, grads) = common::planted(5, D, ATOMS, &S, N, UNITS);
    let store = common::import_acts_grads(tmp.path(), &acts, &grads, D);
    let cfg = tmp.path().join("distill.toml");
    std::fs::write(&cfg, config).unwrap();
    (tmp, atoms, store, cfg)
}

/// `dmsae distill` of `store` under `cfg` for `cycles` cycles into `out`, quietly.
fn distill_args(store: &Path, cfg: &Path, cycles: u32, out: &Path) -> Vec<String> {
    let (store, cfg, out) = (store.to_str(), cfg.to_str(), out.to_str());
    let cycles = cycles.to_string();
    let args = [
        "distill",
        "--shards",
        store.unwrap(),
        "--config",
        cfg.unwrap(),
    ];
    let rest = ["--cycles", &cycles, "--quiet", "--out", out.unwrap()];
    args.iter().chain(&rest).map(|a| a.to_string()).collect()
}

/// The atom a direction is closest to, and |cosine|.
fn best_atom(atoms: &[Vec<f64>], v: &[f64]) -> (usize, f64) {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-30);
    atoms
        .iter()
        .enumerate()
        .map(|(i, a)| {
            (
                i,
                a.iter().zip(v).map(|(x, y)| x * y).sum::<f64>().abs() / n,
            )
        })
        .fold((0, -1.0), |b, c| if c.1 > b.1 { c } else { b })
}

/// (precision, recall) of directions against S: a direction counts when its closest atom (by
/// |cosine| > 0.75, which no other orthonormal atom can also exceed 0.67) is in S; recall counts the atoms of S some direction matched.
fn precision_recall(atoms: &[Vec<f64>], dirs: &[Vec<f64>]) -> (f64, f64) {
    let hits: Vec<usize> = dirs
        .iter()
        .map(|v| best_atom(atoms, v))
        .filter(|(i, c)| *c > 0.75 && S.contains(i))
        .map(|(i, _)| i)
        .collect();
    let found = S.iter().filter(|s| hits.contains(s)).count();
    (
        hits.len() as f64 / dirs.len().max(1) as f64,
        found as f64 / S.len() as f64,
    )
}

const CONFIG: &str = "width = 64\nk = 3\ngroup_fractions = [0.5]\nlr = 3e-3\nwarmup_steps = 20\n\
batch_tokens = 256\ndead_tokens = 20000\neval_fraction = 0.25\nsteps = 1500\nlog_every = 100\ncpu_threads = 1\n";

#[test]
fn distillation_selects_the_planted_directions() {
    let (tmp, atoms, store, cfg) = planted_run(CONFIG);
    let run = tmp.path().join("run");
    let args = |cycles: u32, cfg: &Path| {
        let mut a = distill_args(&store, cfg, cycles, &run);
        a.extend(["--min-selected".into(), "3".into()]);
        a
    };
    let t = std::time::Instant::now();
    let r = ok(&args(3, &cfg));
    eprintln!("{}(wall {:.1} s)", r.stdout, t.elapsed().as_secs_f64());

    // Each cycle's selection, read through its decoder rows (the export, model units).
    // Lineages of the S latents selected in cycle 0: every later cycle must keep them.
    let mut s_lineages: Vec<u64> = Vec::new();
    for n in 0..3 {
        let dir = run.join(format!("cycle-{n}"));
        let c = json(&dir.join("cycle.json"));
        let sel: Vec<usize> = serde_json::from_value(c["selected"].clone()).unwrap();
        let lineages: Vec<u64> = serde_json::from_value(c["lineages"].clone()).unwrap();
        let w = read_safetensors(&dir.join("sae_weights.safetensors"));
        let wd = &w["W_dec"].1;
        let dirs: Vec<Vec<f64>> = sel
            .iter()
            .map(|&j| wd[j * D..(j + 1) * D].to_vec())
            .collect();
        let (p, rc) = precision_recall(&atoms, &dirs);
        if std::env::var("DEBUG_PLANTED").is_ok() {
            let table = std::fs::read_to_string(dir.join("attribution.csv")).unwrap();
            for (j, l) in table.lines().skip(1).enumerate() {
                let (a, cs) = best_atom(&atoms, &wd[j * D..(j + 1) * D]);
                // Norm of the unit decoder row's projection on span(S): how much a non-S
                // latent's attribution can leak from the gradient.
                let dj = &wd[j * D..(j + 1) * D];
                let dot = |s: usize| atoms[s].iter().zip(dj).map(|(x, y)| x * y).sum::<f64>();
                let on_s = S.iter().map(|&s| dot(s).powi(2)).sum::<f64>().sqrt()
                    / dj.iter().map(|x| x * x).sum::<f64>().sqrt();
                let in_s = S.contains(&a);
                eprintln!("{l}  atom {a} cos {cs:.3} in_S {in_s} on_S {on_s:.3}");
            }
        }
        eprintln!(
            "cycle {n}: core {} -> {} selected, precision {p:.3}, recall {rc:.3}, jaccard {}",
            c["core_in"].as_array().unwrap().len(),
            sel.len(),
            c["jaccard_prev"]
        );
        assert!(p >= 0.9, "cycle {n}: precision {p}, selected {sel:?}");
        assert!(rc >= 0.9, "cycle {n}: recall {rc}, selected {sel:?}");
        if n > 0 {
            assert_eq!(c["jaccard_prev"].as_f64(), Some(1.0), "cycle {n}");
        }
        if n == 0 {
            s_lineages = sel
                .iter()
                .zip(&lineages)
                .filter(|(&j, _)| S.contains(&best_atom(&atoms, &wd[j * D..(j + 1) * D]).0))
                .map(|(_, &l)| l)
                .collect();
            assert_eq!(s_lineages.len(), S.len());
        } else {
            assert!(
                s_lineages.iter().all(|l| lineages.contains(l)),
                "cycle {n} dropped an S lineage: {lineages:?} vs {s_lineages:?}"
            );
            let core_in: Vec<u64> = serde_json::from_value(c["core_in"].clone()).unwrap();
            // The core keeps its lineages in index order: latent j < |core| is core_in[j].
            for (&j, l) in sel.iter().zip(&lineages) {
                if j < core_in.len() {
                    assert_eq!(core_in[j], *l);
                }
            }
        }
        // The table has one row per candidate (core + first non-core group) and marks the selection.
        let table = std::fs::read_to_string(dir.join("attribution.csv")).unwrap();
        let rows: Vec<&str> = table.lines().skip(1).collect();
        assert_eq!(rows.len() as u64, c["candidates"].as_u64().unwrap());
        assert_eq!(
            rows.iter().filter(|r| r.contains(",true,")).count(),
            sel.len()
        );
        assert!(dir.join("attribution.parquet").exists());
    }

    // Only encoder columns and b_enc carry over: the core file holds no decoder, cycle 1's
    // core encoder equals cycle 0's selection (frozen), its decoder rows and b_dec do not.
    let core0 = read_safetensors(&run.join("cycle-0/core.safetensors"));
    assert_eq!(
        core0.keys().collect::<Vec<_>>(),
        ["W_enc", "b_enc", "lineage", "threshold"]
    );
    let c0 = json(&run.join("cycle-0/cycle.json"));
    let sel0: Vec<usize> = serde_json::from_value(c0["selected"].clone()).unwrap();
    let (w0, w1) = (
        read_safetensors(&run.join("cycle-0/sae_weights.safetensors")),
        read_safetensors(&run.join("cycle-1/sae_weights.safetensors")),
    );
    let c = sel0.len();
    let f1 = w1["b_enc"].1.len();
    for i in 0..D {
        for j in 0..c {
            let (a, b) = (core0["W_enc"].1[i * c + j], w1["W_enc"].1[i * f1 + j]);
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1e-3),
                "W_enc[{i},{j}]: {a} vs {b}"
            );
        }
    }
    // The export's b_enc is SAELens' (x - b_dec) W_enc + b_enc; the core's is anchored to x.
    for j in 0..c {
        let shift: f64 = (0..D)
            .map(|i| w1["b_dec"].1[i] * w1["W_enc"].1[i * f1 + j])
            .sum();
        let (got, want) = (w1["b_enc"].1[j] - shift, core0["b_enc"].1[j]);
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "b_enc[{j}]: {got} vs {want}"
        );
    }
    let mut dec_diff: f64 = 0.0;
    for (j, &old) in sel0.iter().enumerate() {
        for i in 0..D {
            dec_diff = dec_diff.max((w1["W_dec"].1[j * D + i] - w0["W_dec"].1[old * D + i]).abs());
        }
    }
    assert!(
        dec_diff > 1e-4,
        "core decoder rows carried over (max diff {dec_diff})"
    );
    assert_ne!(w1["b_dec"].1, w0["b_dec"].1);

    // The distilled core (lineages selected in all 3 cycles): S, by lineage (lineages matched to
    // atoms through cycle 0's decoder).
    let summary = json(&run.join("summary.json"));
    let distilled = read_safetensors(&run.join("distilled/core.safetensors"));
    let kept: Vec<u64> = distilled["lineage"].1.iter().map(|&l| l as u64).collect();
    assert_eq!(
        summary["distilled"]["size"].as_u64(),
        Some(kept.len() as u64)
    );
    assert_eq!(distilled["W_enc"].0, [D, kept.len()]);
    let hits = kept.iter().filter(|l| s_lineages.contains(l)).count() as f64;
    let (p, rc) = (hits / kept.len().max(1) as f64, hits / S.len() as f64);
    eprintln!(
        "distilled core: {} lineages, precision {p:.3}, recall {rc:.3}",
        kept.len()
    );
    assert!(
        p >= 0.9 && rc >= 0.9,
        "distilled: precision {p}, recall {rc}"
    );
    // Each column is its lineage's column in the last cycle's core file.
    let last = read_safetensors(&run.join("cycle-2/core.safetensors"));
    let (lc, kc) = (last["lineage"].1.len(), kept.len());
    for (k, l) in kept.iter().enumerate() {
        let j = last["lineage"]
            .1
            .iter()
            .position(|&x| x as u64 == *l)
            .unwrap();
        for i in 0..D {
            assert_eq!(
                distilled["W_enc"].1[i * kc + k],
                last["W_enc"].1[i * lc + j]
            );
        }
    }

    // `report` prints the summary; a rerun reuses the finished cycles; another config is refused.
    let rep = ok(&["report", run.to_str().unwrap()]);
    assert_eq!(
        rep.stdout.lines().filter(|l| l.starts_with("| ")).count(),
        1 + 3
    );
    let before = std::fs::metadata(run.join("cycle-1/cycle.json"))
        .unwrap()
        .modified()
        .unwrap();
    let t = std::time::Instant::now();
    ok(&args(3, &cfg));
    let after = std::fs::metadata(run.join("cycle-1/cycle.json"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "a finished cycle was redone");
    eprintln!("rerun: {:.1} s", t.elapsed().as_secs_f64());
    // `train-cycle` from cycle 0 repeats distill's cycle 1 (same seed, core and store).
    let tc = tmp.path().join("tc1");
    let r = ok(&[
        "train-cycle",
        "--shards",
        store.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--core",
        run.join("cycle-0").to_str().unwrap(),
        "--quiet",
        "--out",
        tc.to_str().unwrap(),
    ]);
    assert!(r.stdout.contains("cycle 1: core 4 ->"), "{}", r.stdout);
    let (a, b) = (
        json(&tc.join("cycle.json")),
        json(&run.join("cycle-1/cycle.json")),
    );
    for key in [
        "cycle",
        "seed",
        "core_in",
        "selected",
        "lineages",
        "next_lineage",
    ] {
        assert_eq!(a[key], b[key], "{key}");
    }
    // Nothing to attribute (every chunk held out, no training split): refused before any
    // training is written.
    let none = tmp.path().join("none.toml");
    std::fs::write(
        &none,
        CONFIG.replace("eval_fraction = 0.25", "eval_fraction = 1.0"),
    )
    .unwrap();
    let fresh = tmp.path().join("fresh");
    let r = dmsae(&distill_args(&store, &none, 1, &fresh));
    assert_one_line_error(&r, &["no training tokens with gradients"]);
    assert!(!fresh.join("cycle-0").join("cfg.json").exists());
    let other = tmp.path().join("other.toml");
    assert!(CONFIG.contains("steps = 1500"));
    std::fs::write(&other, CONFIG.replace("steps = 1500", "steps = 1501")).unwrap();
    let r = dmsae(&args(3, &other));
    assert_one_line_error(&r, &["cycle-0", "cycle.json"]);
}

/// With `core_frozen = false` the carried core keeps training, and every cycle still selects
/// exactly S.
#[test]
fn a_trainable_core_keeps_exactly_the_planted_directions() {
    let (tmp, atoms, store, cfg) = planted_run(&format!("{CONFIG}core_frozen = false\n"));
    let run = tmp.path().join("run");
    ok(&distill_args(&store, &cfg, 3, &run));
    for n in 0..3 {
        let dir = run.join(format!("cycle-{n}"));
        let cy = json(&dir.join("cycle.json"));
        let sel: Vec<usize> = serde_json::from_value(cy["selected"].clone()).unwrap();
        let wd = &read_safetensors(&dir.join("sae_weights.safetensors"))["W_dec"].1;
        let dirs: Vec<Vec<f64>> = sel
            .iter()
            .map(|&j| wd[j * D..(j + 1) * D].to_vec())
            .collect();
        let (p, rc) = precision_recall(&atoms, &dirs);
        eprintln!(
            "trainable core, cycle {n}: {} selected, precision {p:.3}, recall {rc:.3}",
            sel.len()
        );
        assert!(
            p >= 0.9 && rc >= 0.9,
            "cycle {n}: precision {p}, recall {rc}, selected {sel:?}"
        );
        if n > 0 {
            assert_eq!(cy["jaccard_prev"].as_f64(), Some(1.0), "cycle {n}");
        }
    }
}

/// `distill` killed by SIGTERM in the middle of cycle 1 exits 3 with cycle 1's checkpoint, and
/// the same command resumes it: every cycle's weights, core file and attribution table, and the
/// distilled core, come out byte for byte as in an uninterrupted run.
#[test]
fn a_killed_distill_resumes_to_the_same_cycles() {
    assert!(CONFIG.contains("steps = 1500"));
    let short = CONFIG.replace("steps = 1500", "steps = 600") + "checkpoint_every = 50\n";
    let (tmp, _, store, cfg) = planted_run(&short);
    let args = |out: &Path| distill_args(&store, &cfg, 2, out);
    let full = tmp.path().join("full");
    ok(&args(&full));

    let cut = tmp.path().join("cut");
    let r = common::sigterm_once_exists(&args(&cut), &cut.join("cycle-1/checkpoint.json"));
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("rerun the same command to resume"),
        "{}",
        r.stderr
    );
    assert!(cut.join("cycle-0/cycle.json").exists());
    assert!(!cut.join("cycle-1/cycle.json").exists() && !cut.join("distilled").exists());

    let stopped = read_safetensors(&cut.join("cycle-1/checkpoint.safetensors"))["position"].1[0];
    assert!(
        (1.0..600.0).contains(&stopped),
        "checkpoint at step {stopped}"
    );
    let r = ok(&args(&cut));
    // Cycle 0 is reused as finished; cycle 1 continues its checkpoint rather than restarting.
    assert!(
        r.stderr.contains(&format!(
            "cycle 1: resumed from the checkpoint at step {stopped}\n"
        )),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("cycle 0: resumed"), "{}", r.stderr);
    for f in [
        "cycle-0/sae_weights.safetensors",
        "cycle-1/sae_weights.safetensors",
        "cycle-1/core.safetensors",
        "cycle-1/attribution.csv",
        "distilled/core.safetensors",
    ] {
        assert!(
            std::fs::read(full.join(f)).unwrap() == std::fs::read(cut.join(f)).unwrap(),
            "{f} differs after a kill in cycle 1 and a resume"
        );
    }
    assert!(!cut.join("cycle-1/checkpoint.safetensors").exists());
}

/// A config for the tests below, where only the cycles' bookkeeping matters: short cycles.
fn short_config() -> String {
    assert!(CONFIG.contains("steps = 1500"));
    CONFIG.replace("steps = 1500", "steps = 200")
}

/// Add `by` to the first value of the F32 tensor `name` in a safetensors file, in place.
fn nudge_f32(path: &Path, name: &str, by: f32) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header[name]["dtype"], "F32");
    let at = 8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    let v = f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) + by;
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

/// Finished cycles (cycle.json, or an export whose attribution had not run) are matched to the
/// store and the previous core by content: the same store under another spelling of its path
/// is reused; other data re-imported at the same path, or a changed previous core, is refused
/// on one line naming the cycle, before anything is written.
#[test]
fn finished_cycles_are_matched_to_the_store_by_content() {
    let (tmp, _, store, cfg) = planted_run(&short_config());
    let run = tmp.path().join("run");
    ok(&distill_args(&store, &cfg, 1, &run));
    let c0 = run.join("cycle-0/cycle.json");
    let t0 = modified(&c0);

    // Another spelling of the same store: a symlink continues the run (cycle 0 reused), and
    // `/./` reuses both cycles.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&store, &link).unwrap();
    ok(&distill_args(&link, &cfg, 2, &run));
    assert_eq!(
        modified(&c0),
        t0,
        "cycle 0 was redone for a symlink to its store"
    );
    let c1 = run.join("cycle-1/cycle.json");
    let t1 = modified(&c1);
    let dotted = tmp.path().join(".").join("store");
    ok(&distill_args(&dotted, &cfg, 2, &run));
    assert_eq!((modified(&c0), modified(&c1)), (t0, t1));

    // Cycle 0's core changed (same lineages): cycle 1 is refused, by cycle.json and by its export.
    let core0 = run.join("cycle-0/core.safetensors");
    let saved = std::fs::read(&core0).unwrap();
    nudge_f32(&core0, "W_enc", 0.5);
    let r = dmsae(&distill_args(&store, &cfg, 2, &run));
    assert_one_line_error(&r, &["cycle-1", "cycle.json", "another config or core"]);
    let cycle1 = std::fs::read(&c1).unwrap();
    std::fs::remove_file(&c1).unwrap();
    let r = dmsae(&distill_args(&store, &cfg, 2, &run));
    assert_one_line_error(&r, &["cycle-1", "cfg.json", "another core"]);
    assert!(!c1.exists());
    std::fs::write(&core0, saved).unwrap();
    std::fs::write(&c1, cycle1).unwrap();
    ok(&distill_args(&store, &cfg, 2, &run));
    assert_eq!(modified(&c0), t0);

    // Other data re-imported at the same path: refused, by cycle.json and by the export.
    std::fs::remove_dir_all(&store).unwrap();
    let (_, acts, grads) = common::planted(6, D, ATOMS, &S, N, UNITS);
    assert_eq!(
        common::import_acts_grads(tmp.path(), &acts, &grads, D),
        store
    );
    let r = dmsae(&distill_args(&store, &cfg, 3, &run));
    assert_one_line_error(&r, &["cycle-0", "cycle.json", "another store"]);
    std::fs::remove_file(&c0).unwrap();
    let r = dmsae(&distill_args(&store, &cfg, 3, &run));
    assert_one_line_error(&r, &["cycle-0", "cfg.json", "another store"]);
    assert!(!c0.exists() && !run.join("cycle-2").exists());
}

/// A cycle that selects nothing (zero gradients: every candidate scores 0) leaves the next
/// cycle without a core, and the distilled core empty.
#[test]
fn an_empty_selection_leaves_the_next_cycle_without_a_core() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, acts, _) = common::planted(5, D, ATOMS, &S, N, UNITS);
    let store = common::import_acts_grads(tmp.path(), &acts, &vec![0.0; acts.len()], D);
    let cfg = tmp.path().join("distill.toml");
    std::fs::write(&cfg, short_config()).unwrap();
    let run = tmp.path().join("run");
    let mut args = distill_args(&store, &cfg, 2, &run);
    args.extend(["--min-selected".into(), "1".into()]);
    let r = ok(&args);
    let c0 = json(&run.join("cycle-0/cycle.json"));
    assert_eq!(c0["core_size"], 0, "{c0}");
    let c1 = json(&run.join("cycle-1/cycle.json"));
    assert_eq!(
        (c1["cycle"].as_u64(), c1["core_in"].clone()),
        (Some(1), serde_json::json!([]))
    );
    assert_eq!(json(&run.join("cycle-1/cfg.json"))["dmsae"]["core_size"], 0);
    assert!(
        r.stdout.contains("distilled core: 0 lineages"),
        "{}",
        r.stdout
    );
    assert!(!run.join("distilled/core.safetensors").exists());
    // A rerun reuses both cycles.
    let t = modified(&run.join("cycle-1/cycle.json"));
    ok(&args);
    assert_eq!(modified(&run.join("cycle-1/cycle.json")), t);
}
