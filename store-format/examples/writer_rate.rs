//! Rows/s of the store writer, as the extractor drives it: `writer_rate DIR [d_model] [batches]`
//! appends batches of 8,192 rows of bf16 acts and grads (random normal, which compresses like
//! real activations within a few per cent) and prints the rate and the time `append` held the
//! caller, the time an extraction's model thread would wait for it at that rate.
use dmsae_store::{ArraySpec, Codec, DType, StoreWriter, WriterOptions};
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[path = "support/allocator.rs"]
mod allocator;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    allocator::keep_freed_pages();
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::Path::new(&args[1]);
    let d: usize = args.get(2).map_or(2304, |s| s.parse().unwrap());
    let batches: usize = args.get(3).map_or(8, |s| s.parse().unwrap());
    let rows = 8192;
    let arrays = vec![
        ArraySpec::new("acts", DType::Bf16, d, Codec::Expsplit),
        ArraySpec::new("grads", DType::Bf16, d, Codec::Expsplit),
    ];
    // Two batches of data, used in turn: generating normals is slower than writing them.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let bf16 = |x: f32| ((x.to_bits() + 0x7fff + ((x.to_bits() >> 16) & 1)) >> 16) as u16;
    let mut normal = || {
        // Box-Muller: one normal from two uniforms.
        let (u, v): (f32, f32) = (rng.gen_range(1e-7..1.0), rng.gen());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    };
    let data: Vec<Vec<u8>> = (0..2)
        .map(|_| {
            (0..rows * d)
                .flat_map(|_| bf16(normal()).to_le_bytes())
                .collect()
        })
        .collect();
    let _ = std::fs::remove_dir_all(dir);
    let mut w = StoreWriter::create(dir, arrays, WriterOptions::default())?;
    let (t, mut held) = (Instant::now(), 0.0);
    for b in 0..batches {
        let a = Instant::now();
        w.append(&[&data[b % 2], &data[(b + 1) % 2]])?;
        held += a.elapsed().as_secs_f64();
    }
    let a = Instant::now();
    w.finish()?;
    let finish = a.elapsed().as_secs_f64();
    let el = t.elapsed().as_secs_f64();
    let n = (batches * rows) as f64;
    println!(
        "{:.0} rows/s ({:.0} MB/s of raw bf16) on {} threads; append held the caller {:.2} s, finish {:.2} s, of {:.2} s",
        n / el,
        n * (4 * d) as f64 / el / 1e6,
        rayon::current_num_threads(),
        held,
        finish,
        el
    );
    Ok(())
}
