//! Helpers shared by the integration tests: run the real `dmsae` binary and check its exits.

#![allow(dead_code)] // each test file uses its own subset

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
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
