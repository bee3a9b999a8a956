//! Tokens/s of reading, tokenizing and packing text into contexts, on one core and on all:
//! `pack_rate MODEL_DIR DATA [context]`. The extractor's packer thread must outpace the model,
//! for every worker of an array, since each packs all workers' contexts to find its own.
use dmsae_extractor::data::Packer;
use std::path::Path;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (model, data) = (Path::new(&args[1]), Path::new(&args[2]));
    let context: usize = args.get(3).map_or(1024, |s| s.parse().unwrap());
    let rate = |threads: usize| -> Result<f64, Box<dyn std::error::Error>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        pool.install(|| -> dmsae_extractor::Result<f64> {
            let (t, mut tokens) = (Instant::now(), 0);
            let mut packer = Packer::for_model(model, None, usize::MAX, data, context)?;
            while let Some(c) = packer.next_context()? {
                tokens += c.len();
            }
            Ok(tokens as f64 / t.elapsed().as_secs_f64())
        })
        .map_err(Into::into)
    };
    let all = rayon::current_num_threads();
    let (one, many) = (rate(1)?, rate(all)?);
    println!(
        "packing {}: 1 thread {one:.0} tokens/s, {all} threads {many:.0} tokens/s, ratio {:.2}",
        data.display(),
        many / one
    );
    Ok(())
}
