//! The manifest's derived fields (`level`, `provenance`, `stats`) folded per writer, then
//! across writers (SPEC.md "Manifest"). A commit merges only its own shard into its writer's
//! partial, cached in `.partial-<writer>`, instead of re-reading every shard footer: with
//! thousands of shards on a parallel file system that re-read dominated each commit, under
//! the lock every writer waits on.
//!
//! A cache file is trusted only when the (file, blake3) list it records equals the
//! manifest's shards of that writer; anything else (missing, stale, corrupt) is rebuilt from
//! the footers, so the caches never change a result, only its cost.

use crate::dtype::ArraySpec;
use crate::error::{Result, StoreError};
use crate::shard::{Shard, ShardInfo, ShardMeta};
use crate::stats::Stats;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub(crate) const PREFIX: &str = ".partial-";
const MAGIC: &[u8; 8] = b"DMSAEPRT";
/// A cache holds a few KiB of JSON and 16 bytes per column of each float array.
const MAX_BYTES: u64 = 1 << 30;

/// The writer of a shard file name (`w0003` of `w0003-000017.dmss`). Writer names never
/// contain `-`, which sorts below every name character, so a writer's shards are contiguous
/// in file order and writers follow in name order.
pub fn writer_of(file: &str) -> &str {
    file.rsplit_once('-').map_or(file, |(w, _)| w)
}

/// One writer's shards folded in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct Partial {
    /// (file, blake3) of every shard folded, in order.
    pub shards: Vec<(String, String)>,
    /// The first shard's level; its provenance keys, the first shard holding a key wins.
    pub level: i32,
    pub provenance: serde_json::Map<String, serde_json::Value>,
    /// One per float array, in header order.
    pub stats: Vec<Stats>,
}

#[derive(Serialize, Deserialize)]
struct Head {
    shards: Vec<(String, String)>,
    level: i32,
    provenance: serde_json::Map<String, serde_json::Value>,
}

impl Partial {
    pub fn empty(floats: &[&ArraySpec]) -> Partial {
        Partial {
            shards: Vec::new(),
            level: 0,
            provenance: serde_json::Map::new(),
            stats: floats.iter().map(|a| Stats::empty(a.width)).collect(),
        }
    }

    fn add(&mut self, info: &ShardInfo, meta: &ShardMeta) {
        if self.shards.is_empty() {
            self.level = meta.header.level;
        }
        for (k, v) in &meta.header.provenance {
            self.provenance
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
        for (m, s) in self.stats.iter_mut().zip(&meta.stats) {
            m.merge(s);
        }
        self.shards.push(key(info));
    }

    fn extend(&mut self, infos: &[ShardInfo], metas: &[ShardMeta]) {
        for (info, meta) in infos.iter().zip(metas) {
            self.add(info, meta);
        }
    }

    fn path(dir: &Path, writer: &str) -> PathBuf {
        dir.join(format!("{PREFIX}{writer}"))
    }

    /// The cache of `writer`, if it parses and its stats fit `floats`; None otherwise.
    fn load(dir: &Path, writer: &str, floats: &[&ArraySpec]) -> Option<Partial> {
        let path = Self::path(dir, writer);
        if std::fs::metadata(&path).ok()?.len() > MAX_BYTES {
            return None;
        }
        let b = std::fs::read(&path).ok()?;
        let body = b.len().checked_sub(32)?;
        if &b[..8] != MAGIC || blake3::hash(&b[..body]).as_bytes() != &b[body..] {
            return None;
        }
        let head_len = usize::try_from(u64::from_le_bytes(b[8..16].try_into().ok()?)).ok()?;
        let head_end = 16usize.checked_add(head_len)?;
        let head: Head = serde_json::from_slice(b.get(16..head_end)?).ok()?;
        let mut at = head_end;
        let mut stats = Vec::new();
        for a in floats {
            let n = Stats::encoded_len(a.width);
            stats.push(Stats::read_from(b.get(at..at.checked_add(n)?)?, a.width));
            at += n;
        }
        (at == body).then_some(Partial {
            shards: head.shards,
            level: head.level,
            provenance: head.provenance,
            stats,
        })
    }

    /// Temp name, fsync, rename (no directory fsync: a lost cache is only rebuilt).
    fn save(&self, dir: &Path, writer: &str) -> Result<()> {
        let head = serde_json::to_vec(&Head {
            shards: self.shards.clone(),
            level: self.level,
            provenance: self.provenance.clone(),
        })
        .expect("partial head serialises");
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&(head.len() as u64).to_le_bytes());
        b.extend_from_slice(&head);
        for s in &self.stats {
            s.write_to(&mut b);
        }
        let hash = blake3::hash(&b);
        b.extend_from_slice(hash.as_bytes());
        let path = Self::path(dir, writer);
        let (tmp, mut f) = crate::create_temp(dir, &format!("{PREFIX}{writer}"))?;
        f.write_all(&b)
            .and_then(|_| f.sync_all())
            .map_err(|e| StoreError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| StoreError::io(&path, e))
    }
}

/// `shards` (sorted by file) split into (writer, its shards) runs.
fn by_writer(shards: &[ShardInfo]) -> Vec<(&str, &[ShardInfo])> {
    let mut out: Vec<(&str, &[ShardInfo])> = Vec::new();
    let mut start = 0;
    for i in 1..=shards.len() {
        if i == shards.len() || writer_of(&shards[i].file) != writer_of(&shards[start].file) {
            out.push((writer_of(&shards[start].file), &shards[start..i]));
            start = i;
        }
    }
    out
}

fn key(s: &ShardInfo) -> (String, String) {
    (s.file.clone(), s.blake3.clone())
}

/// Every writer's partial of `shards` (sorted by file): from its cache when the cache
/// records exactly these shards, extended by one shard when it lacks only the last one (a
/// commit), else rebuilt from the footers. Caches that changed are rewritten.
pub fn partials(dir: &Path, shards: &[ShardInfo], floats: &[&ArraySpec]) -> Result<Vec<Partial>> {
    by_writer(shards)
        .into_iter()
        .map(|(writer, own)| {
            let want: Vec<(String, String)> = own.iter().map(key).collect();
            let cached = Partial::load(dir, writer, floats);
            let (mut p, from) = match cached {
                Some(p) if p.shards == want => return Ok(p),
                Some(p) if p.shards[..] == want[..want.len() - 1] => (p, want.len() - 1),
                _ => (Partial::empty(floats), 0),
            };
            let metas: Vec<ShardMeta> = own[from..]
                .par_iter()
                .map(|s| Shard::open(&dir.join(&s.file)).map(|sh| sh.meta))
                .collect::<Result<_>>()?;
            p.extend(&own[from..], &metas);
            p.save(dir, writer)?;
            Ok(p)
        })
        .collect()
}

/// The partials of a verified pass, from every shard's meta already opened (in `shards`
/// order).
pub fn partials_of(
    shards: &[ShardInfo],
    metas: &[ShardMeta],
    floats: &[&ArraySpec],
) -> Vec<Partial> {
    let mut at = 0;
    by_writer(shards)
        .into_iter()
        .map(|(_, own)| {
            let mut p = Partial::empty(floats);
            p.extend(own, &metas[at..at + own.len()]);
            at += own.len();
            p
        })
        .collect()
}

/// The writers' partials combined in writer order: (level, provenance, stats); None
/// without shards.
pub fn combine(
    partials: &[Partial],
    floats: &[&ArraySpec],
) -> Option<(i32, serde_json::Map<String, serde_json::Value>, Vec<Stats>)> {
    let level = partials.first()?.level;
    let mut provenance = serde_json::Map::new();
    let mut stats: Vec<Stats> = floats.iter().map(|a| Stats::empty(a.width)).collect();
    for p in partials {
        for (k, v) in &p.provenance {
            provenance.entry(k.clone()).or_insert_with(|| v.clone());
        }
        for (m, s) in stats.iter_mut().zip(&p.stats) {
            m.merge(s);
        }
    }
    Some((level, provenance, stats))
}

/// Remove every cache in `dir` (`finalize` rebuilds them from the footers).
pub fn clear(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
        let e = e.map_err(|e| StoreError::io(dir, e))?;
        if e.file_name().to_string_lossy().starts_with(PREFIX) {
            let p = e.path();
            std::fs::remove_file(&p).map_err(|e| StoreError::io(&p, e))?;
        }
    }
    Ok(())
}
