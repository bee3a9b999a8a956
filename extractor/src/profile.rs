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
/// its per-kernel totals written to PATH (`csrc/kineto.cpp`), on CUDA followed by where the
/// device idled (`idle`). Independent of `DMSAE_PROFILE`:
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

    /// Append `idle::report` of PATH.events (CUDA windows only) to the table at PATH.
    fn add_idle(path: &str, units: f64) -> std::io::Result<()> {
        let events = match std::fs::read_to_string(format!("{path}.events")) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            r => r?,
        };
        if let Some(r) = super::idle::report(&events, units) {
            let table = std::fs::read_to_string(path)?;
            let tmp = format!("{path}.tmp");
            std::fs::write(&tmp, table + &r)?;
            std::fs::rename(&tmp, path)?;
        }
        Ok(())
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
            if rc != 0 {
                eprintln!("DMSAE_KINETO: {}", message(&err));
                return;
            }
            let path = w.path.to_string_lossy();
            eprintln!(
                "DMSAE_KINETO: units {}..{} profiled into {path}",
                w.from,
                w.from + w.units
            );
            if let Err(e) = add_idle(&path, w.units as f64) {
                eprintln!("DMSAE_KINETO: idle analysis: {e}");
            }
        }
    }
}

/// Where the device idled in a `DMSAE_KINETO` window on CUDA, from the events `csrc/kineto.cpp`
/// writes beside its table. Each gap between the device's busy spans is keyed by the host ops
/// whose work bounds it (after, before); each host call that waited for the device by the op
/// that made it. A wait leaves the device idle while the host then queues the next work, so the
/// two tables together say which waits cost what.
mod idle {
    use std::collections::HashMap;

    struct Device<'a> {
        start: u64,
        end: u64,
        linked: u64,
        name: &'a str,
    }

    struct Host<'a> {
        start: u64,
        end: u64,
        thread: u64,
        name: &'a str,
    }

    /// CUDA runtime and driver calls, as opposed to the ops that make them.
    fn is_call(name: &str) -> bool {
        name.starts_with("cu") && !name.starts_with("cub")
    }

    fn is_wait(name: &str) -> bool {
        is_call(name) && (name.contains("Synchronize") || name == "cudaMemcpy")
    }

    fn short(name: &str) -> String {
        match name.char_indices().nth(60) {
            Some((i, _)) => format!("{}...", &name[..i]),
            None => name.to_string(),
        }
    }

    /// The report for `units` units from the events file's text; None if it holds no device
    /// event. Malformed lines are skipped (the file is the C++ side's, written whole).
    pub(super) fn report(events: &str, units: f64) -> Option<String> {
        let (mut dev, mut host) = (Vec::new(), Vec::new());
        for line in events.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
            match (f.first(), f.len()) {
                (Some(&"D"), 5) => dev.push(Device {
                    start: num(1)?,
                    end: num(2)?,
                    linked: num(3)?,
                    name: f[4],
                }),
                (Some(&"H"), 6) => host.push((
                    num(4)?,
                    Host {
                        start: num(1)?,
                        end: num(2)?,
                        thread: num(3)?,
                        name: f[5],
                    },
                )),
                _ => {}
            }
        }
        if dev.is_empty() {
            return None;
        }
        let op_of: HashMap<u64, &str> = host
            .iter()
            .filter(|(_, h)| !is_call(h.name))
            .map(|(c, h)| (*c, h.name))
            .collect();
        // A device event by the op that launched it (or its own name if none is known: dmsae's
        // kernels are launched outside any op).
        let label = |d: &Device| match op_of.get(&d.linked) {
            Some(op) => format!("{op} ({})", short(d.name)),
            None => short(d.name),
        };
        dev.sort_by_key(|d| d.start);
        let mut gaps: HashMap<(String, String), (f64, f64)> = HashMap::new();
        let (mut last, mut idle_ns) = (0usize, 0f64);
        for i in 1..dev.len() {
            if dev[i].start > dev[last].end {
                let ns = (dev[i].start - dev[last].end) as f64;
                idle_ns += ns;
                let g = gaps.entry((label(&dev[last]), label(&dev[i]))).or_default();
                *g = (g.0 + ns, g.1 + 1.0);
            }
            if dev[i].end > dev[last].end {
                last = i;
            }
        }
        let mut waits: HashMap<(String, String), (f64, f64)> = HashMap::new();
        let mut waited_ns = 0f64;
        for (_, w) in host.iter().filter(|(_, h)| is_wait(h.name)) {
            // The innermost op around the call, on its thread.
            let op = host
                .iter()
                .map(|(_, h)| h)
                .filter(|h| !is_call(h.name) && h.thread == w.thread)
                .filter(|h| h.start <= w.start && w.end <= h.end)
                .min_by_key(|h| h.end - h.start)
                .map_or("(no op)", |h| h.name);
            let ns = (w.end - w.start) as f64;
            waited_ns += ns;
            let e = waits
                .entry((op.to_string(), w.name.to_string()))
                .or_default();
            *e = (e.0 + ns, e.1 + 1.0);
        }
        let table = |rows: HashMap<(String, String), (f64, f64)>| {
            let mut rows: Vec<_> = rows.into_iter().collect();
            rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0).then(a.0.cmp(&b.0)));
            rows.into_iter()
                .take(20)
                .map(|((a, b), (ns, n))| {
                    format!("{:.3}\t{:.1}\t{a}\t{b}\n", ns / 1e6 / units, n / units)
                })
                .collect::<String>()
        };
        let n_gaps: f64 = gaps.values().map(|g| g.1).sum();
        let n_waits: f64 = waits.values().map(|w| w.1).sum();
        Some(format!(
            "# device idle {:.2} ms a unit in {:.1} gaps a unit (between its first and last event)\n\
             # idle ms/unit\tgaps/unit\tafter\tbefore\n{}\
             # host waits for the device {:.2} ms a unit in {:.1} calls a unit\n\
             # ms/unit\tcalls/unit\top\tcall\n{}",
            idle_ns / 1e6 / units,
            n_gaps / units,
            table(gaps),
            waited_ns / 1e6 / units,
            n_waits / units,
            table(waits),
        ))
    }

    #[cfg(test)]
    mod tests {
        /// Two units by hand: kernels k1 (by op A) and k2 (by op B) with a 3 us gap each unit,
        /// and a kernel without a known op overlapping k1 (no gap); the host waits 5 us a unit
        /// in cudaStreamSynchronize inside aten::nonzero (inside an outer op).
        #[test]
        fn gaps_and_waits_are_keyed_by_their_ops() {
            let mut ev = String::new();
            for u in 0..2u64 {
                let t = u * 101_000;
                let o = u * 10;
                ev += &format!("H\t{}\t{}\t1\t{}\taten::A\n", t, t + 500, 1 + o);
                ev += &format!(
                    "H\t{}\t{}\t1\t{}\tcudaLaunchKernel\n",
                    t + 10,
                    t + 20,
                    2 + o
                );
                ev += &format!("H\t{}\t{}\t1\t{}\taten::B\n", t + 600, t + 900, 3 + o);
                ev += &format!("H\t{}\t{}\t1\t{}\touter\n", t + 1000, t + 9000, 4 + o);
                ev += &format!(
                    "H\t{}\t{}\t1\t{}\taten::nonzero\n",
                    t + 1100,
                    t + 8000,
                    5 + o
                );
                ev += &format!(
                    "H\t{}\t{}\t1\t0\tcudaStreamSynchronize\n",
                    t + 2000,
                    t + 7000
                );
                ev += &format!("D\t{}\t{}\t{}\tk1\n", t + 1000, t + 2000, 1 + o);
                ev += &format!("D\t{}\t{}\t0\tmine\n", t + 1500, t + 2500,);
                ev += &format!("D\t{}\t{}\t{}\tk2\n", t + 5500, t + 6000, 3 + o);
            }
            ev += "garbage line\n";
            let r = super::report(&ev, 2.0).unwrap();
            let lines: Vec<&str> = r.lines().collect();
            // Per unit: 3 us after `mine`; 96 us between the units, once in 2.
            assert!(
                lines[0].starts_with("# device idle 0.05 ms a unit in 1.5 gaps"),
                "{r}"
            );
            assert_eq!(lines[2], "0.048\t0.5\taten::B (k2)\taten::A (k1)");
            assert_eq!(lines[3], "0.003\t1.0\tmine\taten::B (k2)");
            assert!(lines[4].starts_with("# host waits for the device 0.01 ms a unit in 1.0"));
            assert_eq!(lines[6], "0.005\t1.0\taten::nonzero\tcudaStreamSynchronize");
            assert_eq!(lines.len(), 7);
            assert!(super::report("H\t1\t2\t1\t1\taten::A\n", 1.0).is_none());
        }
    }
}
