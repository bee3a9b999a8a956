//! A store must refuse damaged or hostile files with one clear line that names the file (and the
//! chunk where there is one), never panic, never allocate what the file merely claims, and never
//! leave anything half-written. Exhaustive sweeps go through the library; samples of the same
//! damage go through the real `dmsae` binary.

use dmsae_store::shard::{self, Shard};
use dmsae_store::{npy, ArraySpec, Codec, DType, StoreError, StoreWriter, WriterOptions};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;
use common::{assert_one_line_error, dmsae, Run};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn store_cmd(cmd: &str, dir: &Path) -> Run {
    dmsae(&["store".as_ref(), cmd.as_ref(), dir.as_os_str()])
}

fn export(dir: &Path, out: &Path) -> Run {
    dmsae(&[
        "store".as_ref(),
        "export".as_ref(),
        dir.as_os_str(),
        "--out-dir".as_ref(),
        out.as_os_str(),
    ])
}

/// Every file of a directory and its bytes, to prove a failed command changed nothing.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    rd.flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect()
}

/// `store verify` found problems: exit 1, every problem line names `culprit` (so nothing
/// else is blamed), a one-line summary on stderr.
fn assert_verify_blames(store: &Path, culprit: &str) -> Run {
    let r = store_cmd("verify", store);
    assert_eq!(
        r.code, 1,
        "verify should find a problem with {culprit}:\n{}{}",
        r.stdout, r.stderr
    );
    assert!(
        !r.stdout.is_empty() && !r.stdout.starts_with("ok"),
        "{}",
        r.stdout
    );
    for line in r.stdout.lines() {
        assert!(
            line.contains(culprit),
            "verify blames something other than {culprit}: {line}\n{}",
            r.stdout
        );
    }
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    r
}

/// `verify` and `inspect` (and `export` when `export_too`) refuse the store naming `culprit`,
/// and leave the store directory (and the export folder) as they found them.
fn assert_refused(store: &Path, culprit: &str, export_too: bool) {
    let before = snapshot(store);
    assert_verify_blames(store, culprit);
    assert_one_line_error(&store_cmd("inspect", store), &[culprit]);
    if export_too {
        let out = store.parent().unwrap().join("export");
        assert_one_line_error(&export(store, &out), &[culprit]);
        assert!(
            snapshot(&out).is_empty(),
            "a failed export left {:?}",
            snapshot(&out).keys()
        );
    }
    assert_eq!(
        snapshot(store),
        before,
        "a read-only command changed the store"
    );
}

/// Deterministic bytes for array contents.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// bf16 bit patterns of activation-like values (finite, a few scales).
fn bf16_rows(n: usize, d: usize, seed: u64) -> Vec<u8> {
    noise(n * d, seed)
        .iter()
        .enumerate()
        .flat_map(|(i, &r)| {
            let x = (1 << (i % d % 5)) as f32 * (r as f32 / 255.0 - 0.4);
            ((x.to_bits() >> 16) as u16).to_le_bytes()
        })
        .collect()
}

/// A store imported through the CLI: acts+grads bf16 expsplit (d=16), tokens, loss; 45 tokens
/// in chunks of 8 and shards of 24: `w0000-000000.dmss` (3 full chunks) and
/// `w0000-000001.dmss` (8, 8, 5).
struct Fixture {
    _tmp: tempfile::TempDir,
    store: PathBuf,
}

const SHARD0: &str = "w0000-000000.dmss";
const SHARD1: &str = "w0000-000001.dmss";

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let (n, d) = (45, 16);
        let p = |name: &str| tmp.path().join(format!("{name}.npy"));
        npy::write(&p("acts"), "<u2", &[n, d], &bf16_rows(n, d, 1)).unwrap();
        npy::write(&p("grads"), "<u2", &[n, d], &bf16_rows(n, d, 2)).unwrap();
        let ids: Vec<u8> = (0..n as u32).flat_map(|t| (t * 31).to_le_bytes()).collect();
        npy::write(&p("tokens"), "<u4", &[n], &ids).unwrap();
        let loss: Vec<u8> = (0..n)
            .flat_map(|t| (t as f32 * 0.1).to_le_bytes())
            .collect();
        npy::write(&p("loss"), "<f4", &[n], &loss).unwrap();
        let store = tmp.path().join("store");
        let mut args: Vec<std::ffi::OsString> = [
            "store",
            "import",
            "--dtype",
            "bf16",
            "--chunk-tokens",
            "8",
            "--shard-tokens",
            "24",
        ]
        .iter()
        .map(Into::into)
        .collect();
        for a in ["acts", "grads", "tokens", "loss"] {
            args.push(format!("--{a}").into());
            args.push(p(a).into());
        }
        args.push("--out".into());
        args.push(store.clone().into());
        let r = dmsae(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>());
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        let f = Fixture { _tmp: tmp, store };
        assert_eq!(f.manifest()["shards"].as_array().unwrap().len(), 2);
        f
    }
    fn path(&self, file: &str) -> PathBuf {
        self.store.join(file)
    }
    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }
    fn write(&self, file: &str, bytes: &[u8]) {
        std::fs::write(self.path(file), bytes).unwrap()
    }
    fn manifest(&self) -> Value {
        serde_json::from_slice(&self.read("manifest.json")).unwrap()
    }
    fn set_manifest(&self, m: &Value) {
        self.write("manifest.json", &serde_json::to_vec_pretty(m).unwrap())
    }
}

/// Where the regions of a sound shard lie (SPEC.md, "Shard file").
#[derive(Debug)]
struct Layout {
    header_len: usize,
    blocks_start: usize,
    index_start: usize,
    stats_start: usize,
    trailer: usize,
    /// (chunk, array name, first byte, end) of every block.
    blocks: Vec<(usize, String, usize, usize)>,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn layout(b: &[u8]) -> Layout {
    let meta = shard::parse(Path::new("sound"), b).expect("a sound shard");
    let header_len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    let trailer = b.len() - 72;
    let (index_len, stats_len) = (
        u64_at(b, trailer + 16) as usize,
        u64_at(b, trailer + 24) as usize,
    );
    let mut blocks = Vec::new();
    for (c, ch) in meta.chunks.iter().enumerate() {
        for (a, e) in ch.blocks.iter().enumerate() {
            blocks.push((
                c,
                meta.header.arrays[a].name.clone(),
                e.offset,
                e.offset + e.len,
            ));
        }
    }
    Layout {
        header_len,
        blocks_start: 48 + header_len,
        index_start: trailer - index_len - stats_len,
        stats_start: trailer - stats_len,
        trailer,
        blocks,
    }
}

/// Rewrite the trailer's four counts and recompute its hash, so the damage passes the footer
/// checksum and reaches the length checks. The hash covers the region the new counts point at
/// when that fits in the file, else the original region.
fn with_trailer(b: &[u8], f: impl FnOnce(&mut [u64; 4])) -> Vec<u8> {
    let mut out = b.to_vec();
    let t = b.len() - 72;
    let mut v = [
        u64_at(b, t),
        u64_at(b, t + 8),
        u64_at(b, t + 16),
        u64_at(b, t + 24),
    ];
    let old_start = t - (v[2] + v[3]) as usize;
    f(&mut v);
    for (i, x) in v.iter().enumerate() {
        out[t + 8 * i..t + 8 * i + 8].copy_from_slice(&x.to_le_bytes());
    }
    let start = v[2]
        .checked_add(v[3])
        .filter(|&l| l <= (t - 48) as u64)
        .map_or(old_start, |l| t - l as usize);
    let h = blake3::hash(&out[start..t + 32]);
    out[t + 32..t + 64].copy_from_slice(h.as_bytes());
    out
}

/// The shard's structure must be refused, as a format (not checksum) problem naming the file.
fn assert_format_error(b: &[u8], what: &str) -> String {
    match shard::parse(Path::new("hostile.dmss"), b) {
        Err(e @ StoreError::Format { .. }) => {
            let msg = e.to_string();
            assert!(msg.starts_with("hostile.dmss: "), "{msg}");
            assert!(msg.contains(what), "expected {what:?} in {msg:?}");
            msg
        }
        Err(e) => panic!("expected a format error about {what:?}, got {e}"),
        Ok(_) => panic!("a hostile shard parsed ({what})"),
    }
}

// ---------------------------------------------------------------------------------------------
// Truncation
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated_shard_fails_to_parse_at_every_length() {
    let f = Fixture::new();
    for file in [SHARD0, SHARD1] {
        let b = f.read(file);
        for len in 0..b.len() {
            assert!(
                shard::parse(Path::new(file), &b[..len]).is_err(),
                "{file} cut to {len} of {} bytes parsed",
                b.len()
            );
        }
    }
}

#[test]
fn truncated_shard_is_refused_by_verify_inspect_export_and_finalize() {
    let f = Fixture::new();
    let b = f.read(SHARD1);
    let l = layout(&b);
    let cuts = [
        ("mid-preamble", 10),
        ("mid-header", 16 + l.header_len / 2),
        ("mid-block", (l.blocks[5].2 + l.blocks[5].3) / 2),
        ("mid-index", l.index_start + 13),
        ("mid-trailer", l.trailer + 30),
        ("last byte missing", b.len() - 1),
    ];
    for (what, len) in cuts {
        f.write(SHARD1, &b[..len]);
        let v = assert_verify_blames(&f.store, SHARD1);
        assert_eq!(
            v.stdout.lines().count(),
            1,
            "{what}: one problem, the truncated shard:\n{}",
            v.stdout
        );
        assert_one_line_error(&store_cmd("inspect", &f.store), &[SHARD1]);
    }
    // The last cut once more through the commands that write: nothing may be half-written.
    let before = snapshot(&f.store);
    let out = f.store.parent().unwrap().join("export");
    assert_one_line_error(&export(&f.store, &out), &[SHARD1]);
    assert!(snapshot(&out).is_empty());
    assert_one_line_error(&store_cmd("finalize", &f.store), &[SHARD1]);
    assert_eq!(
        snapshot(&f.store),
        before,
        "a failed finalize changed the store"
    );
}

#[test]
fn unfinished_tmp_files_are_ignored() {
    let f = Fixture::new();
    let b = f.read(SHARD0);
    f.write("w0001-000000.dmss.tmp", &b[..b.len() / 2]);
    f.write("manifest.json.999.tmp", b"{\"half");
    let r = store_cmd("verify", &f.store);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.starts_with("ok: 2 shards"), "{}", r.stdout);
}

// ---------------------------------------------------------------------------------------------
// Flipped bits
// ---------------------------------------------------------------------------------------------

#[test]
fn every_flipped_bit_of_a_shard_is_detected_by_the_library() {
    // One small shard holding every codec: 10 tokens in chunks of 4 (4, 4, 2).
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let arrays = vec![
        ArraySpec::new("acts", DType::Bf16, 8, Codec::Expsplit),
        ArraySpec::new("aux", DType::F16, 3, Codec::Bytesplit),
        ArraySpec::new("tokens", DType::U32, 1, Codec::Raw),
    ];
    let n = 10;
    let mut w = StoreWriter::create(
        &dir,
        arrays,
        WriterOptions {
            chunk_tokens: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let aux: Vec<u8> = (0..n * 3)
        .flat_map(|i| (0x3c00u16 + i as u16 * 37).to_le_bytes())
        .collect();
    w.append(&[&bf16_rows(n, 8, 9), &aux, &noise(4 * n, 3)])
        .unwrap();
    let committed = w.finish().unwrap();
    assert_eq!(committed.len(), 1);
    let path = dir.join(&committed[0].file);
    let sound = std::fs::read(&path).unwrap();
    assert!(dmsae_store::verify(&dir).is_empty());
    assert_eq!(layout(&sound).blocks.len(), 9);

    for at in 0..sound.len() {
        let mut b = sound.clone();
        b[at] ^= 1 << (at % 8);
        std::fs::write(&path, &b).unwrap();
        let problems = dmsae_store::verify(&dir);
        assert!(
            !problems.is_empty(),
            "byte {at} of {} flipped, verify found nothing",
            sound.len()
        );
        for p in &problems {
            assert!(
                p.contains(&committed[0].file),
                "byte {at}: problem does not name the shard: {p}"
            );
        }
        // Without the manifest's whole-file hash, the shard's own checksums catch it.
        let caught = match Shard::open(&path) {
            Err(_) => true,
            Ok(sh) => {
                let mut caught = false;
                for c in 0..sh.meta.chunks.len() {
                    for a in 0..sh.meta.header.arrays.len() {
                        caught |= sh.read_block(c, a, true).is_err();
                        let _ = sh.read_block(c, a, false); // decoding damaged bytes must not panic
                    }
                }
                caught
            }
        };
        assert!(
            caught,
            "byte {at} flipped: the shard parsed and every block passed its checksum"
        );
        assert_eq!(
            shard::parse(&path, &b).is_err(),
            Shard::open(&path).is_err()
        );
    }
}

#[test]
fn flipped_bytes_in_each_region_are_reported_by_verify_and_export() {
    let f = Fixture::new();
    let sound = f.read(SHARD0);
    let l = layout(&sound);
    let (c1_acts, c2_loss) = (&l.blocks[4], &l.blocks[11]);
    assert_eq!(
        (c1_acts.0, c1_acts.1.as_str(), c2_loss.0, c2_loss.1.as_str()),
        (1, "acts", 2, "loss")
    );
    let offsets = [
        ("magic", 0),
        ("version", 9),
        ("header length", 12),
        ("header JSON", 16 + l.header_len / 2),
        ("header hash", 16 + l.header_len + 7),
        ("first block", l.blocks_start),
        ("chunk 1 acts block", c1_acts.2 + 3),
        ("chunk 2 loss block", c2_loss.3 - 1),
        ("index", l.index_start + 3),
        ("index block hash", l.index_start + 8 + 8 + 5),
        ("stats", l.stats_start + 10),
        ("trailer n_chunks", l.trailer),
        ("trailer n_tokens", l.trailer + 9),
        ("trailer index_len", l.trailer + 17),
        ("trailer stats_len", l.trailer + 25),
        ("footer hash", l.trailer + 40),
        ("end magic", sound.len() - 3),
    ];
    for (what, at) in offsets {
        let mut b = sound.clone();
        b[at] ^= 0x10;
        f.write(SHARD0, &b);
        let r = assert_verify_blames(&f.store, SHARD0);
        assert!(r.stdout.lines().count() <= 2, "{what}: {}", r.stdout);
    }
    // A damaged block passes `Store::open` (blocks are checked when read): export must name
    // the shard and the chunk, and leave no file behind.
    for (c, array, lo, _) in [c1_acts, &l.blocks[0]] {
        let mut b = sound.clone();
        b[lo + 1] ^= 0x04;
        f.write(SHARD0, &b);
        let out = f.store.parent().unwrap().join(format!("export-{c}"));
        let r = export(&f.store, &out);
        assert_one_line_error(&r, &[SHARD0, &format!("chunk {c}, array {array}")]);
        assert!(
            snapshot(&out).is_empty(),
            "a failed export left {:?}",
            snapshot(&out).keys()
        );
    }
}

#[test]
fn flipped_manifest_bytes_are_detected_or_change_nothing() {
    let f = Fixture::new();
    let sound = f.read("manifest.json");
    let want: Value = serde_json::from_slice(&sound).unwrap();
    let mut undetected = Vec::new();
    for at in 0..sound.len() {
        let mut b = sound.clone();
        b[at] ^= 1 << (at % 8);
        f.write("manifest.json", &b);
        if dmsae_store::verify(&f.store).is_empty() {
            // Only harmless flips may pass: ones that leave every value as it was (`1e-5` vs `1E-5`).
            let same = serde_json::from_slice::<Value>(&b).is_ok_and(|v| v == want);
            if !same {
                undetected.push(format!(
                    "byte {at}: {:?}",
                    String::from_utf8_lossy(&b[at.saturating_sub(20)..(at + 20).min(b.len())])
                ));
            }
        }
    }
    assert!(
        undetected.is_empty(),
        "{} manifest flips changed the manifest undetected:\n{}",
        undetected.len(),
        undetected.join("\n")
    );
}

#[test]
fn manifest_that_does_not_parse_or_add_up_is_reported_on_one_line() {
    let f = Fixture::new();
    let sound = f.read("manifest.json");
    // `"total_tokens": 45` -> 44: the manifest no longer adds up.
    let at = String::from_utf8_lossy(&sound)
        .find("\"total_tokens\": 45")
        .unwrap()
        + "\"total_tokens\": 4".len();
    let mut b = sound.clone();
    b[at] ^= 0x01;
    f.write("manifest.json", &b);
    assert_refused(&f.store, "manifest.json", true);
    let r = store_cmd("verify", &f.store);
    assert!(
        r.stdout.contains("total_tokens 44 but shards hold 45"),
        "{}",
        r.stdout
    );
    // Not JSON at all.
    let mut b = sound.clone();
    b[0] = b'[';
    f.write("manifest.json", &b);
    assert_refused(&f.store, "manifest.json", false);
    assert_one_line_error(&store_cmd("stats", &f.store), &["manifest.json"]);
}

// ---------------------------------------------------------------------------------------------
// Hostile preamble and trailer
// ---------------------------------------------------------------------------------------------

#[test]
fn wrong_magic_is_refused() {
    let f = Fixture::new();
    let mut b = f.read(SHARD0);
    b[..8].copy_from_slice(b"PK\x03\x04SHD\0");
    assert_format_error(&b, "wrong magic");
    f.write(SHARD0, &b);
    assert_refused(&f.store, SHARD0, true);
}

#[test]
fn wrong_version_is_refused() {
    let f = Fixture::new();
    let mut b = f.read(SHARD1);
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    assert_format_error(&b, "shard format version 2, this build reads 1");
    f.write(SHARD1, &b);
    assert_refused(&f.store, SHARD1, false);
}

#[test]
fn hostile_header_length_is_refused() {
    let f = Fixture::new();
    let sound = f.read(SHARD0);
    for h in [
        u32::MAX,
        sound.len() as u32,
        sound.len() as u32 - 119,
        65_537,
        1,
        0,
    ] {
        let mut b = sound.clone();
        b[12..16].copy_from_slice(&h.to_le_bytes());
        assert_format_error(&b, &format!("header length {h} does not fit"));
        if h == u32::MAX {
            f.write(SHARD0, &b);
            assert_refused(&f.store, SHARD0, false);
        }
    }
}

#[test]
fn hostile_trailer_counts_are_refused_by_checked_arithmetic() {
    let f = Fixture::new();
    let sound = f.read(SHARD0);
    let t = sound.len() - 72;
    let rec = u64_at(&sound, t + 16) / u64_at(&sound, t); // bytes per index record
    assert_eq!(rec, 8 + 40 * 4);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "n_chunks overflows n x R",
            with_trailer(&sound, |v| v[0] = u64::MAX),
            "do not make an index",
        ),
        (
            "index_len u64::MAX",
            with_trailer(&sound, |v| v[2] = u64::MAX),
            "do not make an index",
        ),
        (
            "n_chunks 0",
            with_trailer(&sound, |v| (v[0], v[2]) = (0, 0)),
            "do not make an index",
        ),
        (
            "index larger than the file",
            with_trailer(&sound, |v| (v[0], v[2]) = (1 << 40, rec << 40)),
            "do not fit the file",
        ),
        (
            "index + stats overflows",
            with_trailer(&sound, |v| {
                (v[0], v[2]) = (u64::MAX / rec, u64::MAX / rec * rec)
            }),
            "do not fit the file",
        ),
        (
            "stats_len u64::MAX",
            with_trailer(&sound, |v| v[3] = u64::MAX),
            "stats length",
        ),
        // These fit the file and carry a valid footer hash: the index checks must catch them.
        (
            "one chunk too many",
            with_trailer(&sound, |v| (v[0], v[2]) = (v[0] + 1, v[2] + rec)),
            "chunk 0",
        ),
        (
            "one chunk too few",
            with_trailer(&sound, |v| (v[0], v[2]) = (v[0] - 1, v[2] - rec)),
            "between the last block and the index",
        ),
        (
            "n_tokens u64::MAX",
            with_trailer(&sound, |v| v[1] = u64::MAX),
            "trailer says 18446744073709551615",
        ),
        (
            "n_tokens one short",
            with_trailer(&sound, |v| v[1] -= 1),
            "chunks hold 24 tokens, trailer says 23",
        ),
    ];
    for (what, b, msg) in &cases {
        let got = assert_format_error(b, msg);
        assert!(!got.contains("checksum"), "{what}: {got}");
    }
    for (what, b, _) in &cases[3..7] {
        f.write(SHARD0, b);
        let r = assert_verify_blames(&f.store, SHARD0);
        assert!(!r.stdout.contains("checksum"), "{what}: {}", r.stdout);
        assert_one_line_error(&store_cmd("inspect", &f.store), &[SHARD0]);
    }
}

// ---------------------------------------------------------------------------------------------
// Manifest and shards disagree
// ---------------------------------------------------------------------------------------------

#[test]
fn manifest_token_count_that_disagrees_with_the_shard_is_reported() {
    let f = Fixture::new();
    let mut m = f.manifest();
    m["shards"][1]["tokens"] = 22.into();
    m["total_tokens"] = 46.into();
    f.set_manifest(&m);
    assert_refused(&f.store, SHARD1, true);
    assert!(store_cmd("verify", &f.store)
        .stdout
        .contains("21 tokens, manifest says 22"));
}

#[test]
fn manifest_byte_count_that_disagrees_with_the_shard_is_reported() {
    let f = Fixture::new();
    let mut m = f.manifest();
    let bytes = m["shards"][0]["bytes"].as_u64().unwrap();
    m["shards"][0]["bytes"] = (bytes + 1).into();
    f.set_manifest(&m);
    assert_refused(&f.store, SHARD0, true);
}

#[test]
fn manifest_blake3_that_disagrees_with_the_shard_is_reported() {
    let f = Fixture::new();
    let mut m = f.manifest();
    m["shards"][1]["blake3"] = blake3::hash(b"another file").to_hex().to_string().into();
    f.set_manifest(&m);
    let before = snapshot(&f.store);
    let r = assert_verify_blames(&f.store, SHARD1);
    assert!(r.stdout.contains("file checksum mismatch"), "{}", r.stdout);
    assert_eq!(snapshot(&f.store), before);
}

#[test]
fn deleted_shard_is_reported() {
    let f = Fixture::new();
    std::fs::remove_file(f.path(SHARD0)).unwrap();
    assert_refused(&f.store, SHARD0, true);
    let r = store_cmd("verify", &f.store);
    assert_eq!(
        r.stdout.lines().count(),
        1,
        "one problem, the missing shard:\n{}",
        r.stdout
    );
}

#[test]
fn extra_shard_not_in_the_manifest_is_reported_until_finalize_adopts_it() {
    let f = Fixture::new();
    let extra = "w0007-000000.dmss";
    std::fs::copy(f.path(SHARD1), f.path(extra)).unwrap();
    let r = assert_verify_blames(&f.store, extra);
    assert!(r.stdout.contains("not in the manifest"), "{}", r.stdout);
    let r = store_cmd("finalize", &f.store);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let r = store_cmd("verify", &f.store);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.starts_with("ok: 3 shards, 9 chunks, 66 tokens"),
        "{}",
        r.stdout
    );
}
