//! Tokens/s of the training stream over an existing store:
//! `stream_rate STORE [arrays] [seconds] [batch tokens]` (defaults acts, 2, 1024).
use dmsae_store::{Store, StreamOptions};
use std::sync::Arc;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
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
    let t = Instant::now();
    let (mut tokens, mut epoch, mut waited) = (0usize, 0u64, 0u64);
    while epoch == 0 || t.elapsed().as_secs_f64() < secs {
        let opts = StreamOptions {
            arrays: arrays.clone(),
            batch_tokens,
            epoch,
            ..Default::default()
        };
        let mut s = store.stream(opts)?;
        for b in &mut s {
            tokens += b?.n;
        }
        waited += s.waited_ns;
        epoch += 1;
    }
    let el = t.elapsed().as_secs_f64();
    println!(
        "{:.0} tokens/s over {epoch} epochs, consumer waited {:.0}% of the time",
        tokens as f64 / el,
        waited as f64 / 1e7 / el
    );
    Ok(())
}
