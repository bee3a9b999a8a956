//! Distillation (METHOD.md "Attribution and core selection"): cycles of train, attribute,
//! select, transfer.
//!
//! A cycle directory holds the trainer's export (cfg.json, sae_weights.safetensors,
//! metrics.jsonl), `attribution.csv`, `core.safetensors` (the selection: `W_enc` [d, c] and
//! `b_enc` [c] in model units, as `train --core` takes, with b_enc anchored to x: the
//! pre-activation is x W_enc + b_enc, no b_dec; and `lineage` [c] i64) and `cycle.json`,
//! written last: a cycle with a valid `cycle.json` is done. Only encoder columns and b_enc
//! entries carry over; the next cycle re-initialises the core's decoder rows, b_dec and every
//! non-core latent, with seed `seed + cycle`.

use crate::attribution::{attribute, check_attribution_data, select, Scores};
use crate::config::{DistillConfig, TrainConfig};
use crate::export::{self, write_atomic};
use crate::sae::Sae;
use crate::train::{
    self, export_store_identity, file_blake3, scale_of, store_differs, store_identity, CoreFile,
    Progress, RunOptions, TrainError,
};
use dmsae_store::Store;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

pub const CORE_FILE: &str = "core.safetensors";
pub const CYCLE_FILE: &str = "cycle.json";
pub const TABLE_FILE: &str = "attribution.csv";
pub const TABLE_PARQUET: &str = "attribution.parquet";
pub const SUMMARY_FILE: &str = "summary.json";
pub const DISTILLED_DIR: &str = "distilled";

/// What one cycle did; `cycle.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CycleSummary {
    pub cycle: u64,
    pub seed: u64,
    /// Lineages of the core this cycle trained with (the previous selection), in index order.
    pub core_in: Vec<u64>,
    /// Candidates: the core and the first non-core group.
    pub candidates: usize,
    pub attribution_tokens: u64,
    /// The attribution pass's rate (stream, encode, score), tokens/s; a timing, so it is not
    /// part of the cycle's identity (0 in cycles written before it was recorded).
    #[serde(default)]
    pub attribution_tokens_per_s: f64,
    /// Selected latents (indices of this cycle's SAE, ascending) and their lineages: the next core.
    pub selected: Vec<usize>,
    pub lineages: Vec<u64>,
    pub core_size: usize,
    /// |core_in ∩ selection| / |core_in ∪ selection| by lineage; None in cycle 0.
    pub jaccard_prev: Option<f64>,
    /// Fraction of the candidates' total (positive) score the selection holds.
    pub selected_score_fraction: f64,
    /// The trainer's held-out metrics (FVU, L0 core/non-core/total, first-order loss change).
    pub eval: Value,
    pub norm_scale: f64,
    /// First lineage id the next cycle may hand out.
    pub next_lineage: u64,
    /// What the cycle was run with (config, previous core by lineage and BLAKE3, store by its
    /// shards' BLAKE3s); a rerun must match it to reuse the cycle.
    pub identity: Value,
}

/// Read an export back as an SAE in normalised units (the inverse of export.rs).
pub fn load_export(dir: &Path) -> Result<(Sae, Value), TrainError> {
    let path = dir.join(export::WEIGHTS_FILE);
    let bad = |msg: String| TrainError::Unusable {
        path: path.clone(),
        msg,
    };
    let cfg = read_json(&dir.join(export::CFG_FILE))?;
    let x = &cfg["dmsae"];
    let (scale, th) = (x["norm_scale"].as_f64(), x["threshold_normalised"].as_f64());
    let groups: Option<Vec<usize>> = serde_json::from_value(x["group_sizes"].clone()).ok();
    let (core, k) = (x["core_size"].as_u64(), x["k"].as_u64());
    let (Some(scale), Some(th), Some(groups), Some(core), Some(k)) = (scale, th, groups, core, k)
    else {
        return Err(bad(
            "cfg.json lacks dmsae norm_scale/threshold/group_sizes/core_size/k".into(),
        ));
    };
    let tensors = Tensor::read_safetensors(&path).map_err(|e| bad(e.to_string()))?;
    let get = |n: &str| {
        tensors
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, t)| t.to_kind(Kind::Float))
            .ok_or_else(|| bad(format!("no tensor `{n}`")))
    };
    let w_enc = get("W_enc")? / scale;
    let d_in = w_enc.size()[0] as usize;
    let threshold_f = get("threshold")?;
    if threshold_f.dim() != 1 || threshold_f.size()[0] < core as i64 {
        return Err(bad(format!(
            "threshold is {:?}, core_size {core}",
            threshold_f.size()
        )));
    }
    // The export's b_enc is SAELens' form; the core's is held anchored to x (sae.rs).
    let (b_enc, b_dec) = (get("b_enc")?, get("b_dec")? * scale);
    if core > 0 {
        let c = core as i64;
        let _ = b_enc
            .narrow(0, 0, c)
            .g_sub_(&b_dec.matmul(&w_enc.narrow(1, 0, c)));
    }
    let sae = Sae {
        d_in,
        core: core as usize,
        groups,
        k: k as usize,
        w_enc,
        b_enc,
        w_dec: get("W_dec")? * scale,
        b_dec,
        threshold: th,
        core_threshold: threshold_f.narrow(0, 0, core as i64),
    };
    if sae.w_dec.size() != [sae.width() as i64, d_in as i64] {
        return Err(bad(format!(
            "W_dec is {:?}, cfg.json says width {}",
            sae.w_dec.size(),
            sae.width()
        )));
    }
    Ok((sae, cfg))
}

fn read_json(path: &Path) -> Result<Value, TrainError> {
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| TrainError::Unusable {
        path: path.into(),
        msg: e.to_string(),
    })
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io {
        path: path.into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Write a core file: `W_enc` [d, c], `b_enc` [c], `threshold` [c] (model units, f32) and
/// `lineage` [c] (i64).
pub fn write_core(
    path: &Path,
    w_enc_dc: &Tensor,
    b_enc_c: &Tensor,
    threshold_c: &Tensor,
    lineage: &[u64],
) -> Result<(), TrainError> {
    let ids: Vec<i64> = lineage.iter().map(|&l| l as i64).collect();
    let f = |t: &Tensor| t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
    let tensors = [
        ("W_enc", f(w_enc_dc)),
        ("b_enc", f(b_enc_c)),
        ("threshold", f(threshold_c)),
        ("lineage", Tensor::from_slice(&ids)),
    ];
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    Tensor::write_safetensors(&tensors, &tmp).map_err(|e| io_err(path, e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| io_err(path, e))
}

/// (W_enc [d, c], b_enc [c], threshold [c] (zeros when absent), lineage) of a cycle's core file.
pub fn read_core(path: &Path) -> Result<(Tensor, Tensor, Tensor, Vec<u64>), TrainError> {
    let f = CoreFile::read(path)?;
    let lineage = f.lineage.ok_or_else(|| TrainError::Core {
        path: path.into(),
        msg: "no tensor `lineage`".into(),
    })?;
    let th = f.threshold_c.unwrap_or_else(|| f.b_enc_c.zeros_like());
    Ok((f.w_enc_dc, f.b_enc_c, th, lineage))
}

fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    let (a, b): (BTreeSet<_>, BTreeSet<_>) = (a.iter().collect(), b.iter().collect());
    let union = a.union(&b).count();
    if union == 0 {
        return 1.0;
    }
    a.intersection(&b).count() as f64 / union as f64
}

/// One cycle under `out`. `prev`: the previous cycle's directory (none for cycle 0). Returns
/// None when `stop` interrupted the training (a checkpoint was written; rerun to resume). A
/// finished cycle with the same identity is returned as is.
pub fn train_cycle(
    store_dir: &Path,
    out: &Path,
    cfg: &TrainConfig,
    prev: Option<&Path>,
    device: Device,
    stop: &AtomicBool,
    progress: impl FnMut(&Progress),
) -> Result<Option<CycleSummary>, TrainError> {
    cfg.validate(0)?;
    let (cycle, core_in, mut next_lineage, core_file) =
        match prev {
            None => (0, vec![], 0, None),
            Some(p) => {
                let s: CycleSummary = serde_json::from_value(read_json(&p.join(CYCLE_FILE))?)
                    .map_err(|e| TrainError::Unusable {
                        path: p.join(CYCLE_FILE),
                        msg: e.to_string(),
                    })?;
                // An empty selection's core file holds no latents, which CoreFile refuses:
                // the next cycle runs without a core.
                let file = (!s.lineages.is_empty()).then(|| p.join(CORE_FILE));
                if let Some(file) = &file {
                    let (_, _, _, ids) = read_core(file)?;
                    if ids != s.lineages {
                        return Err(TrainError::Core {
                            path: file.clone(),
                            msg: format!("lineages disagree with {CYCLE_FILE}"),
                        });
                    }
                }
                (s.cycle + 1, s.lineages, s.next_lineage, file)
            }
        };
    // Attribution keys stay out of the training identity, so changing them reuses the training.
    let tcfg = TrainConfig {
        seed: cfg.seed + cycle,
        distill: DistillConfig::default(),
        ..cfg.clone()
    };
    // min_selected only shapes the distilled core, after the cycles.
    let attribution = DistillConfig {
        min_selected: DistillConfig::default().min_selected,
        ..cfg.distill.clone()
    };
    // The store and the core by content, so another spelling of the same path still matches.
    let store = Arc::new(Store::open(store_dir)?);
    let core_blake3 = core_file.as_deref().map(file_blake3).transpose()?;
    let identity = json!({ "cycle": cycle, "core_in": core_in, "core_blake3": core_blake3,
        "train_config": tcfg, "distill": attribution, "store_shards": store_identity(&store) });
    if let Ok(v) = read_json(&out.join(CYCLE_FILE)) {
        let s: Option<CycleSummary> = serde_json::from_value(v).ok();
        match s {
            Some(s) if s.identity == identity && out.join(CORE_FILE).exists() => {
                return Ok(Some(s))
            }
            Some(s)
                if s.identity
                    .get("store_shards")
                    .is_some_and(|v| *v != identity["store_shards"]) =>
            {
                return Err(store_differs(&out.join(CYCLE_FILE), store_dir))
            }
            _ => {
                return Err(TrainError::Unusable {
                    path: out.join(CYCLE_FILE),
                    msg: "written by a cycle with another config or core (or by an older dmsae); \
                    remove the directory"
                        .into(),
                })
            }
        }
    }
    // The normalisation scale: the training's, when it ran here (on a --keep-bos store it is a
    // pass over a sample of the data).
    let mut trained_scale = None;
    if !out.join(export::CFG_FILE).exists() {
        check_attribution_data(&store, cfg)?;
        let summary = train::train(
            store_dir,
            out,
            tcfg.clone(),
            RunOptions {
                core: core_file.as_deref(),
                resume: true,
                device,
                stop,
            },
            progress,
        )?;
        if summary.interrupted {
            return Ok(None);
        }
        trained_scale = Some(summary.scale);
    }
    let (sae, cfg_json) = load_export(out)?;
    let cfg_path = out.join(export::CFG_FILE);
    if cfg_json["dmsae"]["train_config"] != json!(tcfg) {
        return Err(TrainError::Unusable {
            path: cfg_path,
            msg: "an export trained with another config; remove the directory".into(),
        });
    }
    if export_store_identity(&cfg_json) != identity["store_shards"] {
        return Err(store_differs(&cfg_path, store_dir));
    }
    if cfg_json["dmsae"]["core_blake3"] != json!(core_blake3) {
        return Err(TrainError::Unusable {
            path: cfg_path,
            msg: "an export trained on another core than the previous cycle's; remove the \
                directory"
                .into(),
        });
    }
    let sae = sae.to_device(device);
    let scale = match trained_scale {
        Some(s) => s,
        None => scale_of(&store)?.1,
    };
    let t0 = std::time::Instant::now();
    let scores = attribute(&store, &sae, scale, cfg)?;
    let attribution_tokens_per_s = scores.tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    let selected = select(&scores.score, cfg.distill.tau);

    // Core latents keep their lineage; newly selected ones get fresh ids in index order.
    let lineages: Vec<u64> = selected
        .iter()
        .map(|&j| {
            if j < core_in.len() {
                core_in[j]
            } else {
                next_lineage += 1;
                next_lineage - 1
            }
        })
        .collect();
    let idx = Tensor::from_slice(&selected.iter().map(|&j| j as i64).collect::<Vec<_>>());
    let w_enc_dc = (&sae.w_enc * scale)
        .to_device(Device::Cpu)
        .index_select(1, &idx);
    let b_enc_c = sae
        .b_enc_anchored()
        .to_device(Device::Cpu)
        .index_select(0, &idx);
    // A selected latent keeps the threshold it fired under: its carried one if it was core, the
    // learned BatchTopK threshold if it was not.
    let threshold_c = sae.threshold_f().index_select(0, &idx);
    write_core(
        &out.join(CORE_FILE),
        &w_enc_dc,
        &b_enc_c,
        &threshold_c,
        &lineages,
    )?;
    let table = Table::new(&scores, &core_in, &selected, &lineages);
    table.write_csv(&out.join(TABLE_FILE))?;
    table.write_parquet(&out.join(TABLE_PARQUET))?;

    let positive = |j: &usize| scores.score[*j].max(0.0);
    let total: f64 = (0..scores.score.len()).map(|j| positive(&j)).sum();
    let e = &cfg_json["dmsae"]["eval"];
    let s = CycleSummary {
        cycle,
        seed: tcfg.seed,
        candidates: scores.score.len(),
        attribution_tokens: scores.tokens,
        attribution_tokens_per_s,
        jaccard_prev: (cycle > 0).then(|| jaccard(&core_in, &lineages)),
        core_in,
        core_size: selected.len(),
        selected_score_fraction: selected.iter().map(positive).sum::<f64>()
            / total.max(f64::MIN_POSITIVE),
        selected,
        lineages,
        eval: json!({ "fvu": e["fvu"], "l0_core": e["l0_core"], "l0_noncore": e["l0_noncore"],
            "l0_total": e["l0_total"], "first_order_dloss": e["first_order_dloss"] }),
        norm_scale: scale,
        next_lineage,
        identity,
    };
    let text = serde_json::to_string_pretty(&s).expect("serialisable");
    write_atomic(&out.join(CYCLE_FILE), text.as_bytes()).map_err(|e| io_err(out, e))?;
    Ok(Some(s))
}

/// The attribution table: one row per candidate. `lineage` is None for a non-core latent left
/// out; `mean_activation` is over the tokens on which the latent fires.
pub struct Table {
    pub latent: Vec<i64>,
    pub lineage: Vec<Option<i64>>,
    pub score: Vec<f64>,
    pub selected: Vec<bool>,
    pub frequency: Vec<f64>,
    pub mean_activation: Vec<f64>,
}

impl Table {
    fn new(s: &Scores, core_in: &[u64], selected: &[usize], lineages: &[u64]) -> Table {
        let n = s.score.len();
        let pos = |j: usize| selected.iter().position(|&k| k == j);
        Table {
            latent: (0..n as i64).collect(),
            lineage: (0..n)
                .map(|j| {
                    pos(j)
                        .map(|p| lineages[p])
                        .or_else(|| core_in.get(j).copied())
                        .map(|l| l as i64)
                })
                .collect(),
            score: s.score.clone(),
            selected: (0..n).map(|j| pos(j).is_some()).collect(),
            frequency: s.frequency.clone(),
            mean_activation: s.mean_activation.clone(),
        }
    }

    fn write_csv(&self, path: &Path) -> Result<(), TrainError> {
        let mut text = String::from("latent,lineage,score,selected,frequency,mean_activation\n");
        for j in 0..self.latent.len() {
            let lineage = self.lineage[j].map_or(String::new(), |l| l.to_string());
            text.push_str(&format!(
                "{j},{lineage},{:e},{},{:e},{:e}\n",
                self.score[j], self.selected[j], self.frequency[j], self.mean_activation[j]
            ));
        }
        write_atomic(path, text.as_bytes()).map_err(|e| io_err(path, e))
    }

    fn write_parquet(&self, path: &Path) -> Result<(), TrainError> {
        use parquet::data_type::{BoolType, DoubleType, Int64Type};
        use parquet::file::{properties::WriterProperties, writer::SerializedFileWriter};
        let schema = "message attribution { required int64 latent; optional int64 lineage; \
            required double score; required boolean selected; required double frequency; \
            required double mean_activation; }";
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        let write = || -> Result<(), Box<dyn std::error::Error>> {
            let schema = Arc::new(parquet::schema::parser::parse_message_type(schema)?);
            let props = Arc::new(WriterProperties::builder().build());
            let mut w = SerializedFileWriter::new(std::fs::File::create(&tmp)?, schema, props)?;
            let mut rg = w.next_row_group()?;
            let present: Vec<i64> = self.lineage.iter().flatten().copied().collect();
            let defs: Vec<i16> = self.lineage.iter().map(|l| l.is_some() as i16).collect();
            for i in 0.. {
                let Some(mut col) = rg.next_column()? else {
                    break;
                };
                match i {
                    0 => col
                        .typed::<Int64Type>()
                        .write_batch(&self.latent, None, None)?,
                    1 => col
                        .typed::<Int64Type>()
                        .write_batch(&present, Some(&defs), None)?,
                    2 => col
                        .typed::<DoubleType>()
                        .write_batch(&self.score, None, None)?,
                    3 => col
                        .typed::<BoolType>()
                        .write_batch(&self.selected, None, None)?,
                    4 => col
                        .typed::<DoubleType>()
                        .write_batch(&self.frequency, None, None)?,
                    _ => {
                        col.typed::<DoubleType>()
                            .write_batch(&self.mean_activation, None, None)?
                    }
                };
                col.close()?;
            }
            rg.close()?;
            w.close()?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, path)?;
            Ok(())
        };
        write().map_err(|e| io_err(path, e))
    }
}

pub fn cycle_dir(out: &Path, n: u64) -> PathBuf {
    out.join(format!("cycle-{n}"))
}

/// `cycles` cycles under `out/cycle-N`, then the distilled core (`out/distilled/core.safetensors`:
/// lineages selected in at least `distill.min_selected` cycles, each with its encoder column
/// from the last cycle that selected it, ordered by lineage) and `summary.json`/`summary.md`.
/// Finished cycles are reused. None when interrupted.
#[allow(clippy::too_many_arguments)] // two callbacks: per cycle and per training step
pub fn distill(
    store_dir: &Path,
    out: &Path,
    cfg: &TrainConfig,
    cycles: u64,
    device: Device,
    stop: &AtomicBool,
    mut on_cycle: impl FnMut(&CycleSummary),
    mut progress: impl FnMut(u64, &Progress),
) -> Result<Option<Value>, TrainError> {
    let mut done: Vec<CycleSummary> = Vec::new();
    for n in 0..cycles {
        let prev = (n > 0).then(|| cycle_dir(out, n - 1));
        let s = train_cycle(
            store_dir,
            &cycle_dir(out, n),
            cfg,
            prev.as_deref(),
            device,
            stop,
            |p| progress(n, p),
        )?;
        let Some(s) = s else { return Ok(None) };
        on_cycle(&s);
        done.push(s);
    }
    let mut history: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for s in &done {
        for &l in &s.lineages {
            history.entry(l).or_default().push(s.cycle);
        }
    }
    let r = cfg.distill.min_selected as usize;
    let kept: Vec<u64> = history
        .iter()
        .filter(|(_, c)| c.len() >= r)
        .map(|(l, _)| *l)
        .collect();
    let (mut cols, mut biases, mut thresholds) = (Vec::new(), Vec::new(), Vec::new());
    for &l in &kept {
        let last = *history[&l].last().expect("selected at least once");
        let (w, b, th, ids) = read_core(&cycle_dir(out, last).join(CORE_FILE))?;
        let p = ids
            .iter()
            .position(|&i| i == l)
            .expect("lineage in its cycle's core") as i64;
        cols.push(w.narrow(1, p, 1));
        biases.push(b.narrow(0, p, 1));
        thresholds.push(th.narrow(0, p, 1));
    }
    let dir = out.join(DISTILLED_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    if !kept.is_empty() {
        write_core(
            &dir.join(CORE_FILE),
            &Tensor::cat(&cols, 1),
            &Tensor::cat(&biases, 0),
            &Tensor::cat(&thresholds, 0),
            &kept,
        )?;
    }
    let summary = json!({
        "cycles": done.iter().map(|s| json!({
            "cycle": s.cycle, "core_in_size": s.core_in.len(), "core_size": s.core_size,
            "jaccard_prev": s.jaccard_prev, "selected_score_fraction": s.selected_score_fraction,
            "eval": s.eval, "attribution_tokens": s.attribution_tokens,
        })).collect::<Vec<_>>(),
        "lineages": history.iter().map(|(l, c)| (l.to_string(), json!(c))).collect::<serde_json::Map<_, _>>(),
        "distilled": { "min_selected": r, "size": kept.len(), "lineages": kept,
            "core_file": (!kept.is_empty()).then(|| dir.join(CORE_FILE).display().to_string()) },
        "distill_config": cfg.distill,
    });
    let text = serde_json::to_string_pretty(&summary).expect("serialisable");
    write_atomic(&out.join(SUMMARY_FILE), text.as_bytes()).map_err(|e| io_err(out, e))?;
    write_atomic(&out.join("summary.md"), markdown(&summary).as_bytes())
        .map_err(|e| io_err(out, e))?;
    plots(out, &summary)?;
    Ok(Some(summary))
}

/// SVG plots of a run under `out/plots/`, from `summary.json` and each cycle's attribution
/// table: core size, Jaccard with the previous core, FVU and first-order loss change per
/// cycle; lineages by the number of cycles that selected them; the cumulative attribution
/// curve of each cycle with tau marked.
pub fn plots(out: &Path, s: &Value) -> Result<Vec<PathBuf>, TrainError> {
    use crate::plot::{line_chart, Series};
    let dir = out.join("plots");
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let cycles = s["cycles"].as_array().cloned().unwrap_or_default();
    let per_cycle = |name: &str, get: &dyn Fn(&Value) -> Option<f64>| Series {
        name: name.into(),
        points: cycles
            .iter()
            .filter_map(|c| Some((c["cycle"].as_f64()?, get(c)?)))
            .collect(),
    };
    let mut charts: Vec<(&str, &str, &str, Vec<Series>)> = vec![
        (
            "core_size.svg",
            "Core size per cycle",
            "latents",
            vec![
                per_cycle("core in", &|c| c["core_in_size"].as_f64()),
                per_cycle("selected (next core)", &|c| c["core_size"].as_f64()),
            ],
        ),
        (
            "jaccard.svg",
            "Jaccard overlap with the previous core (by lineage)",
            "Jaccard",
            vec![per_cycle("Jaccard", &|c| c["jaccard_prev"].as_f64())],
        ),
        (
            "fvu.svg",
            "Held-out FVU per cycle",
            "FVU",
            vec![per_cycle("FVU", &|c| c["eval"]["fvu"].as_f64())],
        ),
        (
            "dloss.svg",
            "First-order loss change per cycle",
            "mean g·(x̂ − x)",
            vec![per_cycle("first-order dloss", &|c| {
                c["eval"]["first_order_dloss"].as_f64()
            })],
        ),
    ];
    // Lineages by how many cycles selected them.
    let mut counts = vec![0usize; cycles.len() + 1];
    for c in s["lineages"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
    {
        let n = c.as_array().map_or(0, |a| a.len()).min(cycles.len());
        counts[n] += 1;
    }
    charts.push((
        "lineages.svg",
        "Lineages by number of cycles that selected them",
        "lineages",
        vec![Series {
            name: "lineages".into(),
            points: (1..counts.len())
                .map(|n| (n as f64, counts[n] as f64))
                .collect(),
        }],
    ));
    let mut written = Vec::new();
    for (file, title, y, series) in charts {
        let path = dir.join(file);
        let x = if file == "lineages.svg" {
            "cycles selected"
        } else {
            "cycle"
        };
        line_chart(&path, title, x, y, &series, false).map_err(|e| io_err(&path, e))?;
        written.push(path);
    }
    // Cumulative share of the candidates' (positive) score by rank, one line per cycle.
    let mut curves = Vec::new();
    for c in &cycles {
        let Some(n) = c["cycle"].as_u64() else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(cycle_dir(out, n).join(TABLE_FILE)) else {
            continue;
        };
        let mut scores: Vec<f64> = text
            .lines()
            .skip(1)
            .filter_map(|l| l.split(',').nth(2)?.parse::<f64>().ok())
            .map(|v| v.max(0.0))
            .collect();
        scores.sort_by(|a, b| b.total_cmp(a));
        let total: f64 = scores.iter().sum();
        let mut acc = 0.0;
        let points = scores
            .iter()
            .enumerate()
            .map(|(i, v)| {
                acc += v;
                ((i + 1) as f64, acc / total.max(f64::MIN_POSITIVE))
            })
            .collect();
        curves.push(Series {
            name: format!("cycle {n}"),
            points,
        });
    }
    if let Some(tau) = s["distill_config"]["tau"].as_f64() {
        let n = curves.iter().map(|c| c.points.len()).max().unwrap_or(1);
        curves.push(Series {
            name: format!("tau = {tau}"),
            points: vec![(1.0, tau), (n as f64, tau)],
        });
    }
    let path = dir.join("attribution_cumulative.svg");
    line_chart(
        &path,
        "Cumulative attribution of the candidates, by rank",
        "candidates, highest score first",
        "share of total score",
        &curves,
        false,
    )
    .map_err(|e| io_err(&path, e))?;
    written.push(path);
    Ok(written)
}

/// The run summary as a markdown table (also what `dmsae report` prints).
pub fn markdown(s: &Value) -> String {
    let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.4}"));
    let mut md = String::from(
        "| cycle | core in | core out | Jaccard | FVU | L0 core | L0 non-core | L0 total | first-order dloss |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in s["cycles"].as_array().into_iter().flatten() {
        let e = &c["eval"];
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            c["cycle"],
            c["core_in_size"],
            c["core_size"],
            f(&c["jaccard_prev"]),
            f(&e["fvu"]),
            f(&e["l0_core"]),
            f(&e["l0_noncore"]),
            f(&e["l0_total"]),
            f(&e["first_order_dloss"]),
        ));
    }
    let d = &s["distilled"];
    md.push_str(&format!(
        "\nDistilled core: {} lineages selected in at least {} cycles.\n",
        d["size"], d["min_selected"]
    ));
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_through_parquet_and_lineages_follow_the_core() {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let s = Scores {
            tokens: 10,
            score: vec![0.5, 0.0, 2.0, 1.0],
            frequency: vec![0.1, 0.0, 0.3, 0.2],
            mean_activation: vec![1.5, 0.0, 2.5, 3.5],
        };
        // Core of 2 (lineages 7, 9); latents 0 and 2 selected: 0 keeps 7, 2 gets the new id 11.
        let t = Table::new(&s, &[7, 9], &[0, 2], &[7, 11]);
        assert_eq!(t.lineage, vec![Some(7), Some(9), Some(11), None]);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(TABLE_PARQUET);
        t.write_parquet(&path).unwrap();
        let r = SerializedFileReader::try_from(path.as_path()).unwrap();
        let rows: Vec<String> = r
            .get_row_iter(None)
            .unwrap()
            .map(|row| row.unwrap().to_string())
            .collect();
        assert_eq!(rows.len(), 4);
        assert_eq!(
            rows[2],
            "{latent: 2, lineage: 11, score: 2.0, selected: true, frequency: 0.3, mean_activation: 2.5}"
        );
        assert!(rows[3].contains("lineage: null") && rows[3].contains("selected: false"));
        assert!(!tmp.path().join(format!(".{TABLE_PARQUET}.tmp")).exists());
    }

    #[test]
    fn jaccard_by_lineage() {
        assert_eq!(jaccard(&[1, 2, 3], &[2, 3, 4]), 0.5);
        assert_eq!(jaccard(&[], &[]), 1.0);
        assert_eq!(jaccard(&[1], &[2]), 0.0);
    }
}
