//! The dmsae activation store: per-token arrays (activations, gradients, token ids, losses)
//! in sharded, chunked, compressed, BLAKE3-checksummed files with a JSON manifest.
//! The byte layout is in `SPEC.md`; this crate has no libtorch dependency.
//!
//! ```no_run
//! use dmsae_store::{ArraySpec, Codec, DType, Store, StoreWriter, WriterOptions};
//! let arrays = vec![ArraySpec::new("acts", DType::Bf16, 640, Codec::Expsplit)];
//! let mut w = StoreWriter::create("acts".as_ref(), arrays, WriterOptions::default())?;
//! w.append(&[&vec![0u8; 2 * 640 * 16]])?;
//! w.finish()?;
//! let store = Store::open("acts".as_ref())?;
//! let first = store.read_rows("acts", 0..4)?;
//! # Ok::<(), dmsae_store::StoreError>(())
//! ```

pub mod codec;
mod dtype;
mod error;
pub mod manifest;
pub mod npy;
mod partial;
mod reader;
pub mod shard;
mod stats;
mod stream;
mod writer;

pub use dtype::{f16_to_f32, ArraySpec, Codec, DType};
pub use error::{Result, StoreError};
pub use manifest::{finalize, Manifest};
pub use reader::{verify, ChunkRef, Store};
pub use shard::{Shard, ShardHeader, ShardInfo};
pub use stats::{Stats, StatsSummary};
pub use stream::{is_eval_chunk, to_f32, Batch, BatchStream, Split, StreamOptions};
pub use writer::{StoreWriter, WriterOptions};

/// Store format version written by this build.
pub const FORMAT_VERSION: u32 = shard::FORMAT_VERSION;

/// A new temp file `<stem>.<pid>.<random>.tmp` in `dir`, created exclusively: SLURM tasks on
/// other nodes share the directory and reuse pids, and truncating another task's temp file
/// would let its rename publish a half-written file.
pub(crate) fn create_temp(
    dir: &std::path::Path,
    stem: &str,
) -> Result<(std::path::PathBuf, std::fs::File)> {
    loop {
        let tmp = dir.join(format!(
            "{stem}.{}.{:016x}.tmp",
            std::process::id(),
            rand::random::<u64>()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(StoreError::io(&tmp, e)),
        }
    }
}

/// fsync a directory so a rename in it survives a crash.
pub(crate) fn sync_dir(dir: &std::path::Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}
