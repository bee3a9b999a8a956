//! Argument pieces every subcommand shares: counts with suffixes, devices, the stop flag.

use anyhow::{bail, Result};
use dmsae_extractor::tch::{Cuda, Device};
use std::sync::atomic::{AtomicBool, Ordering};

/// `500M` -> 500_000_000; K, M, B are powers of 1000.
pub fn parse_count(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1_000),
        Some('M') => (&s[..s.len() - 1], 1_000_000),
        Some('B') => (&s[..s.len() - 1], 1_000_000_000),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a count like 1000, 64K, 500M or 2B"))?;
    n.checked_mul(mult)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} must be positive and fit in 64 bits"))
}

/// `cpu`, `cuda` or `cuda:N`. For CUDA, libtorch_cuda is loaded first (see
/// `dmsae_extractor::runtime`) and the device must exist.
pub fn device(s: &str) -> Result<Device> {
    let device = match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::Cuda(n),
            None => bail!("--device {s}: expected cpu, cuda or cuda:N"),
        },
    };
    if let Device::Cuda(n) = device {
        let note = dmsae_extractor::runtime::load_cuda(option_env!("DMSAE_LIBTORCH_LIB")).err();
        let count = Cuda::device_count();
        if !Cuda::is_available() || n as i64 >= count {
            bail!(
                "--device {s}: {count} CUDA device(s) visible{}",
                note.map_or(String::new(), |n| format!(" ({n})"))
            );
        }
    }
    Ok(device)
}

/// Set by SIGTERM/SIGINT (schedulers send SIGTERM before killing): long jobs finish the current
/// step, commit or checkpoint, and exit 3.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn stop_on_signals() -> &'static AtomicBool {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    &STOP
}

/// A core given as a file, or as a directory holding `core.safetensors` (a cycle's directory,
/// or a distillation run's `distilled/`).
pub fn core_file(p: &std::path::Path) -> std::path::PathBuf {
    if p.is_dir() {
        p.join(dmsae_trainer::distill::CORE_FILE)
    } else {
        p.to_path_buf()
    }
}
