//! Helpers shared by the integration tests: run the real `dmsae` binary and check its exits.

#![allow(dead_code)] // each test file uses its own subset

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What one run of the binary printed.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn finished(o: Output, args: &[String]) -> Run {
    let r = Run {
        code: o.status.code().expect("dmsae was killed by a signal"),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    assert!(
        !r.stdout.contains("panicked") && !r.stderr.contains("panicked"),
        "dmsae {args:?} panicked:\n{}{}",
        r.stdout,
        r.stderr
    );
    r
}

pub fn args_of<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vec<String> {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect()
}

/// Run `dmsae ARGS` to completion; never lets panic text through.
pub fn dmsae<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_dmsae"))
        .args(args)
        .output()
        .expect("run dmsae");
    finished(out, &args_of(args))
}

/// Start `dmsae ARGS`, send it SIGTERM as soon as `file` exists (what a scheduler does to a
/// job mid-run), and return how it finished.
pub fn sigterm_once_exists<S: AsRef<std::ffi::OsStr>>(args: &[S], file: &Path) -> Run {
    let child = Command::new(env!("CARGO_BIN_EXE_dmsae"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run dmsae");
    let t = std::time::Instant::now();
    while !file.exists() {
        assert!(
            t.elapsed().as_secs() < 60,
            "{} never appeared",
            file.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: signalling our own child by its id.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    finished(child.wait_with_output().unwrap(), &args_of(args))
}

/// Exit 0, or fail the test with what the binary said.
pub fn ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    let r = dmsae(args);
    assert_eq!(
        r.code,
        0,
        "dmsae {:?} failed:\n{}{}",
        args_of(args),
        r.stdout,
        r.stderr
    );
    r
}

/// An error exit: code 2, exactly one line on stderr, naming every one of `names`.
pub fn assert_one_line_error(r: &Run, names: &[&str]) {
    assert_eq!(
        r.code, 2,
        "expected exit 2, got {}:\n{}{}",
        r.code, r.stdout, r.stderr
    );
    assert_eq!(
        r.stderr.lines().count(),
        1,
        "error is not one line:\n{}",
        r.stderr
    );
    assert!(r.stderr.starts_with("dmsae: error: "), "{}", r.stderr);
    for n in names {
        assert!(
            r.stderr.contains(n),
            "error does not name {n:?}: {}",
            r.stderr
        );
    }
}

/// Safetensors reader for F32 and I64 tensors: name -> (shape, values as f64).
pub fn read_safetensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: BTreeMap<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            let off = v["data_offsets"].as_array().unwrap();
            let raw = &data[off[0].as_u64().unwrap() as usize..off[1].as_u64().unwrap() as usize];
            let vals = match v["dtype"].as_str().unwrap() {
                "F32" => raw
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                "F64" => raw
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                "I64" => raw
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                t => panic!("{k}: dtype {t}"),
            };
            (k, (shape, vals))
        })
        .collect()
}

/// The `dtype` of every tensor in a safetensors file.
pub fn safetensors_dtypes(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: BTreeMap<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(_, v)| v["dtype"].as_str().unwrap().to_string())
        .collect()
}

/// `dmsae store import` of f32 `rows` [n, d] (256-token chunks, so an eval split exists) into
/// `dir/store`, with `extra` import flags.
pub fn import_f32_rows(dir: &Path, rows: &[f32], d: usize, extra: &[&str]) -> std::path::PathBuf {
    let npy = dir.join("acts.npy");
    let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
    dmsae_store::npy::write(&npy, "<f4", &[rows.len() / d, d], &bytes).unwrap();
    let store = dir.join("store");
    let mut args = vec![
        "store",
        "import",
        "--acts",
        npy.to_str().unwrap(),
        "--dtype",
        "f32",
    ];
    args.extend(["--out", store.to_str().unwrap(), "--chunk-tokens", "256"]);
    args.extend(extra);
    ok(&args);
    store
}

pub fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// splitmix64 with Box-Muller: a seeded generator without a dependency.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn gauss(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Planted data for distillation: `atoms` orthonormal directions in `d` dimensions; each of `n`
/// tokens is 1 to 5 distinct atoms (uniform, mean 3) with coefficients U(0.5, 1.5) plus noise
/// 0.01, times `units`; its gradient is a sum over the atoms in `s` of N(0, 1) * atom, plus
/// noise 0.002. Returns (atoms, acts [n, d], grads [n, d]).
///
/// The count varies because real activations do not have a fixed number of active features,
/// and a fixed count makes the SAE degenerate: when every token sums exactly 3 decoder rows,
/// b_dec trades against a component shared by all rows at almost no cost. With exactly 3,
/// frozen-core cycles settled at b_dec -0.2 along each atom of S and +0.02 of each S atom in
/// every decoder row; every non-S latent then took a sliver of attribution, and later cycles
/// selected 12 to 16 latents for S's 4 (seed 1 failed cycle 0 too).
pub fn planted(
    seed: u64,
    d: usize,
    atoms: usize,
    s: &[usize],
    n: usize,
    units: f32,
) -> (Vec<Vec<f64>>, Vec<f32>, Vec<f32>) {
    let mut rng = Rng(seed);
    let mut dict: Vec<Vec<f64>> = Vec::new();
    while dict.len() < atoms {
        let mut v: Vec<f64> = (0..d).map(|_| rng.gauss()).collect();
        for a in &dict {
            let p: f64 = v.iter().zip(a).map(|(x, y)| x * y).sum();
            v.iter_mut().zip(a).for_each(|(x, y)| *x -= p * y);
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        dict.push(v.into_iter().map(|x| x / norm).collect());
    }
    let (mut acts, mut grads) = (Vec::with_capacity(n * d), Vec::with_capacity(n * d));
    for _ in 0..n {
        let mut x: Vec<f64> = (0..d).map(|_| 0.01 * rng.gauss()).collect();
        let mut on = Vec::new();
        let count = 1 + (rng.next() % 5) as usize;
        while on.len() < count {
            let i = (rng.next() % atoms as u64) as usize;
            if !on.contains(&i) {
                on.push(i);
            }
        }
        for &i in &on {
            let c = 0.5 + rng.uniform();
            x.iter_mut().zip(&dict[i]).for_each(|(v, a)| *v += c * a);
        }
        let mut g: Vec<f64> = (0..d).map(|_| 0.002 * rng.gauss()).collect();
        for &i in s {
            let w = rng.gauss();
            g.iter_mut().zip(&dict[i]).for_each(|(v, a)| *v += w * a);
        }
        acts.extend(x.iter().map(|v| *v as f32 * units));
        grads.extend(g.iter().map(|v| *v as f32));
    }
    (dict, acts, grads)
}

/// `dir/store` from float32 `acts` and `grads` rows of width `d` (raw codec, 256-token chunks).
pub fn import_acts_grads(dir: &Path, acts: &[f32], grads: &[f32], d: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut args: Vec<String> = vec!["store".into(), "import".into()];
    for (name, v) in [("acts", acts), ("grads", grads)] {
        let npy = dir.join(format!("{name}.npy"));
        let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
        dmsae_store::npy::write(&npy, "<f4", &[v.len() / d, d], &bytes).unwrap();
        args.extend([format!("--{name}"), npy.display().to_string()]);
    }
    let store = dir.join("store");
    for a in [
        "--dtype",
        "f32",
        "--chunk-tokens",
        "256",
        "--codec",
        "raw",
        "--out",
    ] {
        args.push(a.into());
    }
    args.push(store.display().to_string());
    ok(&args);
    store
}
