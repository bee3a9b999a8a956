//! Helpers shared by the integration tests: run the real `dmsae` binary and check its exits.

#![allow(dead_code)] // each test file uses its own subset

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
