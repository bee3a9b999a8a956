//! SAELens-loadable export: `cfg.json` + `sae_weights.safetensors`, in the model's units.
//!
//! Training runs on x_n = s * x (train.rs). With f = ReLU((x_n - b) W + c) and
//! x_hat = f D + b in normalised units, the same codes in model units come from W_enc = s W,
//! b_dec = b / s, W_dec = D / s, b_enc and threshold unchanged (SAELens'
//! `fold_activation_norm_scaling_factor`). The exported SAE is SAELens' `jumprelu`
//! architecture: threshold 0 on the core (plain ReLU), the learned threshold elsewhere.

use crate::sae::Sae;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub const CFG_FILE: &str = "cfg.json";
pub const WEIGHTS_FILE: &str = "sae_weights.safetensors";

/// The exported tensors, model units, float32, SAELens names and shapes.
pub fn weights(sae: &Sae, scale: f64) -> Vec<(&'static str, Tensor)> {
    let f = |t: &Tensor| {
        t.detach()
            .to_kind(Kind::Float)
            .to_device(Device::Cpu)
            .contiguous()
    };
    vec![
        ("W_enc", f(&(&sae.w_enc * scale))),
        ("W_dec", f(&(&sae.w_dec / scale))),
        ("b_enc", f(&sae.b_enc_saelens())),
        ("b_dec", f(&(&sae.b_dec / scale))),
        ("threshold", sae.threshold_f()),
    ]
}

/// `extra`: our fields (k, groups, normalisation scalar, provenance, ...), kept under "dmsae";
/// SAELens reads the fields it knows and ignores the rest.
pub fn cfg_json(sae: &Sae, metadata: Value, extra: Value) -> Value {
    json!({
        "architecture": "jumprelu",
        "d_in": sae.d_in,
        "d_sae": sae.width(),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": true,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
        "dmsae": extra,
    })
}

/// Write both files under `dir`, each through a temporary name, fsync and rename.
pub fn write(dir: &Path, sae: &Sae, scale: f64, cfg: &Value) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
    Tensor::write_safetensors(&weights(sae, scale), &tmp).map_err(std::io::Error::other)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(WEIGHTS_FILE))?;
    write_atomic(
        &dir.join(CFG_FILE),
        serde_json::to_string_pretty(cfg)?.as_bytes(),
    )
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
