//! The Matryoshka BatchTopK SAE with a shared core, and its trainer (model, loss and update in
//! one file, after dictionary_learning's `trainers/matryoshka_batch_top_k.py`).
//!
//! Latents are ordered core (0..c) then non-core groups m0 < m1 < ... . Encoder
//! f = ReLU((x - b_dec) W_enc + b_enc); the core is exempt from BatchTopK, the non-core latents
//! keep the k*B largest activations of the batch. All tensors are in normalised units (see
//! train.rs); export.rs folds the scale back. Shape suffixes: b batch, d d_in, f d_sae.
//!
//! A core latent's pre-activation is anchored to x, not to b_dec: x W_enc + b_enc, so `b_enc`
//! holds that bias for the core (`b_enc_saelens` converts for export). b_dec is re-initialised
//! every cycle; anchored to it, a frozen core's pre-activations would shift with it, and a
//! carried latent would no longer compute the function that attribution selected.

use crate::config::TrainConfig;
use crate::profile::Laps;
use dmsae_extractor::kernels::{self, addr};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

/// The phases of a training step, as `Laps` closes them.
pub const STEP_PHASES: [&str; 9] = [
    "encode", "codes", "decode", "auxk", "backward", "grad", "adam", "renorm", "stats",
];
use torch_sys::C_tensor;

extern "C" {
    // trainer/csrc/fused_adam.cpp
    fn dmsae_fused_adam(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        n: i32,
        step: *mut C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        grad_scale: *mut C_tensor,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> i32;
}

pub struct Sae {
    pub d_in: usize,
    /// Core size c.
    pub core: usize,
    /// Non-core group sizes, innermost first.
    pub groups: Vec<usize>,
    pub k: usize,
    pub w_enc: Tensor, // [d, f]
    pub b_enc: Tensor, // [f]
    pub w_dec: Tensor, // [f, d], unit rows
    pub b_dec: Tensor, // [d]
    /// Inference threshold on non-core pre-activations; negative until first learned.
    pub threshold: f64,
    /// JumpReLU thresholds of the core latents [c], carried from the cycle that selected them
    /// (0: plain ReLU). Not trained.
    pub core_threshold: Tensor,
}

/// The nonzero codes of a batch in row-major order: token `rows`, latent `cols`, and `vals`
/// (differentiable through the dense codes they came from).
pub struct Codes {
    rows: Tensor,
    cols: Tensor,
    vals: Tensor,
    batch: i64,
    /// Which entries are codes, where some may be zeros that hold a place (`train_entries`'
    /// fixed-size list): counts and the threshold's input skip the others, and no gradient
    /// flows through them. None: every entry is a code.
    live: Option<Tensor>,
    /// The core's codes as a dense block, where the entries list the non-core latents alone
    /// (`train_entries` without the host, with a core); None: the entries hold the core's too.
    core: Option<CoreCodes>,
}

/// The core's training codes as a block: a core latent fires on most tokens, so as entries
/// the core's could outnumber BatchTopK's k*B and wait for their count, where as a block they
/// cost [B, c] x [c, d] products.
struct CoreCodes {
    /// [B, c]: the values, zero where `on` is false (differentiable through the kept ones).
    vals: Tensor,
    /// [B, c] bool: where the core's JumpReLU passes.
    on: Tensor,
}

impl Codes {
    pub fn of(f_bf: &Tensor) -> Codes {
        let nz = f_bf.detach().nonzero();
        let (rows, cols) = (nz.select(1, 0), nz.select(1, 1));
        let vals = f_bf.index(&[Some(&rows), Some(&cols)]);
        Codes {
            rows,
            cols,
            vals,
            batch: f_bf.size()[0],
            live: None,
            core: None,
        }
    }

    /// The training codes (`Sae::train_codes`) from (row, column, value) lists in any order.
    fn sorted(rows: Tensor, cols: Tensor, vals: Tensor, width: i64, batch: i64) -> Codes {
        let order = (&rows * width + &cols).argsort(0, false);
        Codes {
            rows: rows.index_select(0, &order),
            cols: cols.index_select(0, &order),
            vals: vals.index_select(0, &order),
            batch,
            live: None,
            core: None,
        }
    }

    /// Entries on latents lo..hi.
    #[cfg(test)]
    fn count_in(&self, lo: i64, hi: i64) -> i64 {
        self.count_in_t(lo, hi).int64_value(&[])
    }

    /// `count_in` as a device scalar.
    fn count_in_t(&self, lo: i64, hi: i64) -> Tensor {
        let n = self
            .live_and(self.cols.ge(lo).logical_and(&self.cols.lt(hi)))
            .sum(Kind::Int64);
        match &self.core {
            Some(k) if lo < k.on.size()[1] => {
                let hi = hi.min(k.on.size()[1]);
                n + k.on.narrow(1, lo, hi - lo).sum(Kind::Int64)
            }
            _ => n,
        }
    }

    /// `mask` [entries] without the places held (`live`).
    fn live_and(&self, mask: Tensor) -> Tensor {
        match &self.live {
            Some(live) => mask.logical_and(live),
            None => mask,
        }
    }
}

/// A core handed to a new SAE: encoder columns and biases, in normalised units.
pub struct Core {
    pub w_enc_dc: Tensor,
    pub b_enc_c: Tensor,
    /// The core latents' JumpReLU thresholds [c]; None gives plain ReLU. A core latent is exempt
    /// from BatchTopK, so without the threshold it was trained under, it fires on most tokens.
    pub threshold_c: Option<Tensor>,
}

impl Sae {
    /// Random unit decoder rows (seeded ChaCha8, independent of torch's global generator),
    /// W_enc = W_dec^T, zero biases. A given core replaces the first c encoder columns and
    /// biases; its decoder rows start as its normalised encoder columns (ours). Built on the
    /// CPU in f64, then moved to `device` as `kind`.
    pub fn new(
        d_in: usize,
        core: Option<Core>,
        cfg: &TrainConfig,
        kind: Kind,
        device: Device,
    ) -> Result<Sae, String> {
        let width = cfg.width;
        let c = core.as_ref().map_or(0, |k| k.w_enc_dc.size()[1] as usize);
        cfg.validate(c).map_err(|e| e.to_string())?;
        let groups = cfg.group_sizes(width - c).map_err(|e| e.to_string())?;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let gauss: Vec<f64> = (0..width * d_in)
            .map(|_| {
                // Box-Muller.
                let (u, v): (f64, f64) = (rng.gen::<f64>().max(f64::MIN_POSITIVE), rng.gen());
                (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
            })
            .collect();
        let w_dec_fd = unit_rows(&Tensor::from_slice(&gauss).view([width as i64, d_in as i64]));
        let w_enc_df = w_dec_fd.tr().contiguous();
        let b_enc_f = Tensor::zeros([width as i64], (Kind::Double, Device::Cpu));
        if let Some(core) = &core {
            if core.w_enc_dc.size() != [d_in as i64, c as i64] || core.b_enc_c.size() != [c as i64]
            {
                return Err(format!(
                    "core shapes W_enc {:?}, b_enc {:?} do not fit d_in {d_in}",
                    core.w_enc_dc.size(),
                    core.b_enc_c.size()
                ));
            }
            let w = core.w_enc_dc.to_kind(Kind::Double);
            w_enc_df.narrow(1, 0, c as i64).copy_(&w);
            b_enc_f
                .narrow(0, 0, c as i64)
                .copy_(&core.b_enc_c.to_kind(Kind::Double));
            w_dec_fd.narrow(0, 0, c as i64).copy_(&unit_rows(&w.tr()));
        }
        let p = |t: Tensor| {
            t.to_kind(kind)
                .to_device(device)
                .contiguous()
                .set_requires_grad(true)
        };
        let core_threshold = match core.as_ref().and_then(|k| k.threshold_c.as_ref()) {
            Some(t) if t.size() != [c as i64] => {
                return Err(format!(
                    "core threshold {:?} does not fit {c} core latents",
                    t.size()
                ))
            }
            Some(t) => t.to_kind(kind).to_device(device),
            None => Tensor::zeros([c as i64], (kind, device)),
        };
        Ok(Sae {
            d_in,
            core: c,
            groups,
            k: cfg.k,
            w_enc: p(w_enc_df),
            b_enc: p(b_enc_f),
            w_dec: p(w_dec_fd),
            b_dec: p(Tensor::zeros([d_in as i64], (Kind::Double, Device::Cpu))),
            threshold: -1.0,
            core_threshold,
        })
    }

    pub fn device(&self) -> Device {
        self.w_enc.device()
    }

    /// Every tensor on `device`, the core thresholds included (a loaded export's are on the CPU).
    pub fn to_device(self, device: Device) -> Sae {
        Sae {
            w_enc: self.w_enc.to_device(device),
            b_enc: self.b_enc.to_device(device),
            w_dec: self.w_dec.to_device(device),
            b_dec: self.b_dec.to_device(device),
            core_threshold: self.core_threshold.to_device(device),
            ..self
        }
    }

    pub fn width(&self) -> usize {
        self.core + self.groups.iter().sum::<usize>()
    }

    pub fn params(&self) -> [&Tensor; 4] {
        [&self.w_enc, &self.b_enc, &self.w_dec, &self.b_dec]
    }

    /// Post-ReLU activations of the first `n` latents (n >= core) before any sparsity; core
    /// latents are JumpReLU at their carried thresholds. Float32 (evaluation, attribution).
    fn relu_acts_first(&self, x_bd: &Tensor, n: usize) -> Tensor {
        let post_bn = self.pre_acts(x_bd, n).relu();
        let c = self.core as i64;
        if c == 0 {
            return post_bn;
        }
        let core_bc = post_bn.narrow(1, 0, c);
        let on_bc = core_bc
            .gt_tensor(&self.core_threshold)
            .to_kind(core_bc.kind());
        Tensor::cat(&[core_bc * on_bc, post_bn.narrow(1, c, n as i64 - c)], 1)
    }

    /// Pre-activations of the first `n` latents: the core's anchored to x, the rest to b_dec.
    pub fn pre_acts(&self, x_bd: &Tensor, n: usize) -> Tensor {
        self.pre_acts_as(x_bd, n, false, true, None)
    }

    /// The pre-activations of the non-core latents `cols` [n] alone, [B, n], with their graph:
    /// (x - b_dec) w_dn + b_enc[cols], where `w_dn` holds W_enc[:, cols] (a leaf of its own,
    /// `Trainer::auxk`), in bf16 with `bf16` (as `pre_acts_as`). b_dec's gradient comes
    /// through a zero term in the bias, as in `encoder_terms`, so the backward's one product
    /// is W's gradient.
    fn noncore_pre_acts(&self, x_bd: &Tensor, cols: &Tensor, w_dn: &Tensor, bf16: bool) -> Tensor {
        let bd = self.b_dec.detach();
        let xc_bd = x_bd - &bd;
        let zero_n = (&bd - &self.b_dec).matmul(&w_dn.detach());
        let bias_n = self.b_enc.index_select(0, cols) + zero_n;
        match bf16 {
            true => {
                let h = Kind::BFloat16;
                bias_n.to_kind(h).addmm(&xc_bd.to_kind(h), &w_dn.to_kind(h))
            }
            false => xc_bd.matmul(w_dn) + bias_n,
        }
    }

    /// `pre_acts`; with `bf16`, the [B, d] x [d, n] product and the bias add run in bf16 and
    /// the result stays bf16 (autograd runs the backward products in bf16 too, as under
    /// autocast). On a GPU at the issue's sizes each float32 pass over [B, n] is 1 GB: a cast
    /// of the product, the bias add, and the dense gradient's zeros and cast in the backward.
    /// `graph`: whether b_dec's gradient through the encoder is wanted (see `encoder_terms`).
    /// `w_h`: W_enc already in bf16 (no graph: its gradient would not reach W_enc).
    fn pre_acts_as(
        &self,
        x_bd: &Tensor,
        n: usize,
        bf16: bool,
        graph: bool,
        w_h: Option<&Tensor>,
    ) -> Tensor {
        let (xc_bd, bias_n) = self.encoder_terms(x_bd, n, graph);
        let w_dn = self.w_enc.narrow(1, 0, n as i64);
        match bf16 {
            // The bias goes into the product's epilogue (cuBLASLt's bias add on CUDA).
            true => {
                let h = Kind::BFloat16;
                let w_dn = match w_h {
                    Some(w) if !graph => w.narrow(1, 0, n as i64),
                    _ => w_dn.to_kind(h),
                };
                bias_n.to_kind(h).addmm(&xc_bd.to_kind(h), &w_dn)
            }
            false => xc_bd.matmul(&w_dn) + bias_n,
        }
    }

    /// The pre-activations of the first `n` latents are xc W_enc + bias: (xc [B, d], bias [n]).
    /// b_dec reaches them only through the zero term in `bias` (with `zero_term`), so the
    /// product's backward computes W_enc's gradient and skips d/d(x - b_dec), a second [B, n] x
    /// [n, d] product that would only be summed over the batch for b_dec. Without it (no graph,
    /// or `encoder_entries`, which makes b_dec's gradient itself) the bias skips a [d] x [d, n]
    /// product whose value is zero (0.15 ms a step on the H200 at the paper's width).
    fn encoder_terms(&self, x_bd: &Tensor, n: usize, zero_term: bool) -> (Tensor, Tensor) {
        let (n, c) = (n as i64, self.core as i64);
        let bd = self.b_dec.detach();
        let w_dn = self.w_enc.narrow(1, 0, n);
        let bias_n = self.b_enc.narrow(0, 0, n);
        // Zero in value (bit for bit), -W_enc in gradient: b_dec's part, as one [n] x [n, d]
        // product of the batch-summed gradient.
        let bias_n = match zero_term {
            true => bias_n + (&bd - &self.b_dec).matmul(&w_dn.detach()),
            false => bias_n.shallow_clone(),
        };
        // The core is anchored to x: its entries gain back b_dec W_enc, in the bias vector
        // rather than in a [B, n] copy.
        let bias_n = match c {
            0 => bias_n,
            _ => {
                let shift_c = self.b_dec.matmul(&self.w_enc.narrow(1, 0, c));
                let rest = bias_n.zeros_like().narrow(0, c, n - c);
                bias_n + Tensor::cat(&[shift_c, rest], 0)
            }
        };
        (x_bd - &bd, bias_n)
    }

    /// The training codes with their values' graph rebuilt from the entries alone (kernels/
    /// encoder_grad.cu): `codes` came from pre-activations computed without a graph, so the
    /// backward never makes the dense [B, W] gradient of the pre-activations nor multiplies it
    /// out. Float32 parameters. `sq`: see `kernels::encoder_entries` (its columns are the
    /// non-core latents': the core's gain a term through the bias's shift). A core block's
    /// values come from their own [B, d] x [d, c] product, through W_enc's core columns as a
    /// leaf (returned) whose gradient `LossOut::gradients` adds into W_enc's. `bf16`: the
    /// product that made the codes read x - b_dec in bf16; W_enc's gradient reads it so too.
    /// `sink`: see `kernels::encoder_entries`.
    fn codes_with_sparse_grad(
        &self,
        x_bd: &Tensor,
        codes: Codes,
        sq: Option<&Tensor>,
        bf16: bool,
        sink: Option<&Tensor>,
    ) -> (Codes, Option<Leaf>) {
        let (xc_bd, bias_f) = self.encoder_terms(x_bd, self.width(), false);
        let xc_bd = match bf16 {
            true => xc_bd.to_kind(Kind::BFloat16),
            false => xc_bd.contiguous(),
        };
        let vals = kernels::encoder_entries(
            &self.w_enc,
            &bias_f,
            &self.b_dec,
            &xc_bd,
            &codes.vals,
            &codes.rows,
            &codes.cols,
            sq,
            self.core as i64,
            sink,
        )
        .unwrap_or_else(|e| panic!("sparse encoder gradient: {e}"));
        // A place held passes no gradient back, as in `train_codes`.
        let vals = match &codes.live {
            Some(live) => vals.where_scalarother(live, 0.0),
            None => vals,
        };
        let Some(k) = codes.core else {
            return (Codes { vals, ..codes }, None);
        };
        let c = self.core as i64;
        let w_dc = Leaf::first(0, 1, &self.w_enc, c);
        // Anchored to x (`encoder_terms`), over the rows the product read (x - b_dec in bf16
        // with `bf16`, as the entries' gradient reads them). The values stay the product's, as
        // the entries' do; the gradient is this product's: pre - pre is 0.
        let x_read = match bf16 {
            true => xc_bd.to_kind(Kind::Float) + self.b_dec.detach(),
            false => x_bd.shallow_clone(),
        };
        let pre_bc = x_read.matmul(&w_dc.t) + self.b_enc.narrow(0, 0, c);
        let core_vals = k.vals.detach() + (&pre_bc - pre_bc.detach());
        let core = CoreCodes {
            vals: core_vals.where_scalarother(&k.on, 0.0),
            on: k.on,
        };
        let codes = Codes {
            vals,
            core: Some(core),
            ..codes
        };
        (codes, Some(w_dc))
    }

    /// b_enc in SAELens' form, (x - b_dec) W_enc + b_enc for every latent (for export): the
    /// core entries gain b_dec W_enc.
    pub fn b_enc_saelens(&self) -> Tensor {
        self.b_enc_shifted(0, self.core, 1.0)
    }

    /// b_enc anchored to x for every latent, x W_enc + b_enc (for a core file): the non-core
    /// entries lose b_dec W_enc.
    pub fn b_enc_anchored(&self) -> Tensor {
        self.b_enc_shifted(self.core, self.width(), -1.0)
    }

    /// A detached copy of b_enc with sign * b_dec W_enc added on latents lo..hi.
    fn b_enc_shifted(&self, lo: usize, hi: usize, sign: f64) -> Tensor {
        let b = self.b_enc.detach().copy();
        let (lo, n) = (lo as i64, (hi - lo) as i64);
        if n > 0 {
            let w = self.w_enc.detach().narrow(1, lo, n);
            let _ = b
                .narrow(0, lo, n)
                .g_add_(&(self.b_dec.detach().matmul(&w) * sign));
        }
        b
    }

    /// Training-time codes from pre-activations [B, W], differentiable through them: the core
    /// JumpReLU at its carried thresholds, the non-core latents BatchTopK (the k*B largest
    /// positive pre-activations of the batch). Built as sparse entries, without the dense
    /// [B, W] masks and copies that a GPU step would otherwise spend its memory bandwidth on.
    pub fn train_codes(&self, pre_bw: &Tensor) -> Codes {
        let (b, w, c) = (pre_bw.size()[0], pre_bw.size()[1], self.core as i64);
        let p = pre_bw.detach();
        let keep = (self.k as i64 * b).min(b * (w - c));
        let e = train_entries(&p, c, (c > 0).then_some(&self.core_threshold), keep);
        // Codes in the model's kind whatever the pre-activations' (bf16 with a bf16 encoder).
        let kind = self.w_dec.kind();
        let vals = pre_bw.index(&[Some(&e.rows), Some(&e.cols)]).to_kind(kind);
        let core = e.core_on.map(|on| CoreCodes {
            vals: pre_bw
                .narrow(1, 0, c)
                .to_kind(kind)
                .where_scalarother(&on, 0.0),
            on,
        });
        let codes = match e.padded {
            // Row-major already; a place held (a non-positive or NaN entry) becomes a zero
            // code, which passes no gradient back.
            true => {
                let live = vals.detach().gt(0.0);
                Codes {
                    rows: e.rows,
                    cols: e.cols,
                    vals: vals.where_scalarother(&live, 0.0),
                    live: Some(live),
                    batch: b,
                    core: None,
                }
            }
            false => Codes::sorted(e.rows, e.cols, vals, w, b),
        };
        Codes { core, ..codes }
    }

    /// Inference codes without batch statistics: the core is JumpReLU at its carried
    /// thresholds, the non-core latents at the learned threshold.
    pub fn encode(&self, x_bd: &Tensor) -> Tensor {
        self.encode_first(x_bd, self.width())
    }

    /// `encode` of the first `n` latents only (n >= core): attribution's candidates.
    pub fn encode_first(&self, x_bd: &Tensor, n: usize) -> Tensor {
        let post_bn = self.relu_acts_first(x_bd, n);
        let c = self.core as i64;
        let nc_bn = post_bn.narrow(1, c, n as i64 - c);
        let on = nc_bn.gt(self.threshold.max(0.0)).to_kind(nc_bn.kind());
        Tensor::cat(&[post_bn.narrow(1, 0, c), nc_bn * on], 1)
    }

    /// Whether the decoder runs as kernels/bag_decode.cu.
    fn fused_decode(&self) -> bool {
        self.w_dec.kind() == Kind::Float && kernels::use_fused(&self.w_dec, &kernels::BAG_DECODE)
    }

    pub fn decode(&self, f_bf: &Tensor) -> Tensor {
        let codes = Codes::of(f_bf);
        self.decode_bags(&codes, &codes.rows, codes.batch, None, None, None, false) + &self.b_dec
    }

    /// sum of f_j W_dec[j] over each bag's entries, [n_bags, d], touching only the active
    /// latents' rows: k*B of them, not B*width as a dense matmul would (64x fewer at k 1024
    /// of 65k). `bag` gives each entry's bag, non-decreasing (entries are in row-major order).
    /// `embedding_bag` differentiates both the codes and the rows it reads. `stats`: see
    /// `kernels::bag_decode`, which alone fills them. `w_h`: W_dec in bf16 (its cast), which
    /// the forward reads instead (`TrainConfig::decoder_bf16`); the gradients are W_dec's.
    /// `sink`: W_dec's gradient in bf16 (`kernels::bag_decode`; the kernel's path only).
    /// `out16`: the sums in bf16, and so their gradient (`kernels::bag_decode`; likewise).
    #[allow(clippy::too_many_arguments)]
    fn decode_bags(
        &self,
        codes: &Codes,
        bag: &Tensor,
        n_bags: i64,
        stats: Option<&Tensor>,
        w_h: Option<&Tensor>,
        sink: Option<&Tensor>,
        out16: bool,
    ) -> Tensor {
        let w = &self.w_dec;
        assert!(
            (sink.is_none() && !out16) || self.fused_decode(),
            "a bf16 W_dec gradient or bf16 sums off the kernel"
        );
        if self.fused_decode() {
            // One pass a direction, and a W_dec gradient written once (kernels/bag_decode.cu).
            let c = |t: &Tensor| t.contiguous();
            return kernels::bag_decode(
                w,
                &c(&codes.vals),
                &c(&codes.cols),
                &c(bag),
                n_bags,
                stats,
                w_h,
                sink,
                out16,
            )
            .unwrap_or_else(|e| panic!("sparse decode: {e}"));
        }
        let counts = counts(bag, n_bags);
        let offsets = counts.cumsum(0, Kind::Int64) - &counts;
        let bags = |w: &Tensor| {
            Tensor::embedding_bag(
                w,
                &codes.cols,
                &offsets,
                false,
                0, // sum
                false,
                Some(&codes.vals),
                false,
            )
            .0
        };
        let x_nd = bags(w);
        match w_h {
            // The rounded rows' sums forward, W_dec's own backward, as the kernel's (a second
            // gather, on the CPU only).
            Some(h) => &x_nd + (bags(&h.to_kind(w.kind())) - &x_nd).detach(),
            None => x_nd,
        }
    }

    /// The Matryoshka loss: the mean over the batch and the prefixes p = 1..=G of
    /// sum_d (x - x_hat_p)^2, from `decode_parts`' [B, 1 + G, d] (and `core_bd`, the core's
    /// part where it was decoded as a block). Prefix p's reconstruction is b_dec + core +
    /// groups 1..=p, so its error is the residual after the core with groups 1..=p taken off
    /// in turn.
    pub fn matryoshka_l2(
        &self,
        x_bd: &Tensor,
        parts_bgd: &Tensor,
        core_bd: Option<&Tensor>,
    ) -> Tensor {
        let g = self.groups.len() as i64;
        let n = x_bd.size()[0] as f64;
        let (x, b) = (x_bd, &self.b_dec);
        if x.kind() == Kind::Float && kernels::use_fused(x, &kernels::MATRYOSHKA_L2) {
            // One pass each way (kernels/matryoshka_l2.cu), where the chain below is about 20.
            let c = |t: &Tensor| t.contiguous();
            return kernels::matryoshka_l2(&c(x), b, &c(parts_bgd), core_bd.map(c).as_ref())
                .unwrap_or_else(|e| panic!("matryoshka loss: {e}"))
                .sum(None)
                / (n * g as f64);
        }
        // G passes over [B, d], where a cumsum over the parts cost a cat, a scan and, in the
        // backward, two flips (a fifth of a CPU step at width 1,024).
        let mut r_bd = match core_bd {
            Some(core) => x - core - parts_bgd.select(1, 0) - b,
            None => x - parts_bgd.select(1, 0) - b,
        };
        let mut l2 = x.zeros_like().sum(None);
        // Not `-=`/`+=`: tch's are in place, and autograd keeps each residual for its square.
        #[allow(clippy::assign_op_pattern)]
        for p in 1..=g {
            r_bd = r_bd - parts_bgd.select(1, p);
            l2 = l2 + r_bd.square().sum(None);
        }
        l2 / (n * g as f64)
    }

    /// Each group's first latent, on the device: a part starts at each, and latents below the
    /// first group are the core's part.
    pub fn part_starts(&self) -> Tensor {
        let starts: Vec<i64> = self
            .groups
            .iter()
            .scan(self.core as i64, |lo, &m| {
                let at = *lo;
                *lo += m as i64;
                Some(at)
            })
            .collect();
        Tensor::from_slice(&starts).to_device(self.w_dec.device())
    }

    /// The core's and each group's part of the reconstruction, [B, 1 + groups, d], without
    /// b_dec, from one `embedding_bag` whose bags are (token, part): one gather of the active
    /// rows and one dense W_dec gradient in the backward, where a bag call per part made one
    /// each and autograd summed them. `starts`: `part_starts`; `stats`, `w_h`, `sink` and
    /// `out16` (the parts in bf16): see `decode_bags`.
    pub fn decode_parts(
        &self,
        codes: &Codes,
        starts: &Tensor,
        stats: Option<&Tensor>,
        w_h: Option<&Tensor>,
        sink: Option<&Tensor>,
        out16: bool,
    ) -> Tensor {
        let parts = 1 + self.groups.len() as i64;
        let part = codes.cols.bucketize(starts, false, true);
        // Parts are column ranges, so within a token the bags stay in order.
        let bag = &codes.rows * parts + part;
        self.decode_bags(codes, &bag, codes.batch * parts, stats, w_h, sink, out16)
            .view([codes.batch, parts, self.d_in as i64])
    }

    /// Per-latent threshold for a JumpReLU export (on the CPU): the carried thresholds for the
    /// core, the learned threshold for the non-core latents.
    pub fn threshold_f(&self) -> Tensor {
        let t = Tensor::full(
            [self.width() as i64],
            self.threshold.max(0.0),
            (Kind::Float, Device::Cpu),
        );
        t.narrow(0, 0, self.core as i64).copy_(
            &self
                .core_threshold
                .to_kind(Kind::Float)
                .to_device(Device::Cpu),
        );
        t
    }
}

/// The training codes' entries of the pre-activations `p` [B, W] (rows, columns): the `keep`
/// largest positive entries outside the core's columns 0..c (BatchTopK: the set one top-k over
/// them gives, ties aside), and beside them the core's JumpReLU (p > `core_thr` [c] and p > 0)
/// as a [B, c] mask (`Entries::core_on`). A core latent fires on a large share of tokens: as
/// entries the core's would be a row through the sparse decoder each, often more of them than
/// k*B (half the tokens at METHOD.md's c = 197 and B = 4,096 are 403k entries beside 262k),
/// and their count would vary, so the list's size would wait for the device; as a block they
/// cost [B, c] x [c, d] products. DMSAE_CORE_BLOCK=0 lists the core's entries ahead of
/// BatchTopK's instead (for timing; then the selection waits for the host).
///
/// A top-k over every 16th token's entries yields a cut that about 2 * keep entries reach;
/// those go through the exact top-k (over 16.7M entries, batch 1,024 and width 16k, a quarter
/// of the full top-k's time on the 2-core CPU). The sample is whole rows, which copy out as
/// contiguous runs: every 16th column read every cache line of the batch's pre-activations
/// (0.14 ms of a step on the H200). The non-core columns are never copied out (with a core
/// they are not contiguous, and flattening them copied the batch's pre-activations). Falls
/// back to the full top-k when the cut is not positive (fewer positive entries than needed) or
/// fewer than `keep` reach it.
///
/// Without the host (`Entries::padded`: bf16, on CUDA or emulated) the list is
/// `kernels::top_entries`': nothing is read back, so the step is queued whole while the device
/// works. Its `keep` entries are in row-major order (ties taken in that order too) and may end
/// in non-positive entries, when fewer than `keep` are positive: places that the codes hold at
/// zero.
fn train_entries(p: &Tensor, c: i64, core_thr: Option<&Tensor>, keep: i64) -> Entries {
    const STRIDE: i64 = 16;
    let (b, w) = (p.size()[0], p.size()[1]);
    let noncore = p.narrow(1, c, w - c);
    let sampled = keep > 0 && b * (w - c) >= 8 * STRIDE * keep;
    let sampled_cut = || {
        let sample = noncore.slice(0, 0, b, STRIDE).reshape([-1]);
        let m = (2 * keep / STRIDE + 16).min(sample.size()[0]);
        sample.topk(m, 0, true, false).0.min()
    };
    let core_on = core_thr.map(|t| {
        let pc = p.narrow(1, 0, c);
        pc.gt_tensor(t).logical_and(&pc.gt(0.0))
    });
    // Listed with the entries (DMSAE_CORE_BLOCK=0), or a block beside them.
    let (core_listed, core_on) = match knob_off("DMSAE_CORE_BLOCK") {
        true => (core_on, None),
        false => (None, core_on),
    };
    let entries = |rows, cols, padded| Entries {
        rows,
        cols,
        padded,
        core_on,
    };
    // DMSAE_HOSTLESS_SELECT=0: the candidates' path below, with its wait (for timing).
    if keep > 0
        && core_listed.is_none()
        && p.kind() == Kind::BFloat16
        && p.is_contiguous()
        && kernels::use_fused(p, &kernels::SELECT)
        && !knob_off("DMSAE_HOSTLESS_SELECT")
    {
        let cut = match sampled {
            true => sampled_cut().to_kind(Kind::Float),
            false => Tensor::zeros([], (Kind::Float, p.device())),
        };
        // DMSAE_SELECT_SLOTS=0: every chunk of p read again to count and write (for timing).
        let slots = knob_off("DMSAE_SELECT_SLOTS").then_some(0);
        let (rows, cols) = kernels::top_entries(p, c, &cut, keep, slots)
            .unwrap_or_else(|e| panic!("BatchTopK entries: {e}"));
        return entries(rows, cols, true);
    }
    let core_listed = core_listed.as_ref();
    if sampled {
        let n_core = match core_listed {
            Some(on) => on.sum(Kind::Int64),
            None => Tensor::zeros([], (Kind::Int64, p.device())),
        };
        // The cut to the host (the size of `nonzero` below waits for the device anyway): a
        // comparison with a number runs vectorised, one with a 0-d device tensor did not (0.6
        // ms over 268M bf16 entries on the H200). The cut is one of p's values, so exact in its
        // kind, and so is the core's count in float64. kernels/select.cu reads the cut on the
        // device and counts its candidates before the host waits, so the count comes back in
        // the same read and the host waits once, not twice.
        let cut_t = sampled_cut();
        // A block's thresholds lie above every value: select.cu lists none of its entries.
        let block_thr = (c > 0 && core_listed.is_none())
            .then(|| Tensor::full([c], f64::INFINITY, (Kind::Float, p.device())));
        let candidates =
            (kernels::use_fused(p, &kernels::SELECT) && p.is_contiguous()).then(|| {
                let thr = block_thr.as_ref().or(core_thr);
                kernels::Candidates::count(p, c, thr, &cut_t.to_kind(Kind::Float))
                    .unwrap_or_else(|e| panic!("BatchTopK candidates: {e}"))
            });
        let total = candidates
            .as_ref()
            .map_or(Tensor::zeros([], (Kind::Int64, p.device())), |k| k.total());
        let read = Tensor::stack(&[cut_t, n_core, total].map(|t| t.to_kind(Kind::Double)), 0);
        let [cut, n_core, total] =
            <[f64; 3]>::try_from(Vec::<f64>::try_from(read.to_device(Device::Cpu)).expect("f64"))
                .expect("three values");
        if cut > 0.0 {
            // The candidates in row-major order.
            let (rows, cols) = match candidates {
                Some(k) => k
                    .write(total as i64)
                    .unwrap_or_else(|e| panic!("BatchTopK candidates: {e}")),
                None => {
                    let on = p.ge(cut);
                    let mut on_c = on.narrow(1, 0, c);
                    match core_listed {
                        Some(core) => on_c.copy_(core),
                        None => _ = on_c.fill_(0),
                    }
                    let nz = on.nonzero();
                    (nz.select(1, 0), nz.select(1, 1))
                }
            };
            let n_core = n_core as i64;
            if rows.size()[0] - n_core >= keep {
                // Core entries ahead of every candidate, then the largest candidates, all of
                // which reach a positive cut.
                let rank = p
                    .index(&[Some(&rows), Some(&cols)])
                    .masked_fill(&cols.lt(c), f64::INFINITY);
                let (_, j) = rank.topk(keep + n_core, 0, true, false);
                return entries(rows.index_select(0, &j), cols.index_select(0, &j), false);
            }
        }
    }
    let (v, i) = noncore.reshape([-1]).topk(keep, 0, true, false);
    let i = i.masked_select(&v.gt(0.0));
    let (rows, cols) = (i.floor_divide_scalar(w - c), i.remainder(w - c) + c);
    match core_listed {
        None => entries(rows, cols, false),
        Some(on) => {
            let nz = on.nonzero();
            entries(
                Tensor::cat(&[nz.select(1, 0), rows], 0),
                Tensor::cat(&[nz.select(1, 1), cols], 0),
                false,
            )
        }
    }
}

/// `train_entries`' list: (rows, cols) of the entries in row-major order, or (not `padded`) in
/// any order.
struct Entries {
    rows: Tensor,
    cols: Tensor,
    /// `kernels::top_entries`' fixed-size list, whose places may hold non-positive entries.
    padded: bool,
    /// [B, c] bool: the core's JumpReLU, where the list leaves the core out (a core, as a
    /// block).
    core_on: Option<Tensor>,
}

/// Whether a path's knob turns it off: its variable set to 0 (for timing it against the path
/// it replaced), or, in tests, `tests_off` on this thread (a variable would reach the tests
/// running beside it).
fn knob_off(var: &'static str) -> bool {
    #[cfg(test)]
    if TESTS_OFF.with(|o| o.borrow().contains(&var)) {
        return true;
    }
    std::env::var(var).is_ok_and(|v| v == "0")
}

#[cfg(test)]
thread_local! {
    static TESTS_OFF: std::cell::RefCell<Vec<&'static str>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A parameter's bf16 copy (`Trainer::w_enc_h`, `w_dec_h`), if no ATen op has changed the
/// parameter since the update wrote it: the version counter is still the one recorded then.
fn current_copy<'a>(copy: &'a Option<(Tensor, i64)>, of: &Tensor) -> Option<&'a Tensor> {
    copy.as_ref()
        .filter(|(_, v)| *v == kernels::version(of))
        .map(|(h, _)| h)
}

/// Where the update writes `of`'s bf16 copy (made on first use), or null when `on` is false.
fn copy_to_write(copy: &mut Option<(Tensor, i64)>, on: bool, of: &Tensor) -> *mut std::ffi::c_void {
    if on && copy.is_none() {
        *copy = Some((Tensor::empty(of.size(), (Kind::BFloat16, of.device())), -1));
    }
    copy.as_ref()
        .map_or(std::ptr::null_mut(), |(h, _)| h.data_ptr())
}

/// What Adam divides the gradients by to clip their joint norm (a float64 scalar on the device)
/// to `clip`: norm / clip over it, 1 under it. Float64 on the device, so no step waits for it.
fn clip_divisor(norm: &Tensor, clip: f64) -> Tensor {
    (norm / clip).where_scalarother(&norm.gt(clip), 1.0)
}

/// How often each of 0..n occurs in `idx` (int64), as `bincount` with that length: a scatter
/// of ones, because CUDA's bincount reads the input's extremes back to the host first and so
/// stalls the step's queue.
fn counts(idx: &Tensor, n: i64) -> Tensor {
    counts_of(idx, n, None)
}

/// `counts` of the places where `on` [entries] (bool) holds; everywhere without it.
fn counts_of(idx: &Tensor, n: i64, on: Option<&Tensor>) -> Tensor {
    let ones = on.map_or_else(|| Tensor::ones_like(idx), |m| m.to_kind(Kind::Int64));
    Tensor::zeros([n], (Kind::Int64, idx.device())).index_add(0, idx, &ones)
}

/// ||dW_enc||^2 (a float64 scalar on the device) from `sq`, the encoder kernel's squares of its
/// non-core columns (`LossOut::enc_sq`), and the core's `core` columns read from `g_enc` itself
/// (a frozen core's zeroed by then).
fn w_enc_grad_sq(sq: &Tensor, g_enc: &Tensor, core: usize) -> Tensor {
    // (Squared in float32 from a bf16 gradient too.)
    let core = g_enc
        .narrow(1, 0, core as i64)
        .to_kind(Kind::Float)
        .square()
        .sum(Kind::Double);
    sq.sum(Kind::Double) + core
}

/// adam.cu's kernel-name suffix for a gradient of `g`'s kind (`_g16`: bf16).
fn g16_suffix(g: &Tensor) -> &'static str {
    match g.kind() {
        Kind::BFloat16 => "_g16",
        _ => "",
    }
}

/// The norm of all parameters' gradients from each one's norm: a float64 scalar on the device.
fn joint_norm(norms: &[Tensor]) -> Tensor {
    Tensor::stack(norms, 0).to_kind(Kind::Double).norm()
}

/// adam.cu's `AdamArgs`: one step's constants.
#[derive(Clone, Copy)]
#[repr(C)]
struct AdamArgs {
    inv_div: *const f32,
    step_size: f32,
    beta1: f32,
    beta2: f32,
    bc2_sqrt: f32,
    eps: f32,
    seed: u32,
}

/// The bf16 moments' rounding stream of parameter `i` at `step`, fixed by the run's seed.
fn rounding_seed(seed: u64, step: u64, i: usize) -> u32 {
    let mut h = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((i as u64) << 56);
    // splitmix64's finaliser
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (h ^ (h >> 31)) as u32
}

fn unit_rows(w: &Tensor) -> Tensor {
    w / w
        .square()
        .sum_dim_intlist(-1, true, None)
        .sqrt()
        .clamp_min(1e-12)
}

/// One step's loss terms (tensors keep the graph).
pub struct LossOut {
    pub loss: Tensor,
    pub l2: Tensor,
    pub auxk: Tensor,
    pub codes: Codes,
    pub x_hat_bd: Tensor,
    /// Filled by the backward: W_dec's gradient's figures for the update
    /// (`kernels::bag_decode_stats`), where the decoder's kernel makes all of that gradient.
    pub dec_stats: Option<Tensor>,
    /// Filled by the backward: the squared norm of W_enc's gradient's non-core columns in
    /// parts (`kernels::encoder_grad_sq`), where the sparse encoder gradient makes it.
    pub enc_sq: Option<Tensor>,
    /// Filled by the backward: W_enc's gradient in bf16 (`Trainer::encoder_grad_bf16`),
    /// which `gradients` gives as W_enc's.
    enc_sink: Option<Tensor>,
    /// The same for W_dec (`Trainer::decoder_grad_bf16`).
    dec_sink: Option<Tensor>,
    /// Parameters' rows and columns read as leaves of their own: AuxK's dead latents'
    /// (`Trainer::auxk`), a core block's (`Trainer::loss_timed`).
    leaves: Vec<Leaf>,
}

/// Some rows or columns of a parameter (`Sae::params`' `param`) along `dim`, detached, a leaf
/// whose gradient `LossOut::gradients` adds into the parameter's in place: through
/// `index_select` or `narrow` the backward would make a zeroed gradient of the whole parameter
/// for them and add it to the kernels' (about 2.4 GB a parameter a step at the paper's sizes).
struct Leaf {
    param: usize,
    dim: i64,
    /// Which rows or columns; None: the first ones (a view).
    index: Option<Tensor>,
    t: Tensor,
}

impl Leaf {
    /// The first `n` along `dim` of parameter `param`, `p`.
    fn first(param: usize, dim: i64, p: &Tensor, n: i64) -> Leaf {
        let t = p.detach().narrow(dim, 0, n).set_requires_grad(true);
        Leaf {
            param,
            dim,
            index: None,
            t,
        }
    }

    /// The rows or columns `index` along `dim` of parameter `param`, `p` (a copy).
    fn picked(param: usize, dim: i64, p: &Tensor, index: &Tensor) -> Leaf {
        let t = p.detach().index_select(dim, index).set_requires_grad(true);
        Leaf {
            param,
            dim,
            index: Some(index.shallow_clone()),
            t,
        }
    }

    /// How many rows or columns.
    fn len(&self) -> i64 {
        self.t.size()[self.dim as usize]
    }

    /// `g`, this leaf's gradient, added into its parameter's gradient `into`.
    fn add_into(&self, into: &Tensor, g: &Tensor) {
        // (`index_add_` wants the kinds equal: W_enc's gradient may be bf16.)
        let g = &g.to_kind(into.kind());
        let _ = match &self.index {
            Some(i) => into.shallow_clone().index_add_(self.dim, i, g),
            None => self.of(into).g_add_(g),
        };
    }

    /// This leaf's rows or columns of `of` (a view for the first ones).
    fn of(&self, of: &Tensor) -> Tensor {
        match &self.index {
            Some(i) => of.index_select(self.dim, i),
            None => of.narrow(self.dim, 0, self.len()),
        }
    }

    /// `v` written into this leaf's places along `dim` of `into`.
    fn put(&self, into: &Tensor, dim: i64, v: &Tensor) {
        match &self.index {
            Some(i) => {
                let _ = into.shallow_clone().index_copy_(dim, i, v);
            }
            None => into.narrow(dim, 0, self.len()).copy_(v),
        }
    }
}

impl LossOut {
    /// The loss's gradients of `params` (`Sae::params`: W_enc, b_enc, W_dec, b_dec), the
    /// leaves' added in place.
    pub fn gradients(&self, params: [&Tensor; 4]) -> Vec<Tensor> {
        let mut inputs = params.to_vec();
        inputs.extend(self.leaves.iter().map(|l| &l.t));
        let mut g = Tensor::run_backward(&[&self.loss], &inputs, false, false);
        let from_leaves = g.split_off(params.len());
        tch::no_grad(|| {
            for (i, sink) in [(0, &self.enc_sink), (2, &self.dec_sink)] {
                let Some(sink) = sink else { continue };
                // The kernel's gradient went to the sink; any other path's (none on the
                // kernels' paths) is added to it.
                if g[i].defined() {
                    let _ = sink.shallow_clone().g_add_(&g[i]);
                }
                g[i] = sink.shallow_clone();
            }
            // (Undefined: the leaf was not reached, a zero gradient.)
            for (l, gl) in self.leaves.iter().zip(&from_leaves) {
                if gl.defined() {
                    self.add_leaf(l, gl, &g);
                }
            }
        });
        g
    }

    /// Leaf `l`'s gradient `gl` added into the parameters' gradients `g`, and what the kernels'
    /// backward made of those gradients without it mended: the encoder kernel's squares
    /// (`enc_sq`) of W_enc's non-core columns (AuxK's dead ones) change by their squares after
    /// less before; W_dec's rows' figures for the update (`dec_stats`; a core block's rows had
    /// no entry in the decoder's backward, AuxK's may have had some) are made again, whole in
    /// the first span.
    fn add_leaf(&self, l: &Leaf, gl: &Tensor, g: &[Tensor]) {
        let sq = |t: &Tensor| l.of(t).to_kind(Kind::Float).square().sum(Kind::Double);
        let mend_sq = match (l.param, &l.index, &self.enc_sq) {
            (0, Some(_), Some(s)) => Some((s, sq(&g[0]))),
            _ => None,
        };
        l.add_into(&g[l.param], gl);
        if let Some((s, before)) = mend_sq {
            let _ = s.narrow(0, 0, 1).g_add_(&(sq(&g[0]) - before));
        }
        let Some(st) = self.dec_stats.as_ref().filter(|_| l.param == 2) else {
            return;
        };
        let (g_d, w_d) = (l.of(&g[2]).to_kind(Kind::Double), l.t.to_kind(Kind::Double));
        let dot = |a: &Tensor, b: &Tensor| (a * b).sum_dim_intlist(1, false, None);
        let sums = Tensor::stack(&[dot(&g_d, &g_d), dot(&g_d, &w_d), dot(&w_d, &w_d)], 0);
        let spans = st.size()[0];
        l.put(&st.select(0, 0), 1, &sums);
        let zeros = Tensor::zeros([spans - 1, 3, l.len()], (Kind::Double, st.device()));
        l.put(&st.narrow(0, 1, spans - 1), 2, &zeros);
    }
}

/// Figures of one step, in normalised units.
#[derive(Clone, Debug, Default)]
pub struct StepStats {
    pub loss: f64,
    pub l2: f64,
    pub auxk: f64,
    /// Mean over batch and dimensions of the squared error of the full reconstruction.
    pub mse: f64,
    /// Batch FVU: sum ||x - x_hat||^2 / sum ||x - mean_b x||^2.
    pub fvu: f64,
    pub l0_core: f64,
    pub l0_noncore: f64,
    pub grad_norm: f64,
    pub lr: f64,
    /// `Trainer::step` after this update (figures may be read a step late: `Trainer::queue`).
    pub step: u64,
}

/// A queued step's figures on their way to the host (`Trainer::queue`), with what turns them
/// into `StepStats`.
struct Pending {
    copy: kernels::HostCopies,
    step: u64,
    lr: f64,
    batch: i64,
    numel: i64,
}

// Where the figures vector (`Trainer::queue`) keeps the values the trainer itself reads.
const F_DEAD: usize = 8;
const F_SINCE_MAX: usize = 9;
const F_KEPT_MIN: usize = 10;

pub struct Trainer {
    pub sae: Sae,
    pub cfg: TrainConfig,
    pub step: u64,
    k_aux: usize,
    freeze_core: bool,
    /// Adam first and second moments, one per parameter.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Training tokens since each latent last fired (AuxK's dead set).
    since_fired_f: Tensor,
    /// How many latents `dead_f` marks, read back with the last step's figures: the next step
    /// sizes AuxK's columns (and, with none, takes W_enc's gradient norm and W_dec's figures
    /// from the kernels) without waiting for the device.
    /// Meaningless while `pending` holds the last step's figures (`queue` decides anew).
    n_dead: i64,
    /// An upper bound on the largest non-core `since_fired_f`: exact when read back, plus the
    /// tokens of each step queued since. Below `dead_tokens`, no latent is dead, and the next
    /// step needs no figures from the last one.
    since_max: i64,
    /// The last queued step's figures, not yet read.
    pending: Option<Pending>,
    /// `Sae::part_starts`, made once: a copy from the host waits for the device.
    part_starts: Tensor,
    /// Tokens on which each latent fired in the last step.
    fired_f: Tensor,
    /// The training encoder product in bf16 (`TrainConfig::encoder_bf16`; unset, it follows
    /// the device the run started on, and a checkpoint carries it to the resumed run).
    bf16: bool,
    /// W_enc in bf16 as the fused update left it (adam.cu writes it beside the float32 values),
    /// with W_enc's version then: the product without a graph reads it while no ATen op has
    /// changed W_enc since, instead of casting W_enc each step.
    w_enc_h: Option<(Tensor, i64)>,
    /// The training decoder's forward reads W_dec in bf16 (`TrainConfig::decoder_bf16`, as
    /// resolved; a checkpoint carries it to the resumed run).
    dec_bf16: bool,
    /// W_dec in bf16 as the fused update left it, with W_dec's version then (as `w_enc_h`).
    w_dec_h: Option<(Tensor, i64)>,
    /// W_enc's gradient in bf16 where its kernel and the fused update run
    /// (`TrainConfig::encoder_grad_bf16`, as resolved).
    enc_grad_bf16: bool,
    /// The same for W_dec (`TrainConfig::decoder_grad_bf16`).
    dec_grad_bf16: bool,
    /// The Matryoshka parts and their gradient in bf16 where the decoder's kernel runs
    /// (`TrainConfig::parts_bf16`, as resolved).
    parts16: bool,
}

impl Trainer {
    /// `core_given`: the core came from a file, so `cfg.core_frozen` applies to it.
    pub fn new(sae: Sae, cfg: TrainConfig, core_given: bool) -> Trainer {
        let bf16_moments = cfg.adam_bf16_moments.unwrap_or_else(|| {
            sae.device().is_cuda() && kernels::use_fused(&sae.w_dec, &kernels::ADAM)
        });
        let moments = match bf16_moments {
            true => Kind::BFloat16,
            false => sae.w_dec.kind(),
        };
        let zeros = |p: &Tensor| Tensor::zeros(p.size(), (moments, p.device()));
        let (m, v) = (
            sae.params().map(zeros).into(),
            sae.params().map(zeros).into(),
        );
        let mut t = Trainer {
            k_aux: cfg.k_aux.unwrap_or(sae.d_in / 2).max(1),
            freeze_core: core_given && cfg.core_frozen,
            since_fired_f: Tensor::zeros([sae.width() as i64], (Kind::Int64, sae.device())),
            fired_f: Tensor::zeros([sae.width() as i64], (Kind::Int64, sae.device())),
            n_dead: 0,
            since_max: 0,
            pending: None,
            part_starts: sae.part_starts(),
            bf16: cfg.encoder_bf16.unwrap_or(sae.device().is_cuda()),
            w_enc_h: None,
            enc_grad_bf16: cfg.encoder_grad_bf16.unwrap_or(sae.device().is_cuda()),
            dec_grad_bf16: cfg.decoder_grad_bf16.unwrap_or(sae.device().is_cuda()),
            parts16: cfg.parts_bf16.unwrap_or(sae.device().is_cuda()),
            dec_bf16: cfg.decoder_bf16.unwrap_or_else(|| {
                sae.device().is_cuda() && kernels::use_fused(&sae.w_dec, &kernels::BAG_DECODE)
            }),
            w_dec_h: None,
            sae,
            cfg,
            step: 0,
            m,
            v,
        };
        // Not 0 when dead_tokens is 0.
        t.recount_dead();
        t
    }

    /// Non-core latents that have not fired for `dead_tokens` (the core is exempt from AuxK:
    /// it is never sparsified away, ours).
    pub fn dead_f(&self) -> Tensor {
        let dead = self.since_fired_f.ge(self.cfg.dead_tokens as i64);
        let _ = dead.narrow(0, 0, self.sae.core as i64).fill_(0);
        dead
    }

    fn count_dead(&self) -> Tensor {
        self.dead_f().sum(Kind::Int64)
    }

    /// `n_dead` and `since_max` from the counters, where they were set other than by a step.
    fn recount_dead(&mut self) {
        self.pending = None;
        let both = Tensor::stack(&[self.count_dead(), self.noncore_since_max()], 0);
        let both = Vec::<i64>::try_from(both.to_device(Device::Cpu)).expect("i64");
        (self.n_dead, self.since_max) = (both[0], both[1]);
    }

    /// The largest non-core `since_fired_f` (0 without non-core latents), on the device.
    fn noncore_since_max(&self) -> Tensor {
        let (c, w) = (self.sae.core as i64, self.sae.width() as i64);
        match w > c {
            true => self.since_fired_f.narrow(0, c, w - c).max(),
            false => Tensor::zeros([], (Kind::Int64, self.since_fired_f.device())),
        }
    }

    /// Matryoshka loss: the mean over prefixes p = 1..=G (core + first p non-core groups) of
    /// sum_d (x - x_hat_p)^2, averaged over the batch; plus auxk_alpha * AuxK.
    pub fn loss(&self, x_bd: &Tensor) -> LossOut {
        // AuxK's dead count is the last read's.
        assert!(
            self.pending.is_none(),
            "Trainer::loss with a step's figures unread"
        );
        self.loss_timed(x_bd, self.bf16, true, &mut Laps::off())
    }

    /// The training-time (BatchTopK) reconstruction, in float32 whatever training uses and
    /// without AuxK: evaluation's.
    pub fn batchtopk_x_hat(&self, x_bd: &Tensor) -> Tensor {
        self.loss_timed(x_bd, false, false, &mut Laps::off())
            .x_hat_bd
    }

    fn loss_timed(&self, x_bd: &Tensor, bf16: bool, auxk: bool, laps: &mut Laps) -> LossOut {
        let s = &self.sae;
        let n_dead = if auxk { self.n_dead } else { 0 };
        // AuxK reads the dead latents' pre-activations: a few from a product of their own
        // beside the sparse path; many (a quarter of the latents: a guess, not timed) from the
        // dense graph, whose product over all latents then costs less than two over most.
        // The sparse gradient: encoder_grad.cu's on CUDA, the same sums as a loop on the CPU
        // (csrc/autograd.cpp; DMSAE_SPARSE_ENCODER_GRAD=0 there: the dense graph, for timing).
        let sparse_kernel = kernels::use_fused(&s.w_enc, &kernels::ENCODER_GRAD);
        let sparse_grad = n_dead * 4 <= s.width() as i64
            && s.w_enc.kind() == Kind::Float
            && (sparse_kernel
                || s.w_enc.device() == Device::Cpu && !knob_off("DMSAE_SPARSE_ENCODER_GRAD"));
        let pre_bf = match sparse_grad {
            true => {
                let w_h = current_copy(&self.w_enc_h, &s.w_enc);
                tch::no_grad(|| s.pre_acts_as(x_bd, s.width(), bf16, false, w_h))
            }
            false => s.pre_acts_as(x_bd, s.width(), bf16, true, None),
        };
        laps.lap(0);
        let codes = s.train_codes(&pre_bf);
        // (AuxK's gradient reaches W_enc's dead columns outside the kernel: `LossOut::add_leaf`
        // mends the squares.)
        let enc_sq = (sparse_grad && sparse_kernel).then(|| kernels::encoder_grad_sq(&s.w_enc));
        // A training step's W_enc gradient in bf16, which the kernel writes and the fused
        // update reads (`LossOut::gradients` hands it on as W_enc's); `encoder_grad_bf16`
        // asks both kernels.
        let enc_sink = (auxk && sparse_grad && self.encoder_grad_bf16())
            .then(|| Tensor::empty(s.w_enc.size(), (Kind::BFloat16, s.w_enc.device())));
        let (codes, w_enc_core) = match sparse_grad {
            true => s.codes_with_sparse_grad(x_bd, codes, enc_sq.as_ref(), bf16, enc_sink.as_ref()),
            false => (codes, None),
        };
        let mut leaves: Vec<Leaf> = w_enc_core.into_iter().collect();
        laps.lap(1);

        // W_dec's gradient's figures for the update from the decoder kernel's backward (those
        // of the rows that leaves add to, AuxK's and a core block's, `LossOut::add_leaf` makes
        // again).
        let dec_stats = (auxk && s.fused_decode()).then(|| kernels::bag_decode_stats(&s.w_dec));
        // Training's decoder over W_dec's bf16 copy: the update's, while current, else a cast.
        let w_dec_h = (auxk && self.dec_bf16).then(|| {
            current_copy(&self.w_dec_h, &s.w_dec).map_or_else(
                || s.w_dec.detach().to_kind(Kind::BFloat16),
                Tensor::shallow_clone,
            )
        });
        // W_dec's gradient in bf16, as W_enc's (where the decoder's figures come from its
        // kernel: the update's projection reads them, not the gradient).
        let dec_sink = (dec_stats.is_some() && self.decoder_grad_bf16())
            .then(|| Tensor::empty(s.w_dec.size(), (Kind::BFloat16, s.w_dec.device())));
        let parts_bgd = s.decode_parts(
            &codes,
            &self.part_starts,
            dec_stats.as_ref(),
            w_dec_h.as_ref(),
            dec_sink.as_ref(),
            self.parts_bf16(),
        );
        // A core block: its part of the reconstruction is one product, in float32 (the entries'
        // decoder may read bf16 rows).
        let core_bd = codes.core.as_ref().map(|k| {
            let w_cd = Leaf::first(2, 0, &s.w_dec, s.core as i64);
            let core_bd = k.vals.matmul(&w_cd.t);
            leaves.push(w_cd);
            core_bd
        });
        let l2 = s.matryoshka_l2(x_bd, &parts_bgd, core_bd.as_ref());
        // In x's kind: bf16 parts (`parts_bf16`) summed in float32.
        let x_hat_bd = parts_bgd.sum_dim_intlist(1, false, x_bd.kind()) + &s.b_dec;
        let x_hat_bd = match &core_bd {
            Some(core) => x_hat_bd + core,
            None => x_hat_bd,
        };

        laps.lap(2);
        let (auxk, dead_leaves) = match auxk {
            true => {
                let e_bd = (x_bd - &x_hat_bd).detach();
                // Without a graph on the pre-activations, the dead latents' are made again.
                let pre = (!sparse_grad).then_some(&pre_bf);
                self.auxk(x_bd, &e_bd, pre, bf16, n_dead)
            }
            false => (x_bd.zeros_like().sum(None), Vec::new()),
        };
        leaves.extend(dead_leaves);
        laps.lap(3);
        LossOut {
            loss: &l2 + &auxk * self.cfg.auxk_alpha,
            l2,
            auxk,
            codes,
            x_hat_bd,
            dec_stats,
            enc_sq,
            enc_sink,
            dec_sink,
            leaves,
        }
    }

    /// AuxK (Gao et al.): the top k_aux dead latents of each token reconstruct the residual
    /// `e_bd`, without b_dec; the error is divided by the residual's variance about its batch
    /// mean. `n_dead`: how many latents `dead_f` marks. Only their columns are read: from
    /// `pre_bf` (the pre-activations with their graph) or, without it, from their own product
    /// (in bf16 with `bf16`), so a few dead latents cost a few columns, not a dense graph over
    /// all W.
    fn auxk(
        &self,
        x_bd: &Tensor,
        e_bd: &Tensor,
        pre_bf: Option<&Tensor>,
        bf16: bool,
        n_dead: i64,
    ) -> (Tensor, Vec<Leaf>) {
        if n_dead == 0 {
            return (e_bd.zeros_like().sum(None), Vec::new());
        }
        let s = &self.sae;
        let dead_f = self.dead_f();
        // The n_dead marked latents in order, without `nonzero`'s wait for its size.
        let dead = dead_f
            .to_kind(Kind::Float)
            .topk(n_dead, 0, true, false)
            .1
            .sort(0, false)
            .0;
        // The dead latents' W_dec rows (and, without `pre_bf`, W_enc columns) as leaves.
        let w_dec_nd = Leaf::picked(2, 0, &s.w_dec, &dead);
        let (pre_bn, w_enc_dn) = match pre_bf {
            Some(p) => (p.index_select(1, &dead), None),
            None => {
                let w_dn = Leaf::picked(0, 1, &s.w_enc, &dead);
                (s.noncore_pre_acts(x_bd, &dead, &w_dn.t, bf16), Some(w_dn))
            }
        };
        // A count behind the marks (never, if `n_dead` is current) picks no live latent.
        let on = dead_f.index_select(0, &dead).to_kind(pre_bn.kind());
        let dead_bn = pre_bn.relu() * on.unsqueeze(0);
        let (acts_bk, at_bk) = dead_bn.topk((self.k_aux as i64).min(n_dead), -1, true, false);
        let kind = s.w_dec.kind();
        let e_hat_bd = if self.auxk_dense() {
            // In the pre-activations' kind: bf16 with a bf16 encoder.
            let a_bn = dead_bn.zeros_like().scatter(1, &at_bk, &acts_bk);
            a_bn.matmul(&w_dec_nd.t.to_kind(a_bn.kind())).to_kind(kind)
        } else {
            let acts_bk = acts_bk.to_kind(kind);
            // Each token's k_aux rows, as one bag each.
            let (b, k) = (at_bk.size()[0], at_bk.size()[1]);
            let idx = at_bk.reshape([-1]);
            Tensor::embedding_bag(
                &w_dec_nd.t,
                &idx,
                &Tensor::arange_start_step(0, b * k, k, (Kind::Int64, idx.device())),
                false,
                0,
                false,
                Some(acts_bk.reshape([-1])),
                false,
            )
            .0
        };
        let err = (e_bd - e_hat_bd)
            .square()
            .sum_dim_intlist(-1, false, None)
            .mean(None);
        let var = (e_bd - e_bd.mean_dim(0, true, None))
            .square()
            .sum_dim_intlist(-1, false, None)
            .mean(None);
        let leaves = [Some(w_dec_nd), w_enc_dn].into_iter().flatten().collect();
        ((err / var).nan_to_num(0.0, 0.0, 0.0), leaves)
    }

    /// One update and its figures: `queue`, then `settle`.
    pub fn update(&mut self, x_bd: &Tensor) -> StepStats {
        let read = self.queue(x_bd);
        // With DMSAE_DEFER_FIGURES=0, `queue` has read this step's already.
        self.settle().or(read).expect("the update just queued")
    }

    /// One update, stages in order: b_dec init (step 0), loss and backward, frozen core,
    /// drop the gradient parallel to decoder rows, clip, Adam, renormalise the decoder,
    /// dead-latent and threshold bookkeeping. Its figures are read on the next call (or by
    /// `settle`), so the host queues the next step while the device finishes this one; what
    /// the next step needs of them, whether any latent is dead, comes from `since_max` unless
    /// a latent may have just died. Returns the figures read during this call: the previous
    /// step's (`DMSAE_DEFER_FIGURES=0`: this step's, read at its end, one wait more a step).
    /// Either way the steps and the threshold are those of reading each step's figures at once.
    pub fn queue(&mut self, x_bd: &Tensor) -> Option<StepStats> {
        let mut read = None;
        if self.pending.is_some() {
            match self.since_max < self.cfg.dead_tokens as i64 {
                true => self.n_dead = 0,
                false => read = self.settle(),
            }
        }
        if self.step == 0 {
            // Ours: the batch mean (dictionary_learning uses the geometric median).
            tch::no_grad(|| self.sae.b_dec.copy_(&x_bd.mean_dim(0, false, None)));
        }
        let mut laps = Laps::start(self.sae.device());
        let out = self.loss_timed(x_bd, self.bf16, true, &mut laps);
        let mut g = out.gradients(self.sae.params());
        laps.lap(4);
        let lr = self.cfg.lr_at(self.step);
        let norm = tch::no_grad(|| {
            let c = self.sae.core as i64;
            if self.freeze_core && c > 0 {
                let _ = g[0].narrow(1, 0, c).zero_();
                let _ = g[1].narrow(0, 0, c).zero_();
            }
            // Each kernel wants its gradient laid out as its parameter (row-major here).
            for t in g.iter_mut().filter(|t| !t.is_contiguous()) {
                *t = t.contiguous();
            }
            let (dec_stats, enc_sq) = (out.dec_stats.as_ref(), out.enc_sq.as_ref());
            match kernels::use_fused(&self.sae.w_dec, &kernels::ADAM) {
                true => self.fused_update(&g, lr, dec_stats, enc_sq, &mut laps),
                false => self.aten_update(&mut g, lr, &mut laps),
            }
        });
        let kept_min = tch::no_grad(|| self.bookkeep(&out.codes));
        self.since_max += out.codes.batch;
        if let Some(p) = self.pending.take() {
            // The device is on this step by now: the previous one's copy has long finished.
            let (stats, f) = self.read(p);
            self.since_max = f[F_SINCE_MAX] as i64 + out.codes.batch;
            read = Some(stats);
        }
        // The step's figures, the dead counts and the threshold's new input as one copy to
        // the host, started behind the step's work on the device.
        let (c, w) = (self.sae.core as i64, self.sae.width() as i64);
        let copy = tch::no_grad(|| {
            let (err, var) = err_sums(x_bd, &out.x_hat_bd);
            let terms = [&out.loss, &out.l2, &out.auxk].map(|t| t.detach().to_kind(Kind::Double));
            let counts = [
                out.codes.count_in_t(0, c),
                out.codes.count_in_t(c, w),
                self.count_dead(),
                self.noncore_since_max(),
            ]
            .map(|t| t.to_kind(Kind::Double));
            let all: Vec<&Tensor> = terms
                .iter()
                .chain([&err, &var, &norm])
                .chain(&counts)
                .chain(&kept_min)
                .collect();
            let f = Tensor::stack(&all, 0);
            kernels::HostCopies::start(&[&f])
                .or_else(|_| kernels::HostCopies::start(&[&f.to_device(Device::Cpu)]))
                .expect("a CPU tensor's copy")
        });
        self.step += 1;
        self.pending = Some(Pending {
            copy,
            step: self.step,
            lr,
            batch: out.codes.batch,
            numel: x_bd.numel() as i64,
        });
        if knob_off("DMSAE_DEFER_FIGURES") {
            read = self.settle();
        }
        laps.lap(8);
        laps.end();
        read
    }

    /// The last queued step's figures (waiting for the device if they are not in yet), with
    /// its dead count and threshold applied; None if they were read already.
    pub fn settle(&mut self) -> Option<StepStats> {
        let p = self.pending.take()?;
        let (stats, f) = self.read(p);
        (self.n_dead, self.since_max) = (f[F_DEAD] as i64, f[F_SINCE_MAX] as i64);
        Some(stats)
    }

    /// `p`'s figures, its threshold input applied (steps are read in order, so the EMA sees
    /// them in order).
    fn read(&mut self, p: Pending) -> (StepStats, Vec<f64>) {
        let host = p
            .copy
            .wait()
            .unwrap_or_else(|e| panic!("step figures: {e}"));
        let f = Vec::<f64>::try_from(&host[0]).expect("f64");
        if let Some(&min) = f.get(F_KEPT_MIN) {
            self.update_threshold(min);
        }
        let per_token = |n: f64| n / (p.batch.max(1)) as f64;
        let stats = StepStats {
            loss: f[0],
            l2: f[1],
            auxk: f[2],
            mse: f[3] / p.numel as f64,
            fvu: f[3] / f[4].max(f64::MIN_POSITIVE),
            grad_norm: f[5],
            l0_core: per_token(f[6]),
            l0_noncore: per_token(f[7]),
            lr: p.lr,
            step: p.step,
        };
        (stats, f)
    }

    /// The update in ATen: the gradient along each decoder row removed, the clip, Adam
    /// (`adam`), each decoder row renormalised. Returns the gradient's norm before the clip
    /// (a float64 scalar on the device).
    fn aten_update(&mut self, g: &mut [Tensor], lr: f64, laps: &mut Laps) -> Tensor {
        // In place throughout: on a GPU these passes over [W, d] are memory-bound, and each
        // temporary is one more.
        let w_fd = &self.sae.w_dec;
        let minus_par_f1 = g[2]
            .unsqueeze(1)
            .bmm(&w_fd.unsqueeze(2))
            .squeeze_dim(2)
            .neg();
        let _ = g[2].addcmul_(&minus_par_f1, w_fd);
        let norm = joint_norm(&g.iter().map(|t| t.norm()).collect::<Vec<_>>());
        laps.lap(5);
        let div = clip_divisor(&norm, self.cfg.grad_clip).to_kind(Kind::Float);
        self.adam(g, lr, &div);
        laps.lap(6);
        let norms_f1 = self
            .sae
            .w_dec
            .norm_scalaropt_dim(2, [-1], true)
            .clamp_min(1e-12);
        let _ = self.sae.w_dec.g_div_(&norms_f1);
        laps.lap(7);
        norm
    }

    /// `aten_update` in dmsae's kernels (extractor/kernels/adam.cu): two passes over the
    /// decoder, its gradient and moments, where ATen's sequence takes seven, and one over
    /// each other parameter. The moments may be bf16 (`TrainConfig::adam_bf16_moments`).
    /// `dec_stats`: W_dec's gradient's figures from the decoder's backward, if it made them
    /// (`LossOut::dec_stats`); decoder_grad_stats reads the gradient for them otherwise.
    /// `enc_sq`: W_enc's gradient's non-core squared norm in parts (`LossOut::enc_sq`), if the
    /// backward made it; a pass over the gradient otherwise.
    fn fused_update(
        &mut self,
        g: &[Tensor],
        lr: f64,
        dec_stats: Option<&Tensor>,
        enc_sq: Option<&Tensor>,
        laps: &mut Laps,
    ) -> Tensor {
        let w = &self.sae.w_dec;
        let (dev, rows, d) = (w.device(), w.size()[0], w.size()[1]);
        // 8 warps a block, one decoder row each; emulated (tests), one warp, and one block
        // for the flat kernel, which strides over its elements: each thread is an OS thread.
        let threads: u32 = if dev.is_cuda() { 256 } else { 32 };
        let row_grid = (rows as u32).div_ceil(threads / 32);
        // decoder_adam: 4 warps a block, each row waiting in the block's shared memory for its
        // norm (adam.cu's DEC_HELD_WARPS); DMSAE_DECODER_HELD=0 launches 8, which read each
        // row back instead (to time one against the other).
        let held_threads = match knob_off("DMSAE_DECODER_HELD") {
            true => threads,
            false => threads.min(128),
        };
        let held_grid = (rows as u32).div_ceil(held_threads / 32);
        let flat_grid = |n: i64| match dev.is_cuda() {
            true => (n as u32).div_ceil(threads).clamp(1, 1 << 16),
            false => 1,
        };
        let ptr = |t: &Tensor| t.data_ptr();
        let (mut rows_a, mut d_a) = (rows, d);
        // Each row's g.w, and the projected gradient's squared norm summed over the rows.
        let (dot, sq_sum) = match dec_stats {
            // From the decoder's backward: per span [gg, gw, ww], summed here in float64.
            Some(st) => {
                let s3 = st.sum_dim_intlist(0, false, None);
                let (gg, gw, ww) = (s3.get(0), s3.get(1), s3.get(2));
                let q = (&gg - &gw * &gw * 2.0 + &gw * &gw * &ww).clamp_min(0.0);
                (
                    gw.to_kind(Kind::Float),
                    q.sum(Kind::Double).to_kind(Kind::Float),
                )
            }
            None => {
                let dot = Tensor::empty([rows], (Kind::Float, dev));
                let sq = Tensor::empty([rows], (Kind::Float, dev));
                // (A bf16 gradient comes with the decoder kernel's figures; else in float32.)
                let g2 = g[2].to_kind(Kind::Float);
                let (mut a0, mut a1, mut a2, mut a3) = (ptr(&g2), ptr(w), ptr(&dot), ptr(&sq));
                // SAFETY: decoder_grad_stats(g, w, dot, sq, rows, d) over live contiguous
                // float32 tensors of those shapes on `dev`.
                unsafe {
                    kernels::run(
                        &kernels::ADAM,
                        "decoder_grad_stats",
                        dev,
                        row_grid,
                        threads,
                        &mut [
                            addr(&mut a0),
                            addr(&mut a1),
                            addr(&mut a2),
                            addr(&mut a3),
                            addr(&mut rows_a),
                            addr(&mut d_a),
                        ],
                    )
                }
                .unwrap_or_else(|e| panic!("fused update: {e}"));
                (dot, sq.sum(Kind::Float))
            }
        };
        let enc_norm = enc_sq.map_or_else(
            || g[0].to_kind(Kind::Float).norm(),
            |sq| {
                w_enc_grad_sq(sq, &g[0], self.sae.core)
                    .sqrt()
                    .to_kind(Kind::Float)
            },
        );
        let norm = joint_norm(&[enc_norm, g[1].norm(), sq_sum.sqrt(), g[3].norm()]);
        laps.lap(5);
        let t = (self.step + 1) as i32;
        let (b1, b2) = (self.cfg.adam_beta1, self.cfg.adam_beta2);
        // As the host would form it: 1 / (norm / clip) in float64, then rounded.
        let inv_div = clip_divisor(&norm, self.cfg.grad_clip)
            .reciprocal()
            .to_kind(Kind::Float);
        let step = AdamArgs {
            inv_div: inv_div.data_ptr() as *const f32,
            step_size: (lr / (1.0 - b1.powi(t))) as f32,
            beta1: b1 as f32,
            beta2: b2 as f32,
            bc2_sqrt: (1.0 - b2.powi(t)).sqrt() as f32,
            eps: self.cfg.adam_eps as f32,
            seed: 0,
        };
        let suffix = if self.bf16_moments() { "bf16" } else { "f32" };
        // W_enc's bf16 copy for the next step's product and W_dec's for its decoder, written
        // by the update.
        let mut shadow = copy_to_write(&mut self.w_enc_h, self.bf16, &self.sae.w_enc);
        let mut dec_shadow = copy_to_write(&mut self.w_dec_h, self.dec_bf16, &self.sae.w_dec);
        let mut no_shadow: *mut std::ffi::c_void = std::ptr::null_mut();
        for (i, (p, g)) in self.sae.params().into_iter().zip(g).enumerate() {
            let mut a = AdamArgs {
                seed: rounding_seed(self.cfg.seed, self.step, i),
                ..step
            };
            let (mut pp, mut gp) = (ptr(p), ptr(g));
            let (mut mp, mut vp, mut dp) = (ptr(&self.m[i]), ptr(&self.v[i]), ptr(&dot));
            let mut n = p.numel() as i64;
            // SAFETY: decoder_adam(w, g, m, v, dot, shadow, rows, d, args) and adam_flat(p,
            // g, m, v, shadow, n, args) over live contiguous tensors on `dev`: float32
            // parameters and gradients, moments of the kind the name says, bf16 shadows of
            // their parameters' shapes (or null); `AdamArgs` is laid out as in C.
            let r = unsafe {
                match i {
                    2 => kernels::run(
                        &kernels::ADAM,
                        &format!("decoder_adam_{suffix}{}", g16_suffix(g)),
                        dev,
                        held_grid,
                        held_threads,
                        &mut [
                            addr(&mut pp),
                            addr(&mut gp),
                            addr(&mut mp),
                            addr(&mut vp),
                            addr(&mut dp),
                            addr(&mut dec_shadow),
                            addr(&mut rows_a),
                            addr(&mut d_a),
                            addr(&mut a),
                        ],
                    ),
                    _ => kernels::run(
                        &kernels::ADAM,
                        &format!("adam_flat_{suffix}{}", g16_suffix(g)),
                        dev,
                        flat_grid(n),
                        threads,
                        &mut [
                            addr(&mut pp),
                            addr(&mut gp),
                            addr(&mut mp),
                            addr(&mut vp),
                            match i {
                                0 => addr(&mut shadow),
                                _ => addr(&mut no_shadow),
                            },
                            addr(&mut n),
                            addr(&mut a),
                        ],
                    ),
                }
            };
            r.unwrap_or_else(|e| panic!("fused update: {e}"));
        }
        // The kernels wrote W_enc and W_dec directly, so their versions are still what the
        // copies go with.
        for (copy, p) in [
            (&mut self.w_enc_h, &self.sae.w_enc),
            (&mut self.w_dec_h, &self.sae.w_dec),
        ] {
            if let Some((_, v)) = copy.as_mut() {
                *v = kernels::version(p);
            }
        }
        laps.lap(6);
        laps.lap(7);
        norm
    }

    /// Adam through torch's fused kernel (`csrc/fused_adam.cpp`): one pass over each
    /// parameter, its gradient and both moments, the gradients divided by `grad_div` (a float32
    /// scalar on the device).
    fn adam(&mut self, g: &mut [Tensor], lr: f64, grad_div: &Tensor) {
        let dev = self.sae.device();
        let mut step = Tensor::full([0i64; 0], (self.step + 1) as f64, (Kind::Float, dev));
        let mut div = grad_div.shallow_clone();
        let mut params = [
            &mut self.sae.w_enc,
            &mut self.sae.b_enc,
            &mut self.sae.w_dec,
            &mut self.sae.b_dec,
        ];
        let ptrs =
            |ts: &mut [&mut Tensor]| ts.iter_mut().map(|t| t.as_mut_ptr()).collect::<Vec<_>>();
        let p = ptrs(&mut params);
        let g = ptrs(&mut g.iter_mut().collect::<Vec<_>>());
        let m = ptrs(&mut self.m.iter_mut().collect::<Vec<_>>());
        let v = ptrs(&mut self.v.iter_mut().collect::<Vec<_>>());
        let mut err = [0u8; 512];
        // SAFETY: every pointer is a live tch tensor handle borrowed for this call; the shim
        // checks that moments and gradients are laid out as their parameters (the CPU kernel
        // does not) and reports through `err`.
        let rc = unsafe {
            dmsae_fused_adam(
                p.as_ptr(),
                g.as_ptr(),
                m.as_ptr(),
                v.as_ptr(),
                p.len() as i32,
                step.as_mut_ptr(),
                lr,
                self.cfg.adam_beta1,
                self.cfg.adam_beta2,
                self.cfg.adam_eps,
                div.as_mut_ptr(),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc != 0 {
            let msg = std::ffi::CStr::from_bytes_until_nul(&err).unwrap_or_default();
            // Devices and dtypes are fixed at construction, so this is a bug, not bad input.
            panic!("fused Adam failed: {}", msg.to_string_lossy());
        }
    }

    /// The dead-latent counters; returns, from the end of the warm-up (dictionary_learning
    /// starts at step 1000, its warm-up length), the smallest kept non-core activation as a
    /// float64 scalar on the device (+inf if none), for `update_threshold`.
    fn bookkeep(&mut self, codes: &Codes) -> Option<Tensor> {
        let b = codes.batch;
        self.fired_f = counts_of(&codes.cols, self.sae.width() as i64, codes.live.as_ref());
        if let Some(k) = &codes.core {
            let on_c = k.on.sum_dim_intlist(0, false, Kind::Int64);
            let _ = self.fired_f.narrow(0, 0, on_c.size()[0]).g_add_(&on_c);
        }
        self.since_fired_f = (&self.since_fired_f + b) * self.fired_f.eq(0).to_kind(Kind::Int64);
        let c = self.sae.core as i64;
        // (Runs shorter than two warm-ups start at half-way, so every export has a threshold.)
        let start = self.cfg.warmup_steps.min(self.cfg.total_steps() / 2);
        if self.step + 1 < start || codes.vals.numel() == 0 {
            return None;
        }
        // The core's entries masked rather than selected out: a selection's size waits for
        // the device.
        let vals = codes.vals.detach();
        let kept = codes.live_and(codes.cols.ge(c));
        let min = vals.where_scalarother(&kept, f64::INFINITY).min();
        Some(min.to_kind(Kind::Double))
    }

    /// The threshold's EMA with this step's smallest kept non-core activation (`bookkeep`).
    fn update_threshold(&mut self, min: f64) {
        if min == f64::INFINITY {
            return; // no non-core entry this step
        }
        // The EMA spans at most the last tenth of training: at 0.999 (about 1,000 steps) a
        // short run's threshold stays near its early, smaller values and the inference L0
        // overshoots k.
        let steps = self.cfg.total_steps().max(1) as f64;
        let beta = self.cfg.threshold_beta.min((1.0 - 10.0 / steps).max(0.0));
        self.sae.threshold = if self.sae.threshold < 0.0 {
            min
        } else {
            beta * self.sae.threshold + (1.0 - beta) * min
        };
    }

    /// Everything a resumed run needs besides `step` and the threshold, on the CPU: weights,
    /// Adam moments, dead-latent counters, the encoder product.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        // The threshold would miss the last step's input.
        assert!(
            self.pending.is_none(),
            "Trainer::state with a step's figures unread"
        );
        let names = ["W_enc", "b_enc", "W_dec", "b_dec"];
        let cpu = |t: &Tensor| t.detach().to_device(Device::Cpu);
        let mut out: Vec<(String, Tensor)> = names
            .iter()
            .zip(self.sae.params())
            .map(|(n, p)| (n.to_string(), cpu(p)))
            .collect();
        for (i, n) in names.iter().enumerate() {
            out.push((format!("adam_m.{n}"), cpu(&self.m[i])));
            out.push((format!("adam_v.{n}"), cpu(&self.v[i])));
        }
        out.push(("since_fired".into(), cpu(&self.since_fired_f)));
        for (n, on) in [("encoder_bf16", self.bf16), ("decoder_bf16", self.dec_bf16)] {
            out.push((n.into(), Tensor::from_slice(&[on as i64])));
        }
        out
    }

    /// Restore `state()` output; names and shapes must match.
    pub fn load_state(
        &mut self,
        tensors: &[(String, Tensor)],
        step: u64,
        threshold: f64,
    ) -> Result<(), String> {
        let get = |name: &str, like: &Tensor| -> Result<Tensor, String> {
            let t = tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or(format!("no tensor `{name}`"))?;
            if t.size() != like.size() || t.kind() != like.kind() {
                return Err(format!(
                    "`{name}` is {:?} {:?}, expected {:?} {:?}",
                    t.kind(),
                    t.size(),
                    like.kind(),
                    like.size()
                ));
            }
            // A copy: Adam updates the moments in place, and `tensors` may share their memory.
            Ok(t.to_device(like.device()).copy())
        };
        // Unset, the moments' kind is the checkpoint's (a run keeps what it started with, as
        // the default may differ on this device or in this version); set, it must match.
        let moments_like = |m: &Tensor| match self.cfg.adam_bf16_moments {
            Some(_) => m.shallow_clone(),
            None => tensors
                .iter()
                .find(|(n, _)| n == "adam_m.W_enc")
                .map_or(m.shallow_clone(), |(_, t)| m.to_kind(t.kind())),
        };
        let names = ["W_enc", "b_enc", "W_dec", "b_dec"];
        for (i, n) in names.iter().enumerate() {
            let p = get(n, self.sae.params()[i])?;
            tch::no_grad(|| self.sae.params()[i].shallow_clone().copy_(&p));
            self.m[i] = get(&format!("adam_m.{n}"), &moments_like(&self.m[i]))?;
            self.v[i] = get(&format!("adam_v.{n}"), &moments_like(&self.v[i]))?;
        }
        self.since_fired_f = get("since_fired", &self.since_fired_f)?;
        self.recount_dead();
        // A run resumed on another device keeps the product it started with. Checkpoints from
        // before this entry resume with the current device's default.
        let saved = |name: &str| {
            tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.int64_value(&[0]) != 0)
        };
        self.bf16 = saved("encoder_bf16").unwrap_or(self.bf16);
        self.dec_bf16 = saved("decoder_bf16").unwrap_or(self.dec_bf16);
        (self.step, self.sae.threshold) = (step, threshold);
        Ok(())
    }

    /// Why this trainer cannot update on its device, if it cannot: bf16 moments need the fused
    /// update (`fused_update`), which runs on CUDA only.
    pub fn check_update(&self) -> Result<(), String> {
        let fused = kernels::use_fused(&self.sae.w_dec, &kernels::ADAM);
        match self.bf16_moments() && !fused {
            true => Err(format!(
                "adam_bf16_moments needs dmsae's update kernels, which run on a CUDA device \
                 with NVRTC and {} not 0; this run is on {:?}",
                kernels::ADAM.off,
                self.sae.device()
            )),
            false => Ok(()),
        }
    }

    /// Whether Adam's moments are bf16 (`TrainConfig::adam_bf16_moments`, as resolved).
    pub fn bf16_moments(&self) -> bool {
        self.m[0].kind() == Kind::BFloat16
    }

    /// Whether the training encoder product runs in bf16.
    pub fn encoder_bf16(&self) -> bool {
        self.bf16
    }

    /// Whether W_enc's gradient is bf16 in steps on the sparse path (where its kernel and the
    /// fused update run; `TrainConfig::encoder_grad_bf16`).
    pub fn encoder_grad_bf16(&self) -> bool {
        self.enc_grad_bf16
            && kernels::use_fused(&self.sae.w_enc, &kernels::ENCODER_GRAD)
            && kernels::use_fused(&self.sae.w_dec, &kernels::ADAM)
    }

    /// Whether W_dec's gradient is bf16 (where its kernel and the fused update run;
    /// `TrainConfig::decoder_grad_bf16`).
    pub fn decoder_grad_bf16(&self) -> bool {
        self.dec_grad_bf16
            && self.sae.fused_decode()
            && kernels::use_fused(&self.sae.w_dec, &kernels::ADAM)
    }

    /// Whether the training step's Matryoshka parts, and their gradient, are bf16 (where the
    /// decoder's kernel runs; `TrainConfig::parts_bf16`).
    pub fn parts_bf16(&self) -> bool {
        self.parts16 && self.sae.fused_decode()
    }

    /// Whether the training decoder's forward reads W_dec in bf16.
    pub fn decoder_bf16(&self) -> bool {
        self.dec_bf16
    }

    /// Whether AuxK reconstructs with a dense product (`TrainConfig::auxk_dense`).
    fn auxk_dense(&self) -> bool {
        self.cfg
            .auxk_dense
            .unwrap_or(self.bf16 && self.k_aux * 256 >= self.sae.width())
    }

    /// Tokens on which each latent fired in the last step.
    pub fn last_fired_counts(&self) -> Tensor {
        self.fired_f.shallow_clone()
    }
}

/// (mean squared error per element, FVU) of a batch.
pub fn err_stats(x_bd: &Tensor, x_hat_bd: &Tensor) -> (f64, f64) {
    let (err, var) = err_sums(x_bd, x_hat_bd);
    let (err, var) = (err.double_value(&[]), var.double_value(&[]));
    (err / x_bd.numel() as f64, err / var.max(f64::MIN_POSITIVE))
}

/// sum ||x - x_hat||^2 and sum ||x - mean_b x||^2, in float64 on the device.
fn err_sums(x_bd: &Tensor, x_hat_bd: &Tensor) -> (Tensor, Tensor) {
    let err = (x_bd - x_hat_bd).square().sum(Kind::Double);
    let var = (x_bd - x_bd.mean_dim(0, true, None))
        .square()
        .sum(Kind::Double);
    (err, var)
}

/// Mean active latents per token: (core, non-core).
pub fn l0s(f_bf: &Tensor, core: usize) -> (f64, f64) {
    let b = f_bf.size()[0].max(1) as f64;
    let on = f_bf.gt(0.0).sum_dim_intlist(0, false, Kind::Int64);
    let c = core as i64;
    let core_n = on.narrow(0, 0, c).sum(Kind::Int64).int64_value(&[]) as f64;
    let all = on.sum(Kind::Int64).int64_value(&[]) as f64;
    (core_n / b, (all - core_n) / b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{recovery, sparse_dictionary};

    fn tensor(v: &[f32], rows: usize, kind: Kind) -> Tensor {
        // Spinning intra-op threads crawl on a busy 2-core machine (see TrainConfig::cpu_threads).
        tch::set_num_threads(1);
        Tensor::from_slice(v).view([rows as i64, -1]).to_kind(kind)
    }

    /// Every partial derivative of the full loss (Matryoshka prefixes, BatchTopK, AuxK with every
    /// non-core latent dead, a trainable core) against central differences, in f64. AuxK's
    /// residual target is detached (as in dictionary_learning), so the differences hold it at
    /// its unperturbed value.
    #[test]
    fn loss_gradient_matches_finite_differences() {
        let cfg = TrainConfig {
            width: 12,
            k: 2,
            group_fractions: vec![0.25, 0.25],
            dead_tokens: 0,
            k_aux: Some(3),
            core_frozen: false,
            seed: 3,
            ..Default::default()
        };
        let (core_w, _) = sparse_dictionary(6, 2, 1, 1, 0.0, 9);
        let core = Core {
            w_enc_dc: tensor(&core_w, 2, Kind::Float).tr(),
            b_enc_c: Tensor::from_slice(&[0.1f32, -0.2]),
            threshold_c: None,
        };
        let sae = Sae::new(6, Some(core), &cfg, Kind::Double, Device::Cpu).unwrap();
        let t = Trainer::new(sae, cfg, true);
        let (_, x) = sparse_dictionary(6, 10, 3, 5, 0.3, 4);
        let x_bd = tensor(&x, 5, Kind::Double);
        let out = t.loss(&x_bd);
        assert!(out.auxk.double_value(&[]) > 0.0 && out.l2.double_value(&[]) > 0.0);
        let grads = out.gradients(t.sae.params());
        let e0_bd = (&x_bd - &out.x_hat_bd).detach();
        let loss = || {
            let n_dead = t.dead_f().sum(Kind::Int64).int64_value(&[]);
            let pre = t.sae.pre_acts(&x_bd, 12);
            let aux = t.auxk(&x_bd, &e0_bd, Some(&pre), false, n_dead).0;
            (t.loss(&x_bd).l2 + aux * t.cfg.auxk_alpha).double_value(&[])
        };
        assert!((loss() - out.loss.double_value(&[])).abs() < 1e-12);
        let eps = 1e-6;
        let mut checked = 0;
        for (p, g) in t.sae.params().into_iter().zip(&grads) {
            let (flat, gflat) = (p.detach().view([-1]), g.view([-1]));
            for i in 0..flat.size()[0] {
                let at = |h: f64| {
                    tch::no_grad(|| {
                        let v = flat.double_value(&[i]);
                        let _ = flat.get(i).fill_(v + h);
                        let l = loss();
                        let _ = flat.get(i).fill_(v);
                        l
                    })
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                let an = gflat.double_value(&[i]);
                assert!(
                    (fd - an).abs() <= 1e-6 * (1.0 + an.abs()),
                    "param {checked}: fd {fd} vs autograd {an}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 6 * 12 * 2 + 12 + 6);
    }

    /// The loss as its definition reads, with dense [B, W] tensors: JumpReLU core, a 0/1 mask of
    /// the batch's k*B largest non-core activations, each prefix decoded by a dense product,
    /// AuxK from a dense scatter of each token's top dead activations.
    #[allow(clippy::assign_op_pattern)] // tch's `+=` is in place, which autograd must not see
    fn dense_reference_loss(t: &Trainer, x_bd: &Tensor) -> Tensor {
        let s = &t.sae;
        let (b, w, c) = (x_bd.size()[0], s.width() as i64, s.core as i64);
        let pre = (x_bd - &s.b_dec).matmul(&s.w_enc) + &s.b_enc;
        let shift = s.b_dec.matmul(&s.w_enc.narrow(1, 0, c));
        let post = Tensor::cat(&[pre.narrow(1, 0, c) + shift, pre.narrow(1, c, w - c)], 1).relu();
        let core = post.narrow(1, 0, c);
        let core = &core * core.gt_tensor(&s.core_threshold).to_kind(core.kind());
        let nc = post.narrow(1, c, w - c);
        let (_, idx) = nc.reshape([-1]).topk(s.k as i64 * b, 0, true, true);
        let mask = nc
            .reshape([-1])
            .zeros_like()
            .scatter_value(0, &idx, 1.0)
            .view_as(&nc);
        let f = Tensor::cat(&[core, &nc * mask], 1);
        let mut l2 = x_bd.zeros_like().sum(None);
        let mut hi = c;
        for &m in &s.groups {
            hi += m as i64;
            let x_hat = f.narrow(1, 0, hi).matmul(&s.w_dec.narrow(0, 0, hi)) + &s.b_dec;
            l2 = l2
                + (x_bd - x_hat)
                    .square()
                    .sum_dim_intlist(-1, false, None)
                    .mean(None);
        }
        let l2 = l2 / s.groups.len() as f64;
        let x_hat = f.matmul(&s.w_dec) + &s.b_dec;
        let e = (x_bd - x_hat).detach();
        let dead = post * t.dead_f().to_kind(x_bd.kind());
        let (top, at) = dead.topk(t.k_aux as i64, -1, true, true);
        let aux_f = dead.zeros_like().scatter(1, &at, &top);
        let err = (&e - aux_f.matmul(&s.w_dec))
            .square()
            .sum_dim_intlist(-1, false, None)
            .mean(None);
        let var = (&e - e.mean_dim(0, true, None))
            .square()
            .sum_dim_intlist(-1, false, None)
            .mean(None);
        l2 + err / var * t.cfg.auxk_alpha
    }

    /// A trainer of width 48 over `d` inputs, k 3, k_aux 5: a trained core of 4 latents under
    /// JumpReLU thresholds, b_dec at 0.2, and non-core latent i (of 44) dead where i % `every`
    /// is 0.
    fn core_and_dead_trainer(d: usize, kind: Kind, device: Device, every: i64) -> Trainer {
        let cfg = TrainConfig {
            width: 48,
            k: 3,
            dead_tokens: 1,
            k_aux: Some(5),
            core_frozen: false,
            seed: 5,
            encoder_bf16: Some(false),
            decoder_bf16: Some(false),
            ..Default::default()
        };
        let (core_w, _) = sparse_dictionary(d, 4, 1, 1, 0.0, 2);
        let core = Core {
            w_enc_dc: tensor(&core_w, 4, Kind::Float).tr(),
            b_enc_c: Tensor::from_slice(&[0.3f32, -0.1, 0.0, 0.2]),
            threshold_c: Some(Tensor::from_slice(&[0.0f32, 0.05, 0.2, 0.4])),
        };
        let mut sae = Sae::new(d, Some(core), &cfg, kind, device).unwrap();
        tch::no_grad(|| sae.b_dec.copy_(&(sae.b_dec.ones_like() * 0.2)));
        let mut t = Trainer::new(sae, cfg, true);
        let dead = Tensor::arange(44, (Kind::Int64, Device::Cpu))
            .remainder(every)
            .eq(0)
            .to_kind(Kind::Int64);
        t.since_fired_f
            .narrow(0, 4, 44)
            .copy_(&dead.to_device(device));
        t.recount_dead();
        t
    }

    /// The sparse training path (codes as entries, decoder rows gathered) gives the loss and
    /// every gradient of the dense definition: a trained core with thresholds, half the
    /// non-core latents dead, f64.
    #[test]
    fn sparse_training_loss_matches_the_dense_definition() {
        let (d, b) = (8usize, 64usize);
        let mut t = core_and_dead_trainer(d, Kind::Double, Device::Cpu, 2);
        assert_eq!(t.n_dead, 22);
        let (_, x) = sparse_dictionary(d, 20, 3, b, 0.2, 6);
        let x_bd = tensor(&x, b, Kind::Double);
        let (ours, reference) = (t.loss(&x_bd), dense_reference_loss(&t, &x_bd));
        assert!(ours.auxk.double_value(&[]) > 0.0);
        let (lo, lr) = (ours.loss.double_value(&[]), reference.double_value(&[]));
        assert!((lo - lr).abs() < 1e-12 * lr, "loss {lo} vs dense {lr}");
        let g_ref = Tensor::run_backward(&[&reference], &t.sae.params(), false, false);
        let same_gradients = |out: &LossOut, what: &str| {
            let g = out.gradients(t.sae.params());
            for (i, (a, r)) in g.iter().zip(&g_ref).enumerate() {
                let diff = (a - r).abs().max().double_value(&[]);
                let scale = r.abs().max().double_value(&[]);
                assert!(
                    scale > 0.0 && diff < 1e-10 * scale,
                    "{what}, param {i}: max diff {diff} of {scale}"
                );
            }
        };
        same_gradients(&ours, "gathered AuxK");
        // AuxK's dense product gives the same loss and gradients.
        t.cfg.auxk_dense = Some(true);
        let dense = t.loss(&x_bd);
        let ld = dense.loss.double_value(&[]);
        assert!((ld - lr).abs() < 1e-12 * lr, "dense AuxK {ld} vs {lr}");
        same_gradients(&dense, "dense AuxK");
        // The core fired where its threshold let it, and BatchTopK kept k per token on average.
        let (c, n) = (ours.codes.count_in(0, 4), ours.codes.count_in(4, 48));
        assert!(c > 0 && c < 4 * b as i64, "core entries {c}");
        assert_eq!(n, 3 * b as i64);
        // The bf16 encoder (product, bias and pre-activations in bf16; codes back in the
        // model's kind), both AuxK paths: the same loss and gradients to bf16's precision
        // (here the loss to 1.1e-4 and W_enc's gradient to 4.4 % of its largest entry; a
        // float32 bias and pre-activations gave 3.3e-4 and 4.5 %).
        t.bf16 = true;
        for dense in [true, false] {
            t.cfg.auxk_dense = Some(dense);
            let h = t.loss(&x_bd);
            assert_eq!(h.codes.vals.kind(), Kind::Double);
            let lh = h.loss.double_value(&[]);
            assert!((lh - lr).abs() < 1e-3 * lr, "bf16 loss {lh} vs {lr}");
            let g = h.gradients(t.sae.params());
            for (i, (a, r)) in g.iter().zip(&g_ref).enumerate() {
                let diff = (a - r).abs().max().double_value(&[]);
                let scale = r.abs().max().double_value(&[]);
                // (Headroom: which near-tied entries BatchTopK keeps depends on the bf16 GEMM.)
                assert!(
                    diff < 0.1 * scale,
                    "bf16, param {i}: max diff {diff} of {scale}"
                );
            }
        }
    }

    /// The sparse decoder's kernels (bag_decode.cu, emulated) against `embedding_bag`: the
    /// Matryoshka parts and, through a random projection of them, the gradients of every
    /// parameter (W_dec's directly, the others through the codes' values), in float32. Tokens
    /// with no entry in a part and latents that never fire are among them.
    #[test]
    fn the_fused_decoder_matches_embedding_bag() {
        // 300 columns: two 256-column spans a decoder row in the W_dec gradient.
        for d in [40, 300] {
            fused_decoder_against_embedding_bag(Device::Cpu, d);
        }
    }

    /// The same on a GPU (DMSAE_TEST_CUDA=1; scripts/gpu_checks.sh).
    #[test]
    fn the_fused_decoder_matches_embedding_bag_on_cuda() {
        if let Some(device) = test_cuda() {
            fused_decoder_against_embedding_bag(device, 2304);
        }
    }

    /// The fused Matryoshka loss (matryoshka_l2.cu, emulated) against the ATen chain: the loss
    /// and its gradients in b_dec and the parts, to float32 summation order (1e-5 relative);
    /// d = 40 leaves the second lane pass part-filled. With bf16 parts (`parts_bf16`): the
    /// loss is the float32 kernel's over the rounded parts, their gradient its gradient
    /// rounded, bit for bit, and b_dec's the float32 sum of the rounded part 0's.
    #[test]
    fn the_fused_loss_matches_aten() {
        fused_loss_against_aten(Device::Cpu, 40);
    }

    /// The same on a GPU (DMSAE_TEST_CUDA=1; scripts/gpu_checks.sh).
    #[test]
    fn the_fused_loss_matches_aten_on_cuda() {
        if let Some(device) = test_cuda() {
            fused_loss_against_aten(device, 2304);
        }
    }

    fn fused_loss_against_aten(device: Device, d: usize) {
        let b = 24i64;
        let sae = Sae::new(d, None, &small_cfg(8), Kind::Float, device).unwrap();
        tch::manual_seed(11);
        let x = Tensor::randn([b, d as i64], (Kind::Float, device));
        let parts32 = Tensor::randn(
            [b, 1 + sae.groups.len() as i64, d as i64],
            (Kind::Float, device),
        ) * 0.3;
        let b_dec = sae
            .b_dec
            .detach()
            .copy()
            .normal_(0.0, 0.5)
            .set_requires_grad(true);
        let sae = Sae {
            b_dec: b_dec.shallow_clone(),
            ..sae
        };
        let run = |fused: bool| {
            let parts = parts32.copy().set_requires_grad(true);
            let l2 = with_kernel(&kernels::MATRYOSHKA_L2, fused, || {
                sae.matryoshka_l2(&x, &parts, None)
            });
            let g = Tensor::run_backward(&[&l2], &[&sae.b_dec, &parts], false, false);
            (l2.detach(), g)
        };
        let ((l2, g), (want_l2, want_g)) = (run(true), run(false));
        // The parts in bf16, on the kernel's path and on ATen's (which promotes them).
        let parts16 = parts32.to_kind(Kind::BFloat16);
        let rounded = parts16.to_kind(Kind::Float).set_requires_grad(true);
        let l2_r = with_kernel(&kernels::MATRYOSHKA_L2, true, || {
            sae.matryoshka_l2(&x, &rounded, None)
        });
        let g_r = Tensor::run_backward(&[&l2_r], &[&rounded], false, false);
        for fused in [true, false] {
            let p16 = parts16.copy().set_requires_grad(true);
            let l2_16 = with_kernel(&kernels::MATRYOSHKA_L2, fused, || {
                sae.matryoshka_l2(&x, &p16, None)
            });
            let g16 = Tensor::run_backward(&[&l2_16], &[&sae.b_dec, &p16], false, false);
            assert_eq!(g16[1].kind(), Kind::BFloat16, "bf16 parts' gradient");
            if fused {
                let want_db = g_r[0].select(1, 0).to_kind(Kind::BFloat16).sum_dim_intlist(
                    0,
                    false,
                    Kind::Float,
                );
                assert!(
                    l2_16.equal(&l2_r) && g16[1].equal(&g_r[0].to_kind(Kind::BFloat16)),
                    "bf16 parts: the loss or their gradient is not the float32 kernel's"
                );
                let db16 = rel_max(&g16[0], &want_db);
                assert!(db16 <= 1e-6, "bf16 parts: b_dec's gradient, {db16:e}");
            }
            // Against float32 parts, within bf16's rounding of the parts.
            let (dl16, dp16) = (
                rel_max(&l2_16, &want_l2),
                rel_max(&g16[1].to_kind(Kind::Float), &want_g[1]),
            );
            assert!(
                dl16 <= 1e-2 && dp16 <= 1e-2 && dp16 > 0.0,
                "bf16 parts (fused {fused}): loss {dl16:e}, parts' gradient {dp16:e}"
            );
        }
        let dl = rel_max(&l2, &want_l2);
        let (db, dp) = (rel_max(&g[0], &want_g[0]), rel_max(&g[1], &want_g[1]));
        eprintln!("matryoshka loss on {device:?}, d {d}: loss {dl:.2e}, b_dec gradient {db:.2e}, parts gradient {dp:.2e}");
        assert!(want_l2.double_value(&[]) > 0.0);
        assert!(
            dl <= 1e-5 && db <= 1e-5 && dp <= 1e-5,
            "loss {dl:e}, b_dec {db:e}, parts {dp:e}"
        );
    }

    /// max |a - b| / max |b|: NaN when both are all zero, infinite when only b is.
    fn rel_max(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
    }

    /// ||t||^2 summed in float64 from float64 squares (of a bf16 gradient, exactly).
    fn sq_norm(t: &Tensor) -> f64 {
        t.to_kind(Kind::Double)
            .square()
            .sum(Kind::Double)
            .double_value(&[])
    }

    /// The decoder kernel's figures `stats` (`LossOut::dec_stats`) give each row's g.g of the
    /// gradient `g` (a bf16 one's, to float64 rounding).
    fn assert_rows_gg(stats: &Tensor, g: &Tensor, case: &str) {
        let g = g.to_kind(Kind::Double);
        let gg = (&g * &g).sum_dim_intlist(1, false, None);
        let rel = rel_max(&stats.sum_dim_intlist(0, false, None).get(0), &gg);
        assert!(
            rel <= 1e-12,
            "{case}: W_dec rows' g.g, {rel:e} of its largest"
        );
    }

    /// `f` on this thread with every kernel emulated (`emulate`) or none, and the paths whose
    /// knobs `off` names (`knob_off`) turned off.
    fn with_paths<T>(emulate: bool, off: &[&'static str], f: impl FnOnce() -> T) -> T {
        kernels::emulate_on_cpu(emulate);
        TESTS_OFF.with(|o| o.borrow_mut().extend_from_slice(off));
        let out = f();
        TESTS_OFF.with(|o| o.borrow_mut().clear());
        kernels::emulate_on_cpu(false);
        out
    }

    /// `f` with every kernel emulated and BatchTopK's selection without the host (`hostless`)
    /// or through the candidates' path, on this thread only.
    fn emulated<T>(hostless: bool, f: impl FnOnce() -> T) -> T {
        let off: &[&str] = if hostless {
            &[]
        } else {
            &["DMSAE_HOSTLESS_SELECT"]
        };
        with_paths(true, off, f)
    }

    /// `f` with `src`'s kernels (`fused`) or without. On the CPU the kernels are emulated when
    /// on (every kernel: the flag is per thread); on CUDA they run unless `src`'s variable turns
    /// them off (so tests using this run one at a time there: --test-threads 1).
    fn with_kernel<T>(src: &kernels::Source, fused: bool, f: impl FnOnce() -> T) -> T {
        kernels::emulate_on_cpu(fused);
        if !fused {
            std::env::set_var(src.off, "0");
        }
        let out = f();
        kernels::emulate_on_cpu(false);
        std::env::remove_var(src.off);
        out
    }

    fn fused_decoder_against_embedding_bag(device: Device, d: usize) {
        let b = 24i64;
        let cfg = small_cfg(8);
        let sae = Sae::new(d, None, &cfg, Kind::Float, device).unwrap();
        tch::manual_seed(9);
        let x = Tensor::randn([b, d as i64], (Kind::Float, device));
        let proj = Tensor::randn(
            [b, 1 + sae.groups.len() as i64, d as i64],
            (Kind::Float, device),
        );
        let run = |fused: bool| {
            let (codes, parts) = with_kernel(&kernels::BAG_DECODE, fused, || {
                let codes = sae.train_codes(&sae.pre_acts(&x, sae.width()));
                let parts = sae.decode_parts(&codes, &sae.part_starts(), None, None, None, false);
                (codes, parts)
            });
            let loss = (&parts * &proj).sum(None);
            let g = Tensor::run_backward(&[&loss], &sae.params(), false, false);
            (parts, g, codes.cols)
        };
        let (want, g_want, cols) = run(false);
        let (got, g_got, _) = run(true);
        let fired = cols.bincount::<Tensor>(None, sae.width() as i64).gt(0);
        let n_fired = fired.sum(Kind::Int64).int64_value(&[]);
        assert!(
            n_fired > 0 && n_fired < sae.width() as i64,
            "{n_fired} latents fired"
        );
        assert!(
            rel_max(&got, &want) < 1e-6,
            "parts: {}",
            rel_max(&got, &want)
        );
        for (i, (a, w)) in g_got.iter().zip(&g_want).enumerate() {
            assert!(rel_max(a, w) < 1e-6, "param {i}: {}", rel_max(a, w));
        }
        // A latent that did not fire has a zero decoder gradient, written by the kernel.
        let quiet = fired.logical_not().nonzero().squeeze_dim(1);
        assert_eq!(
            g_got[2]
                .index_select(0, &quiet)
                .abs()
                .max()
                .double_value(&[]),
            0.0
        );
    }

    /// The W_enc and b_enc gradients from the entries alone (encoder_grad.cu, emulated, with
    /// the decoder kernels; and on the CPU as a loop over the same sums) against autograd's
    /// dense path, float32, with a core anchored to x
    /// (JumpReLU thresholds) and a b_dec away from zero, so every term of the bias reaches its
    /// parameter: the loss and all four gradients. W_enc with 24 rows (one partial 256-row
    /// block) and with 300 (a full block and a partial one).
    #[test]
    fn the_sparse_encoder_gradient_matches_the_dense_one() {
        for d in [24, 300] {
            sparse_encoder_gradient_against_dense(Device::Cpu, d);
        }
    }

    /// The same on a GPU (DMSAE_TEST_CUDA=1; scripts/gpu_checks.sh).
    #[test]
    fn the_sparse_encoder_gradient_matches_the_dense_one_on_cuda() {
        if let Some(device) = test_cuda() {
            sparse_encoder_gradient_against_dense(device, 2304);
        }
    }

    fn sparse_encoder_gradient_against_dense(device: Device, d: usize) {
        let cfg = TrainConfig {
            encoder_bf16: Some(false),
            decoder_bf16: Some(false),
            ..small_cfg(6)
        };
        let (core_w, _) = sparse_dictionary(d, 3, 1, 1, 0.0, 4);
        let core = Core {
            w_enc_dc: tensor(&core_w, 3, Kind::Float).tr(),
            b_enc_c: Tensor::from_slice(&[0.2f32, -0.1, 0.05]),
            threshold_c: Some(Tensor::from_slice(&[0.0f32, 0.1, 0.3])),
        };
        let mut sae = Sae::new(d, Some(core), &cfg, Kind::Float, device).unwrap();
        tch::no_grad(|| sae.b_dec.copy_(&(sae.b_dec.randn_like() * 0.3)));
        let mut t = Trainer::new(sae, cfg, false);
        t.enc_grad_bf16 = false;
        tch::manual_seed(11);
        let x = Tensor::randn([40, d as i64], (Kind::Float, device));
        // The dense graph (on the CPU, the sparse path turned off), encoder_grad.cu (emulated
        // on the CPU), and on the CPU its sums as a loop (csrc/autograd.cpp).
        let grads = |kernel: bool, aten: bool| {
            let loss = || t.loss(&x);
            let out = match (kernel, aten) {
                (true, _) => with_kernel(&kernels::ENCODER_GRAD, true, loss),
                (false, true) => with_paths(false, &[], loss),
                (false, false) if device == Device::Cpu => {
                    with_paths(false, &["DMSAE_SPARSE_ENCODER_GRAD"], loss)
                }
                (false, false) => with_kernel(&kernels::ENCODER_GRAD, false, loss),
            };
            let g = out.gradients(t.sae.params());
            // The kernel's blocks' squares, its non-core columns', with the core's added.
            let sq = out
                .enc_sq
                .map(|sq| w_enc_grad_sq(&sq, &g[0], t.sae.core).double_value(&[]));
            (out.loss.double_value(&[]), out.codes.count_in(0, 3), g, sq)
        };
        let (want, core_entries, g_want, no_sq) = grads(false, false);
        assert!(no_sq.is_none(), "the dense path has no blocks' squares");
        assert!(core_entries > 0, "the core never fired");
        let kernel = grads(true, false);
        let g_kernel: Vec<Tensor> = kernel.2.iter().map(Tensor::shallow_clone).collect();
        let mut paths = vec![("encoder_grad.cu", kernel)];
        if device == Device::Cpu {
            paths.push(("the CPU's loop", grads(false, true)));
        }
        // W_enc's and W_dec's gradients in bf16 (the training step's, into the update): the
        // kernels' float32 gradients rounded once, bit for bit (the core block's columns and
        // rows added from its leaves), the biases' as they were; the clip's squares and the
        // decoder rows' figures are the rounded gradients'.
        (t.enc_grad_bf16, t.dec_grad_bf16) = (true, true);
        let (g16, sq16, dec16) = with_kernel(&kernels::ENCODER_GRAD, true, || {
            let out = t.loss(&x);
            let g = out.gradients(t.sae.params());
            let sq = out.enc_sq.map(|sq| w_enc_grad_sq(&sq, &g[0], t.sae.core));
            (g, sq.map(|s| s.double_value(&[])), out.dec_stats)
        });
        (t.enc_grad_bf16, t.dec_grad_bf16) = (false, false);
        for i in 0..4 {
            let want = match i {
                0 | 2 => g_kernel[i].to_kind(Kind::BFloat16),
                _ => g_kernel[i].shallow_clone(),
            };
            assert!(
                g16[i].kind() == want.kind() && g16[i].equal(&want),
                "param {i}"
            );
        }
        assert_rows_gg(
            &dec16.expect("the decoder's figures"),
            &g16[2],
            "bf16 gradients",
        );
        let (sq_got, sq_want) = (sq16.expect("the blocks' squares"), sq_norm(&g16[0]));
        assert!(
            (sq_got - sq_want).abs() <= 1e-5 * sq_want,
            "the bf16 gradient's squared norm {sq_got} against {sq_want}"
        );
        for (path, (got, _, g_got, sq)) in paths {
            // The update's clip takes W_enc's gradient norm from the kernel's blocks' squares.
            let want_sq = g_want[0].square().sum(Kind::Double).double_value(&[]);
            match sq {
                Some(sq) => assert!(
                    (sq - want_sq).abs() <= 1e-5 * want_sq,
                    "{path}: W_enc's gradient's squared norm {sq} against {want_sq}"
                ),
                None => assert!(path.starts_with("the CPU"), "{path}: no blocks' squares"),
            }
            assert!(
                (got - want).abs() <= 1e-6 * want,
                "{path}: loss {got} against {want}"
            );
            for (i, (a, w)) in g_got.iter().zip(&g_want).enumerate() {
                // NaN (never under the bound) where both are all zero: the gradient must reach
                // it.
                let rel = rel_max(a, w);
                assert!(
                    rel <= 1e-5,
                    "{path}: param {i}: {rel:e} of its largest entry"
                );
            }
        }
    }

    /// The kernels' path (encoder_grad.cu and the others, emulated) with dead latents gives the
    /// dense definition's loss and gradients, float32, a trained core with thresholds: with
    /// every fifth non-core latent dead, AuxK over their own product beside the sparse encoder
    /// gradient; with every other one, over the dense graph. Both AuxK reconstructions
    /// (gathered rows, and the product over the dead latents). At d 300 the decoder's figures
    /// come in two spans.
    #[test]
    fn the_sparse_path_with_dead_latents_matches_the_dense_definition() {
        for (every, n_dead, d) in [(5, 9, 24), (2, 22, 24), (5, 9, 300)] {
            kernels_path_with_dead_latents(Device::Cpu, every, n_dead, d, 1e-5);
        }
    }

    /// The same on a GPU (DMSAE_TEST_CUDA=1; scripts/gpu_checks.sh), to 1e-4: cuBLAS sums in
    /// its own order.
    #[test]
    fn the_sparse_path_with_dead_latents_matches_the_dense_definition_on_cuda() {
        if let Some(device) = test_cuda() {
            for (every, n_dead, d) in [(5, 9, 24), (2, 22, 24), (5, 9, 300)] {
                kernels_path_with_dead_latents(device, every, n_dead, d, 1e-4);
            }
        }
    }

    fn kernels_path_with_dead_latents(device: Device, every: i64, n_dead: i64, d: usize, tol: f64) {
        let b = 64usize;
        let mut t = core_and_dead_trainer(d, Kind::Float, device, every);
        assert_eq!(t.n_dead, n_dead);
        let (_, x) = sparse_dictionary(d, 20, 3, b, 0.2, 6);
        let x_bd = tensor(&x, b, Kind::Float).to_device(device);
        let reference = dense_reference_loss(&t, &x_bd);
        let lr = reference.double_value(&[]);
        let g_ref = Tensor::run_backward(&[&reference], &t.sae.params(), false, false);
        for dense in [false, true] {
            t.cfg.auxk_dense = Some(dense);
            let out = with_kernel(&kernels::ENCODER_GRAD, true, || t.loss(&x_bd));
            assert!(out.auxk.double_value(&[]) > 0.0, "AuxK idle");
            let lo = out.loss.double_value(&[]);
            let case = format!("{n_dead} dead, d {d}, dense AuxK {dense}");
            assert!((lo - lr).abs() <= tol * lr, "{case}: loss {lo} vs {lr}");
            let g = out.gradients(t.sae.params());
            for (i, (a, r)) in g.iter().zip(&g_ref).enumerate() {
                let rel = rel_max(a, r);
                assert!(rel <= tol, "{case}, param {i}: {rel:e} of its largest");
            }
            // What the update takes from the kernels' backward, the dead latents' gradients
            // added since (`LossOut::add_leaf`): W_enc's squared norm, and each W_dec row's
            // g.g, g.w and projected squared norm (a row without entries there has w.w 0).
            // (With many dead, the dense graph: no squares.)
            if let Some(sq) = &out.enc_sq {
                let (got, want) = (
                    w_enc_grad_sq(sq, &g[0], t.sae.core).double_value(&[]),
                    g[0].square().sum(Kind::Double).double_value(&[]),
                );
                assert!(
                    (got - want).abs() <= tol * want,
                    "{case}: ||dW_enc||^2 {got} vs {want}"
                );
                // W_enc's gradient in bf16: the dead columns' AuxK gradient and the core's
                // added into the kernel's rounded sums, rounded again (a dead latent may still
                // have entries this step): within two bf16 roundings of the float32 gradient;
                // the squares mended as in float32.
                (t.enc_grad_bf16, t.dec_grad_bf16) = (true, true);
                let out16 = with_kernel(&kernels::ENCODER_GRAD, true, || t.loss(&x_bd));
                (t.enc_grad_bf16, t.dec_grad_bf16) = (false, false);
                let g16 = out16.gradients(t.sae.params());
                for i in [0, 2] {
                    assert_eq!(g16[i].kind(), Kind::BFloat16, "{case}: param {i}'s kind");
                    let rel = rel_max(&g16[i].to_kind(Kind::Float), &g[i]);
                    assert!(
                        rel > 0.0 && rel <= 2f64.powi(-8),
                        "{case}: param {i}'s bf16 gradient {rel:e} of its largest from float32's"
                    );
                }
                // W_dec's rows' figures, mended where AuxK's rows were added, are the bf16
                // gradient's.
                let s16 = out16.dec_stats.as_ref().expect("the decoder's figures");
                assert_rows_gg(s16, &g16[2], &format!("{case}, bf16"));
                let sq16 = out16.enc_sq.as_ref().expect("the blocks' squares");
                let (got, want) = (
                    w_enc_grad_sq(sq16, &g16[0], t.sae.core).double_value(&[]),
                    sq_norm(&g16[0]),
                );
                assert!(
                    (got - want).abs() <= tol * want,
                    "{case}: bf16 ||dW_enc||^2 {got} vs {want}"
                );
            }
            let st = out.dec_stats.as_ref().expect("the decoder's figures");
            let s3 = st.sum_dim_intlist(0, false, None);
            let (gd, wd) = (
                g[2].to_kind(Kind::Double),
                t.sae.w_dec.to_kind(Kind::Double),
            );
            let dot = |a: &Tensor, b: &Tensor| (a * b).sum_dim_intlist(1, false, None);
            let (gg, gw) = (dot(&gd, &gd), dot(&gd, &wd));
            let q = |gg: &Tensor, gw: &Tensor, ww: &Tensor| gg - gw * gw * 2.0 + gw * gw * ww;
            for (what, a, r) in [
                ("g.g", s3.get(0), gg.shallow_clone()),
                ("g.w", s3.get(1), gw.shallow_clone()),
                (
                    "projected",
                    q(&s3.get(0), &s3.get(1), &s3.get(2)),
                    q(&gg, &gw, &dot(&wd, &wd)),
                ),
            ] {
                let rel = rel_max(&a, &r);
                assert!(
                    rel <= tol,
                    "{case}: W_dec rows' {what}, {rel:e} of its largest"
                );
            }
        }
    }

    /// Whole steps with W_enc's and W_dec's gradients in bf16, or with the Matryoshka parts
    /// and their gradient in bf16 (every kernel emulated, a trained core, 9 latents dead at
    /// first), follow those in float32 to about bf16's precision, and move apart from them
    /// (the bf16 values reached the update).
    #[test]
    fn steps_with_bf16_gradients_follow_float32s() {
        let d = 24;
        let (_, x) = sparse_dictionary(d, 20, 3, 64, 0.2, 6);
        let x_bd = tensor(&x, 64, Kind::Float);
        let run = |g16: bool, p16: bool| {
            let mut t = core_and_dead_trainer(d, Kind::Float, Device::Cpu, 5);
            (t.enc_grad_bf16, t.dec_grad_bf16, t.parts16) = (g16, g16, p16);
            kernels::emulate_on_cpu(true);
            assert_eq!(
                (t.encoder_grad_bf16(), t.decoder_grad_bf16(), t.parts_bf16()),
                (g16, g16, p16)
            );
            for _ in 0..3 {
                t.update(&x_bd);
            }
            kernels::emulate_on_cpu(false);
            [t.sae.w_enc.detach().copy(), t.sae.w_dec.detach().copy()]
        };
        let f32s = run(false, false);
        for (what, a) in [("gradients", run(true, false)), ("parts", run(false, true))] {
            for i in 0..2 {
                let rel = rel_max(&a[i], &f32s[i]);
                assert!(
                    rel > 0.0 && rel <= 1e-3,
                    "bf16 {what}, weight {i}: {rel:e} of its largest apart"
                );
            }
        }
    }

    /// The sampled-cut top-k picks the same entries as one top-k over the non-core columns: on
    /// the fast path (every entry positive), with fewer positive entries than `keep`, with a
    /// heavy tail; without a core and with one, as a block (its JumpReLU a mask beside the
    /// entries, none of its entries listed) or listed (DMSAE_CORE_BLOCK=0: its entries wherever
    /// it is on, and never among the top k). ATen's path and select.cu's (emulated) alike.
    #[test]
    fn train_entries_are_the_core_and_the_top_k() {
        tch::manual_seed(0);
        let (b, w) = (64, 1024);
        let normal = Tensor::randn([b, w], (Kind::Float, Device::Cpu));
        let cases = [
            (normal.exp(), 64),
            ((&normal - 3.5).relu(), 64),
            (normal.square().square(), 300),
            // bf16, as the pre-activations come on a GPU: ties at the cut are common.
            (normal.exp().to_kind(Kind::BFloat16), 64),
        ];
        for (x, keep) in cases {
            for (c, block) in [(0, true), (37, true), (37, false)] {
                let what = format!("c {c}, {:?}, core block {block}", x.kind());
                let off: &[&str] = if block { &[] } else { &["DMSAE_CORE_BLOCK"] };
                let core_on = (c > 0).then(|| x.narrow(1, 0, c).gt(1.5));
                let thr = Tensor::full([c], 1.5, (Kind::Float, Device::Cpu));
                let thr = (c > 0).then_some(&thr);
                let mask_is_right = |got: &Option<Tensor>| match (&core_on, got) {
                    (Some(want), Some(got)) => block && got.equal(want),
                    (Some(_), None) => !block,
                    (None, got) => got.is_none(),
                };
                let e = with_paths(false, off, || train_entries(&x, c, thr, keep));
                assert!(!e.padded, "{what}: ATen's entries");
                assert!(mask_is_right(&e.core_on), "{what}: ATen's core mask");
                let (rows, cols) = (e.rows, e.cols);
                // The candidates from kernels/select.cu (emulated): the same entries in the
                // same order; in bf16 with the core as a block, the device's own top-k, by its
                // definition.
                let k = with_paths(true, off, || train_entries(&x, c, thr, keep));
                assert!(mask_is_right(&k.core_on), "{what}: select.cu's core mask");
                if k.padded {
                    assert_eq!(x.kind(), Kind::BFloat16, "{what}: top_entries' case");
                    assert!(block, "{what}: top_entries lists no core");
                    assert!((k.rows * w + k.cols).equal(&top_reference(&x, c, keep)));
                } else {
                    assert!(
                        k.rows.equal(&rows) && k.cols.equal(&cols),
                        "{what}: select.cu's entries differ"
                    );
                }
                let is_core = cols.lt(c);
                let (r, cl) = (rows.masked_select(&is_core), cols.masked_select(&is_core));
                let got = (r * c + cl).sort(0, false).0;
                let want = match (&core_on, block) {
                    (Some(on), false) => {
                        let nz = on.nonzero();
                        (nz.select(1, 0) * c + nz.select(1, 1)).sort(0, false).0
                    }
                    _ => got.zeros_like().narrow(0, 0, 0),
                };
                assert!(got.equal(&want), "{what}: core entries");
                let not_core = is_core.logical_not();
                let (r, cl) = (rows.masked_select(&not_core), cols.masked_select(&not_core));
                let v = x.index(&[Some(&r), Some(&cl)]);
                let noncore = x.narrow(1, c, w - c).reshape([-1]);
                let (vw, iw) = noncore.topk(keep, 0, true, false);
                let positive = vw.gt(0.0);
                let (vw, iw) = (vw.masked_select(&positive), iw.masked_select(&positive));
                assert_eq!(v.size(), vw.size(), "{what}: how many");
                assert!(
                    v.sort(0, false).0.equal(&vw.sort(0, false).0),
                    "{what}: values"
                );
                if x.kind() == Kind::Float {
                    let idx = r * (w - c) + (cl - c);
                    assert!(
                        idx.sort(0, false).0.equal(&iw.sort(0, false).0),
                        "{what}: entries"
                    );
                }
            }
        }
    }

    /// `kernels::top_entries`' definition, for a bf16 [B, W] `x` on the CPU: the flat places
    /// (row * W + column) of the `keep` entries outside the first `c` columns with the largest
    /// keys (a positive value's bits; 0 for zero, negative and NaN), ties taken in row-major
    /// order, listed in that order.
    fn top_reference(x: &Tensor, c: i64, keep: i64) -> Tensor {
        let w = x.size()[1];
        let x = x.narrow(1, c, w - c).reshape([-1]);
        let bits = x
            .view_dtype(Kind::Int16)
            .to_kind(Kind::Int64)
            .bitwise_and(0xffff);
        let key = bits.where_scalarother(&x.gt(0.0), 0);
        let (_, order) = key.sort_stable(true, 0, true);
        let at = order.narrow(0, 0, keep).sort(0, false).0;
        at.floor_divide_scalar(w - c) * w + at.remainder(w - c) + c
    }

    /// BatchTopK without the host (select.cu's select_top_*, emulated) against its definition:
    /// whatever the cut (the sampled one; none; one above every entry; one so low that its bins
    /// end below the answer; NaN), with ties everywhere, with fewer positive entries than
    /// `keep` and with none, at keep 1 and all entries, and over rows whose packs do not line
    /// up; and with every chunk's entries that reach the cut in its slot, none, or about half
    /// (the others read from p again). A wrong round (the cut's, the 256s', the keys'), a place
    /// off by one, or a slot's entry off by one fails it.
    #[test]
    fn top_entries_are_the_top_keep_in_row_major_order() {
        tch::manual_seed(5);
        // Four blocks of select_top_count's 8,192 entries, the histograms' two emulated blocks
        // taking two turns each (the emulator spawns a thread per CUDA thread, so every launch
        // costs; the cases are picked, not crossed).
        let normal = Tensor::randn([32, 1024], (Kind::Float, Device::Cpu));
        let bf = |t: Tensor| t.to_kind(Kind::BFloat16);
        let x = bf(normal.shallow_clone());
        let n = x.numel();
        let (near, big, zero, nan) = (-1.0, f64::INFINITY, 0.0, f64::NAN);
        let cases = [
            // (what, x, keep, cut): near is the value about 2 keep entries reach, the aim of
            // the trainer's sample; big, twice the largest entry. A name with "core" leaves
            // the first 37 columns out.
            ("the cut's bins", &x, 2048, near),
            ("a core", &x, 2048, near),
            ("a core, no cut", &x, 2048, zero),
            ("a core, every other entry", &x, n - 32 * 37, near),
            ("a core, few positive", &bf(&normal - 3.0), 2048, big),
            ("the cut's bins, keep 1", &x, 1, near),
            ("the cut's bins, all entries", &x, n, near),
            ("no cut", &x, 2048, zero),
            ("no cut, all entries", &x, n, zero),
            ("NaN cut", &x, 2048, nan),
            ("cut above every entry", &x, 2048, big),
            ("bins ending below the answer", &x, 2048, 1e-30),
            ("ties", &bf((&normal * 2.0).round()), 2048, near),
            ("ties, no cut", &bf((&normal * 2.0).round()), 5000, zero),
            ("few positive", &bf(&normal - 3.0), 2048, big),
            ("few positive, no cut", &bf(&normal - 3.0), 2048, zero),
            ("none positive", &bf(-normal.abs()), 2048, zero),
            ("heavy tail", &bf(normal.square().square()), 2048, near),
            (
                "unaligned rows",
                &bf(Tensor::randn([13, 515], (Kind::Float, Device::Cpu))),
                777,
                near,
            ),
        ];
        kernels::emulate_on_cpu(true);
        for (what, x, keep, cut) in cases {
            let keep = keep as i64;
            let core = if what.contains("core") { 37 } else { 0 };
            let xf = x.to_kind(Kind::Float).reshape([-1]);
            let sorted = xf.sort(0, true).0;
            let cut = match cut {
                -1.0 => sorted.double_value(&[(2 * keep).min(xf.numel() as i64) - 1]),
                c if c == f64::INFINITY => 2.0 * sorted.double_value(&[0]).abs() + 1.0,
                c => c,
            };
            // Each chunk's entries reaching the cut (select.cu's slot lists): with a cap of 0
            // and of their median, none and about half of the chunks keep theirs in a slot.
            let (w, chunk) = (x.size()[1], 8192);
            let cut_bf = Tensor::from(cut as f32)
                .to_kind(Kind::BFloat16)
                .double_value(&[]);
            let reach = x.ge(cut_bf).logical_and(&x.gt(0.0)).to_kind(Kind::Int64);
            let _ = reach.narrow(1, 0, core).fill_(0);
            let reach = reach.reshape([-1]);
            let pad = (chunk - reach.numel() as i64 % chunk) % chunk;
            let per_chunk = reach
                .constant_pad_nd([0, pad])
                .reshape([-1, chunk])
                .sum_dim_intlist(1, false, Kind::Int64);
            let median = per_chunk.median().int64_value(&[]);
            let caps: &[Option<i64>] = match cut > 0.0 && cut.is_finite() {
                true => &[None, Some(0), Some(median)],
                false => &[None],
            };
            for &cap in caps {
                let (rows, cols) =
                    kernels::top_entries(x, core, &Tensor::from(cut as f32), keep, cap).unwrap();
                assert!(
                    (rows * w + cols).equal(&top_reference(x, core, keep)),
                    "{what}: keep {keep}, cut {cut}, slots of {cap:?} (chunks reaching the cut: \
                     {per_chunk:?})"
                );
            }
        }
        kernels::emulate_on_cpu(false);
    }

    /// select.cu on a GPU (DMSAE_TEST_CUDA=1; scripts/gpu_checks.sh) against ATen's mask and
    /// `nonzero`: the same entries in the same order, in bf16 (as training runs) and float32,
    /// with and without a core, at 512 tokens of width 16,384; `top_entries` (bf16) against
    /// its definition, also with none and some of the chunks' lists in their slots.
    #[test]
    fn the_fused_candidates_match_aten_on_cuda() {
        let Some(device) = test_cuda() else {
            return;
        };
        tch::manual_seed(3);
        let (b, w, keep) = (512, 16_384, 512 * 32);
        let x = Tensor::randn([b, w], (Kind::Float, device));
        for kind in [Kind::BFloat16, Kind::Float] {
            let x = x.to_kind(kind);
            for c in [0, 37] {
                let thr = Tensor::full([c], 1.5, (Kind::Float, device));
                let thr = (c > 0).then_some(&thr);
                let run = |fused| {
                    with_kernel(&kernels::SELECT, fused, || train_entries(&x, c, thr, keep))
                };
                let (got, want) = (run(true), run(false));
                if got.padded {
                    let want = top_reference(&x.to_device(Device::Cpu), c, keep);
                    let at = (got.rows * w + got.cols).to_device(Device::Cpu);
                    assert!(
                        at.equal(&want),
                        "{kind:?}, c {c}: top_entries differs from its definition"
                    );
                    // No chunk's list in its slot, and about half (about 32 reach the cut in each).
                    let noncore = x.narrow(1, c, w - c).reshape([-1]);
                    let cut = noncore
                        .topk(2 * keep, 0, true, false)
                        .0
                        .min()
                        .to_kind(Kind::Float);
                    for cap in [0, 32] {
                        let (rows, cols) = kernels::top_entries(&x, c, &cut, keep, Some(cap))
                            .unwrap_or_else(|e| panic!("{e}"));
                        assert!(
                            (rows * w + cols).to_device(Device::Cpu).equal(&want),
                            "{kind:?}, c {c}, slots of {cap}: top_entries differs"
                        );
                    }
                    continue;
                }
                assert!(
                    got.rows.equal(&want.rows) && got.cols.equal(&want.cols),
                    "{kind:?}, c {c}: select.cu's entries differ"
                );
            }
        }
    }

    /// The fused Adam against the textbook update, written out, over three steps with bias
    /// correction and the clip's divisor in one step: in f64, and in f32 (training's dtype);
    /// on CUDA as well with DMSAE_TEST_CUDA=1 (`scripts/gpu_checks.sh`: the CUDA kernel is
    /// another implementation; libtorch_cuda is loaded only then, not beside other tests).
    #[test]
    fn fused_adam_is_adam() {
        let cuda = test_cuda().is_some();
        let mut cases = vec![
            (Kind::Double, 1e-12, Device::Cpu),
            (Kind::Float, 1e-6, Device::Cpu),
        ];
        if cuda {
            cases.extend([
                (Kind::Double, 1e-12, Device::Cuda(0)),
                (Kind::Float, 1e-6, Device::Cuda(0)),
            ]);
        }
        for (kind, tol, device) in cases {
            eprintln!("fused Adam against the textbook: {kind:?} on {device:?}");
            let cfg = TrainConfig {
                width: 64,
                ..small_cfg(1)
            };
            let sae = Sae::new(4, None, &cfg, kind, device).unwrap();
            let mut t = Trainer::new(sae, cfg.clone(), false);
            let copy = |ts: &[&Tensor]| ts.iter().map(|p| p.detach().copy()).collect::<Vec<_>>();
            let mut p = copy(&t.sae.params());
            let (mut m, mut v): (Vec<Tensor>, Vec<Tensor>) = (
                p.iter().map(|x| x.zeros_like()).collect(),
                p.iter().map(|x| x.zeros_like()).collect(),
            );
            let (b1, b2, eps, lr) = (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, 1e-2);
            for step in 0..3 {
                tch::manual_seed(step);
                let g: Vec<Tensor> = p.iter().map(|x| x.randn_like()).collect();
                let div = (step == 1).then_some(4.0);
                let n = (step + 1) as i32;
                for i in 0..4 {
                    let g = &g[i] / div.unwrap_or(1.0);
                    m[i] = &m[i] * b1 + &g * (1.0 - b1);
                    v[i] = &v[i] * b2 + g.square() * (1.0 - b2);
                    let m_hat = &m[i] / (1.0 - b1.powi(n));
                    let v_hat = &v[i] / (1.0 - b2.powi(n));
                    p[i] = &p[i] - m_hat / (v_hat.sqrt() + eps) * lr;
                }
                let div_t = Tensor::full([0i64; 0], div.unwrap_or(1.0), (Kind::Float, device));
                tch::no_grad(|| t.adam(&mut copy(&g.iter().collect::<Vec<_>>()), lr, &div_t));
                t.step += 1;
            }
            for (ours, want) in t.sae.params().iter().zip(&p) {
                let diff = (*ours - want).abs().max().double_value(&[]);
                assert!(diff < tol, "{kind:?}: max |diff| {diff}");
            }
            for (ours, want) in t.m.iter().zip(&m).chain(t.v.iter().zip(&v)) {
                assert!(
                    ours.allclose(want, tol, tol, false),
                    "{kind:?}: moments differ"
                );
            }
            assert!(!t.sae.w_enc.allclose(&t.sae.w_dec.tr(), 1e-3, 1e-3, false));
        }
    }

    /// CUDA device 0 when DMSAE_TEST_CUDA=1 and it is there (scripts/gpu_checks.sh): what the
    /// `_on_cuda` tests run on; elsewhere they pass without running.
    fn test_cuda() -> Option<Device> {
        let on = std::env::var("DMSAE_TEST_CUDA").is_ok_and(|v| v == "1")
            && dmsae_extractor::runtime::load_cuda(option_env!("DMSAE_LIBTORCH_LIB")).is_ok()
            && tch::Cuda::is_available();
        on.then_some(Device::Cuda(0))
    }

    fn copies(ts: &[Tensor]) -> Vec<Tensor> {
        ts.iter().map(|t| t.copy()).collect()
    }

    /// The fused update (adam.cu, emulated) against the ATen sequence over three steps with
    /// random gradients, the clip active on the first and last and not on the second; d = 40
    /// leaves the last lane group of each decoder row part-filled. Parameters, moments and the
    /// returned norm agree to float32 rounding: 1e-6 absolute (a ten-thousandth of a step at lr
    /// 1e-2; ATen and the kernel order their float32 operations differently, and Adam divides
    /// by sqrt(v), which magnifies that where the moments nearly cancel) plus 2e-6 relative.
    #[test]
    fn the_fused_update_matches_aten() {
        fused_update_against_aten(Device::Cpu);
    }

    /// The same on a GPU, launched through NVRTC and the driver (DMSAE_TEST_CUDA=1;
    /// scripts/gpu_checks.sh).
    #[test]
    fn the_fused_update_matches_aten_on_cuda() {
        if let Some(device) = test_cuda() {
            fused_update_against_aten(device);
        }
    }

    fn fused_update_against_aten(device: Device) {
        // d 40 in 16-byte packs, 42 an element at a time, 136 more packs than a warp's lanes;
        // on a GPU also 2,308, over the rows decoder_adam holds in shared memory (emulated, the
        // held and read-back forms are compared directly, at a fraction of the time).
        let long = device.is_cuda().then_some(2308);
        for d in [40, 42, 136].into_iter().chain(long) {
            fused_update_against_aten_at(device, d);
        }
    }

    fn fused_update_against_aten_at(device: Device, d: usize) {
        let cfg = small_cfg(2);
        let new = || {
            Trainer::new(
                Sae::new(d, None, &cfg, Kind::Float, device).unwrap(),
                cfg.clone(),
                false,
            )
        };
        let (mut a, mut b) = (new(), new());
        let w0 = a.sae.w_dec.detach().copy();
        for step in 0..3 {
            tch::manual_seed(step);
            let scale = if step == 1 { 1e-4 } else { 1.0 };
            let g: Vec<Tensor> = a
                .sae
                .params()
                .iter()
                .map(|p| p.randn_like() * scale)
                .collect();
            let na = tch::no_grad(|| a.aten_update(&mut copies(&g), 1e-2, &mut Laps::off()))
                .double_value(&[]);
            kernels::emulate_on_cpu(true);
            assert!(kernels::use_fused(&b.sae.w_dec, &kernels::ADAM));
            let nb =
                tch::no_grad(|| b.fused_update(&copies(&g), 1e-2, None, None, &mut Laps::off()))
                    .double_value(&[]);
            kernels::emulate_on_cpu(false);
            assert!(
                (na - nb).abs() <= 1e-5 * na,
                "step {step}: norm {na} against {nb}"
            );
            assert_eq!(na > cfg.grad_clip, step != 1);
            a.step += 1;
            b.step += 1;
        }
        let pairs = a.sae.params().into_iter().zip(b.sae.params());
        for (i, (x, y)) in pairs
            .chain(a.m.iter().zip(&b.m))
            .chain(a.v.iter().zip(&b.v))
            .enumerate()
        {
            let diff = (x - y).abs().max().double_value(&[]);
            let size = x.abs().max().double_value(&[]);
            assert!(
                diff <= 1e-6 + 2e-6 * size,
                "tensor {i}: max |diff| {diff} of {size}"
            );
        }
        let norms = b.sae.w_dec.norm_scalaropt_dim(2, [-1], false);
        assert!(norms.allclose(&norms.ones_like(), 1e-6, 1e-6, false));
        assert!(
            (&b.sae.w_dec - w0).abs().max().double_value(&[]) > 1e-3,
            "nothing moved"
        );
    }

    /// The fused update with W_enc's and W_dec's gradients in bf16 (adam.cu's `_g16` kernels)
    /// is the update of those gradients' values in float32, bit for bit, with float32 and bf16
    /// moments, over three steps (the clip active, then not); the biases' stay float32.
    #[test]
    fn fused_update_reads_bf16_gradients() {
        for bf16_moments in [false, true] {
            let cfg = TrainConfig {
                adam_bf16_moments: Some(bf16_moments),
                ..small_cfg(2)
            };
            let new = || {
                let sae = Sae::new(24, None, &cfg, Kind::Float, Device::Cpu).unwrap();
                Trainer::new(sae, cfg.clone(), false)
            };
            let (mut a, mut b) = (new(), new());
            kernels::emulate_on_cpu(true);
            for step in 0..3 {
                tch::manual_seed(step);
                let scale = if step == 1 { 1e-4 } else { 1.0 };
                let mut g: Vec<Tensor> = a
                    .sae
                    .params()
                    .iter()
                    .map(|p| p.randn_like() * scale)
                    .collect();
                let mut g32 = copies(&g);
                for i in [0, 2] {
                    g[i] = g[i].to_kind(Kind::BFloat16);
                    g32[i] = g[i].to_kind(Kind::Float);
                }
                let na = tch::no_grad(|| a.fused_update(&g, 1e-2, None, None, &mut Laps::off()));
                let nb = tch::no_grad(|| b.fused_update(&g32, 1e-2, None, None, &mut Laps::off()));
                assert!(na.equal(&nb), "step {step}: the clip's norm");
                a.step += 1;
                b.step += 1;
            }
            kernels::emulate_on_cpu(false);
            let pairs = a.sae.params().into_iter().zip(b.sae.params());
            for (i, (x, y)) in pairs
                .chain(a.m.iter().zip(&b.m))
                .chain(a.v.iter().zip(&b.v))
                .enumerate()
            {
                assert!(
                    x.equal(y),
                    "bf16 moments {bf16_moments}: tensor {i} differs"
                );
            }
        }
    }

    /// A run with bf16 moments stopped after one step and resumed from `state()` ends where an
    /// uninterrupted one does, bit for bit: the moments round-trip in bf16 and the rounding
    /// stream follows the step, not the process (whole steps, every kernel emulated). The
    /// resumed trainer has the key unset, so it keeps the checkpoint's kind of moments.
    #[test]
    fn bf16_moments_resume_exactly() {
        let d = 16;
        let cfg = TrainConfig {
            width: 32,
            adam_bf16_moments: Some(true),
            ..small_cfg(12)
        };
        let new = || {
            let sae = Sae::new(d, None, &cfg, Kind::Float, Device::Cpu).unwrap();
            Trainer::new(sae, cfg.clone(), false)
        };
        tch::manual_seed(3);
        let xs: Vec<Tensor> = (0..3)
            .map(|_| Tensor::randn([32, d as i64], (Kind::Float, Device::Cpu)))
            .collect();
        kernels::emulate_on_cpu(true);
        let mut whole = new();
        for x in &xs {
            whole.update(x);
        }
        let mut first = new();
        first.update(&xs[0]);
        // Resumed with the key unset (float32 moments on the CPU): it keeps the checkpoint's
        // bf16 ones. Set to float32, it refuses them.
        let unset = TrainConfig {
            adam_bf16_moments: None,
            ..cfg.clone()
        };
        let sae = || Sae::new(d, None, &cfg, Kind::Float, Device::Cpu).unwrap();
        let mut resumed = Trainer::new(sae(), unset, false);
        assert_eq!(resumed.m[0].kind(), Kind::Float);
        let state = first.state();
        assert!(state
            .iter()
            .any(|(n, t)| n == "adam_v.W_enc" && t.kind() == Kind::BFloat16));
        let f32_cfg = TrainConfig {
            adam_bf16_moments: Some(false),
            ..cfg.clone()
        };
        let err = Trainer::new(sae(), f32_cfg, false)
            .load_state(&state, first.step, first.sae.threshold)
            .unwrap_err();
        assert!(
            err.contains("adam_m.W_enc") && err.contains("BFloat16"),
            "{err}"
        );
        resumed
            .load_state(&state, first.step, first.sae.threshold)
            .unwrap();
        for x in &xs[1..] {
            resumed.update(x);
        }
        kernels::emulate_on_cpu(false);
        for ((n, a), (_, b)) in whole.state().iter().zip(&resumed.state()) {
            assert!(a.equal(b), "{n} differs after the resume");
        }
    }

    /// BatchTopK without the host (`kernels::top_entries`: bf16 pre-activations, no core;
    /// emulated) steps as ATen's top-k does (weights, moments, counters, threshold and figures
    /// after two steps: float32 bit for bit, float64 to 1e-14), where b_enc is lowered until
    /// fewer than k*B entries are positive: its list then ends in zero codes that must not
    /// count, fire, set the threshold or pass a gradient (each of those left out fails it),
    /// through the sparse encoder gradient and through the dense graph (float64 here; also the
    /// path of many dead latents). Both keep every positive entry there; with more, each
    /// breaks bf16's ties its own way, so the entries are
    /// `top_entries_are_the_top_keep_in_row_major_order`'s to check.
    #[test]
    fn hostless_batchtopk_steps_as_atens() {
        let d = 24;
        let cfg = TrainConfig {
            encoder_bf16: Some(true),
            warmup_steps: 1,
            ..small_cfg(6)
        };
        tch::manual_seed(8);
        let xs: Vec<Tensor> = (0..2)
            .map(|_| Tensor::randn([32, d as i64], (Kind::Float, Device::Cpu)))
            .collect();
        // float32 parameters: every kernel (emulated), the sparse encoder gradient among them;
        // float64: ATen's, the dense graph, all but the selection (bf16 pre-activations).
        let run = |hostless: bool, kind: Kind| {
            let sae = Sae::new(d, None, &cfg, kind, Device::Cpu).unwrap();
            tch::no_grad(|| {
                let _ = sae.b_enc.shallow_clone().g_add_scalar_(-2.5);
            });
            let mut t = Trainer::new(sae, cfg.clone(), false);
            let stats: Vec<StepStats> = emulated(hostless, || {
                xs.iter().map(|x| t.update(&x.to_kind(kind))).collect()
            });
            (t, stats)
        };
        for kind in [Kind::Float, Kind::Double] {
            let ((a, sa), (b, sb)) = (run(true, kind), run(false, kind));
            let path = if kind == Kind::Float {
                "encoder_grad.cu"
            } else {
                "the dense graph"
            };
            assert!(
                sa.iter()
                    .all(|s| s.l0_noncore > 0.0 && s.l0_noncore < cfg.k as f64),
                "{path}: fewer positive entries than k*B, and some"
            );
            for ((n, x), (_, y)) in a.state().iter().zip(&b.state()) {
                // (float64: embedding_bag's backward groups W_dec's sums otherwise with the
                // zero codes among them, 7e-18 apart here.)
                let diff = (x - y).abs().max().double_value(&[]);
                let tol = match kind {
                    Kind::Double => 1e-14 * y.abs().max().double_value(&[]),
                    _ => 0.0,
                };
                assert!(diff <= tol, "{path}: {n} differs by {diff:e}");
            }
            assert!(a.sae.threshold > 0.0, "{path}: the threshold was set");
            assert_eq!(a.sae.threshold, b.sae.threshold, "{path}: threshold");
            for (x, y) in sa.iter().zip(&sb) {
                assert_eq!(
                    (x.loss, x.fvu, x.l0_noncore, x.l0_core),
                    (y.loss, y.fvu, y.l0_noncore, y.l0_core),
                    "{path}: step {}",
                    x.step
                );
                assert!(
                    (x.grad_norm - y.grad_norm).abs() <= 1e-14 * y.grad_norm,
                    "{path}: step {}, gradient norm",
                    x.step
                );
            }
        }
    }

    /// A core trains as a block (`CoreCodes`): its codes, its part of the reconstruction and its
    /// gradients from [B, c] products, its decoder rows' figures for the update patched in
    /// (`LossOut::gradients`). Two steps of that against two that list the core's entries among
    /// the others (DMSAE_CORE_BLOCK=0), on each path: every kernel emulated (the sparse encoder
    /// gradient, the decoder's figures from its backward) with BatchTopK without the host or
    /// with it, and ATen's alone (the CPU's: the dense graph). Weights, moments, counters,
    /// threshold and figures, float32 with a trained core and a frozen one, and float64
    /// (through the dense graph on every path). The non-core b_enc is lowered so that every
    /// path keeps every positive entry (as in `hostless_batchtopk_steps_as_atens`); the
    /// selection's sampled cut, with a core block or without, is
    /// `train_entries_are_the_core_and_the_top_k`'s.
    #[test]
    fn steps_with_a_core_block_as_with_its_entries() {
        let (d, c) = (24usize, 6i64);
        let cfg = TrainConfig {
            encoder_bf16: Some(true),
            decoder_bf16: Some(false),
            warmup_steps: 1,
            ..small_cfg(7)
        };
        tch::manual_seed(9);
        let xs: Vec<Tensor> = (0..2)
            .map(|_| Tensor::randn([32, d as i64], (Kind::Float, Device::Cpu)))
            .collect();
        let w_dc = Tensor::randn([d as i64, c], (Kind::Float, Device::Cpu));
        let core = || Core {
            w_enc_dc: &w_dc / w_dc.norm_scalaropt_dim(2, [0], true),
            b_enc_c: Tensor::from_slice(&[0.3f32, -0.2, 0.0, 0.1, 0.2, -0.1]),
            threshold_c: Some(Tensor::from_slice(&[0.0f32, 0.1, 0.3, 0.5, 0.2, 0.05])),
        };
        let run = |emulate: bool, off: &[&'static str], kind: Kind, frozen: bool| {
            let cfg = TrainConfig {
                core_frozen: frozen,
                ..cfg.clone()
            };
            let sae = Sae::new(d, Some(core()), &cfg, kind, Device::Cpu).unwrap();
            let w = sae.width() as i64;
            tch::no_grad(|| {
                let _ = sae.b_enc.narrow(0, c, w - c).g_add_scalar_(-2.5);
            });
            let mut t = Trainer::new(sae, cfg, true);
            let (stats, block) = with_paths(emulate, off, || {
                let stats: Vec<StepStats> = xs.iter().map(|x| t.update(&x.to_kind(kind))).collect();
                (stats, t.loss(&xs[0].to_kind(kind)).codes.core.is_some())
            });
            let want = !off.contains(&"DMSAE_CORE_BLOCK");
            assert_eq!(
                block, want,
                "{off:?}: the core as a block unless its knob is off"
            );
            (t, stats)
        };
        let listed = "DMSAE_HOSTLESS_SELECT";
        let paths: [(bool, &[&str]); 3] = [(true, &[]), (true, &[listed]), (false, &[])];
        for (kind, frozen) in [
            (Kind::Float, false),
            (Kind::Float, true),
            (Kind::Double, false),
        ] {
            for (emulate, off) in paths {
                let (a, sa) = run(emulate, off, kind, frozen);
                let entries = [off, &["DMSAE_CORE_BLOCK"]].concat();
                let (b, sb) = run(emulate, &entries, kind, frozen);
                let what =
                    format!("{kind:?}, frozen core {frozen}, emulated {emulate}, {off:?} off");
                assert!(
                    sa.iter()
                        .all(|s| s.l0_core > 0.5 && s.l0_core < c as f64 - 0.5),
                    "{what}: the core fires on some tokens, not all: {sa:?}"
                );
                assert!(
                    sa.iter()
                        .all(|s| s.l0_noncore > 0.0 && s.l0_noncore < cfg.k as f64),
                    "{what}: fewer positive entries than k*B, and some"
                );
                // Only the sums' order differs: the core's from products, not entry by entry (about
                // 3e-8 of the largest weight apart in float32, 4e-17 in float64, here).
                let tol = if kind == Kind::Double { 1e-14 } else { 1e-6 };
                for ((n, x), (_, y)) in a.state().iter().zip(&b.state()) {
                    let diff = (x - y).abs().max().double_value(&[]);
                    let scale = y.abs().max().double_value(&[]).max(1e-30);
                    assert!(diff <= tol * scale, "{what}: {n} differs by {diff:e}");
                }
                assert!(a.sae.threshold > 0.0, "{what}: the threshold was set");
                let close = |x: f64, y: f64| (x - y).abs() <= tol * y.abs().max(1e-30);
                assert!(close(a.sae.threshold, b.sae.threshold), "{what}: threshold");
                for (x, y) in sa.iter().zip(&sb) {
                    assert_eq!(
                        (x.l0_noncore, x.l0_core),
                        (y.l0_noncore, y.l0_core),
                        "{what}: step {}",
                        x.step
                    );
                    for (p, q) in [(x.loss, y.loss), (x.fvu, y.fvu), (x.grad_norm, y.grad_norm)] {
                        assert!(close(p, q), "{what}: step {}: {p} against {q}", x.step);
                    }
                }
            }
        }
    }

    /// The fused update's bf16 copy of W_enc is W_enc cast to bf16, bit for bit, and the next
    /// step's product reads it: steps with it end where steps that cast W_enc each time do.
    /// After W_enc changes in place through ATen the copy is stale and goes unread.
    #[test]
    fn the_updates_bf16_w_enc_is_its_cast() {
        let d = 40;
        let cfg = TrainConfig {
            encoder_bf16: Some(true),
            ..small_cfg(5)
        };
        let new = || {
            let sae = Sae::new(d, None, &cfg, Kind::Float, Device::Cpu).unwrap();
            Trainer::new(sae, cfg.clone(), false)
        };
        tch::manual_seed(4);
        let xs: Vec<Tensor> = (0..2)
            .map(|_| Tensor::randn([32, d as i64], (Kind::Float, Device::Cpu)))
            .collect();
        kernels::emulate_on_cpu(true);
        let (mut with, mut without) = (new(), new());
        for x in &xs {
            with.update(x);
            let (h, v) = with.w_enc_h.as_ref().expect("a bf16 W_enc");
            assert_eq!(*v, kernels::version(&with.sae.w_enc));
            assert!(
                h.equal(&with.sae.w_enc.to_kind(Kind::BFloat16)),
                "not W_enc's cast"
            );
            without.update(x);
            without.w_enc_h = None;
        }
        for ((n, a), (_, b)) in with.state().iter().zip(&without.state()) {
            assert!(a.equal(b), "{n} differs");
        }
        // Changed in place: the copy's version is behind, and the loss is the cast's.
        tch::no_grad(|| {
            let _ = with.sae.w_enc.shallow_clone().g_mul_scalar_(1.5);
            let _ = without.sae.w_enc.shallow_clone().g_mul_scalar_(1.5);
        });
        let (a, b) = (with.loss(&xs[0]).loss, without.loss(&xs[0]).loss);
        kernels::emulate_on_cpu(false);
        assert!(a.equal(&b), "a stale copy was read");
    }

    /// `decoder_bf16`: the fused update's bf16 W_dec is W_dec's cast, bit for bit, and steps
    /// that read it end where steps that cast each time do; after an in-place change of W_dec
    /// the copy is not read. The ATen path (the CPU's) ends within float32 rounding of the
    /// emulated kernels', and the copy is read at all: the loss is not float32's.
    #[test]
    fn the_updates_bf16_w_dec_is_its_cast() {
        let d = 40;
        let cfg = TrainConfig {
            decoder_bf16: Some(true),
            ..small_cfg(5)
        };
        let new = |cfg: &TrainConfig| {
            let sae = Sae::new(d, None, cfg, Kind::Float, Device::Cpu).unwrap();
            Trainer::new(sae, cfg.clone(), false)
        };
        tch::manual_seed(4);
        let xs: Vec<Tensor> = (0..2)
            .map(|_| Tensor::randn([32, d as i64], (Kind::Float, Device::Cpu)))
            .collect();
        let mut aten = new(&cfg);
        for x in &xs {
            aten.update(x);
        }
        kernels::emulate_on_cpu(true);
        let (mut with, mut without) = (new(&cfg), new(&cfg));
        for x in &xs {
            with.update(x);
            let (h, v) = with.w_dec_h.as_ref().expect("a bf16 W_dec");
            assert_eq!(*v, kernels::version(&with.sae.w_dec));
            assert!(
                h.equal(&with.sae.w_dec.to_kind(Kind::BFloat16)),
                "not W_dec's cast"
            );
            without.update(x);
            without.w_dec_h = None;
        }
        for (((n, a), (_, b)), (_, c)) in
            with.state().iter().zip(&without.state()).zip(&aten.state())
        {
            assert!(a.equal(b), "{n} differs");
            let diff = (a - c).abs().max().double_value(&[]);
            assert!(diff <= 1e-5, "{n}: max |diff| {diff} from ATen's");
        }
        let f32_loss = new(&TrainConfig {
            decoder_bf16: Some(false),
            ..cfg.clone()
        })
        .loss(&xs[0])
        .loss;
        let bf16_loss = new(&cfg).loss(&xs[0]).loss;
        // Changed in place: the copy's version is behind, and the loss is the cast's.
        tch::no_grad(|| {
            let _ = with.sae.w_dec.shallow_clone().g_mul_scalar_(1.5);
            let _ = without.sae.w_dec.shallow_clone().g_mul_scalar_(1.5);
        });
        let (a, b) = (with.loss(&xs[0]).loss, without.loss(&xs[0]).loss);
        kernels::emulate_on_cpu(false);
        assert!(a.equal(&b), "a stale copy was read");
        let rel = ((&f32_loss - &bf16_loss) / &f32_loss)
            .abs()
            .double_value(&[]);
        assert!(
            rel > 1e-7 && rel < 1e-2,
            "bf16 rows moved the loss by {rel:e}"
        );
    }

    /// Whole steps (`update`) with the fused update emulated against the ATen path, with a
    /// frozen core and a trained one: the wiring around the kernels (the core's zeroed
    /// gradient, contiguity, the clip's norm). The weights agree to float32 rounding, and a
    /// frozen core's encoder columns stay put. Rows of 24 floats (16-byte packs) and of 301
    /// (one at a time).
    #[test]
    fn steps_with_the_fused_update_match_aten() {
        for d in [24, 301] {
            steps_with_the_fused_update_match_aten_at(d);
        }
    }

    /// decoder_adam's two forms give the same bits: rows held in shared memory for their norm
    /// (a block of at most 4 warps) and rows read back (more warps, or rows over 2,304
    /// floats), with bf16 and float32 moments, in packs (65 a row: a lane takes two at once)
    /// and one at a time, the bf16 copy too.
    #[test]
    fn the_decoders_held_update_is_the_read_back_one() {
        kernels::emulate_on_cpu(true);
        for (d, moments) in [
            (260i64, Kind::BFloat16),
            (301, Kind::BFloat16),
            (260, Kind::Float),
        ] {
            tch::manual_seed(d);
            let rows = 6i64;
            let f = (Kind::Float, Device::Cpu);
            let w0 = unit_rows(&Tensor::randn([rows, d], f));
            let g = Tensor::randn([rows, d], f) * 0.1;
            let m0 = (Tensor::randn([rows, d], f) * 0.01).to_kind(moments);
            let v0 = (Tensor::rand([rows, d], f) * 0.01).to_kind(moments);
            let dot = (&g * &w0).sum_dim_intlist(1, false, None);
            let inv_div = Tensor::from_slice(&[0.5f32]);
            let update = |block: u32| {
                let (w, m, v) = (w0.copy(), m0.copy(), v0.copy());
                let shadow = Tensor::empty([rows, d], (Kind::BFloat16, Device::Cpu));
                let mut a = AdamArgs {
                    inv_div: inv_div.data_ptr() as *const f32,
                    step_size: 1e-2,
                    beta1: 0.9,
                    beta2: 0.999,
                    bc2_sqrt: 0.05,
                    eps: 1e-8,
                    seed: 77,
                };
                let [mut pw, mut pg, mut pm, mut pv, mut pd, mut ps] =
                    [&w, &g, &m, &v, &dot, &shadow].map(|t| t.data_ptr());
                let (mut r, mut dd) = (rows, d);
                let name = match moments {
                    Kind::BFloat16 => "decoder_adam_bf16",
                    _ => "decoder_adam_f32",
                };
                // SAFETY: decoder_adam(w, g, m, v, dot, shadow, rows, d, args) over live
                // contiguous CPU tensors of those shapes and kinds.
                unsafe {
                    kernels::run(
                        &kernels::ADAM,
                        name,
                        Device::Cpu,
                        (rows as u32).div_ceil(block / 32),
                        block,
                        &mut [
                            addr(&mut pw),
                            addr(&mut pg),
                            addr(&mut pm),
                            addr(&mut pv),
                            addr(&mut pd),
                            addr(&mut ps),
                            addr(&mut r),
                            addr(&mut dd),
                            addr(&mut a),
                        ],
                    )
                }
                .unwrap();
                [w, m, v, shadow]
            };
            // A block of 5 warps is over the held rows' 4.
            let (held, read_back) = (update(32), update(160));
            assert!(!held[0].equal(&w0), "d {d}: no update");
            for (what, (x, y)) in ["W", "m", "v", "bf16 W"]
                .iter()
                .zip(held.iter().zip(&read_back))
            {
                assert!(x.equal(y), "d {d}, {moments:?} moments: {what} differs");
            }
            assert!(held[3].equal(&held[0].to_kind(Kind::BFloat16)));
        }
        kernels::emulate_on_cpu(false);
    }

    fn steps_with_the_fused_update_match_aten_at(d: usize) {
        // A frozen core, and one trained (the clip's norm then has its columns' gradient from
        // the bias as well as from the sparse encoder kernel's).
        for frozen in [true, false] {
            steps_with_the_fused_update_match_aten_with(d, frozen);
        }
    }

    fn steps_with_the_fused_update_match_aten_with(d: usize, frozen: bool) {
        let cfg = small_cfg(4);
        let (core_w, _) = sparse_dictionary(d, 3, 1, 1, 0.0, 5);
        let new = || {
            let core = Core {
                w_enc_dc: tensor(&core_w, 3, Kind::Float).tr(),
                b_enc_c: Tensor::from_slice(&[0.1f32, -0.2, 0.05]),
                threshold_c: None,
            };
            let sae = Sae::new(d, Some(core), &cfg, Kind::Float, Device::Cpu).unwrap();
            Trainer::new(sae, cfg.clone(), frozen)
        };
        let (mut a, mut b) = (new(), new());
        let w0 = a.sae.w_enc.detach().copy();
        // Batches from a generator of their own, not torch's, which tests running beside this
        // one also draw from: one full run's draws put the weights over 1e-5 apart (these, at
        // most 1.2e-6).
        for step in 0..3 {
            let (_, x) = sparse_dictionary(d, 4, 2, 64, 1.0, 7 + step);
            let x = tensor(&x, 64, Kind::Float);
            let sa = a.update(&x);
            kernels::emulate_on_cpu(true);
            let sb = b.update(&x);
            kernels::emulate_on_cpu(false);
            let (na, nb) = (sa.grad_norm, sb.grad_norm);
            assert!(
                (na - nb).abs() <= 1e-5 * na,
                "frozen {frozen}: norm {nb} against {na}"
            );
        }
        for (x, y) in a.sae.params().into_iter().zip(b.sae.params()) {
            let diff = (x - y).abs().max().double_value(&[]);
            assert!(diff <= 1e-5, "d {d}, frozen {frozen}: max |diff| {diff}");
        }
        let core_kept = b.sae.w_enc.narrow(1, 0, 3).equal(&w0.narrow(1, 0, 3));
        assert_eq!(core_kept, frozen);
        assert!(!b.sae.w_enc.narrow(1, 3, 8).equal(&w0.narrow(1, 3, 8)));
    }

    /// bf16 moments rounded stochastically follow the float32 ones where rounding to nearest
    /// stalls: from v = 1 with g^2 = 4, each step adds 0.003, under half a bf16 ulp of 1 (0.0039).
    /// After 10 steps v = 4 - 3 * 0.999^10 = 1.030 (a stalled v stays 1); the mean over 512
    /// entries lands within 0.005 of it. A seed repeats its rounding; another seed does not.
    #[test]
    fn bf16_moments_follow_the_float32_ones() {
        let run = |seed: u64, steps: u64| {
            let cfg = TrainConfig {
                width: 32,
                grad_clip: 1e9,
                adam_bf16_moments: Some(true),
                ..small_cfg(seed)
            };
            let sae = Sae::new(16, None, &cfg, Kind::Float, Device::Cpu).unwrap();
            let mut t = Trainer::new(sae, cfg, false);
            assert!(
                t.check_update().is_err(),
                "bf16 moments on the CPU without the emulator"
            );
            let _ = t.v[0].fill_(1.0);
            let mut g: Vec<Tensor> = t
                .sae
                .params()
                .iter()
                .map(|p| p.detach().zeros_like())
                .collect();
            g[0] = g[0].fill(2.0);
            kernels::emulate_on_cpu(true);
            assert!(t.check_update().is_ok());
            for _ in 0..steps {
                let _ = tch::no_grad(|| t.fused_update(&g, 1e-3, None, None, &mut Laps::off()));
                t.step += 1;
            }
            kernels::emulate_on_cpu(false);
            t
        };
        let t = run(3, 10);
        assert_eq!(t.m[0].kind(), Kind::BFloat16);
        let mean = |x: &Tensor| x.to_kind(Kind::Double).mean(None).double_value(&[]);
        let (v, m) = (mean(&t.v[0]), mean(&t.m[0]));
        let (want_v, want_m) = (4.0 - 3.0 * 0.999f64.powi(10), 2.0 * (1.0 - 0.9f64.powi(10)));
        assert!(
            (v - want_v).abs() < 0.005,
            "mean v {v}, float32 moments {want_v}"
        );
        assert!(
            (m - want_m).abs() < 0.005,
            "mean m {m}, float32 moments {want_m}"
        );
        let (a, b, c) = (run(5, 3), run(5, 3), run(6, 3));
        assert!(a.v[0].equal(&b.v[0]) && a.sae.w_enc.equal(&b.sae.w_enc));
        assert!(!a.v[0].equal(&c.v[0]));
    }

    #[test]
    fn the_clip_scales_the_norm_down_to_the_limit() {
        let div = |norm: f64, clip| clip_divisor(&Tensor::from(norm), clip).double_value(&[]);
        assert_eq!(div(0.5, 1.0), 1.0);
        assert_eq!(div(80.0, 1.0), 80.0);
        assert_eq!(div(3.0, 2.0), 1.5);
    }

    /// The CPU kernel would walk a mislaid moment's memory as if it were the parameter's.
    #[test]
    #[should_panic(expected = "first moment is not laid out as its parameter")]
    fn fused_adam_refuses_a_moment_laid_out_otherwise() {
        let cfg = TrainConfig {
            width: 64,
            ..small_cfg(1)
        };
        let sae = Sae::new(4, None, &cfg, Kind::Float, Device::Cpu).unwrap();
        let mut t = Trainer::new(sae, cfg, false);
        t.m[0] = t.m[0].tr().contiguous().tr();
        let mut g: Vec<Tensor> = t
            .sae
            .params()
            .iter()
            .map(|p| p.detach().ones_like())
            .collect();
        let one = Tensor::ones([0i64; 0], (Kind::Float, Device::Cpu));
        tch::no_grad(|| t.adam(&mut g, 1e-3, &one));
    }

    fn train(cfg: &TrainConfig, x: &[f32], d: usize, steps: usize) -> Trainer {
        let sae = Sae::new(d, None, cfg, Kind::Float, Device::Cpu).unwrap();
        let mut t = Trainer::new(sae, cfg.clone(), false);
        let b = cfg.batch_tokens;
        let n = x.len() / d / b;
        for s in 0..steps {
            let lo = (s % n) * b * d;
            t.update(&tensor(&x[lo..lo + b * d], b, Kind::Float));
        }
        t
    }

    fn small_cfg(seed: u64) -> TrainConfig {
        TrainConfig {
            width: 96,
            k: 4,
            batch_tokens: 256,
            lr: 3e-3,
            warmup_steps: 20,
            steps: 1500,
            dead_tokens: 20_000,
            seed,
            ..Default::default()
        }
    }

    #[test]
    fn seeded_runs_are_identical() {
        let (_, x) = sparse_dictionary(16, 24, 3, 2048, 0.05, 1);
        let cfg = TrainConfig {
            width: 64,
            steps: 40,
            ..small_cfg(7)
        };
        let (a, b) = (train(&cfg, &x, 16, 40), train(&cfg, &x, 16, 40));
        for (p, q) in a.sae.params().into_iter().zip(b.sae.params()) {
            assert!(p.equal(q));
        }
        assert_eq!(a.sae.threshold, b.sae.threshold);
        let c = train(
            &TrainConfig {
                seed: 8,
                ..cfg.clone()
            },
            &x,
            16,
            40,
        );
        assert!(!a.sae.w_dec.equal(&c.sae.w_dec));
        // The bf16 encoder product changes the numbers, a little.
        let e = train(
            &TrainConfig {
                encoder_bf16: Some(true),
                ..cfg.clone()
            },
            &x,
            16,
            40,
        );
        let diff = (&a.sae.w_enc - &e.sae.w_enc).abs().max().double_value(&[]);
        assert!(
            diff > 0.0 && diff < 0.05,
            "bf16 vs f32 W_enc: max |diff| {diff}"
        );
        // Resumed where the unset keys mean f32 (the CPU), a bf16 run stays bf16: the
        // checkpoint carries the product and the decoder's rows, and the continuation matches
        // the bf16 run's.
        let unset = TrainConfig {
            encoder_bf16: None,
            decoder_bf16: None,
            ..cfg.clone()
        };
        let mut r = Trainer::new(
            Sae::new(16, None, &unset, Kind::Float, Device::Cpu).unwrap(),
            unset,
            false,
        );
        assert!(!r.encoder_bf16() && !r.decoder_bf16());
        // Resumed before the last step, where the learning rate is not yet 0.
        let bf16 = TrainConfig {
            encoder_bf16: Some(true),
            decoder_bf16: Some(true),
            ..cfg.clone()
        };
        let mut e = train(&bf16, &x, 16, 39);
        r.load_state(&e.state(), e.step, e.sae.threshold).unwrap();
        assert!(r.encoder_bf16() && r.decoder_bf16());
        let x_bd = tensor(&x[..cfg.batch_tokens * 16], cfg.batch_tokens, Kind::Float);
        let before = e.sae.w_enc.copy();
        e.update(&x_bd);
        r.update(&x_bd);
        assert!(!e.sae.w_enc.equal(&before));
        assert!(r.sae.w_enc.equal(&e.sae.w_enc));
        assert!(r.sae.w_dec.equal(&e.sae.w_dec));
    }

    /// Steps whose figures are read during the next step (`queue`) are the steps that read
    /// them at once (`update`): the weights, the moments, the threshold and every step's
    /// figures, bit for bit, across the steps where latents die. Whether the next step needs
    /// AuxK is then known from `since_max`, and latents die exactly at a step's end here
    /// (`dead_tokens` a multiple of the batch), so a bound one token short, or one missing a
    /// step's tokens, gives a step without AuxK's rows that should have had them.
    #[test]
    fn steps_read_a_step_late_are_the_steps_read_at_once() {
        steps_read_late_against_at_once(Device::Cpu);
    }

    /// The same on a GPU (DMSAE_TEST_CUDA=1; scripts/gpu_checks.sh), where the figures cross
    /// on the copy stream: equal to float32 summation order (the kernels' atomics), the same
    /// step for AuxK's start.
    #[test]
    fn steps_read_a_step_late_are_the_steps_read_at_once_on_cuda() {
        if let Some(device) = test_cuda() {
            steps_read_late_against_at_once(device);
        }
    }

    fn steps_read_late_against_at_once(device: Device) {
        let (_, x) = sparse_dictionary(16, 24, 3, 2048, 0.05, 1);
        let cfg = TrainConfig {
            width: 96,
            k: 2,
            steps: 40,
            warmup_steps: 4,
            dead_tokens: 256 * 2,
            ..small_cfg(3)
        };
        let (d, b) = (16, cfg.batch_tokens);
        let new = || {
            let sae = Sae::new(d, None, &cfg, Kind::Float, device).unwrap();
            Trainer::new(sae, cfg.clone(), false)
        };
        let batch = |s: usize| {
            let lo = (s % (x.len() / d / b)) * b * d;
            tensor(&x[lo..lo + b * d], b, Kind::Float).to_device(device)
        };
        // Exact on the CPU; on a GPU, to a relative 1e-3.
        let tol = if device.is_cuda() { 1e-3 } else { 0.0 };
        let close = |a: f64, b: f64| (a - b).abs() <= tol * a.abs().max(b.abs());
        let (mut now, mut late) = (new(), new());
        let (mut read_now, mut read_late) = (Vec::new(), Vec::new());
        for s in 0..cfg.steps as usize {
            read_now.push(now.update(&batch(s)));
            read_late.extend(late.queue(&batch(s)));
        }
        read_late.extend(late.settle());
        assert!(late.settle().is_none());
        // Latents died during the run, not before it: AuxK starts part-way.
        let first_auxk = read_now.iter().position(|s| s.auxk > 0.0);
        assert!(
            matches!(first_auxk, Some(i) if i > 1),
            "AuxK from step {first_auxk:?}"
        );
        assert_eq!(read_now.len(), read_late.len());
        for (a, b) in read_now.iter().zip(&read_late) {
            let figures = |s: &StepStats| [s.loss, s.auxk, s.fvu, s.grad_norm, s.l0_noncore, s.lr];
            assert!(
                a.step == b.step
                    && figures(a)
                        .into_iter()
                        .zip(figures(b))
                        .all(|(p, q)| close(p, q)),
                "at once {a:?}, a step late {b:?}"
            );
        }
        let tensors = |t: &Trainer| {
            let mut all: Vec<Tensor> = t.sae.params().into_iter().map(|p| p.copy()).collect();
            all.extend(t.m.iter().chain(&t.v).map(|m| m.copy()));
            all.push(t.since_fired_f.copy());
            all
        };
        for (p, q) in tensors(&now).iter().zip(tensors(&late)) {
            let (p, q) = (p.to_kind(Kind::Double), q.to_kind(Kind::Double));
            let diff = (&p - &q).abs().max().double_value(&[]);
            assert!(diff <= tol * p.abs().max().double_value(&[]));
        }
        assert!(now.sae.threshold > 0.0);
        assert!(close(now.sae.threshold, late.sae.threshold));
        if !device.is_cuda() {
            assert_eq!((now.n_dead, now.since_max), (late.n_dead, late.since_max));
        }
    }

    #[test]
    fn recovers_a_known_sparse_dictionary() {
        recovers_with(small_cfg(0));
    }

    #[test]
    fn recovers_a_known_sparse_dictionary_with_a_bf16_encoder_product() {
        recovers_with(TrainConfig {
            encoder_bf16: Some(true),
            ..small_cfg(0)
        });
    }

    fn recovers_with(cfg: TrainConfig) {
        let d = 32;
        let (dict, x) = sparse_dictionary(d, 48, 4, 64 * 256, 0.02, 11);
        let t = train(&cfg, &x, d, cfg.steps as usize);
        let w: Vec<f32> = Vec::try_from(t.sae.w_dec.detach().view([-1])).unwrap();
        let rec = recovery(&dict, &w, d);
        let x_bd = tensor(&x[..4096 * d], 4096, Kind::Float);
        let (_, fvu) = tch::no_grad(|| err_stats(&x_bd, &t.sae.decode(&t.sae.encode(&x_bd))));
        eprintln!(
            "recovery {rec:.4}, inference FVU {fvu:.4}, threshold {:.4}",
            t.sae.threshold
        );
        assert!(rec >= 0.9, "mean max cosine {rec}");
        // Matryoshka prefixes cost some FVU on data without hierarchy (plain BatchTopK: 0.05).
        assert!(fvu < 0.15, "FVU {fvu}");
    }
}
