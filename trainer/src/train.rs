//! The training run: stream a store's train split, update, log JSONL, evaluate on the held-out
//! split, export.
//!
//! Normalisation (METHOD.md): activations are multiplied by one scalar s = sqrt(d / E||x||^2),
//! E||x||^2 from the store manifest's `acts` statistics, so that E||s x||^2 = d_model. The
//! SAE trains in these units; the export folds s back (export.rs).

use crate::config::{ConfigError, TrainConfig};
use crate::export;
use crate::sae::{err_stats, l0s, Core, Sae, StepStats, Trainer};
use dmsae_extractor::kernels::Upload;
use dmsae_store::{Batch, DType, Split, Store, StoreError, StreamOptions};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Opening or streaming the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store cannot be trained on (no `acts`, no statistics, no training tokens).
    #[error("{path}: {msg}")]
    Unusable { path: PathBuf, msg: String },
    /// The core file is unreadable or has the wrong tensors.
    #[error("{path}: {msg}")]
    Core { path: PathBuf, msg: String },
    /// A checkpoint that cannot be resumed from.
    #[error("{path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// The loss or the gradient norm stopped being finite.
    #[error("{path}: training diverged at step {step}: {msg}")]
    Diverged {
        path: PathBuf,
        step: u64,
        msg: String,
    },
    /// Writing the run directory failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.into(),
        source,
    }
}

/// What the progress callback sees after each step.
pub struct Progress<'a> {
    pub step: u64,
    pub total_steps: u64,
    pub tokens: u64,
    /// Steps and tokens trained by this process (a resumed run counts from its checkpoint).
    pub run_steps: u64,
    pub run_tokens: u64,
    pub elapsed_s: f64,
    pub stats: &'a StepStats,
}

/// Held-out metrics, in model units where they have units.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EvalMetrics {
    pub tokens: u64,
    /// Mean over tokens and dimensions of (x - x_hat)^2, model units.
    pub mse: f64,
    /// 1 - explained variance: sum ||x - x_hat||^2 / sum ||x - mean x||^2, inference encoding.
    pub fvu: f64,
    /// FVU with BatchTopK codes over eval batches (the training-time encoding), for comparison.
    pub fvu_batchtopk: f64,
    pub l0_core: f64,
    pub l0_noncore: f64,
    pub l0_total: f64,
    /// Latents that never fire on the eval tokens.
    pub dead_fraction: f64,
    /// Latents firing on more than `dense_fraction` of the eval tokens.
    pub dense_fraction: f64,
    /// Mean over tokens with valid gradients of g . (x_hat - x): the first-order change of the
    /// next-token loss when the SAE's reconstruction replaces x.
    pub first_order_dloss: Option<f64>,
    pub grad_tokens: u64,
    /// Mean stored next-token loss over the eval tokens, beside the above.
    pub mean_loss: Option<f64>,
}

pub struct Summary {
    /// Tokens trained by this process.
    pub run_tokens: u64,
    /// Stopped by the `stop` flag: a checkpoint was written, no eval and no export.
    pub interrupted: bool,
    pub steps: u64,
    pub tokens: u64,
    pub seconds: f64,
    pub scale: f64,
    pub eval: Option<EvalMetrics>,
    pub sae: Sae,
}

/// A core file as written: `W_enc` [d_in, c] and `b_enc` [c] in model units, the
/// pre-activation being x W_enc + b_enc (anchored to x, no b_dec: sae.rs says why; from an
/// export, b_enc - b_dec W_enc), and optionally `threshold` [c] (the core latents' JumpReLU
/// thresholds, in pre-activation units, which the export's scale folding leaves unchanged;
/// plain ReLU without it) and `lineage` [c] (distillation's ids).
pub struct CoreFile {
    pub w_enc_dc: Tensor,
    pub b_enc_c: Tensor,
    pub threshold_c: Option<Tensor>,
    pub lineage: Option<Vec<u64>>,
}

impl CoreFile {
    /// Read and check shapes, finiteness and agreement of the tensors (float32, CPU).
    pub fn read(path: &Path) -> Result<CoreFile, TrainError> {
        let err = |msg: String| TrainError::Core {
            path: path.into(),
            msg,
        };
        let tensors = Tensor::read_safetensors(path).map_err(|e| err(e.to_string()))?;
        let find = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let get = |name: &str| {
            find(name)
                .map(|t| t.to_kind(Kind::Float))
                .ok_or_else(|| err(format!("no tensor `{name}`")))
        };
        let (w, b) = (get("W_enc")?, get("b_enc")?);
        let (ws, bs) = (w.size(), b.size());
        if ws.len() != 2 || bs != [ws[1]] || ws[1] == 0 {
            return Err(err(format!(
                "expected W_enc [d_in, c] and b_enc [c] with c >= 1, got {ws:?} and {bs:?}"
            )));
        }
        let finite = |t: &Tensor| bool::try_from(t.isfinite().all()).unwrap_or(false);
        if !finite(&w) || !finite(&b) {
            return Err(err("W_enc or b_enc holds a non-finite value".into()));
        }
        let threshold_c = find("threshold").map(|t| t.to_kind(Kind::Float));
        if let Some(t) = &threshold_c {
            if t.size() != bs || !finite(t) {
                return Err(err(format!(
                    "threshold {:?} must be {bs:?} and finite",
                    t.size()
                )));
            }
        }
        let lineage = match find("lineage") {
            None => None,
            Some(l) => {
                let ids: Vec<i64> = Vec::try_from(l.to_kind(Kind::Int64).view([-1]))
                    .map_err(|e: tch::TchError| err(e.to_string()))?;
                if ids.len() as i64 != ws[1] || ids.iter().any(|&i| i < 0) {
                    return Err(err(format!(
                        "lineage [{}] must hold c = {} ids >= 0",
                        ids.len(),
                        ws[1]
                    )));
                }
                Some(ids.into_iter().map(|i| i as u64).collect())
            }
        };
        Ok(CoreFile {
            w_enc_dc: w,
            b_enc_c: b,
            threshold_c,
            lineage,
        })
    }
}

/// A core file's `Core` for a store of width `d_in`, in normalised units.
pub fn load_core(path: &Path, d_in: usize, scale: f64) -> Result<Core, TrainError> {
    let f = CoreFile::read(path)?;
    let ws = f.w_enc_dc.size();
    if ws[0] != d_in as i64 {
        return Err(TrainError::Core {
            path: path.into(),
            msg: format!("expected W_enc [{d_in}, c], got {ws:?}"),
        });
    }
    Ok(Core {
        w_enc_dc: f.w_enc_dc / scale,
        b_enc_c: f.b_enc_c,
        threshold_c: f.threshold_c,
    })
}

/// BLAKE3 of a core file, so a run or sweep model knows its core by content, not path.
pub fn file_blake3(path: &Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// A store's identity by content: its shards' BLAKE3s, in manifest order. Checkpoints,
/// cycles and sweep models are matched to their store by this, never by its path.
pub fn store_identity(store: &Store) -> Value {
    json!(store
        .manifest
        .shards
        .iter()
        .map(|s| s.blake3.as_str())
        .collect::<Vec<_>>())
}

/// The `store_identity` an export's cfg.json records (null when it records none).
pub fn export_store_identity(cfg_json: &Value) -> Value {
    match cfg_json["dmsae"]["store"]["shards"].as_array() {
        Some(a) => json!(a.iter().map(|s| s["blake3"].clone()).collect::<Vec<_>>()),
        None => Value::Null,
    }
}

/// The error for `path`, made from a store whose contents are not `store_dir`'s.
pub fn store_differs(path: &Path, store_dir: &Path) -> TrainError {
    TrainError::Unusable {
        path: path.into(),
        msg: format!(
            "made from another store: its shards' BLAKE3s differ from those of {}; remove the \
             directory or use another --out",
            store_dir.display()
        ),
    }
}

/// The normalisation scalar of a store's `acts`.
pub fn scale_of(store: &Arc<Store>) -> Result<(usize, f64), TrainError> {
    let bad = |msg: String| TrainError::Unusable {
        path: store.dir.clone(),
        msg,
    };
    let (_, spec) = store.array("acts")?;
    if !spec.dtype.is_float() {
        return Err(bad(format!(
            "`acts` is {}, not a float array",
            spec.dtype.name()
        )));
    }
    // `extract --keep-bos` stores BOS rows, which the training stream drops and whose norms
    // (Gemma's are orders above the rest) would dominate the manifest's statistic.
    let keeps_bos = store
        .manifest
        .provenance
        .get("extract")
        .and_then(|e| e.get("keep_bos"))
        == Some(&Value::Bool(true));
    let msn = if keeps_bos {
        mean_sq_norm_without_bos(store)?
    } else {
        store
            .manifest
            .stats
            .get("acts")
            .map(|s| s.mean_sq_norm)
            .unwrap_or(0.0)
    };
    if !(msn.is_finite() && msn > 0.0) {
        return Err(bad(format!(
            "no usable `acts` statistics (mean squared norm {msn})"
        )));
    }
    Ok((spec.width, (spec.width as f64 / msn).sqrt()))
}

/// Mean squared norm of up to `SCALE_SAMPLE` non-BOS rows, in a fixed shuffle (seed 0, so
/// every run on the store gets the same scale).
fn mean_sq_norm_without_bos(store: &Arc<Store>) -> Result<f64, TrainError> {
    const SCALE_SAMPLE: usize = 1 << 20;
    let so = StreamOptions {
        batch_tokens: 8192,
        drop_bos: true,
        ..Default::default()
    };
    let (mut sum, mut n) = (0.0f64, 0usize);
    for b in store.stream(so)? {
        let b = b?;
        let x = b.f32("acts").expect("requested");
        sum += x.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>();
        n += b.n;
        if n >= SCALE_SAMPLE {
            break;
        }
    }
    Ok(if n == 0 { 0.0 } else { sum / n as f64 })
}

/// A batch's array as float32 [n, width] on `device`. 16-bit floats cross to the device as
/// stored and widen there (exactly): half the bytes over PCIe and no pass on the host.
/// Queued on torch's stream (from page-locked memory), so the host goes on; the training loop
/// uses `Upload` instead.
pub(crate) fn rows(b: &Batch, name: &str, width: usize, device: Device) -> Tensor {
    dmsae_extractor::kernels::upload(&host_rows(b, name, width, device), device)
        .expect("a batch to the device")
        .to_kind(Kind::Float)
}

/// A batch's array [n, width] on the host, as stored; for CUDA a view of `b`'s bytes, which
/// must be read (`Upload::start` copies it into page-locked memory) while `b` lives.
fn host_rows(b: &Batch, name: &str, width: usize, device: Device) -> Tensor {
    let (a, bytes) = b
        .arrays
        .iter()
        .find(|(a, _)| a.name == name)
        .expect("requested array");
    let kind = match a.dtype {
        DType::Bf16 => Kind::BFloat16,
        DType::F16 => Kind::Half,
        DType::F32 => Kind::Float,
        _ => unreachable!("stores hold acts and grads as floats (manifest check)"),
    };
    let size = [b.n as i64, width as i64];
    match device {
        // SAFETY: the callers copy the view before `b` goes (see above). Copying it into a
        // tensor first was a second pass over the batch (19 MB at the paper's sizes) on the
        // thread that feeds the steps.
        Device::Cuda(_) => unsafe {
            Tensor::from_blob(bytes.as_ptr(), &size, &[width as i64, 1], kind, Device::Cpu)
        },
        _ => Tensor::from_data_size(bytes, &size, kind),
    }
}

/// One training batch on the device and where it leaves the stream.
struct DeviceBatch {
    x_bd: Tensor,
    n: usize,
    epoch: u64,
    /// Batches of `epoch` taken, this one included.
    batches: u64,
}

/// A `DeviceBatch` as the batch thread sends it: its acts on their way to the device, as
/// stored; `DeviceBatches::next` widens and scales them on torch's stream.
struct Pending {
    acts: Upload,
    scale: f64,
    n: usize,
    epoch: u64,
    batches: u64,
}

/// Training batches, scaled and on the device, prepared one ahead on a thread of their own so
/// the host's copy of batch n+1 overlaps step n. On an H100 at the sizes the step
/// proper took 40 ms and the loop 65 ms a step while the main thread made each batch itself
/// (bench_train: 76k tokens/s before, 131k with this and `Sae::decode_parts`).
/// Epochs roll over here; the consumer's wait is what the metrics log as data wait.
struct DeviceBatches {
    rx: Option<crossbeam_channel::Receiver<Result<Pending, TrainError>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    waited_ns: u64,
}

impl DeviceBatches {
    fn start(
        store: &Arc<Store>,
        store_dir: &Path,
        opts: impl Fn(u64) -> StreamOptions + Send + 'static,
        pos: Position,
        (d, scale, device): (usize, f64, Device),
    ) -> DeviceBatches {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (store, store_dir) = (store.clone(), store_dir.to_path_buf());
        let produce = move |tx: &crossbeam_channel::Sender<_>| -> Result<(), TrainError> {
            let (mut epoch, mut taken) = (pos.epoch, pos.batches);
            let mut stream = store.stream(opts(epoch))?;
            // The next epoch's stream starts at once, so that its shuffle buffer is full when
            // this one ends: opened only then, the steps waited while it decoded a buffer's
            // worth of chunks (bench_train's store is 64 batches an epoch).
            let mut next = store.stream(opts(epoch + 1))?;
            for _ in 0..taken {
                stream.next().transpose()?;
            }
            loop {
                let Some(b) = stream.next().transpose()? else {
                    if taken == 0 {
                        return Err(TrainError::Unusable {
                            path: store_dir,
                            msg: format!(
                                "no full batch of {} training tokens",
                                opts(0).batch_tokens
                            ),
                        });
                    }
                    (epoch, taken) = (epoch + 1, 0);
                    stream = std::mem::replace(&mut next, store.stream(opts(epoch + 1))?);
                    continue;
                };
                taken += 1;
                // From page-locked memory on the copy stream, beside the step running now.
                let acts = Upload::start(&host_rows(&b, "acts", d, device), device)
                    .expect("a batch to the device");
                let item = Pending {
                    acts,
                    scale,
                    n: b.n,
                    epoch,
                    batches: taken,
                };
                if tx.send(Ok(item)).is_err() {
                    return Ok(()); // the loop has ended
                }
            }
        };
        let thread = std::thread::spawn(move || {
            if let Err(e) = produce(&tx) {
                let _ = tx.send(Err(e));
            }
        });
        DeviceBatches {
            rx: Some(rx),
            thread: Some(thread),
            waited_ns: 0,
        }
    }

    fn next(&mut self) -> Result<DeviceBatch, TrainError> {
        let t = Instant::now();
        let r = self.rx.as_ref().expect("open").recv();
        let p = r.expect("the batch thread sends an error before it ends")?;
        // Its copy ran during the last step; a wait here is a wait for data.
        let acts = p.acts.finish().expect("a batch to the device");
        self.waited_ns += t.elapsed().as_nanos() as u64;
        Ok(DeviceBatch {
            x_bd: acts.to_kind(Kind::Float) * p.scale,
            n: p.n,
            epoch: p.epoch,
            batches: p.batches,
        })
    }
}

impl Drop for DeviceBatches {
    /// Closes the channel, then waits for the thread (at most the batch it is making), so no
    /// device work outlives the loop.
    fn drop(&mut self) {
        drop(self.rx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How a run starts and where it runs (not part of the saved config, so a run may resume on
/// another device).
pub struct RunOptions<'a> {
    /// A core file (see `load_core`).
    pub core: Option<&'a Path>,
    /// Continue from the run directory's checkpoint when there is one.
    pub resume: bool,
    pub device: Device,
    /// Turned true by a signal: checkpoint after the current step and return.
    pub stop: &'a AtomicBool,
}

const CKPT: &str = "checkpoint.safetensors";
const CKPT_JSON: &str = "checkpoint.json";

/// Where the stream stood: a resumed run reopens epoch `epoch` and skips `batches` batches,
/// which the seeded stream makes the same batches.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
pub(crate) struct Position {
    pub epoch: u64,
    pub batches: u64,
    pub tokens: u64,
}

fn save_checkpoint(
    out: &Path,
    t: &Trainer,
    pos: Position,
    identity: &Value,
) -> Result<(), TrainError> {
    let path = out.join(CKPT);
    let mut state = t.state();
    let p = [
        t.step as i64,
        pos.epoch as i64,
        pos.batches as i64,
        pos.tokens as i64,
    ];
    state.push(("position".into(), Tensor::from_slice(&p)));
    state.push(("threshold".into(), Tensor::from_slice(&[t.sae.threshold])));
    let tmp = out.join(format!(".{CKPT}.tmp"));
    Tensor::write_safetensors(&state, &tmp).map_err(|e| TrainError::Io {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&path))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    // Constant over a run, so the two files cannot disagree whatever order a crash leaves.
    export::write_atomic(&out.join(CKPT_JSON), identity.to_string().as_bytes()).map_err(io(out))
}

/// Restore a checkpoint written by a run with the same `identity` (config, store, core).
fn load_checkpoint(out: &Path, t: &mut Trainer, identity: &Value) -> Result<Position, TrainError> {
    let path = out.join(CKPT);
    let bad = |msg: String| TrainError::Checkpoint {
        path: path.clone(),
        msg,
    };
    let saved: Value = std::fs::read(out.join(CKPT_JSON))
        .map_err(io(&out.join(CKPT_JSON)))
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| bad(e.to_string())))?;
    if &saved != identity {
        return Err(bad(
            "written by a run with another config, store or core; remove it or drop --resume"
                .into(),
        ));
    }
    let state = Tensor::read_safetensors(&path).map_err(|e| bad(e.to_string()))?;
    let get = |n: &str| {
        state
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.shallow_clone())
            .ok_or_else(|| bad(format!("no tensor `{n}`")))
    };
    let p: Vec<i64> =
        Vec::try_from(get("position")?).map_err(|e: tch::TchError| bad(e.to_string()))?;
    let th = get("threshold")?.double_value(&[0]);
    if p.len() != 4 {
        return Err(bad("`position` must hold 4 values".into()));
    }
    t.load_state(&state, p[0] as u64, th).map_err(bad)?;
    Ok(Position {
        epoch: p[1] as u64,
        batches: p[2] as u64,
        tokens: p[3] as u64,
    })
}

/// Train on `store_dir`, write `metrics.jsonl` and the export under `out`. `resume`: continue
/// from `out`'s checkpoint when there is one. When `stop` turns true (a signal), the run
/// writes a checkpoint after the current step and returns `interrupted`.
pub fn train(
    store_dir: &Path,
    out: &Path,
    cfg: TrainConfig,
    opts: RunOptions,
    progress: impl FnMut(&Progress),
) -> Result<Summary, TrainError> {
    let RunOptions {
        core: core_file,
        resume,
        device,
        stop,
    } = opts;
    set_threads(&cfg);
    let store = Arc::new(Store::open(store_dir)?);
    let (d, scale) = scale_of(&store)?;
    let spec = MemberSpec {
        out: out.into(),
        cfg,
        core_file: core_file.map(Into::into),
        extra: None,
    };
    let (member, pos) = Member::open(&store, d, scale, &spec, resume, device)?;
    let start_tokens = pos.tokens;
    let mut members = [member];
    let end = train_members(&store, store_dir, &mut members, pos, scale, stop, progress)?;
    let [member] = members;
    let steps = member.t.step;
    let (eval, sae) = if end.interrupted {
        (None, member.t.sae)
    } else {
        member.finish(&store, store_dir, scale, end.pos.tokens)?
    };
    Ok(Summary {
        run_tokens: end.pos.tokens - start_tokens,
        interrupted: end.interrupted,
        steps,
        tokens: end.pos.tokens,
        seconds: end.seconds,
        scale,
        eval,
        sae,
    })
}

pub(crate) fn set_threads(cfg: &TrainConfig) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    tch::set_num_threads(cfg.cpu_threads.unwrap_or(cores.saturating_sub(1)).max(1) as i32);
}

/// What a model fed from a shared stream is: a `train` run, or one of a sweep's models.
pub(crate) struct MemberSpec {
    pub out: PathBuf,
    pub cfg: TrainConfig,
    pub core_file: Option<PathBuf>,
    /// Keys added to cfg.json's "dmsae" object (a sweep's series); none for `train`.
    pub extra: Option<serde_json::Map<String, Value>>,
}

/// One model being trained: its trainer, run directory, log and checkpoint identity.
pub(crate) struct Member {
    pub t: Trainer,
    pub out: PathBuf,
    core_file: Option<PathBuf>,
    identity: Value,
    extra: Option<serde_json::Map<String, Value>>,
    log: std::io::BufWriter<std::fs::File>,
    log_path: PathBuf,
    fires_f: Tensor,
}

impl Member {
    /// A new model under `spec.out`, or, with `resume`, the one in its checkpoint, with the
    /// stream position it stood at (the start otherwise).
    pub(crate) fn open(
        store: &Store,
        d: usize,
        scale: f64,
        spec: &MemberSpec,
        resume: bool,
        device: Device,
    ) -> Result<(Member, Position), TrainError> {
        let (out, cfg, core_file) = (&spec.out, &spec.cfg, spec.core_file.as_deref());
        let core = core_file.map(|p| load_core(p, d, scale)).transpose()?;
        let sae = Sae::new(d, core, cfg, Kind::Float, device).map_err(ConfigError::Invalid)?;
        let mut t = Trainer::new(sae, cfg.clone(), core_file.is_some());
        t.check_update().map_err(ConfigError::Invalid)?;
        std::fs::create_dir_all(out).map_err(io(out))?;
        // By content only: a run resumed under another spelling of its paths is the same run.
        let identity = json!({
            "config": cfg,
            "core_blake3": core_file.map(file_blake3).transpose()?,
            "store_shards": store_identity(store),
        });
        let mut pos = Position::default();
        let log_path = out.join("metrics.jsonl");
        let mut kept_log = String::new();
        if resume && !out.join(CKPT).exists() && out.join(export::CFG_FILE).exists() {
            return Err(TrainError::Unusable {
                path: out.clone(),
                msg: "holds a finished export and no checkpoint: nothing to resume".into(),
            });
        }
        if resume && out.join(CKPT).exists() {
            pos = load_checkpoint(out, &mut t, &identity)?;
            // Its moments may be bf16, which only the CUDA update runs.
            t.check_update().map_err(ConfigError::Invalid)?;
            // Keep the log up to the checkpoint; later lines came from the interrupted run.
            let old = std::fs::read_to_string(&log_path).unwrap_or_default();
            for l in old.lines() {
                let v: Value = serde_json::from_str(l).unwrap_or(Value::Null);
                if v["kind"] == "train" && v["step"].as_u64().is_some_and(|s| s <= t.step) {
                    kept_log.push_str(l);
                    kept_log.push('\n');
                }
            }
        }
        let mut log =
            std::io::BufWriter::new(std::fs::File::create(&log_path).map_err(io(&log_path))?);
        log.write_all(kept_log.as_bytes()).map_err(io(&log_path))?;
        let fires_f = Tensor::zeros([t.sae.width() as i64], (Kind::Int64, device));
        let m = Member {
            t,
            out: out.clone(),
            core_file: core_file.map(Into::into),
            identity,
            extra: spec.extra.clone(),
            log,
            log_path,
            fires_f,
        };
        Ok((m, pos))
    }

    /// The log first: a resume keeps only the lines on disk up to the checkpoint's step.
    fn checkpoint(&mut self, pos: Position) -> Result<(), TrainError> {
        self.log.flush().map_err(io(&self.log_path))?;
        self.log.get_ref().sync_data().map_err(io(&self.log_path))?;
        save_checkpoint(&self.out, &self.t, pos, &self.identity)
    }

    /// Evaluate on the held-out split, write the export and drop the checkpoint.
    pub(crate) fn finish(
        mut self,
        store: &Arc<Store>,
        store_dir: &Path,
        scale: f64,
        tokens: u64,
    ) -> Result<(Option<EvalMetrics>, Sae), TrainError> {
        let (t, out, log_path) = (&self.t, &self.out, &self.log_path);
        let (cfg, core_file) = (&t.cfg, self.core_file.as_deref());
        let eval = evaluate(store, t, scale, cfg)?;
        let log = &mut self.log;
        writeln!(
            log,
            "{}",
            json!({ "kind": "eval", "step": t.step, "tokens": tokens, "eval": eval })
        )
        .map_err(io(log_path))?;
        log.flush().map_err(io(log_path))?;
        log.get_ref().sync_all().map_err(io(log_path))?;

        let mut extra = json!({
            "core_size": t.sae.core,
            "core_frozen": core_file.is_some() && cfg.core_frozen,
            "core_file": core_file.map(|p| p.display().to_string()),
            "core_blake3": core_file.map(file_blake3).transpose()?,
            "k": cfg.k,
            "group_sizes": t.sae.groups,
            "norm_scale": scale,
            "norm_note": "trained on x * norm_scale (E||x * norm_scale||^2 = d_in); folded into these weights",
            "threshold_normalised": t.sae.threshold,
            "steps": t.step,
            "tokens": tokens,
            "train_config": cfg,
            "encoder_bf16": t.encoder_bf16(),
            "decoder_bf16": t.decoder_bf16(),
            "adam_bf16_moments": t.bf16_moments(),
            "encoder_grad_bf16": t.encoder_grad_bf16(),
            "decoder_grad_bf16": t.decoder_grad_bf16(),
            "parts_bf16": t.parts_bf16(),
            "eval": eval,
            "store": {
                "path": store_dir.display().to_string(),
                "total_tokens": store.manifest.total_tokens,
                "shards": store.manifest.shards.iter().map(|s| json!({"file": s.file, "blake3": s.blake3})).collect::<Vec<_>>(),
                "provenance": store.manifest.provenance,
            },
            "producer": format!("dmsae-trainer {}", env!("CARGO_PKG_VERSION")),
        });
        if let (Some(obj), Some(more)) = (extra.as_object_mut(), &self.extra) {
            obj.extend(more.clone());
        }
        // SAELens metadata from what `dmsae extract` records (null for imported stores).
        let ex = store
            .manifest
            .provenance
            .get("extract")
            .cloned()
            .unwrap_or(Value::Null);
        let metadata = json!({
            "model_name": ex["model"],
            "hook_name": ex["layer"].as_u64().map(|l| format!("blocks.{l}.hook_resid_post")),
            "context_size": ex["context"],
        });
        export::write(
            out,
            &t.sae,
            scale,
            &export::cfg_json(&t.sae, metadata, extra),
        )
        .map_err(io(out))?;
        // The export is the result; a finished run's checkpoint is only disk.
        for f in [CKPT, CKPT_JSON] {
            let _ = std::fs::remove_file(out.join(f));
        }
        Ok((eval, self.t.sae))
    }
}

/// Where `train_members` stopped.
pub(crate) struct LoopEnd {
    pub pos: Position,
    /// `stop` turned true: every member holds a checkpoint at `pos`.
    pub interrupted: bool,
    pub seconds: f64,
}

/// Feed every member the same training batches, each read once, from `pos` to the end of
/// training. The stream, schedule, logging and checkpoint settings are the first member's;
/// the others must share them (sweep.rs checks), so each member sees what it would alone.
pub(crate) fn train_members(
    store: &Arc<Store>,
    store_dir: &Path,
    members: &mut [Member],
    pos: Position,
    scale: f64,
    stop: &AtomicBool,
    mut progress: impl FnMut(&Progress),
) -> Result<LoopEnd, TrainError> {
    let cfg = members[0].t.cfg.clone();
    let (d, device) = (members[0].t.sae.d_in, members[0].t.sae.device());
    let (batch_tokens, seed, eval_fraction, shuffle_tokens) = (
        cfg.batch_tokens,
        cfg.seed,
        cfg.eval_fraction,
        cfg.shuffle_tokens,
    );
    let opts = move |epoch: u64| StreamOptions {
        arrays: vec!["acts".into()],
        batch_tokens,
        seed,
        epoch,
        split: Split::Train,
        eval_fraction,
        shuffle_tokens,
        drop_last: true,
        ..Default::default()
    };
    let total = cfg.total_steps();
    let start = Instant::now();
    crate::profile::init(&crate::sae::STEP_PHASES, "model step");
    let (mut epoch, mut tokens, mut epoch_batches) = (pos.epoch, pos.tokens, pos.batches);
    let mut step = members[0].t.step;
    let (start_tokens, start_step, mut last_ckpt) = (tokens, step, step);
    let mut batches = DeviceBatches::start(store, store_dir, opts, pos, (d, scale, device));
    let (mut win_tokens, mut win_wait_ns, mut last_wait, mut win_start) =
        (0u64, 0u64, 0u64, Instant::now());
    // Each member's newest figures read back: a step's are read during the next (`queue`),
    // and all of them before a checkpoint, a log line or the end.
    let mut last = vec![StepStats::default(); members.len()];
    while step < total {
        let pos = Position {
            epoch,
            batches: epoch_batches,
            tokens,
        };
        let stopping = stop.load(Ordering::SeqCst);
        let checkpoint = cfg.checkpoint_every > 0
            && step > last_ckpt
            && step.is_multiple_of(cfg.checkpoint_every);
        if stopping || checkpoint {
            settle(members, &mut last)?;
        }
        if stopping {
            for m in members.iter_mut() {
                m.checkpoint(pos)?;
            }
            return Ok(LoopEnd {
                pos,
                interrupted: true,
                seconds: start.elapsed().as_secs_f64(),
            });
        }
        if checkpoint {
            for m in members.iter_mut() {
                m.checkpoint(pos)?;
            }
            last_ckpt = step;
        }
        let batch = batches.next()?;
        (epoch, epoch_batches) = (batch.epoch, batch.batches);
        win_wait_ns += batches.waited_ns - last_wait;
        last_wait = batches.waited_ns;
        let x_bd = batch.x_bd;
        for (m, l) in members.iter_mut().zip(&mut last) {
            if let Some(s) = m.t.queue(&x_bd) {
                *l = checked(m, s)?;
            }
            m.fires_f += m.t.last_fired_counts();
        }
        step = members[0].t.step;
        tokens += batch.n as u64;
        win_tokens += batch.n as u64;
        let log = step.is_multiple_of(cfg.log_every.max(1)) || step == total;
        if log {
            settle(members, &mut last)?;
        }
        progress(&Progress {
            step,
            total_steps: total,
            tokens,
            run_steps: step - start_step,
            run_tokens: tokens - start_tokens,
            elapsed_s: start.elapsed().as_secs_f64(),
            stats: &last[0],
        });
        if log {
            let frac = |m: Tensor| m.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
            let tokens_per_s = win_tokens as f64 / win_start.elapsed().as_secs_f64();
            for (m, s) in members.iter_mut().zip(&last) {
                let rate = m.fires_f.to_kind(Kind::Double) / win_tokens.max(1) as f64;
                let t = &m.t;
                let line = json!({
                    "kind": "train", "step": t.step, "tokens": tokens, "epoch": epoch, "lr": s.lr,
                    "loss": s.loss, "l2": s.l2, "auxk": s.auxk, "mse": s.mse, "fvu": s.fvu,
                    "l0_core": s.l0_core, "l0_noncore": s.l0_noncore, "l0_total": s.l0_core + s.l0_noncore,
                    "dead_fraction": frac(t.dead_f()), "dense_fraction": frac(rate.gt(cfg.dense_fraction)),
                    "threshold": t.sae.threshold, "grad_norm": s.grad_norm,
                    "data_wait_s": win_wait_ns as f64 * 1e-9,
                    "tokens_per_s": tokens_per_s,
                });
                writeln!(m.log, "{line}").map_err(io(&m.log_path))?;
                let _ = m.fires_f.zero_();
            }
            (win_tokens, win_wait_ns, win_start) = (0, 0, Instant::now());
        }
    }
    settle(members, &mut last)?;
    crate::profile::report();
    Ok(LoopEnd {
        pos: Position {
            epoch,
            batches: epoch_batches,
            tokens,
        },
        interrupted: false,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Every member's last step's figures, read (`Trainer::settle`) and checked, into `last`.
fn settle(members: &mut [Member], last: &mut [StepStats]) -> Result<(), TrainError> {
    for (m, l) in members.iter_mut().zip(last) {
        if let Some(s) = m.t.settle() {
            *l = checked(m, s)?;
        }
    }
    Ok(())
}

/// `s`, unless its step diverged. Checked before any checkpoint holds the poisoned weights
/// (the loop settles first). A NaN pre-activation never passes BatchTopK's `> 0`, so the loss
/// alone could stay finite.
fn checked(m: &Member, s: StepStats) -> Result<StepStats, TrainError> {
    match s.loss.is_finite() && s.grad_norm.is_finite() {
        true => Ok(s),
        false => Err(TrainError::Diverged {
            path: m.out.clone(),
            step: s.step,
            msg: format!(
                "loss {}, gradient norm {}; lower lr (now {}) or check the store",
                s.loss, s.grad_norm, m.t.cfg.lr
            ),
        }),
    }
}

/// Metrics on up to `eval_tokens` held-out tokens; None when the store holds none.
pub fn evaluate(
    store: &Arc<Store>,
    t: &Trainer,
    scale: f64,
    cfg: &TrainConfig,
) -> Result<Option<EvalMetrics>, TrainError> {
    let has = |n: &str| store.array(n).is_ok();
    let (grads, loss, flags) = (has("grads"), has("loss"), has("flags"));
    let mut arrays = vec!["acts".to_string()];
    for (on, n) in [(grads, "grads"), (loss, "loss"), (flags, "flags")] {
        if on {
            arrays.push(n.into());
        }
    }
    let so = StreamOptions {
        arrays,
        batch_tokens: cfg.batch_tokens,
        seed: cfg.seed,
        split: Split::Eval,
        eval_fraction: cfg.eval_fraction,
        shuffle: false,
        ..Default::default()
    };
    let (d, sae, dev) = (t.sae.d_in, &t.sae, t.sae.device());
    let mut m = EvalMetrics::default();
    let (mut err, mut err_topk, mut sum_x, mut sum_sq) = (
        0.0,
        0.0,
        Tensor::zeros([d as i64], (Kind::Double, dev)),
        0.0,
    );
    let mut fires_f = Tensor::zeros([sae.width() as i64], (Kind::Int64, dev));
    let (mut dloss, mut loss_sum, mut loss_n) = (0.0, 0.0, 0u64);
    for b in store.stream(so)? {
        let b = b?;
        if m.tokens >= cfg.eval_tokens {
            break;
        }
        // The last batch is cut so that at most eval_tokens count.
        let n_b = (cfg.eval_tokens - m.tokens).min(b.n as u64) as usize;
        let rows = |name: &str| rows(&b, name, d, dev).narrow(0, 0, n_b as i64);
        let x_bd = rows("acts");
        tch::no_grad(|| {
            let xn_bd = &x_bd * scale;
            let f_bf = sae.encode(&xn_bd);
            let diff_bd = (sae.decode(&f_bf) - &xn_bd) / scale;
            err += diff_bd.square().sum(Kind::Double).double_value(&[]);
            err_topk += err_stats(&xn_bd, &t.batchtopk_x_hat(&xn_bd)).0 * (n_b * d) as f64
                / (scale * scale);
            sum_x += x_bd.sum_dim_intlist(0, false, Kind::Double);
            sum_sq += x_bd.square().sum(Kind::Double).double_value(&[]);
            let (c, n) = l0s(&f_bf, sae.core);
            m.l0_core += c * n_b as f64;
            m.l0_noncore += n * n_b as f64;
            fires_f += f_bf.gt(0.0).sum_dim_intlist(0, false, Kind::Int64);
            let fl = b.get("flags");
            let bit = |t: usize, k: u8| fl.is_none_or(|f| f[t] & k != 0);
            if grads {
                let dot = (rows("grads") * &diff_bd).sum_dim_intlist(-1, false, Kind::Double);
                let dot: Vec<f64> = Vec::try_from(dot.to_device(Device::Cpu)).expect("f64 vector");
                for (i, v) in dot.iter().enumerate() {
                    if bit(i, 1) {
                        dloss += v;
                        m.grad_tokens += 1;
                    }
                }
            }
            if loss {
                let l = b.f32("loss").expect("requested");
                for (i, v) in l.iter().enumerate().take(n_b) {
                    if bit(i, 2) {
                        loss_sum += *v as f64;
                        loss_n += 1;
                    }
                }
            }
        });
        m.tokens += n_b as u64;
    }
    if m.tokens == 0 {
        return Ok(None);
    }
    let n = m.tokens as f64;
    let var = sum_sq - sum_x.square().sum(Kind::Double).double_value(&[]) / n;
    m.mse = err / (n * d as f64);
    m.fvu = err / var.max(f64::MIN_POSITIVE);
    m.fvu_batchtopk = err_topk / var.max(f64::MIN_POSITIVE);
    m.l0_core /= n;
    m.l0_noncore /= n;
    m.l0_total = m.l0_core + m.l0_noncore;
    let rate = fires_f.to_kind(Kind::Double) / n;
    m.dead_fraction = rate
        .eq(0.0)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]);
    m.dense_fraction = rate
        .gt(cfg.dense_fraction)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]);
    m.first_order_dloss = (m.grad_tokens > 0).then(|| dloss / m.grad_tokens as f64);
    m.mean_loss = (loss_n > 0).then(|| loss_sum / loss_n as f64);
    Ok(Some(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::sparse_dictionary;
    use dmsae_store::{ArraySpec, Codec, DType, StoreWriter, WriterOptions};

    /// Rows of norm² 4 and, every 8th row, a BOS row of norm² 40,000 (Gemma's BOS is that far
    /// out). Stored without BOS rows, the manifest's statistic is the scale; with them
    /// (`extract --keep-bos`), the scale comes from the rows training streams.
    #[test]
    fn the_scale_leaves_out_bos_rows_the_stream_drops() {
        let (d, n) = (4usize, 256usize);
        let scale = |keep_bos: bool| {
            let tmp = tempfile::tempdir().unwrap();
            let mut provenance = serde_json::Map::new();
            provenance.insert("extract".into(), json!({ "keep_bos": keep_bos }));
            let arrays = vec![
                ArraySpec::new("acts", DType::F32, d, Codec::Raw),
                ArraySpec::new("flags", DType::U8, 1, Codec::Raw),
            ];
            let opts = WriterOptions {
                chunk_tokens: 32,
                provenance,
                ..Default::default()
            };
            let rows: Vec<usize> = (0..n)
                .filter(|i| keep_bos || !i.is_multiple_of(8))
                .collect();
            let bos = |i: usize| i.is_multiple_of(8);
            let x: Vec<u8> = rows
                .iter()
                .flat_map(|&i| vec![if bos(i) { 100.0f32 } else { 1.0 }; d])
                .flat_map(|v| v.to_le_bytes())
                .collect();
            let flags: Vec<u8> = rows.iter().map(|&i| if bos(i) { 4 } else { 0 }).collect();
            let mut w = StoreWriter::create(tmp.path(), arrays, opts).unwrap();
            w.append(&[&x, &flags]).unwrap();
            w.finish().unwrap();
            scale_of(&Arc::new(Store::open(tmp.path()).unwrap()))
                .unwrap()
                .1
        };
        // E||x||^2 = 4 over the training rows: scale sqrt(d / 4) = 1.
        assert!((scale(false) - 1.0).abs() < 1e-12, "{}", scale(false));
        assert!((scale(true) - 1.0).abs() < 1e-12, "{}", scale(true));
    }

    /// The eval on a store whose every chunk is held out, against the same figures computed
    /// by hand in f64 from the exported (model-unit) weights: FVU, L0, the first-order loss
    /// change mean g . (x_hat - x), and the mean stored loss.
    #[test]
    fn eval_matches_a_direct_computation_from_the_export() {
        eval_against_direct(None);
    }

    /// An eval_tokens that ends inside a batch (200 of 600, batches of 128) counts exactly
    /// the first 200 held-out tokens, in every figure.
    #[test]
    fn eval_stops_at_eval_tokens_inside_a_batch() {
        eval_against_direct(Some(200));
    }

    /// `evaluate` with `eval_tokens` (all 600 when None) against the direct computation on
    /// the same leading rows (the unshuffled eval stream is store order).
    fn eval_against_direct(eval_tokens: Option<u64>) {
        tch::set_num_threads(1);
        let (d, n) = (8usize, 600usize);
        let (_, x) = sparse_dictionary(d, 12, 2, n, 0.05, 3);
        let x: Vec<f32> = x.iter().map(|v| v * 5.0).collect();
        let (_, g) = sparse_dictionary(d, 12, 3, n, 0.5, 4);
        let loss: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let tmp = tempfile::tempdir().unwrap();
        let arrays = ["acts", "grads"]
            .map(|a| ArraySpec::new(a, DType::F32, d, Codec::Raw))
            .into_iter()
            .chain([ArraySpec::new("loss", DType::F32, 1, Codec::Raw)])
            .collect();
        let opts = WriterOptions {
            chunk_tokens: 100,
            ..Default::default()
        };
        let mut w = StoreWriter::create(tmp.path(), arrays, opts).unwrap();
        let b = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        w.append(&[&b(&x), &b(&g), &b(&loss)]).unwrap();
        w.finish().unwrap();
        let store = Arc::new(Store::open(tmp.path()).unwrap());
        let (_, scale) = scale_of(&store).unwrap();

        let cfg = TrainConfig {
            width: 40,
            k: 3,
            group_fractions: vec![0.25],
            eval_fraction: 1.0,
            batch_tokens: 128,
            seed: 2,
            eval_tokens: eval_tokens.unwrap_or(TrainConfig::default().eval_tokens),
            ..Default::default()
        };
        let n = eval_tokens.map_or(n, |e| e as usize);
        let mut sae = Sae::new(d, None, &cfg, Kind::Float, Device::Cpu).unwrap();
        tch::no_grad(|| {
            let _ = sae.b_enc.shallow_clone().fill_(0.05);
        });
        sae.threshold = 0.2;
        let t = Trainer::new(sae, cfg.clone(), false);
        let m = evaluate(&store, &t, scale, &cfg).unwrap().unwrap();

        let wts: Vec<(&str, Vec<f32>)> = export::weights(&t.sae, scale)
            .into_iter()
            .map(|(k, v)| (k, Vec::try_from(v.view([-1])).unwrap()))
            .collect();
        let get = |k: &str| &wts.iter().find(|(n, _)| *n == k).unwrap().1;
        let (we, wd, be, bd, th) = (
            get("W_enc"),
            get("W_dec"),
            get("b_enc"),
            get("b_dec"),
            get("threshold"),
        );
        let f = 40;
        let (mut err, mut dl, mut l0, mut sx, mut sxx) = (0.0, 0.0, 0.0, vec![0.0; d], 0.0);
        for (xr, gr) in x.chunks_exact(d).zip(g.chunks_exact(d)).take(n) {
            let mut xh: Vec<f64> = bd.iter().map(|v| *v as f64).collect();
            for j in 0..f {
                let pre = be[j] as f64
                    + (0..d)
                        .map(|i| (xr[i] - bd[i]) as f64 * we[i * f + j] as f64)
                        .sum::<f64>();
                if pre > 0.0 && pre > th[j] as f64 {
                    l0 += 1.0;
                    (0..d).for_each(|i| xh[i] += pre * wd[j * d + i] as f64);
                }
            }
            err += (0..d).map(|i| (xh[i] - xr[i] as f64).powi(2)).sum::<f64>();
            dl += (0..d)
                .map(|i| gr[i] as f64 * (xh[i] - xr[i] as f64))
                .sum::<f64>();
            (0..d).for_each(|i| sx[i] += xr[i] as f64);
            sxx += xr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
        }
        let nf = n as f64;
        let var = sxx - sx.iter().map(|s| s * s).sum::<f64>() / nf;
        let close = |a: f64, b: f64, what: &str| {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
                "{what}: eval {a} vs direct {b}"
            )
        };
        assert_eq!((m.tokens, m.grad_tokens), (n as u64, n as u64));
        close(m.fvu, err / var, "fvu");
        close(m.mse, err / (nf * d as f64), "mse");
        close(m.l0_total, l0 / nf, "l0");
        close(m.first_order_dloss.unwrap(), dl / nf, "first-order dloss");
        close(
            m.mean_loss.unwrap(),
            loss[..n].iter().map(|v| *v as f64).sum::<f64>() / nf,
            "mean loss",
        );
        assert!(
            m.l0_noncore > 0.0 && m.l0_total < 40.0,
            "a threshold that neither keeps all nor none: {}",
            m.l0_total
        );
    }
}
