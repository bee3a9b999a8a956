//! `DMSAE_PROFILE=1`: wall time per phase of a repeated unit of work (a training step, an
//! extraction batch), printed to stderr every 50 units and at the end of a run (each model of a
//! sweep counts: times are per model step). On CUDA each phase ends with a device
//! synchronisation, so the work runs a little slower than without it; the breakdown is what
//! it is for.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use tch::Device;

struct Totals {
    phases: &'static [&'static str],
    unit: &'static str,
    seconds: Vec<f64>,
    units: u64,
}

static ON: AtomicBool = AtomicBool::new(false);
static PRINTED: AtomicU64 = AtomicU64::new(0);
static TOTALS: Mutex<Totals> = Mutex::new(Totals {
    phases: &[],
    unit: "",
    seconds: Vec::new(),
    units: 0,
});

/// Read `DMSAE_PROFILE` and start the totals afresh, at the start of a run: `phases` name the
/// laps of one `unit` in order.
pub fn init(phases: &'static [&'static str], unit: &'static str) {
    *TOTALS.lock().expect("profile lock") = Totals {
        phases,
        unit,
        seconds: vec![0.0; phases.len()],
        units: 0,
    };
    PRINTED.store(0, Ordering::Relaxed);
    ON.store(
        std::env::var("DMSAE_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0"),
        Ordering::Relaxed,
    );
}

/// Times the phases of one unit, in order; a no-op unless profiling is on.
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

    /// Close `phase` (an index into the phases given to `init`).
    pub fn lap(&mut self, phase: usize) {
        if let Some(t) = self.last {
            self.sync();
            if let Some(s) = TOTALS.lock().expect("profile lock").seconds.get_mut(phase) {
                *s += t.elapsed().as_secs_f64();
            }
            self.last = Some(Instant::now());
        }
    }

    /// Close the unit; every 50 units print the breakdown so far.
    pub fn end(self) {
        if self.last.is_some() {
            let n = {
                let mut t = TOTALS.lock().expect("profile lock");
                t.units += 1;
                t.units
            };
            if n % 50 == 0 {
                report();
            }
        }
    }
}

/// Print the breakdown (ms per unit and share of each phase), unless nothing ran since the
/// last one.
pub fn report() {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let t = TOTALS.lock().expect("profile lock");
    let (n, total) = (t.units, t.seconds.iter().sum::<f64>());
    if n == 0 || total <= 0.0 || PRINTED.swap(n, Ordering::Relaxed) == n {
        return;
    }
    let parts: Vec<String> = t
        .phases
        .iter()
        .zip(&t.seconds)
        .map(|(p, s)| format!("{p} {:.1} ({:.0}%)", 1e3 * s / n as f64, 100.0 * s / total))
        .collect();
    eprintln!(
        "profile, ms per {} over {n}: {:.1} = {}",
        t.unit,
        1e3 * total / n as f64,
        parts.join(", ")
    );
}
