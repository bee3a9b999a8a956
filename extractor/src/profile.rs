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
        kineto::tick(device);
        Laps::resume(device)
    }

    /// `start` for the rest of a unit on another thread (the extraction writer's phases): not
    /// a new unit for `DMSAE_KINETO`'s window.
    pub fn resume(device: Device) -> Laps {
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

/// `DMSAE_KINETO=PATH`: libtorch's Kineto profiler over a window of units (training steps or
/// extraction batches; `DMSAE_KINETO_FROM`, default 10, then `DMSAE_KINETO_UNITS`, default 10),
/// its per-kernel totals written to PATH (`csrc/kineto.cpp`). Independent of `DMSAE_PROFILE`:
/// without its synchronisations, the table shows the device as a run keeps it busy.
mod kineto {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, OnceLock};
    use std::time::Instant;
    use tch::Device;

    extern "C" {
        fn dmsae_kineto_start(cuda: i32, err: *mut std::ffi::c_char, err_len: usize) -> i32;
        fn dmsae_kineto_stop(
            path: *const std::ffi::c_char,
            units: f64,
            wall_s: f64,
            err: *mut std::ffi::c_char,
            err_len: usize,
        ) -> i32;
    }

    struct Window {
        path: std::ffi::CString,
        from: u64,
        units: u64,
    }

    static WINDOW: OnceLock<Option<Window>> = OnceLock::new();
    static UNITS: AtomicU64 = AtomicU64::new(0);
    static STARTED: Mutex<Option<Instant>> = Mutex::new(None);

    fn window() -> Option<&'static Window> {
        WINDOW
            .get_or_init(|| {
                let path = std::env::var("DMSAE_KINETO")
                    .ok()
                    .filter(|p| !p.is_empty())?;
                let num = |var: &str, default: u64| {
                    std::env::var(var)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(default)
                };
                Some(Window {
                    path: std::ffi::CString::new(path).ok()?,
                    from: num("DMSAE_KINETO_FROM", 10),
                    units: num("DMSAE_KINETO_UNITS", 10).max(1),
                })
            })
            .as_ref()
    }

    fn message(err: &[u8]) -> String {
        let msg = std::ffi::CStr::from_bytes_until_nul(err).unwrap_or_default();
        msg.to_string_lossy().into_owned()
    }

    /// At the start of each unit: opens the window at unit `from`, closes it `units` later.
    pub fn tick(device: Device) {
        let Some(w) = window() else { return };
        let u = UNITS.fetch_add(1, Ordering::Relaxed);
        if u != w.from && u != w.from + w.units {
            return;
        }
        // The window holds exactly its units' kernels.
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        let mut err = [0u8; 512];
        let mut started = STARTED.lock().expect("kineto lock");
        if u == w.from {
            // SAFETY: `err` outlives the call, which writes at most err.len() bytes into it.
            let rc = unsafe {
                dmsae_kineto_start(device.is_cuda() as i32, err.as_mut_ptr().cast(), err.len())
            };
            match rc {
                0 => *started = Some(Instant::now()),
                _ => eprintln!(
                    "DMSAE_KINETO: the profiler did not start: {}",
                    message(&err)
                ),
            }
        } else if let Some(t) = started.take() {
            let wall = t.elapsed().as_secs_f64();
            // SAFETY: as above; `path` is a live NUL-terminated string.
            let rc = unsafe {
                dmsae_kineto_stop(
                    w.path.as_ptr(),
                    w.units as f64,
                    wall,
                    err.as_mut_ptr().cast(),
                    err.len(),
                )
            };
            match rc {
                0 => eprintln!(
                    "DMSAE_KINETO: units {}..{} profiled into {}",
                    w.from,
                    w.from + w.units,
                    w.path.to_string_lossy()
                ),
                _ => eprintln!("DMSAE_KINETO: {}", message(&err)),
            }
        }
    }
}
