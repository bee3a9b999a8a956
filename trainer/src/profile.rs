//! `DMSAE_PROFILE=1`: wall time per phase of the training step, printed to stderr every 50
//! model steps and at the end of a run (each model of a sweep counts: times are per model
//! step). On CUDA each phase ends with a device synchronisation, so the step runs a little
//! slower than without it; the breakdown is what it is for.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use tch::Device;

pub const PHASES: [&str; 9] = [
    "encode", "codes", "decode", "auxk", "backward", "grad", "adam", "renorm", "stats",
];

static ON: AtomicBool = AtomicBool::new(false);
static PRINTED: AtomicU64 = AtomicU64::new(0);
static TOTALS: Mutex<([f64; PHASES.len()], u64)> = Mutex::new(([0.0; PHASES.len()], 0));

/// Read `DMSAE_PROFILE` and start the totals afresh, at the start of a run.
pub fn init() {
    *TOTALS.lock().expect("profile lock") = ([0.0; PHASES.len()], 0);
    PRINTED.store(0, Ordering::Relaxed);
    ON.store(
        std::env::var("DMSAE_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0"),
        Ordering::Relaxed,
    );
}

/// Times the phases of one step, in order; a no-op unless profiling is on.
pub struct Laps {
    device: Device,
    last: Option<Instant>,
}

impl Laps {
    /// Laps that time nothing (evaluation's forward passes).
    pub fn off() -> Laps {
        Laps {
            device: Device::Cpu,
            last: None,
        }
    }

    pub fn start(device: Device) -> Laps {
        let on = ON.load(Ordering::Relaxed);
        let mut l = Laps { device, last: None };
        if on {
            l.sync();
            l.last = Some(Instant::now());
        }
        l
    }

    fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// Close `phase` (an index into PHASES).
    pub fn lap(&mut self, phase: usize) {
        if let Some(t) = self.last {
            self.sync();
            TOTALS.lock().expect("profile lock").0[phase] += t.elapsed().as_secs_f64();
            self.last = Some(Instant::now());
        }
    }

    /// Close the step; every 50 steps print the breakdown so far.
    pub fn end(self) {
        if self.last.is_some() {
            let n = {
                let mut t = TOTALS.lock().expect("profile lock");
                t.1 += 1;
                t.1
            };
            if n % 50 == 0 {
                report();
            }
        }
    }
}

/// Print the breakdown (ms per step and share of each phase), unless nothing ran since the
/// last one.
pub fn report() {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let (acc, n) = *TOTALS.lock().expect("profile lock");
    let total: f64 = acc.iter().sum();
    if n == 0 || total <= 0.0 || PRINTED.swap(n, Ordering::Relaxed) == n {
        return;
    }
    let parts: Vec<String> = PHASES
        .iter()
        .zip(acc)
        .map(|(p, s)| format!("{p} {:.1} ({:.0}%)", 1e3 * s / n as f64, 100.0 * s / total))
        .collect();
    eprintln!(
        "profile over {n} model steps, ms per model step: {:.1} = {}",
        1e3 * total / n as f64,
        parts.join(", ")
    );
}
