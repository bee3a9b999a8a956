//! Sweeps (METHOD.md "After distillation"): SAEs at several sparsities that reuse the distilled
//! core, with their comparisons, trained in one pass over the store: each batch is read once
//! and every model is updated on it (`train::train_members`).
//!
//! Three series, each at every k:
//! - `distilled-core`: the distilled core (frozen by default, as `train --core` takes it).
//! - `baseline`: a plain Matryoshka BatchTopK SAE, no core.
//! - `random-core`: the ablation. c latents (c = the distilled core's size) drawn uniformly with
//!   the sweep's seed from the distillation's cycle-0 candidates (its first group: cycle 0 has
//!   no core), carrying encoder rows, b_enc (anchored to x) and thresholds exactly as a cycle
//!   carries its selection. It differs from the distilled core only in how the latents were
//!   chosen: at random, not by attribution and repeated selection. Written to
//!   `random-core.safetensors` (its `lineage` holds the cycle-0 latent indices).
//!
//! Every model shares the config except k, so they share the stream, the seed and the
//! schedule, and each ends with the weights `dmsae train` gives it alone. Layout:
//! `DIR/<series>-k<k>/` (a `train` export; cfg.json's "dmsae" object adds `sweep_series`),
//! `sweep.json`, `sweep.md`, `plots/`. A finished model is skipped on a rerun (same config, and
//! core and store by content); the summary covers every finished model in DIR, so a k list may
//! be split across invocations (several 65k-wide models with Adam state may not fit one GPU
//! together).

use crate::compare;
use crate::config::{ConfigError, TrainConfig};
use crate::distill::{load_export, write_core};
use crate::export::{self, write_atomic};
use crate::plot::{line_chart, Series as PlotSeries};
use crate::train::{
    export_store_identity, file_blake3, load_core, scale_of, set_threads, store_differs,
    store_identity, train_members, Member, MemberSpec, Position, Progress, TrainError,
};
use dmsae_store::Store;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tch::{Device, Tensor};

pub const SWEEP_FILE: &str = "sweep.json";
pub const RANDOM_CORE_FILE: &str = "random-core.safetensors";

/// One kind of model in a sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Series {
    DistilledCore,
    Baseline,
    RandomCore,
}

impl Series {
    pub const ALL: [Series; 3] = [Series::DistilledCore, Series::Baseline, Series::RandomCore];

    pub fn name(self) -> &'static str {
        match self {
            Series::DistilledCore => "distilled-core",
            Series::Baseline => "baseline",
            Series::RandomCore => "random-core",
        }
    }

    pub fn parse(s: &str) -> Option<Series> {
        Series::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// What a sweep trains and where.
pub struct SweepSpec<'a> {
    pub store: &'a Path,
    pub out: &'a Path,
    /// Shared by every model; `k` is replaced by each of `ks`.
    pub cfg: TrainConfig,
    pub ks: Vec<usize>,
    pub series: Vec<Series>,
    /// The distilled core (a core file, as `train --core` takes).
    pub core: Option<PathBuf>,
    /// The distillation's cycle-0 directory, which the random core is drawn from.
    pub random_from: Option<PathBuf>,
    pub device: Device,
    pub stop: &'a AtomicBool,
}

/// What one invocation did.
pub struct SweepOutcome {
    /// Stopped by `stop`: every unfinished model holds a checkpoint; rerun to continue.
    pub interrupted: bool,
    /// Model directory names trained now, and those skipped as already finished.
    pub trained: Vec<String>,
    pub skipped: Vec<String>,
    /// Tokens streamed by this invocation (each read once for every model) and the seconds the
    /// pass took, without the evals.
    pub run_tokens: u64,
    pub seconds: f64,
    /// `sweep.json` (None when interrupted).
    pub summary: Option<Value>,
}

fn bad(path: &Path, msg: impl Into<String>) -> TrainError {
    TrainError::Unusable {
        path: path.into(),
        msg: msg.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.into(),
        source,
    }
}

pub fn model_dir_name(series: Series, k: usize) -> String {
    format!("{}-k{k}", series.name())
}

/// Draw the random core (see the module doc) from the cycle-0 export in `cycle0` and write it
/// to `path`. Deterministic in `seed`.
pub fn random_core(
    cycle0: &Path,
    c: usize,
    d_in: usize,
    seed: u64,
    path: &Path,
) -> Result<(), TrainError> {
    let (sae, cfg_json) = load_export(cycle0)?;
    let cfg_path = cycle0.join(export::CFG_FILE);
    if sae.d_in != d_in {
        return Err(bad(
            &cfg_path,
            format!("d_in {} does not match the store's {d_in}", sae.d_in),
        ));
    }
    let candidates = sae.core + sae.groups.first().copied().unwrap_or(0);
    if c > candidates {
        return Err(bad(
            &cfg_path,
            format!(
                "{candidates} candidates (core + first group), fewer than the core size {c}, so \
                 no random core of that size can be drawn; leave random-core out of --series"
            ),
        ));
    }
    let scale = cfg_json["dmsae"]["norm_scale"].as_f64().unwrap_or(1.0);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut picked = rand::seq::index::sample(&mut rng, candidates, c).into_vec();
    picked.sort_unstable();
    let idx = Tensor::from_slice(&picked.iter().map(|&j| j as i64).collect::<Vec<_>>());
    // As train_cycle carries a selection: encoder columns in model units, b_enc anchored to x,
    // each latent's threshold.
    let w = (&sae.w_enc * scale).index_select(1, &idx);
    let b = sae.b_enc_anchored().index_select(0, &idx);
    let th = sae.threshold_f().index_select(0, &idx);
    let ids: Vec<u64> = picked.iter().map(|&j| j as u64).collect();
    write_core(path, &w, &b, &th, &ids)
}

/// Latents in the core file `p`, whose shapes must fit the store's `d`.
fn core_size(p: &Path, d: usize, scale: f64) -> Result<usize, TrainError> {
    if !p.is_file() {
        return Err(TrainError::Core {
            path: p.into(),
            msg: "no such core file (an unfinished run, or a distilled core that is empty?)".into(),
        });
    }
    Ok(load_core(p, d, scale)?.w_enc_dc.size()[1] as usize)
}

/// Train the sweep's unfinished models in one pass, then write `sweep.json`, `sweep.md` and
/// the plots over every finished model in the directory.
pub fn sweep(spec: SweepSpec, progress: impl FnMut(&Progress)) -> Result<SweepOutcome, TrainError> {
    let SweepSpec {
        store: store_dir,
        out,
        cfg,
        ks,
        series,
        core,
        random_from,
        device,
        stop,
    } = spec;
    if ks.is_empty() || ks.contains(&0) {
        return Err(
            ConfigError::Invalid(format!("k list {ks:?} must be non-empty and positive")).into(),
        );
    }
    if series.is_empty() {
        return Err(ConfigError::Invalid("no series to train".into()).into());
    }
    set_threads(&cfg);
    let store = Arc::new(Store::open(store_dir)?);
    let (d, scale) = scale_of(&store)?;
    let shards = store_identity(&store);
    let with_core = series.iter().any(|s| *s != Series::Baseline);
    let core_size = match &core {
        Some(p) if with_core => core_size(p, d, scale)?,
        None if with_core => {
            let msg =
                "the distilled-core and random-core series need a core (--core or --distill-run)";
            return Err(ConfigError::Invalid(msg.into()).into());
        }
        _ => 0,
    };
    if series.contains(&Series::RandomCore) && random_from.is_none() {
        return Err(ConfigError::Invalid(
            "the random-core series needs the distillation's cycle-0 export (--distill-run)".into(),
        )
        .into());
    }
    // Every model's config is checked before anything is written.
    for &s in &series {
        for &k in &ks {
            let c = if s == Series::Baseline { 0 } else { core_size };
            TrainConfig { k, ..cfg.clone() }
                .validate(c)
                .map_err(|e| bad(&out.join(model_dir_name(s, k)), e.to_string()))?;
        }
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    let random_file = out.join(RANDOM_CORE_FILE);
    if let (true, Some(c0)) = (series.contains(&Series::RandomCore), &random_from) {
        random_core(c0, core_size, d, cfg.seed, &random_file)?;
    }

    // The table covers every finished model in `out`: refuse now, not after training, any that
    // cannot join it. Those this sweep names are skipped if they match it exactly.
    let finished: std::collections::HashMap<String, Value> =
        finished_models(out, &cfg, store_dir, &shards)?
            .into_iter()
            .map(|(name, _, _, v)| (name, v))
            .collect();
    let mut specs = Vec::new();
    let (mut trained, mut skipped) = (Vec::new(), Vec::new());
    for &s in &series {
        for &k in &ks {
            let name = model_dir_name(s, k);
            let cfg_k = TrainConfig { k, ..cfg.clone() };
            let core_file = match s {
                Series::DistilledCore => core.clone(),
                Series::Baseline => None,
                Series::RandomCore => Some(random_file.clone()),
            };
            let dir = out.join(&name);
            if let Some(v) = finished.get(&name) {
                let x = &v["dmsae"];
                let hash = core_file.as_deref().map(file_blake3).transpose()?;
                let same_core = x["core_blake3"] == json!(hash);
                if x["train_config"] != json!(cfg_k) || !same_core {
                    return Err(bad(
                        &dir.join(export::CFG_FILE),
                        "a finished model with another config or core; remove the directory",
                    ));
                }
                skipped.push(name);
                continue;
            }
            let mut extra = serde_json::Map::new();
            extra.insert("sweep_series".into(), json!(s.name()));
            specs.push((
                name,
                MemberSpec {
                    out: dir,
                    cfg: cfg_k,
                    core_file,
                    extra: Some(extra),
                },
            ));
        }
    }

    let (mut interrupted, mut run_tokens, mut seconds) = (false, 0, 0.0);
    if !specs.is_empty() {
        let mut members = Vec::new();
        let mut start: Option<(Position, String)> = None;
        for (name, ms) in &specs {
            let (m, pos) = Member::open(&store, d, scale, ms, true, device)?;
            match &start {
                None => start = Some((pos, name.clone())),
                Some((p, first)) if *p != pos => {
                    return Err(bad(
                        &ms.out,
                        format!(
                            "its checkpoint stands at {} tokens, {first}'s at {}; one pass needs them equal: remove one checkpoint.safetensors or run them in separate invocations",
                            pos.tokens, p.tokens
                        ),
                    ))
                }
                _ => {}
            }
            members.push(m);
        }
        let pos = start.map(|s| s.0).unwrap_or_default();
        let end = train_members(&store, store_dir, &mut members, pos, scale, stop, progress)?;
        (interrupted, run_tokens, seconds) =
            (end.interrupted, end.pos.tokens - pos.tokens, end.seconds);
        if !interrupted {
            for (m, (name, _)) in members.into_iter().zip(&specs) {
                m.finish(&store, store_dir, scale, end.pos.tokens)?;
                trained.push(name.clone());
            }
        }
    }
    if interrupted {
        return Ok(SweepOutcome {
            interrupted,
            trained,
            skipped,
            run_tokens,
            seconds,
            summary: None,
        });
    }
    let summary = summarise(
        out,
        &cfg,
        store_dir,
        &shards,
        core.as_deref(),
        random_from.as_deref(),
    )?;
    Ok(SweepOutcome {
        interrupted,
        trained,
        skipped,
        run_tokens,
        seconds,
        summary: Some(summary),
    })
}

fn read_json(path: &Path) -> Result<Value, TrainError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(path, e.to_string()))
}

/// Every finished `<series>-k<k>` directory in `out`: (name, series, k, cfg.json). Models from
/// another config (other than k) or another store (by content) are refused: one table, one
/// config, one store.
fn finished_models(
    out: &Path,
    cfg: &TrainConfig,
    store_dir: &Path,
    shards: &Value,
) -> Result<Vec<(String, Series, usize, Value)>, TrainError> {
    let mut models = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(out)
        .map_err(io(out))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(export::CFG_FILE).exists())
        .collect();
    entries.sort();
    for dir in entries {
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let Some((series, k)) = name
            .rsplit_once("-k")
            .and_then(|(s, k)| Some((Series::parse(s)?, k.parse::<usize>().ok()?)))
        else {
            continue;
        };
        let cfg_path = dir.join(export::CFG_FILE);
        let v = read_json(&cfg_path)?;
        let x = &v["dmsae"];
        let mut tc = x["train_config"].clone();
        tc["k"] = json!(cfg.k);
        if tc != json!(cfg) {
            return Err(bad(
                &cfg_path,
                "trained with another config (beyond k) than this sweep; use another --out",
            ));
        }
        if export_store_identity(&v) != *shards {
            return Err(store_differs(&dir, store_dir));
        }
        models.push((name, series, k, v));
    }
    Ok(models)
}

/// `sweep.json`, `sweep.md` and the plots from every finished model in `out`
/// (`finished_models`).
fn summarise(
    out: &Path,
    cfg: &TrainConfig,
    store_dir: &Path,
    shards: &Value,
    core: Option<&Path>,
    random_from: Option<&Path>,
) -> Result<Value, TrainError> {
    let mut rows = Vec::new();
    for (name, series, k, v) in finished_models(out, cfg, store_dir, shards)? {
        let x = &v["dmsae"];
        let e = &x["eval"];
        rows.push(json!({
            "series": series.name(), "k": k, "model": name,
            "core_size": x["core_size"], "width": v["d_sae"],
            "fvu": e["fvu"], "mse": e["mse"],
            "l0_core": e["l0_core"], "l0_noncore": e["l0_noncore"], "l0_total": e["l0_total"],
            "dead_fraction": e["dead_fraction"], "dense_fraction": e["dense_fraction"],
            "first_order_dloss": e["first_order_dloss"], "eval_tokens": e["tokens"],
        }));
    }
    rows.sort_by_key(|r| {
        (
            Series::parse(r["series"].as_str().unwrap_or("")),
            r["k"].as_u64(),
        )
    });
    let mut shared = json!(cfg);
    if let Some(o) = shared.as_object_mut() {
        o.remove("k");
    }
    let at_equal_l0 = at_equal_l0(&rows);
    let summary = json!({
        "models": rows,
        "at_equal_l0": at_equal_l0,
        "core_file": core.map(|p| p.display().to_string()),
        "random_core_from": random_from.map(|p| p.display().to_string()),
        "train_config": shared,
        "note": "train_config is shared by every model; k is per model",
    });
    let text = serde_json::to_string_pretty(&summary).expect("serialisable");
    write_atomic(&out.join(SWEEP_FILE), text.as_bytes()).map_err(io(out))?;
    write_atomic(&out.join("sweep.md"), markdown(&summary).as_bytes()).map_err(io(out))?;
    plots(out, &summary)?;
    Ok(summary)
}

/// The sweep table (also what `dmsae report DIR` prints): total L0 counts the core.
pub fn markdown(s: &Value) -> String {
    let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.4}"));
    let g = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.4e}"));
    let mut md = String::from(
        "| series | k | core | FVU | L0 core | L0 non-core | L0 total | dead | dense | first-order dloss |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in s["models"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["series"].as_str().unwrap_or("-"),
            r["k"],
            r["core_size"],
            f(&r["fvu"]),
            f(&r["l0_core"]),
            f(&r["l0_noncore"]),
            f(&r["l0_total"]),
            f(&r["dead_fraction"]),
            f(&r["dense_fraction"]),
            g(&r["first_order_dloss"]),
        ));
    }
    md.push_str("\nCompare series at equal total L0 (core latents counted).\n");
    let rows = s["models"].as_array().cloned().unwrap_or_default();
    let present: Vec<Series> = Series::ALL
        .into_iter()
        .filter(|ser| !points(&rows, *ser, "fvu").is_empty())
        .collect();
    if present.len() > 1 {
        let metrics: [(&str, &str, compare::Format); 2] = [
            ("FVU", "fvu", |x| format!("{x:.4}")),
            ("dloss", "first_order_dloss", |x| format!("{x:.4e}")),
        ];
        let cols: Vec<compare::Column> = metrics
            .iter()
            .flat_map(|&(label, key, fmt)| present.iter().map(move |&ser| (label, key, fmt, ser)))
            .map(|(label, key, fmt, ser)| compare::Column {
                header: format!("{label} {}", ser.name()),
                points: points(&rows, ser, key),
                fmt,
            })
            .collect();
        md.push_str(&compare::markdown(&cols));
    }
    md
}

/// One series' (total L0, `key`) points, in k order.
fn points(rows: &[Value], series: Series, key: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter(|r| r["series"] == series.name())
        .map(|r| {
            let v = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            (v("l0_total"), v(key))
        })
        .collect()
}

/// For every model's total L0 (ascending), each series' FVU and first-order dloss there
/// (`compare::interpolate`; null outside the series' range).
fn at_equal_l0(rows: &[Value]) -> Value {
    let at = |key: &str, l0: f64| -> Value {
        Series::ALL
            .iter()
            .map(|&ser| {
                let v = compare::interpolate(&points(rows, ser, key), l0);
                (ser.name().to_string(), json!(v))
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    compare::l0_grid(rows.iter().filter_map(|r| r["l0_total"].as_f64()))
        .into_iter()
        .map(|l0| {
            json!({ "l0_total": l0, "fvu": at("fvu", l0),
            "first_order_dloss": at("first_order_dloss", l0) })
        })
        .collect()
}

/// `plots/fvu_vs_l0.svg` and `plots/dloss_vs_l0.svg`: one line per series, ordered by k.
pub fn plots(out: &Path, s: &Value) -> Result<Vec<PathBuf>, TrainError> {
    let dir = out.join("plots");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let rows = s["models"].as_array().cloned().unwrap_or_default();
    let series_of = |key: &str| -> Vec<PlotSeries> {
        Series::ALL
            .iter()
            .filter_map(|&ser| {
                let points = points(&rows, ser, key);
                (!points.is_empty()).then(|| PlotSeries {
                    name: ser.name().into(),
                    points,
                })
            })
            .collect()
    };
    let mut written = Vec::new();
    for (file, key, title, y) in [
        (
            "fvu_vs_l0.svg",
            "fvu",
            "FVU against total L0",
            "FVU (held out)",
        ),
        (
            "dloss_vs_l0.svg",
            "first_order_dloss",
            "First-order loss change against total L0",
            "mean g·(x̂ − x)",
        ),
    ] {
        let path = dir.join(file);
        line_chart(
            &path,
            title,
            "total L0 (core + non-core)",
            y,
            &series_of(key),
            true,
        )
        .map_err(io(&path))?;
        written.push(path);
    }
    Ok(written)
}
