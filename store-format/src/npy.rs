//! Minimal NumPy `.npy` reading (memory-mapped) and writing, for `store import` / `export`.
//! C order, little-endian or byte-order-free types only.

use crate::error::{Result, StoreError};
use memmap2::Mmap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8] = b"\x93NUMPY";

pub struct Npy {
    pub path: PathBuf,
    /// NumPy type string, e.g. `<u2`, `<f4`, `|u1`.
    pub descr: String,
    pub shape: Vec<usize>,
    offset: usize,
    map: Mmap,
}

fn item_size(descr: &str) -> Option<usize> {
    match descr {
        "|u1" | "|i1" | "|b1" => Some(1),
        "<u2" | "<i2" | "<f2" => Some(2),
        "<u4" | "<i4" | "<f4" => Some(4),
        "<u8" | "<i8" | "<f8" => Some(8),
        _ => None,
    }
}

/// Value of `key` in the header dict, as the raw text up to the next top-level comma.
fn dict_value<'a>(h: &'a str, key: &str) -> Option<&'a str> {
    let at = h.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = h[at..].trim_start().strip_prefix(':')?.trim_start();
    if rest.starts_with('(') {
        return rest.find(')').map(|e| &rest[..=e]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

impl Npy {
    pub fn open(path: &Path) -> Result<Npy> {
        let bad = |w: String| StoreError::format(path, w);
        let f = File::open(path).map_err(|e| StoreError::io(path, e))?;
        // SAFETY: read-only map of an input file the user handed us; we never write through it.
        let map = unsafe { Mmap::map(&f) }.map_err(|e| StoreError::io(path, e))?;
        if map.len() < 10 || &map[..6] != MAGIC {
            return Err(bad("not a .npy file (wrong magic)".into()));
        }
        let (hlen, start) = match map[6] {
            1 => (u16::from_le_bytes([map[8], map[9]]) as usize, 10usize),
            2 | 3 if map.len() >= 12 => (
                u32::from_le_bytes(map[8..12].try_into().unwrap()) as usize,
                12,
            ),
            v => return Err(bad(format!(".npy version {v} is not supported"))),
        };
        let end = start
            .checked_add(hlen)
            .filter(|&e| e <= map.len())
            .ok_or_else(|| bad("header runs past the file end".into()))?;
        let h =
            std::str::from_utf8(&map[start..end]).map_err(|_| bad("header is not text".into()))?;
        let descr = dict_value(h, "descr")
            .ok_or_else(|| bad("header has no descr".into()))?
            .trim_matches('\'')
            .to_string();
        if dict_value(h, "fortran_order") != Some("False") {
            return Err(bad(
                "Fortran-order arrays are not supported; save with np.ascontiguousarray".into(),
            ));
        }
        let shape_txt = dict_value(h, "shape").ok_or_else(|| bad("header has no shape".into()))?;
        let shape = shape_txt
            .trim_matches(|c| c == '(' || c == ')')
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<usize>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| bad(format!("bad shape {shape_txt}")))?;
        let size = item_size(&descr).ok_or_else(|| {
            bad(format!(
                "dtype {descr} is not supported (little-endian ints/floats only)"
            ))
        })?;
        let want = shape
            .iter()
            .try_fold(size, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("shape overflows".into()))?;
        if map.len() - end != want {
            return Err(bad(format!(
                "data is {} bytes, shape {shape:?} of {descr} needs {want} (truncated?)",
                map.len() - end
            )));
        }
        Ok(Npy {
            path: path.to_path_buf(),
            descr,
            shape,
            offset: end,
            map,
        })
    }

    pub fn data(&self) -> &[u8] {
        &self.map[self.offset..]
    }

    pub fn item_size(&self) -> usize {
        item_size(&self.descr).unwrap()
    }

    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Elements per row (1 for a 1-D array).
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }
}

/// Write an array atomically (temp name, fsync, rename); `fill` streams the data in. On any
/// error the temp file is removed, so a failed write leaves nothing behind.
pub fn write_with(
    path: &Path,
    descr: &str,
    shape: &[usize],
    fill: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let tmp = path.with_extension("npy.tmp");
    let written = write_tmp(path, &tmp, descr, shape, fill);
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn write_tmp(
    path: &Path,
    tmp: &Path,
    descr: &str,
    shape: &[usize],
    fill: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // NumPy pads the header so the data starts 64-byte aligned.
    let pad = (64 - (10 + h.len() + 1) % 64) % 64;
    h.extend(std::iter::repeat_n(' ', pad));
    h.push('\n');
    let f = File::create(tmp).map_err(|e| StoreError::io(tmp, e))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
    let mut head = MAGIC.to_vec();
    head.extend_from_slice(&[1, 0]);
    head.extend_from_slice(&(h.len() as u16).to_le_bytes());
    head.extend_from_slice(h.as_bytes());
    out.write_all(&head).map_err(|e| StoreError::io(tmp, e))?;
    fill(&mut out)?;
    let f = out
        .into_inner()
        .map_err(|e| StoreError::io(tmp, e.into_error()))?;
    f.sync_all().map_err(|e| StoreError::io(tmp, e))?;
    std::fs::rename(tmp, path).map_err(|e| StoreError::io(path, e))
}

pub fn write(path: &Path, descr: &str, shape: &[usize], data: &[u8]) -> Result<()> {
    write_with(path, descr, shape, |w| {
        w.write_all(data).map_err(|e| StoreError::io(path, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_open() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        let data: Vec<u8> = (0..24u16).flat_map(|v| v.to_le_bytes()).collect();
        write(&p, "<u2", &[4, 6], &data).unwrap();
        let a = Npy::open(&p).unwrap();
        assert_eq!(
            (a.descr.as_str(), a.shape.clone(), a.data()),
            ("<u2", vec![4, 6], data.as_slice())
        );
        write(&p, "<f4", &[3], &[0u8; 12]).unwrap();
        assert_eq!(Npy::open(&p).unwrap().shape, vec![3]);
        std::fs::write(&p, b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'").unwrap();
        assert!(Npy::open(&p).is_err());
    }
}
