//! `dmsae train` killed by SIGTERM and resumed ends at the same weights, byte for byte, as an
//! uninterrupted run with the same seed (CPU).

mod common;

use common::ok;
use dmsae_trainer::synthetic::sparse_dictionary;
use serde_json::Value;
use std::path::Path;

const D: usize = 32;

fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn killed_and_resumed_run_matches_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, rows) = sparse_dictionary(D, 32, 3, 32 * 256, 0.02, 5);
    let store = common::import_f32_rows(tmp.path(), &rows, D, &[]);
    let cfg = tmp.path().join("c.toml");
    // 600 steps of 256 over ~7k training tokens: several epochs, so resume crosses epochs too.
    std::fs::write(&cfg, "lr = 3e-3\nwarmup_steps = 20\nbatch_tokens = 256\ndead_tokens = 5000\neval_fraction = 0.1\nlog_every = 25\ncheckpoint_every = 40\nshuffle_tokens = 1024\n").unwrap();
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--shards",
            store.to_str().unwrap(),
            "--width",
            "64",
            "--k",
            "3",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "600",
            "--seed",
            "4",
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let full = tmp.path().join("full");
    ok(&args(&full));
    assert!(
        !full.join("checkpoint.safetensors").exists(),
        "a finished run keeps no checkpoint"
    );

    let cut = tmp.path().join("cut");
    let r = common::sigterm_once_exists(&args(&cut), &cut.join("checkpoint.json"));
    assert_eq!(
        r.code, 3,
        "expected the interrupted exit:\n{}{}",
        r.stdout, r.stderr
    );
    assert!(r.stderr.contains("interrupted at step"), "{}", r.stderr);
    assert!(!cut.join("sae_weights.safetensors").exists());
    let stopped: u64 = r
        .stderr
        .split("interrupted at step ")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..600).contains(&stopped), "stopped at {stopped}");

    let mut resume = args(&cut);
    resume.push("--resume".into());
    let r = ok(&resume);
    assert!(
        r.stderr
            .contains(&format!("resumed from the checkpoint at step {stopped}\n")),
        "{}",
        r.stderr
    );
    for f in ["sae_weights.safetensors", "cfg.json"] {
        let (a, b) = (
            std::fs::read(full.join(f)).unwrap(),
            std::fs::read(cut.join(f)).unwrap(),
        );
        if f == "cfg.json" {
            // Everything but the run's own figures of time must agree.
            let (a, b): (Value, Value) = (
                serde_json::from_slice(&a).unwrap(),
                serde_json::from_slice(&b).unwrap(),
            );
            assert_eq!(a["dmsae"]["eval"], b["dmsae"]["eval"]);
        } else {
            assert!(
                a == b,
                "weights differ after kill (step {stopped}) + resume"
            );
        }
    }
    let again = common::dmsae(&resume);
    common::assert_one_line_error(&again, &["nothing to resume"]);
    assert_eq!(
        losses(&full),
        losses(&cut),
        "the resumed log must continue the interrupted one"
    );
}
