//! `manifest.json`: derived data. Each writer adds its shard under an exclusive lock, and
//! `finalize` rebuilds the whole file from the shards alone.

use crate::dtype::{ArraySpec, Codec, DType};
use crate::error::{Result, StoreError};
use crate::partial;
use crate::shard::{self, Shard, ShardHeader, ShardInfo, SHARD_EXT};
use crate::stats::StatsSummary;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
const LOCK: &str = ".manifest.lock";
/// Larger than any honest manifest (≈100 bytes a shard); refuses hostile files.
const MAX_MANIFEST_BYTES: u64 = 1 << 30;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub d_model: usize,
    pub dtype: DType,
    pub codec: Codec,
    pub level: i32,
    pub chunk_tokens: usize,
    pub arrays: Vec<ArraySpec>,
    pub total_tokens: u64,
    pub shards: Vec<ShardInfo>,
    #[serde(default)]
    pub provenance: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub stats: BTreeMap<String, StatsSummary>,
}

impl Manifest {
    fn new(header: &ShardHeader) -> Result<Manifest> {
        let acts = header
            .arrays
            .iter()
            .find(|a| a.name == "acts")
            .ok_or_else(|| StoreError::Usage("a store needs an `acts` array".into()))?;
        Ok(Manifest {
            format: "dmsae-store".into(),
            format_version: shard::FORMAT_VERSION,
            d_model: acts.width,
            dtype: acts.dtype,
            codec: acts.codec,
            level: header.level,
            chunk_tokens: header.chunk_tokens,
            arrays: header.arrays.clone(),
            total_tokens: 0,
            shards: Vec::new(),
            provenance: header.provenance.clone(),
            stats: BTreeMap::new(),
        })
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST)
    }

    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = Self::path(dir);
        let file = File::open(&path).map_err(|e| StoreError::io(&path, e))?;
        let mut text = Vec::new();
        file.take(MAX_MANIFEST_BYTES)
            .read_to_end(&mut text)
            .map_err(|e| StoreError::io(&path, e))?;
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|e| StoreError::manifest(&path, format!("not a valid manifest: {e}")))?;
        if m.format != "dmsae-store" || m.format_version != shard::FORMAT_VERSION {
            return Err(StoreError::manifest(
                &path,
                format!(
                    "format {:?} version {}, this build reads dmsae-store {}",
                    m.format,
                    m.format_version,
                    shard::FORMAT_VERSION
                ),
            ));
        }
        for (i, s) in m.shards.iter().enumerate() {
            if !is_shard_name(&s.file) {
                return Err(StoreError::manifest(
                    &path,
                    format!("shard entry {:?} is not a shard file name", s.file),
                ));
            }
            if s.blake3.len() != 64
                || !s
                    .blake3
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                return Err(StoreError::manifest(
                    &path,
                    format!(
                        "shard {:?}: blake3 {:?} is not 64 lowercase hex digits",
                        s.file, s.blake3
                    ),
                ));
            }
            if i > 0 && m.shards[i - 1].file >= s.file {
                return Err(StoreError::manifest(
                    &path,
                    format!("shards are not sorted by name at {:?}", s.file),
                ));
            }
        }
        let sum: u64 = m.shards.iter().map(|s| s.tokens).sum();
        if sum != m.total_tokens {
            return Err(StoreError::manifest(
                &path,
                format!("total_tokens {} but shards hold {sum}", m.total_tokens),
            ));
        }
        Ok(m)
    }

    /// Temp name, fsync, rename, fsync the directory: readers see the old or the new file.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = Self::path(dir);
        let (tmp, mut f) = crate::create_temp(dir, MANIFEST)?;
        let mut text = serde_json::to_vec_pretty(self).expect("manifest serialises");
        text.push(b'\n');
        f.write_all(&text)
            .and_then(|_| f.sync_all())
            .map_err(|e| StoreError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| StoreError::io(&path, e))?;
        crate::sync_dir(dir)
    }

    /// Arrays and chunking must agree across every shard of a store.
    fn check_compatible(&self, dir: &Path, file: &str, header: &ShardHeader) -> Result<()> {
        if header.arrays != self.arrays || header.chunk_tokens != self.chunk_tokens {
            return Err(StoreError::manifest(
                dir.join(file),
                format!(
                    "arrays or chunk size differ from the store's ({} arrays, chunk {} vs {} arrays, chunk {})",
                    header.arrays.len(),
                    header.chunk_tokens,
                    self.arrays.len(),
                    self.chunk_tokens
                ),
            ));
        }
        Ok(())
    }

    /// Recompute `total_tokens`, `level`, `provenance` and `stats` from the listed shards
    /// (per writer in file order, then across writers: `partial`), so the manifest depends on
    /// the set of shards and not on commit order. Reads only the footers no cache covers.
    pub(crate) fn refresh(&mut self, dir: &Path) -> Result<()> {
        self.shards.sort_by(|a, b| a.file.cmp(&b.file));
        self.total_tokens = self.shards.iter().map(|s| s.tokens).sum();
        let floats: Vec<&ArraySpec> = self.arrays.iter().filter(|a| a.dtype.is_float()).collect();
        let partials = partial::partials(dir, &self.shards, &floats)?;
        if let Some((level, provenance, stats)) = partial::combine(&partials, &floats) {
            self.level = level;
            self.provenance = provenance;
            self.stats = floats
                .iter()
                .zip(&stats)
                .map(|(a, s)| (a.name.clone(), s.summary()))
                .collect();
        }
        Ok(())
    }

    pub fn array(&self, name: &str) -> Option<&ArraySpec> {
        self.arrays.iter().find(|a| a.name == name)
    }
}

/// Run `f` holding the store's manifest lock (an exclusive flock), so concurrent writers
/// (SLURM array tasks) never lose each other's entries. Where the file system has no flock
/// (Lustre mounted `noflock`, some NFS), `f` runs unlocked after a warning: concurrent
/// writers may then drop each other's manifest entries, which `dmsae store finalize`
/// restores from the shard files (README), and a resumed writer adopts its own.
fn with_lock<T>(dir: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let path = dir.join(LOCK);
    let lock = File::create(&path).map_err(|e| StoreError::io(&path, e))?;
    match lock.lock() {
        Ok(()) => {
            let out = f();
            let _ = lock.unlock();
            out
        }
        Err(e) if lock_unsupported(&e) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                eprintln!(
                    "dmsae: warning: {}: no file locking here ({e}); with several writers, run `dmsae store finalize` when all are done",
                    path.display()
                )
            });
            f()
        }
        Err(e) => Err(StoreError::io(&path, e)),
    }
}

fn lock_unsupported(e: &std::io::Error) -> bool {
    // ENOLCK, ENOSYS, EOPNOTSUPP on Linux.
    e.kind() == std::io::ErrorKind::Unsupported || matches!(e.raw_os_error(), Some(37 | 38 | 95))
}

/// Add a freshly committed shard to the manifest (creating it if needed).
pub fn commit_shard(dir: &Path, header: &ShardHeader, info: ShardInfo) -> Result<Manifest> {
    with_lock(dir, || {
        let mut m = if Manifest::path(dir).exists() {
            Manifest::load(dir)?
        } else {
            Manifest::new(header)?
        };
        m.check_compatible(dir, &info.file, header)?;
        m.shards.retain(|s| s.file != info.file);
        m.shards.push(info);
        m.refresh(dir)?;
        m.save(dir)?;
        Ok(m)
    })
}

pub(crate) fn valid_writer_name(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `<writer>-<seq>.dmss` (SPEC.md); also keeps a manifest from naming files outside the store.
pub fn is_shard_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(&format!(".{SHARD_EXT}")) else {
        return false;
    };
    let Some((writer, seq)) = stem.rsplit_once('-') else {
        return false;
    };
    valid_writer_name(writer) && seq.len() >= 6 && seq.bytes().all(|b| b.is_ascii_digit())
}

/// Committed shard files in a store directory, sorted by name.
pub fn list_shards(dir: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))?;
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(|e| StoreError::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if is_shard_name(&name) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// A shard's manifest entry, hashing the whole file.
pub(crate) fn entry_of(sh: &Shard) -> ShardInfo {
    ShardInfo {
        file: sh.file_name(),
        tokens: sh.meta.n_tokens,
        bytes: sh.len_bytes() as u64,
        blake3: blake3::Hasher::new()
            .update_rayon(sh.bytes())
            .finalize()
            .to_hex()
            .to_string(),
    }
}

/// Rebuild the manifest from the shard files alone (after several writers, or a lost manifest).
/// Every shard is parsed and hashed whole.
pub fn finalize(dir: &Path) -> Result<Manifest> {
    with_lock(dir, || {
        let names = list_shards(dir)?;
        if names.is_empty() {
            return Err(StoreError::Usage(format!(
                "{}: no .{SHARD_EXT} shards to finalize",
                dir.display()
            )));
        }
        let opened: Vec<(Shard, ShardInfo)> = names
            .par_iter()
            .map(|n| {
                let sh = Shard::open(&dir.join(n))?;
                let info = entry_of(&sh);
                Ok((sh, info))
            })
            .collect::<Result<_>>()?;
        let mut m = Manifest::new(&opened[0].0.meta.header)?;
        for (sh, info) in &opened {
            m.check_compatible(dir, &info.file, &sh.meta.header)?;
            m.shards.push(info.clone());
        }
        drop(opened);
        partial::clear(dir)?;
        m.refresh(dir)?;
        m.save(dir)?;
        Ok(m)
    })
}
