//! Tokens/s of the training stream over an existing store:
//! `stream_rate STORE [arrays] [seconds] [batch tokens]` (defaults acts, 2, 1024).
//! Epochs follow one another as the trainer takes them (the next one opened when this one
//! is), so a store smaller than the run is timed in the steady state. The CPU time per token
//! (all threads) says how many cores a rate needs.
use dmsae_store::{Store, StreamOptions};
use std::sync::Arc;
use std::time::Instant;

#[path = "support/allocator.rs"]
mod allocator;

/// User plus system CPU seconds of the process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    s(u.ru_utime) + s(u.ru_stime)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    allocator::keep_freed_pages();
    let args: Vec<String> = std::env::args().collect();
    let store = Arc::new(Store::open(args[1].as_ref())?);
    let arrays: Vec<String> = args
        .get(2)
        .map_or("acts", |s| s.as_str())
        .split(',')
        .map(String::from)
        .collect();
    let secs: f64 = args.get(3).map_or(2.0, |s| s.parse().unwrap());
    let batch_tokens: usize = args.get(4).map_or(1024, |s| s.parse().unwrap());
    let opts = |epoch| StreamOptions {
        arrays: arrays.clone(),
        batch_tokens,
        epoch,
        ..Default::default()
    };
    let (t, cpu) = (Instant::now(), cpu_seconds());
    let (mut tokens, mut epoch, mut waited) = (0usize, 0u64, 0u64);
    let mut next = store.stream(opts(0))?;
    while epoch == 0 || t.elapsed().as_secs_f64() < secs {
        let mut s = std::mem::replace(&mut next, store.stream(opts(epoch + 1))?);
        for b in &mut s {
            tokens += b?.n;
        }
        waited += s.waited_ns;
        epoch += 1;
    }
    let (el, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    println!(
        "{:.0} tokens/s over {epoch} epochs on {} threads, consumer waited {:.0}% of the time; \
         {:.2} CPU-µs a token",
        tokens as f64 / el,
        rayon::current_num_threads(),
        waited as f64 / 1e7 / el,
        cpu / tokens as f64 * 1e6
    );
    Ok(())
}
