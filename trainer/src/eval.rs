//! Evaluation through the language model (`dmsae eval`): the residual after layer L replaced by
//! each SAE's reconstruction (spliced) or by zeros, on the same tokens as the clean run.
//!
//! Per SAE: spliced CE, CE-loss recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean),
//! KL(clean ‖ spliced) per token, FVU and L0 (core, non-core, total), and the first-order
//! estimate of the CE change, Σ g · (x_hat − x) / (positions with a target), g the clean loss
//! gradient at layer L (d(sum of CE over the context)/d(residual)), next to the true change
//! CE_spliced − CE_clean. Both are per target position (a context's mid-context BOS positions
//! are targets but are not spliced, so the estimate is a mean over slightly more positions than
//! the trainer's `first_order_dloss`). The clean and zero passes run once for all SAEs.
//!
//! BOS positions keep their clean residual in the splice (SAELens' `ignore_tokens`), but zero
//! ablation zeroes every position, BOS included, as SAELens' does: with BOS kept, Gemma's later
//! layers read the clean BOS and predict worse than uniform (24.6 nats against ln 262,144 =
//! 12.5 on the demo), which doubled CE_zero − CE_clean and inflated CE-loss recovered.
//!
//! SAEs are read in SAELens' `jumprelu` layout as `export.rs` writes it, in model units:
//! f = JumpReLU((x − b_dec) W_enc + b_enc, threshold), x_hat = f W_dec + b_dec; without
//! `apply_b_dec_to_input`, x W_enc + b_enc. SAELens' input normalisations and reshapes are
//! refused rather than ignored.

use crate::compare;
use crate::export::{self, write_atomic};
use crate::plot;
use dmsae_extractor::Model;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const JSON_FILE: &str = "eval.json";
pub const MD_FILE: &str = "eval.md";
/// Next to `dmsae sweep`'s plots.
pub const PLOT_FILE: &str = "plots/ce_recovered_vs_l0.svg";

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// An SAE export that cannot be used (missing file, bad tensor, wrong size or layer).
    #[error("{}: {msg}", path.display())]
    Sae { path: PathBuf, msg: String },
    /// Arguments that do not fit the model or each other.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Model(#[from] dmsae_extractor::Error),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T, E = EvalError> = std::result::Result<T, E>;

fn sae_err(path: &Path, msg: impl Into<String>) -> EvalError {
    EvalError::Sae {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// A JumpReLU SAE in model units, float32, on the model's device.
pub struct EvalSae {
    pub dir: PathBuf,
    /// The export directory's name.
    pub name: String,
    /// The sweep series (`distilled-core`, `baseline`, `random-core`) or `sae`.
    pub series: String,
    pub k: Option<u64>,
    pub d_in: usize,
    pub width: usize,
    /// Latents `0..core` are the core (0 when the export does not say).
    pub core: usize,
    /// From `metadata.hook_name` (`blocks.L.hook_resid_post`), when present.
    pub layer: Option<usize>,
    w_enc: Tensor,
    b_enc: Tensor,
    w_dec: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    /// SAELens' `apply_b_dec_to_input`: the encoder reads x − b_dec (dmsae's exports) or x.
    b_dec_in: bool,
}

/// The export directories under `path`: `path` itself when it holds `cfg.json`, else its
/// subdirectories holding one (a sweep), in name order.
pub fn discover(path: &Path) -> Result<Vec<PathBuf>> {
    let check = |d: &Path| -> Result<PathBuf> {
        let w = d.join(export::WEIGHTS_FILE);
        if !w.is_file() {
            return Err(sae_err(
                &w,
                "missing (an SAE export holds cfg.json and sae_weights.safetensors)",
            ));
        }
        Ok(d.to_path_buf())
    };
    if path.join(export::CFG_FILE).is_file() {
        return Ok(vec![check(path)?]);
    }
    let rd = std::fs::read_dir(path).map_err(|source| EvalError::Io {
        path: path.into(),
        source,
    })?;
    let mut dirs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(export::CFG_FILE).is_file())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        return Err(sae_err(
            path,
            "no SAE export (cfg.json + sae_weights.safetensors) here or one level down",
        ));
    }
    dirs.iter().map(|d| check(d)).collect()
}

/// `blocks.L.hook_resid_post` -> L; other hooks are refused (only the residual stream splices).
fn hook_layer(path: &Path, hook: &str) -> Result<usize> {
    hook.strip_prefix("blocks.")
        .and_then(|r| r.strip_suffix(".hook_resid_post"))
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| {
            sae_err(
                path,
                format!(
                    "metadata.hook_name {hook:?}: only blocks.L.hook_resid_post can be evaluated"
                ),
            )
        })
}

impl EvalSae {
    pub fn load(dir: &Path, device: Device) -> Result<EvalSae> {
        let cfg_path = dir.join(export::CFG_FILE);
        let bytes = std::fs::read(&cfg_path).map_err(|source| EvalError::Io {
            path: cfg_path.clone(),
            source,
        })?;
        let cfg: Value = serde_json::from_slice(&bytes)
            .map_err(|e| sae_err(&cfg_path, format!("not JSON: {e}")))?;
        match cfg["architecture"].as_str() {
            Some("jumprelu") => {}
            a => {
                return Err(sae_err(
                    &cfg_path,
                    format!("architecture {a:?}: only SAELens jumprelu exports can be evaluated"),
                ))
            }
        }
        for key in ["normalize_activations", "reshape_activations"] {
            match &cfg[key] {
                Value::Null => {}
                Value::String(s) if s == "none" => {}
                v => {
                    return Err(sae_err(
                        &cfg_path,
                        format!("{key} {v}: only \"none\" is supported"),
                    ))
                }
            }
        }
        let b_dec_in = match &cfg["apply_b_dec_to_input"] {
            Value::Null => true,
            Value::Bool(b) => *b,
            v => {
                return Err(sae_err(
                    &cfg_path,
                    format!("apply_b_dec_to_input {v} is not a boolean"),
                ))
            }
        };
        let layer = match cfg["metadata"]["hook_name"].as_str() {
            Some(h) => Some(hook_layer(&cfg_path, h)?),
            None => None,
        };
        let x = &cfg["dmsae"];
        // `dmsae sweep` writes dmsae.sweep_series.
        let series = [&x["sweep_series"], &cfg["metadata"]["series"], &x["series"]]
            .iter()
            .find_map(|v| v.as_str())
            .unwrap_or("sae")
            .to_string();
        let wpath = dir.join(export::WEIGHTS_FILE);
        if !wpath.is_file() {
            return Err(sae_err(&wpath, "missing"));
        }
        let bad = |msg: String| sae_err(&wpath, msg);
        let tensors = Tensor::read_safetensors(&wpath).map_err(|e| bad(e.to_string()))?;
        let get = |n: &str| -> Result<Tensor> {
            tensors
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, t)| t.to_kind(Kind::Float).to_device(device))
                .ok_or_else(|| bad(format!("no tensor `{n}`")))
        };
        let w_enc = get("W_enc")?;
        let (d, w) = match w_enc.size()[..] {
            [d, w] if d > 0 && w > 0 => (d, w),
            ref s => return Err(bad(format!("W_enc is {s:?}, expected [d_in, d_sae]"))),
        };
        let sae = EvalSae {
            dir: dir.to_path_buf(),
            name: dir
                .file_name()
                .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into()),
            series,
            k: x["k"].as_u64(),
            d_in: d as usize,
            width: w as usize,
            core: x["core_size"].as_u64().unwrap_or(0) as usize,
            layer,
            w_dec: get("W_dec")?,
            b_enc: get("b_enc")?,
            b_dec: get("b_dec")?,
            threshold: get("threshold")?,
            w_enc,
            b_dec_in,
        };
        for (n, t, want) in [
            ("W_dec", &sae.w_dec, vec![w, d]),
            ("b_enc", &sae.b_enc, vec![w]),
            ("b_dec", &sae.b_dec, vec![d]),
            ("threshold", &sae.threshold, vec![w]),
        ] {
            if t.size() != want {
                return Err(bad(format!(
                    "{n} is {:?}, expected {want:?} from W_enc",
                    t.size()
                )));
            }
        }
        if let Some(c) = cfg["d_in"].as_u64().filter(|&c| c != d as u64) {
            return Err(sae_err(
                &cfg_path,
                format!("d_in {c}, but W_enc has {d} rows"),
            ));
        }
        if let Some(c) = cfg["d_sae"].as_u64().filter(|&c| c != w as u64) {
            return Err(sae_err(
                &cfg_path,
                format!("d_sae {c}, but W_enc has {w} columns"),
            ));
        }
        if sae.core > sae.width {
            return Err(sae_err(
                &cfg_path,
                format!("core_size {} exceeds the width {}", sae.core, sae.width),
            ));
        }
        Ok(sae)
    }

    /// Codes `[N, width]` for rows `[N, d]`, float32.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.b_dec_in {
            x.f_sub(&self.b_dec)?
        } else {
            x.shallow_clone()
        };
        let pre = x.f_matmul(&self.w_enc)?.f_add(&self.b_enc)?;
        let on = pre.f_gt_tensor(&self.threshold)?.f_to_kind(Kind::Float)?;
        Ok(pre.f_relu()?.f_mul(&on)?)
    }

    pub fn decode(&self, f: &Tensor) -> Result<Tensor> {
        Ok(f.f_matmul(&self.w_dec)?.f_add(&self.b_dec)?)
    }
}

/// The layer all SAEs (and `--layer`, when given) agree on, checked against the model.
pub fn resolve_layer(saes: &[EvalSae], flag: Option<usize>, num_layers: usize) -> Result<usize> {
    let mut layer = flag;
    for s in saes {
        match (layer, s.layer) {
            (Some(l), Some(sl)) if l != sl => {
                return Err(sae_err(
                    &s.dir.join(export::CFG_FILE),
                    format!(
                        "trained at layer {sl} (metadata.hook_name), but {} layer {l}",
                        if flag.is_some() {
                            "--layer asks for"
                        } else {
                            "another SAE has"
                        }
                    ),
                ))
            }
            (None, sl) => layer = sl,
            _ => {}
        }
    }
    let l = layer.ok_or_else(|| {
        EvalError::Usage("no layer: the exports name no hook_name; give --layer".into())
    })?;
    if l >= num_layers {
        return Err(EvalError::Usage(format!(
            "layer {l} out of range: the model has {num_layers} layers (0..={})",
            num_layers - 1
        )));
    }
    Ok(l)
}

#[derive(Clone, Debug)]
pub struct Options {
    pub layer: usize,
    /// Splice BOS positions too; by default they keep the clean residual in every variant
    /// (their residual is an outlier no SAE is trained on).
    pub keep_bos: bool,
    pub bos: u32,
}

#[derive(Default)]
struct SaeAcc {
    ce: f64,
    kl: f64,
    err: f64,
    sum_x: Option<Tensor>,
    sum_sq: f64,
    l0_core: f64,
    l0_noncore: f64,
    first_order: f64,
}

/// Accumulates the figures over batches of contexts.
pub struct Evaluator<'a> {
    model: &'a Model,
    saes: &'a [EvalSae],
    opts: Options,
    contexts: u64,
    /// Positions with a next token (CE and KL are means over these).
    targets: u64,
    /// Positions whose residual is replaced.
    spliced: u64,
    clean_ce: f64,
    zero_ce: f64,
    zero_kl: f64,
    acc: Vec<SaeAcc>,
}

fn sum64(t: &Tensor) -> Result<f64> {
    Ok(t.f_sum(Kind::Double)?.f_double_value(&[])?)
}

impl<'a> Evaluator<'a> {
    pub fn new(model: &'a Model, saes: &'a [EvalSae], opts: Options) -> Result<Evaluator<'a>> {
        for s in saes {
            if s.d_in != model.d_model() {
                return Err(sae_err(
                    &s.dir.join(export::WEIGHTS_FILE),
                    format!(
                        "d_in {} does not match the model's d_model {}",
                        s.d_in,
                        model.d_model()
                    ),
                ));
            }
        }
        if opts.layer >= model.num_layers() {
            return Err(EvalError::Usage(format!(
                "layer {} out of range: the model has {} layers",
                opts.layer,
                model.num_layers()
            )));
        }
        Ok(Evaluator {
            model,
            saes,
            opts,
            contexts: 0,
            targets: 0,
            spliced: 0,
            clean_ce: 0.0,
            zero_ce: 0.0,
            zero_kl: 0.0,
            acc: saes.iter().map(|_| SaeAcc::default()).collect(),
        })
    }

    /// Positions with a next token evaluated so far.
    pub fn tokens(&self) -> u64 {
        self.targets
    }

    /// One batch of contexts, int64 ids `[B, T]`.
    pub fn add_batch(&mut self, ids: &Tensor) -> Result<()> {
        let cp = self.model.clean_pass(ids, self.opts.layer, true)?;
        let _g = tch::no_grad_guard();
        let size = cp.resid.size();
        let (b, t, d) = (size[0], size[1], size[2]);
        let dev = cp.resid.device();
        let ids_d = ids.f_to_device(dev)?;
        let keep = if self.opts.keep_bos {
            ids_d.f_ones_like()?.f_to_kind(Kind::Bool)?
        } else {
            ids_d.f_ne(self.opts.bos as i64)?
        };
        let idx = keep.f_reshape([b * t])?.f_nonzero()?.f_squeeze_dim(1)?;
        let n = idx.size()[0];
        let x_flat = cp.resid.f_reshape([b * t, d])?.f_to_kind(Kind::Float)?;
        let xs = x_flat.f_index_select(0, &idx)?;
        let gs = cp
            .grad
            .as_ref()
            .expect("clean_pass with grad")
            .f_reshape([b * t, d])?
            .f_to_kind(Kind::Float)?
            .f_index_select(0, &idx)?;
        let kind = cp.resid.kind();
        let splice = |rows: &Tensor| -> Result<Tensor> {
            Ok(x_flat
                .f_index_copy(0, &idx, rows)?
                .f_view([b, t, d])?
                .f_to_kind(kind)?)
        };
        let mut variants = vec![cp.resid.f_zeros_like()?];
        for (s, a) in self.saes.iter().zip(&mut self.acc) {
            let f = s.encode(&xs)?;
            let x_hat = s.decode(&f)?;
            let v = splice(&x_hat)?;
            // The change the model sees (after rounding to its dtype).
            let diff = v
                .f_reshape([b * t, d])?
                .f_to_kind(Kind::Float)?
                .f_index_select(0, &idx)?
                .f_sub(&xs)?;
            a.err += sum64(&diff.f_square()?)?;
            a.first_order += sum64(&gs.f_mul(&diff)?)?;
            let sx = xs.f_sum_dim_intlist([0i64].as_slice(), false, Kind::Double)?;
            a.sum_x = Some(match a.sum_x.take() {
                Some(p) => p.f_add(&sx)?,
                None => sx,
            });
            a.sum_sq += sum64(&xs.f_square()?)?;
            let on = f.f_gt(0.0)?;
            let c = s.core as i64;
            let core_on = sum64(&on.f_narrow(1, 0, c)?)?;
            a.l0_core += core_on;
            a.l0_noncore += sum64(&on)? - core_on;
            variants.push(v);
        }
        let l = self.model.splice(&cp, &variants)?;
        let tgt = |x: &Tensor| -> Result<f64> {
            let v = sum64(&x.f_narrow(1, 0, t - 1)?)?;
            if !v.is_finite() {
                return Err(EvalError::Model(dmsae_extractor::Error::NonFinite(
                    format!(
                        "non-finite loss in batch of contexts {}..{}",
                        self.contexts,
                        self.contexts + b as u64
                    ),
                )));
            }
            Ok(v)
        };
        self.clean_ce += tgt(&l.clean)?;
        self.zero_ce += tgt(&l.loss[0])?;
        self.zero_kl += tgt(&l.kl[0])?;
        for (j, a) in self.acc.iter_mut().enumerate() {
            a.ce += tgt(&l.loss[j + 1])?;
            a.kl += tgt(&l.kl[j + 1])?;
        }
        self.contexts += b as u64;
        self.targets += (b * (t - 1)) as u64;
        self.spliced += n as u64;
        Ok(())
    }

    pub fn finish(self, settings: Value) -> Result<EvalReport> {
        let nt = self.targets.max(1) as f64;
        let ns = self.spliced.max(1) as f64;
        let (clean, zero) = (self.clean_ce / nt, self.zero_ce / nt);
        let mut saes = Vec::new();
        for (s, a) in self.saes.iter().zip(&self.acc) {
            let sum_x = match &a.sum_x {
                Some(t) => sum64(&t.f_square()?)?,
                None => 0.0,
            };
            let var = a.sum_sq - sum_x / ns;
            let ce = a.ce / nt;
            saes.push(SaeResult {
                name: s.name.clone(),
                dir: s.dir.display().to_string(),
                series: s.series.clone(),
                k: s.k,
                width: s.width,
                core: s.core,
                ce,
                ce_recovered: (zero - ce) / (zero - clean),
                kl: a.kl / nt,
                fvu: a.err / var.max(f64::MIN_POSITIVE),
                l0_core: a.l0_core / ns,
                l0_noncore: a.l0_noncore / ns,
                l0_total: (a.l0_core + a.l0_noncore) / ns,
                delta_ce: ce - clean,
                first_order_delta_ce: a.first_order / nt,
            });
        }
        let first_order_pearson = pearson(
            &saes
                .iter()
                .map(|s| (s.first_order_delta_ce, s.delta_ce))
                .collect::<Vec<_>>(),
        );
        Ok(EvalReport {
            settings,
            layer: self.opts.layer,
            keep_bos: self.opts.keep_bos,
            contexts: self.contexts,
            target_tokens: self.targets,
            spliced_tokens: self.spliced,
            clean_ce: clean,
            zero_ce: zero,
            zero_kl: self.zero_kl / nt,
            saes,
            first_order_pearson,
        })
    }
}

/// Pearson correlation of the pairs; None for fewer than 3 or a constant coordinate.
pub fn pearson(p: &[(f64, f64)]) -> Option<f64> {
    let p: Vec<_> = p
        .iter()
        .filter(|(a, b)| a.is_finite() && b.is_finite())
        .collect();
    if p.len() < 3 {
        return None;
    }
    let n = p.len() as f64;
    let (ma, mb) = (
        p.iter().map(|x| x.0).sum::<f64>() / n,
        p.iter().map(|x| x.1).sum::<f64>() / n,
    );
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (a, b) in p {
        sab += (a - ma) * (b - mb);
        saa += (a - ma).powi(2);
        sbb += (b - mb).powi(2);
    }
    (saa > 0.0 && sbb > 0.0).then(|| sab / (saa * sbb).sqrt())
}

/// One SAE's figures; CE and KL in nats per target position, L0 per spliced position.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SaeResult {
    pub name: String,
    pub dir: String,
    pub series: String,
    pub k: Option<u64>,
    pub width: usize,
    pub core: usize,
    pub ce: f64,
    /// NaN (null in JSON) when zero ablation does not change CE.
    #[serde(deserialize_with = "null_as_nan")]
    pub ce_recovered: f64,
    pub kl: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub fvu: f64,
    pub l0_core: f64,
    pub l0_noncore: f64,
    pub l0_total: f64,
    /// CE_spliced − CE_clean.
    pub delta_ce: f64,
    /// Σ g · (x_hat − x) over spliced positions / target positions.
    pub first_order_delta_ce: f64,
}

fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// `eval.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    /// What the command was run with (model, data, context, ...), as the CLI gives it.
    pub settings: Value,
    pub layer: usize,
    pub keep_bos: bool,
    pub contexts: u64,
    pub target_tokens: u64,
    pub spliced_tokens: u64,
    pub clean_ce: f64,
    pub zero_ce: f64,
    pub zero_kl: f64,
    pub saes: Vec<SaeResult>,
    /// Across the SAEs: first-order estimate vs true CE change (None for fewer than 3).
    pub first_order_pearson: Option<f64>,
}

fn f(v: f64, p: usize) -> String {
    if v.is_finite() {
        format!("{v:.p$}")
    } else {
        "-".into()
    }
}

/// The table `eval.md` holds and `dmsae report` prints.
pub fn markdown(r: &EvalReport) -> String {
    let mut s = String::new();
    s += &format!(
        "## Evaluation through the model (layer {}, {} contexts, {} target tokens)\n\n",
        r.layer, r.contexts, r.target_tokens
    );
    s += &format!(
        "BOS positions {}; {} positions spliced. Clean CE {}, zero-ablation CE {} (KL {}; every position zeroed, BOS included, as in SAELens), nats per token.\n\n",
        if r.keep_bos { "spliced too" } else { "excluded from the splice (they keep the clean residual)" },
        r.spliced_tokens,
        f(r.clean_ce, 4),
        f(r.zero_ce, 4),
        f(r.zero_kl, 4)
    );
    s += "| SAE | series | k | CE spliced | CE recovered | KL | FVU | L0 core | L0 non-core | L0 total | ΔCE true | ΔCE first-order |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for e in &r.saes {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            e.name,
            e.series,
            e.k.map_or("-".into(), |k| k.to_string()),
            f(e.ce, 4),
            f(e.ce_recovered, 4),
            f(e.kl, 4),
            f(e.fvu, 4),
            f(e.l0_core, 2),
            f(e.l0_noncore, 2),
            f(e.l0_total, 2),
            f(e.delta_ce, 4),
            f(e.first_order_delta_ce, 4),
        );
    }
    s += "\nΔCE first-order = mean over target tokens of g · (x_hat − x), g = d(context CE)/d(residual) \
          from the clean pass: a linearisation, good while the reconstruction error is small; it \
          misses the curvature, which grows with FVU (compare the two columns before trusting it).\n";
    match r.first_order_pearson {
        Some(p) => {
            s += &format!(
                "Pearson correlation of first-order and true ΔCE across the {} SAEs: {p:.3}.\n",
                r.saes.len()
            )
        }
        None if r.saes.len() > 1 => {
            s += "Pearson correlation: undefined (fewer than 3 SAEs or a constant column).\n"
        }
        None => {}
    }
    // The same series at equal total L0, where the SAEs come from more than one.
    let mut series: Vec<&str> = r.saes.iter().map(|e| e.series.as_str()).collect();
    series.sort_unstable();
    series.dedup();
    if series.len() > 1 {
        let points = |name: &str, value: fn(&SaeResult) -> f64| {
            let of = r.saes.iter().filter(|e| e.series == name);
            of.map(|e| (e.l0_total, value(e))).collect()
        };
        type Metric = (&'static str, fn(&SaeResult) -> f64);
        let metrics: [Metric; 2] = [("CE recovered", |e| e.ce_recovered), ("KL", |e| e.kl)];
        let cols: Vec<compare::Column> = metrics
            .iter()
            .flat_map(|&(label, value)| series.iter().map(move |&name| (label, value, name)))
            .map(|(label, value, name)| compare::Column {
                header: format!("{label} {name}"),
                points: points(name, value),
                fmt: |x| format!("{x:.4}"),
            })
            .collect();
        s += &compare::markdown(&cols);
    }
    s
}

/// Write `eval.json`, `eval.md` and, for more than one SAE, the plot of CE-loss recovered
/// against total L0 (one series per kind), each atomically.
pub fn write_outputs(out: &Path, r: &EvalReport) -> Result<Vec<PathBuf>> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EvalError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut written = Vec::new();
    if r.saes.len() > 1 {
        let mut series: Vec<plot::Series> = Vec::new();
        for e in &r.saes {
            let p = (e.l0_total, e.ce_recovered);
            match series.iter_mut().find(|s| s.name == e.series) {
                Some(s) => s.points.push(p),
                None => series.push(plot::Series {
                    name: e.series.clone(),
                    points: vec![p],
                }),
            }
        }
        for s in &mut series {
            s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        let p = out.join(PLOT_FILE);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        plot::line_chart(
            &p,
            &format!("CE-loss recovered vs L0, layer {}", r.layer),
            "L0 (total, per token)",
            "CE-loss recovered",
            &series,
            true,
        )
        .map_err(io(&p))?;
        written.push(p);
    }
    let p = out.join(MD_FILE);
    write_atomic(&p, markdown(r).as_bytes()).map_err(io(&p))?;
    written.push(p);
    let p = out.join(JSON_FILE);
    let json = serde_json::to_string_pretty(r).expect("serialisable");
    write_atomic(&p, json.as_bytes()).map_err(io(&p))?;
    written.push(p);
    Ok(written)
}

/// The evaluation table for `dmsae report DIR` when `DIR/eval.json` exists.
pub fn report_section(dir: &Path) -> Result<Option<String>> {
    let p = dir.join(JSON_FILE);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(EvalError::Io { path: p, source }),
    };
    let r: EvalReport = serde_json::from_slice(&bytes)
        .map_err(|e| EvalError::Usage(format!("{}: {e}", p.display())))?;
    Ok(Some(markdown(&r)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
    }

    /// Draws from a generator of the test's own: torch's global one is shared with the tests
    /// running beside it, so a seed set there does not fix what a later draw returns.
    fn uniform(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(lo..hi)).collect()
    }

    /// Random ids `[B, T]` with BOS first and once mid-context (a document boundary); the same
    /// every call.
    fn ids(model: &Model, bos: i64) -> Tensor {
        let v = model.config.vocab_size as f64;
        let flat: Vec<i64> = uniform(7, 36, 4.0, v).iter().map(|x| *x as i64).collect();
        let ids = Tensor::from_slice(&flat).reshape([3, 12]);
        let _ = ids.narrow(1, 0, 1).fill_(bos);
        let _ = ids.narrow(1, 5, 1).narrow(0, 1, 1).fill_(bos);
        ids
    }

    /// Width 2d: W_enc = [I, -I], W_dec = [I; -I], so x_hat = ReLU(x - b) - ReLU(b - x) + b = x;
    /// b_enc = [shift, -shift] with b_dec = shift makes x_hat = x + shift.
    fn identity(d: i64, shift: &Tensor, core: usize) -> EvalSae {
        let eye = Tensor::eye(d, (Kind::Float, Device::Cpu));
        EvalSae {
            dir: PathBuf::from("identity"),
            name: "identity".into(),
            series: "sae".into(),
            k: None,
            d_in: d as usize,
            width: 2 * d as usize,
            core,
            layer: None,
            w_enc: Tensor::cat(&[&eye, &eye.neg()], 1),
            b_enc: Tensor::cat(&[shift, &shift.neg()], 0),
            w_dec: Tensor::cat(&[&eye, &eye.neg()], 0),
            b_dec: shift.shallow_clone(),
            // JumpReLU at 0 is ReLU.
            threshold: Tensor::zeros([2 * d], (Kind::Float, Device::Cpu)),
            b_dec_in: true,
        }
    }

    fn evaluate(model: &Model, saes: &[EvalSae], layer: usize, keep_bos: bool) -> EvalReport {
        let bos = model.config.bos_token_id.unwrap();
        let opts = Options {
            layer,
            keep_bos,
            bos,
        };
        let mut ev = Evaluator::new(model, saes, opts).unwrap();
        let ids = ids(model, bos as i64);
        // Two batches of different sizes: the sums must not depend on the batching.
        ev.add_batch(&ids.narrow(0, 0, 2)).unwrap();
        ev.add_batch(&ids.narrow(0, 2, 1)).unwrap();
        ev.finish(Value::Null).unwrap()
    }

    #[test]
    fn identity_sae_reproduces_the_clean_run() {
        tch::set_num_threads(1);
        for name in ["gemma3", "gemma2-published", "gemma2-t5"] {
            let model = Model::load(&fixture(name), Device::Cpu, Kind::Float).unwrap();
            let d = model.d_model() as i64;
            let zero = Tensor::zeros([d], (Kind::Float, Device::Cpu));
            for keep_bos in [false, true] {
                let r = evaluate(&model, &[identity(d, &zero, 10)], 1, keep_bos);
                let s = &r.saes[0];
                let what = format!("{name} keep_bos={keep_bos}");
                // Zero ablation moves CE, so recovered is well defined and the test can fail.
                assert!((r.zero_ce - r.clean_ce).abs() > 1e-3, "{what}: {r:?}");
                assert!(
                    (s.ce - r.clean_ce).abs() < 1e-6,
                    "{what}: {s:?} vs {}",
                    r.clean_ce
                );
                assert!((s.ce_recovered - 1.0).abs() < 1e-5, "{what}: {s:?}");
                assert!(s.kl.abs() < 1e-7 && r.zero_kl > 1e-2, "{what}: {s:?}");
                assert!(
                    s.fvu < 1e-12 && s.first_order_delta_ce.abs() < 1e-9,
                    "{what}: {s:?}"
                );
                // Each dimension fires exactly one of its two latents (x is never exactly 0).
                assert!((s.l0_total - d as f64).abs() < 1e-9, "{what}: {s:?}");
                assert!(s.l0_core > 0.0 && s.l0_core < 10.0, "{what}: {s:?}");
                let (t, bos_n) = (3 * 11, 4);
                assert_eq!(r.target_tokens, t, "{what}");
                let spliced = if keep_bos { 36 } else { 36 - bos_n };
                assert_eq!(r.spliced_tokens, spliced, "{what}");
            }
        }
    }

    #[test]
    fn first_order_estimate_matches_a_small_perturbation() {
        tch::set_num_threads(1);
        let model = Model::load(&fixture("gemma3"), Device::Cpu, Kind::Float).unwrap();
        let d = model.d_model() as i64;
        let v = Tensor::from_slice(&uniform(3, d as usize, -1.7, 1.7)).to_kind(Kind::Float);
        let mut last = None;
        let mut trues = Vec::new();
        for eps in [0.02, -0.02] {
            let r = evaluate(&model, &[identity(d, &(&v * eps), 0)], 2, false);
            let s = &r.saes[0];
            eprintln!(
                "eps {eps}: first-order {:.6e}, true {:.6e}",
                s.first_order_delta_ce, s.delta_ce
            );
            // Second-order terms are O(eps^2): a few percent of the first-order term here.
            assert!(s.delta_ce.abs() > 1e-4, "{s:?}");
            assert!(
                (s.first_order_delta_ce - s.delta_ce).abs() < 0.05 * s.delta_ce.abs(),
                "eps {eps}: first-order {} vs true {}",
                s.first_order_delta_ce,
                s.delta_ce
            );
            trues.push(s.delta_ce);
            if let Some(prev) = last.replace(s.first_order_delta_ce) {
                // Odd in eps up to the rounding of x - b + b.
                let fo = s.first_order_delta_ce;
                assert!(
                    (prev + fo).abs() < 1e-3 * fo.abs(),
                    "not odd in eps: {prev} {fo}"
                );
                // The central difference cancels the second-order term: O(eps^2) relative.
                let central = (trues[0] - trues[1]) / 2.0;
                assert!(
                    (prev - central).abs() < 1e-3 * central.abs(),
                    "first-order {prev} vs central difference {central}"
                );
            }
        }
    }

    #[test]
    fn report_section_reads_back_what_write_outputs_wrote() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(report_section(tmp.path()).unwrap().is_none());
        let sae = |name: &str, series: &str, rec: f64| SaeResult {
            name: name.into(),
            dir: name.into(),
            series: series.into(),
            k: Some(8),
            width: 16,
            core: 4,
            ce: 3.0,
            ce_recovered: rec,
            kl: 0.1,
            fvu: 0.2,
            l0_core: 1.0,
            l0_noncore: 2.0,
            l0_total: 3.0,
            delta_ce: 0.5,
            first_order_delta_ce: 0.4,
        };
        let r = EvalReport {
            settings: Value::Null,
            layer: 3,
            keep_bos: false,
            contexts: 2,
            target_tokens: 10,
            spliced_tokens: 9,
            clean_ce: 2.5,
            zero_ce: 2.5,
            zero_kl: 1.0,
            // Zero ablation that changes nothing leaves recovered undefined: null in JSON.
            saes: vec![sae("a", "baseline", f64::NAN), sae("b", "random-core", 0.5)],
            first_order_pearson: None,
        };
        let written = write_outputs(tmp.path(), &r).unwrap();
        assert_eq!(written.len(), 3, "two SAEs: plot, markdown, JSON");
        let md = report_section(tmp.path()).unwrap().unwrap();
        assert_eq!(md, markdown(&r));
        assert!(md.contains("| a | baseline | 8 | 3.0000 | - |"), "{md}");
        assert!(md.contains("fewer than 3 SAEs"), "{md}");
        // At equal total L0 (both at 3.0): recovered per series, then KL; undefined is "-".
        assert!(
            md.contains("| 3.00 | - | 0.5000 | 0.1000 | 0.1000 |"),
            "{md}"
        );
        let svg = std::fs::read_to_string(tmp.path().join(PLOT_FILE)).unwrap();
        assert!(svg.contains("baseline") && svg.contains("random-core"));
    }

    #[test]
    fn pearson_of_known_pairs() {
        let p = pearson(&[(1.0, 2.0), (2.0, 4.1), (3.0, 5.9), (4.0, 8.0)]).unwrap();
        assert!((p - 0.999541).abs() < 1e-6, "{p}");
        let n = pearson(&[(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)]).unwrap();
        assert!((n + 1.0).abs() < 1e-12, "{n}");
        assert_eq!(pearson(&[(1.0, 2.0), (2.0, 3.0)]), None);
        assert_eq!(pearson(&[(1.0, 2.0), (2.0, 2.0), (3.0, 2.0)]), None);
    }

    #[test]
    fn layers_from_hooks_and_flags() {
        let p = Path::new("x/cfg.json");
        assert_eq!(hook_layer(p, "blocks.9.hook_resid_post").unwrap(), 9);
        let e = hook_layer(p, "blocks.9.hook_mlp_out")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x/cfg.json") && e.contains("hook_mlp_out"),
            "{e}"
        );
        let zero = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let mut a = identity(4, &zero, 0);
        a.layer = Some(2);
        let mut b = identity(4, &zero, 0);
        b.layer = Some(3);
        assert_eq!(
            resolve_layer(&[identity(4, &zero, 0)], Some(1), 4).unwrap(),
            1
        );
        assert_eq!(resolve_layer(std::slice::from_ref(&a), None, 4).unwrap(), 2);
        let e = resolve_layer(&[a, b], None, 4).unwrap_err().to_string();
        assert!(e.contains("layer 3") && e.contains("layer 2"), "{e}");
        let e = resolve_layer(&[identity(4, &zero, 0)], Some(4), 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 4 out of range"), "{e}");
        let e = resolve_layer(&[identity(4, &zero, 0)], None, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--layer"), "{e}");
    }
}
