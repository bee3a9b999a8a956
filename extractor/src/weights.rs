//! Checkpoint tensors from an HF directory: `model.safetensors`, or the shards listed in
//! `model.safetensors.index.json`. Files are memory-mapped and each tensor is copied once,
//! straight into the model's dtype and device, so peak host memory stays near one tensor.

use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::tensor::{SafeTensors, TensorInfo};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub struct Weights {
    files: Vec<(PathBuf, Mmap, usize)>,
    /// tensor name -> (file index, header entry)
    index: HashMap<String, (usize, TensorInfo)>,
    /// What a missing tensor's error names: the single file or the index.
    source: PathBuf,
    device: Device,
    kind: Kind,
}

impl Weights {
    pub fn open(dir: &Path, device: Device, kind: Kind) -> Result<Weights> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let (names, source) = if single.exists() {
            (vec![single.clone()], single)
        } else if index_path.exists() {
            (shard_names(&index_path, dir)?, index_path)
        } else {
            return Err(Error::Weights {
                path: dir.to_path_buf(),
                msg: "no model.safetensors or model.safetensors.index.json".into(),
            });
        };
        let mut w = Weights {
            files: Vec::new(),
            index: HashMap::new(),
            source,
            device,
            kind,
        };
        for path in names {
            let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: read-only map; a checkpoint rewritten while we load it is the user's error.
            let mmap = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::Weights {
                path: path.clone(),
                msg: format!("not a valid safetensors file: {e:?}"),
            })?;
            let fi = w.files.len();
            for (name, info) in meta.tensors() {
                w.index.insert(name, (fi, info.clone()));
            }
            w.files.push((path, mmap, 8 + n));
        }
        Ok(w)
    }

    /// The single file or the shard index: what a missing tensor's error names.
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The tensor `name`, which must have `shape`, converted to the model's dtype and device.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (fi, info) = self.index.get(name).ok_or_else(|| Error::Weights {
            path: self.source.clone(),
            msg: format!("tensor {name} (shape {shape:?}) not found"),
        })?;
        let (path, mmap, start) = &self.files[*fi];
        let err = |msg: String| Error::Weights {
            path: path.clone(),
            msg: format!("tensor {name}: {msg}"),
        };
        if info.shape != shape {
            return Err(err(format!("shape {:?}, expected {shape:?}", info.shape)));
        }
        let kind: Kind = info.dtype.try_into().map_err(|e| err(format!("{e}")))?;
        if !matches!(
            kind,
            Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double
        ) {
            return Err(err(format!("dtype {:?} is not a float type", info.dtype)));
        }
        let (a, b) = info.data_offsets;
        let bytes = &mmap[start + a..start + b];
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(bytes, &dims, kind)?;
        Ok(t.f_to_device(self.device)?.f_to_kind(self.kind)?)
    }
}

/// The distinct shard files named by an index's `weight_map`, in first-seen order.
fn shard_names(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let bad = |msg: String| Error::Weights {
        path: index.to_path_buf(),
        msg,
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no weight_map object".into()))?;
    let mut out: Vec<PathBuf> = Vec::new();
    for (k, f) in map {
        let f = f
            .as_str()
            .ok_or_else(|| bad(format!("weight_map.{k} is not a file name")))?;
        if f.contains('/') || f.contains("..") {
            return Err(bad(format!(
                "weight_map.{k}: {f:?} is not a file in this directory"
            )));
        }
        let p = dir.join(f);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}
