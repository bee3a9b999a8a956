//! CUDA kernels dmsae compiles for itself at run time. The sources are embedded in the binary;
//! NVRTC, which every CUDA build of torch ships beside it, compiles them for the device in use;
//! the driver API loads them and launches them on torch's default stream. Both libraries are
//! opened with dlopen, so the build needs no CUDA toolkit and one binary still runs where there
//! is no CUDA. The sources include no CUDA header, so any NVRTC that knows the device will do.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use tch::{Device, Kind, Tensor};

/// What every kernel source includes, handed to NVRTC as the header `common.cuh`.
const COMMON: &str = include_str!("../kernels/common.cuh");
/// A kernel source and its `extern "C"` entry points.
pub struct Source {
    pub name: &'static str,
    /// The environment variable that turns the kernels off when 0.
    pub off: &'static str,
    pub text: &'static str,
    pub kernels: &'static [&'static str],
}

/// The largest final soft-cap `softcap_ce` takes: it measures the softmax from the cap, and
/// below it by 2 c the exponentials would leave float32's normal range past c = 43.
pub const CE_MAX_CAP: f64 = 40.0;

/// The trainer's BatchTopK candidates without a [B, W] mask (`Candidates`).
pub const SELECT: Source = Source {
    name: "select.cu",
    off: "DMSAE_FUSED_SELECT",
    text: include_str!("../kernels/select.cu"),
    kernels: &[
        "select_count_bf16",
        "select_count_f32",
        "select_write_bf16",
        "select_write_f32",
        "select_top_init",
        "select_top_hist",
        "select_top_find",
        "select_top_count",
        "select_top_write",
        "select_top_slot_count",
        "select_top_slot_write",
    ],
};

/// The fused soft-cap cross-entropy, launched by `softcap_ce`.
pub const SOFTCAP_CE: Source = Source {
    name: "softcap_ce.cu",
    off: "DMSAE_FUSED_CE",
    text: include_str!("../kernels/softcap_ce.cu"),
    kernels: &["softcap_ce_bf16", "softcap_ce_f32"],
};
/// The fused attention softmax, through csrc/autograd.cpp (`softcap_softmax`).
pub const SOFTCAP_SOFTMAX: Source = Source {
    name: "softcap_softmax.cu",
    off: "DMSAE_FUSED_ATTENTION",
    text: include_str!("../kernels/softcap_softmax.cu"),
    kernels: &[
        "softcap_softmax_fwd_bf16",
        "softcap_softmax_fwd_f32",
        "softcap_softmax_bwd_bf16",
        "softcap_softmax_bwd_f32",
    ],
};
/// Gemma's RMSNorm with its casts, through csrc/autograd.cpp (`rms_norm`).
pub const RMS_NORM: Source = Source {
    name: "rms_norm.cu",
    off: "DMSAE_FUSED_NORM",
    text: include_str!("../kernels/rms_norm.cu"),
    kernels: &[
        "rms_norm_fwd_bf16",
        "rms_norm_fwd_f32",
        "rms_norm_bwd_bf16",
        "rms_norm_bwd_f32",
    ],
};
/// Gemma's GeGLU product, through csrc/autograd.cpp (`geglu`).
pub const GEGLU: Source = Source {
    name: "geglu.cu",
    off: "DMSAE_FUSED_GEGLU",
    text: include_str!("../kernels/geglu.cu"),
    kernels: &[
        "geglu_fwd_bf16",
        "geglu_fwd_f32",
        "geglu_bwd_bf16",
        "geglu_bwd_f32",
    ],
};
/// Rotary embeddings with q's scaling, and the plain head swap for v and the attention output,
/// through csrc/autograd.cpp (`rope`, `swap_heads`).
pub const ROPE: Source = Source {
    name: "rope.cu",
    off: "DMSAE_FUSED_ROPE",
    text: include_str!("../kernels/rope.cu"),
    kernels: &[
        "rope_fwd_bf16",
        "rope_fwd_f32",
        "rope_bwd_bf16",
        "rope_bwd_f32",
        "swap_heads_bf16",
        "swap_heads_f32",
    ],
};
/// The trainer's update: projected gradient, clip, Adam and unit decoder rows (trainer/src/sae.rs).
pub const ADAM: Source = Source {
    name: "adam.cu",
    off: "DMSAE_FUSED_ADAM",
    text: include_str!("../kernels/adam.cu"),
    kernels: &[
        "decoder_grad_stats",
        "decoder_adam_f32",
        "decoder_adam_bf16",
        "decoder_adam_f32_g16",
        "decoder_adam_bf16_g16",
        "adam_flat_f32",
        "adam_flat_bf16",
        "adam_flat_f32_g16",
        "adam_flat_bf16_g16",
    ],
};
/// The trainer's sparse decoder and its backward, through csrc/autograd.cpp (`bag_decode`).
pub const BAG_DECODE: Source = Source {
    name: "bag_decode.cu",
    off: "DMSAE_FUSED_DECODE",
    text: include_str!("../kernels/bag_decode.cu"),
    kernels: &[
        "bag_decode_fwd",
        "bag_decode_fwd_bf16",
        "bag_decode_fwd_o16",
        "bag_decode_fwd_bf16_o16",
        "bag_decode_bwd",
        "bag_decode_bwd_g16",
        "bag_decode_bwd_d16",
        "bag_decode_bwd_g16_d16",
    ],
};
/// The trainer's W_enc and b_enc gradients from the codes alone, through csrc/autograd.cpp
/// (`encoder_entries`).
pub const ENCODER_GRAD: Source = Source {
    name: "encoder_grad.cu",
    off: "DMSAE_FUSED_ENCODER_GRAD",
    text: include_str!("../kernels/encoder_grad.cu"),
    kernels: &[
        "encoder_grad_bf16",
        "encoder_grad_f32",
        "encoder_grad_bf16_g16",
        "encoder_grad_f32_g16",
    ],
};
/// The trainer's Matryoshka reconstruction loss and its gradient, through csrc/autograd.cpp
/// (`matryoshka_l2`).
pub const MATRYOSHKA_L2: Source = Source {
    name: "matryoshka_l2.cu",
    off: "DMSAE_FUSED_LOSS",
    text: include_str!("../kernels/matryoshka_l2.cu"),
    kernels: &[
        "matryoshka_l2_fwd",
        "matryoshka_l2_bwd",
        "matryoshka_l2_fwd_bf16",
        "matryoshka_l2_bwd_bf16",
    ],
};
pub const SOURCES: [&Source; 10] = [
    &SOFTCAP_CE,
    &SOFTCAP_SOFTMAX,
    &RMS_NORM,
    &GEGLU,
    &ROPE,
    &ADAM,
    &BAG_DECODE,
    &ENCODER_GRAD,
    &MATRYOSHKA_L2,
    &SELECT,
];

/// Threads per block of the row kernels (a multiple of 32).
const ROW_THREADS: c_uint = 1024;

type Handle = *mut c_void;

/// The first of `candidates` that dlopen loads, and which it was; the errors of all of them
/// otherwise.
fn open_first(candidates: &[String]) -> Result<(Handle, String), String> {
    let mut errs = Vec::new();
    for c in candidates {
        match crate::runtime::dlopen(c, libc::RTLD_NOW | libc::RTLD_LOCAL) {
            Ok(h) => return Ok((h, c.clone())),
            Err(e) => errs.push(e),
        }
    }
    Err(errs.join("; "))
}

/// # Safety
/// `F` must be the `extern "C"` function pointer type of the symbol `name`.
unsafe fn sym<F: Copy>(h: Handle, name: &str) -> Result<F, String> {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<Handle>());
    let s = CString::new(name).map_err(|e| e.to_string())?;
    let p = libc::dlsym(h, s.as_ptr());
    match p.is_null() {
        true => Err(format!("no symbol {name}")),
        false => Ok(std::mem::transmute_copy(&p)),
    }
}

/// The NVRTC entry points used here (nvrtc.h; every one returns an nvrtcResult, 0 = success).
struct Nvrtc {
    create: unsafe extern "C" fn(
        *mut Handle,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    compile: unsafe extern "C" fn(Handle, c_int, *const *const c_char) -> c_int,
    log_size: unsafe extern "C" fn(Handle, *mut usize) -> c_int,
    log: unsafe extern "C" fn(Handle, *mut c_char) -> c_int,
    cubin_size: unsafe extern "C" fn(Handle, *mut usize) -> c_int,
    cubin: unsafe extern "C" fn(Handle, *mut c_char) -> c_int,
    destroy: unsafe extern "C" fn(*mut Handle) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    /// What was opened: a path, or a name the loader resolved.
    from: String,
}

// SAFETY: plain function pointers into a library that stays loaded.
unsafe impl Send for Nvrtc {}
unsafe impl Sync for Nvrtc {}

/// Where NVRTC may be: already loaded or on the library path, else in the pip wheels beside
/// the loaded torch (`site-packages/nvidia/*/lib`, where torch's CUDA wheels put it) or beside
/// the torch this binary was built against.
fn nvrtc_candidates() -> Vec<String> {
    let mut c: Vec<String> = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
        .map(String::from)
        .into();
    let torch_libs = [
        crate::runtime::loaded_libtorch_dir(),
        option_env!("DMSAE_LIBTORCH_LIB").map(PathBuf::from),
    ];
    for lib in torch_libs.into_iter().flatten() {
        // torch/lib -> site-packages/nvidia
        let Some(nvidia) = lib
            .parent()
            .and_then(Path::parent)
            .map(|p| p.join("nvidia"))
        else {
            continue;
        };
        let Ok(dirs) = std::fs::read_dir(&nvidia) else {
            continue;
        };
        let mut found: Vec<PathBuf> = dirs
            .flatten()
            .flat_map(|d| {
                std::fs::read_dir(d.path().join("lib"))
                    .into_iter()
                    .flatten()
            })
            .flatten()
            .map(|f| f.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libnvrtc.so.") && !n.contains("alt"))
            })
            .collect();
        found.sort();
        c.extend(
            found
                .into_iter()
                .rev()
                .map(|p| p.to_string_lossy().into_owned()),
        );
    }
    c
}

/// NVRTC loads its builtins library by name at compile time. Loaded first from NVRTC's own
/// folder, it is found there by its soname whatever the library path says.
fn preload_builtins(nvrtc: &Path) {
    let Some(dir) = nvrtc.parent().and_then(|d| std::fs::read_dir(d).ok()) else {
        return;
    };
    for f in dir.flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        if name.starts_with("libnvrtc-builtins.so.") && !name.contains("alt") {
            let _ = open_first(&[f.path().to_string_lossy().into_owned()]);
        }
    }
}

fn nvrtc() -> Result<&'static Nvrtc, String> {
    static NVRTC: OnceLock<Result<Nvrtc, String>> = OnceLock::new();
    NVRTC
        .get_or_init(|| {
            let candidates = nvrtc_candidates();
            for c in candidates.iter().filter(|c| c.contains('/')) {
                preload_builtins(Path::new(c));
            }
            let (h, from) = open_first(&candidates).map_err(|e| format!("NVRTC not found: {e}"))?;
            // SAFETY: the types are nvrtc.h's signatures.
            unsafe {
                Ok(Nvrtc {
                    create: sym(h, "nvrtcCreateProgram")?,
                    compile: sym(h, "nvrtcCompileProgram")?,
                    log_size: sym(h, "nvrtcGetProgramLogSize")?,
                    log: sym(h, "nvrtcGetProgramLog")?,
                    cubin_size: sym(h, "nvrtcGetCUBINSize")?,
                    cubin: sym(h, "nvrtcGetCUBIN")?,
                    destroy: sym(h, "nvrtcDestroyProgram")?,
                    error_string: sym(h, "nvrtcGetErrorString")?,
                    from,
                })
            }
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The NVRTC library the kernels are compiled with (what `dmsae env` reports).
pub fn nvrtc_location() -> Result<String, String> {
    nvrtc().map(|n| n.from.clone())
}

/// Compiles and loads every kernel for `device` (once); why not, if one cannot be.
pub fn ready(device: Device) -> Result<(), String> {
    SOURCES.iter().try_for_each(|src| source_ready(src, device))
}

/// Whether to run `src`'s kernels on tensors like `x`: on CUDA in bf16 or float32, unless its
/// variable (`Source::off`) is 0 (the ATen sequence, for comparison). If the source cannot be
/// compiled or loaded, the ATen sequence runs instead and stderr says why, once a source.
pub fn use_fused(x: &Tensor, src: &'static Source) -> bool {
    if x.device() == Device::Cpu && EMULATE.with(|e| e.get()) {
        return matches!(x.kind(), Kind::BFloat16 | Kind::Float);
    }
    if !x.device().is_cuda()
        || !matches!(x.kind(), Kind::BFloat16 | Kind::Float)
        || std::env::var(src.off).is_ok_and(|v| v == "0")
    {
        return false;
    }
    match source_ready(src, x.device()) {
        Ok(()) => true,
        Err(e) => {
            static WARNED: Mutex<Vec<&str>> = Mutex::new(Vec::new());
            let mut warned = WARNED.lock().unwrap();
            if !warned.contains(&src.name) {
                warned.push(src.name);
                eprintln!("dmsae: {} unavailable, ATen runs instead ({e})", src.name);
            }
            false
        }
    }
}

thread_local! {
    /// Set (`emulate_on_cpu`): `use_fused` takes every kernel on CPU tensors too, emulated.
    static EMULATE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// For tests: while `on`, this thread runs the kernels on CPU tensors through the emulator
/// (csrc/cuda_emulator.cpp: slow, a thread per CUDA thread), so the fused paths are tested
/// where there is no GPU.
pub fn emulate_on_cpu(on: bool) {
    EMULATE.with(|e| e.set(on));
}

/// Whether input gradients on `device` are made from transposed copies of the weights (see
/// `linear_t`), which the environment variable `off` = 0 turns off: on CUDA, and on the CPU
/// while emulating, so that the model tests cover it.
pub fn transposed_weights(device: Device, off: &str) -> bool {
    match device {
        Device::Cpu => EMULATE.with(|e| e.get()),
        _ => !std::env::var(off).is_ok_and(|v| v == "0"),
    }
}

/// Compiles and loads `src` for `device` (once); why not, if it cannot be.
pub fn source_ready(src: &'static Source, device: Device) -> Result<(), String> {
    match device {
        Device::Cuda(i) => loaded(src, i).map(|_| ()),
        d => Err(format!("{d:?} is not a CUDA device")),
    }
}

/// Compile CUDA `src` (named `name` in messages, `common.cuh` includable) to a CUBIN for `arch`,
/// e.g. `sm_90`; NVRTC's log on failure. Needs no GPU.
pub fn compile(src: &str, name: &str, arch: &str) -> Result<Vec<u8>, String> {
    let n = nvrtc()?;
    let (src_c, name_c) = (
        CString::new(src).map_err(|e| e.to_string())?,
        CString::new(name).map_err(|e| e.to_string())?,
    );
    let (header, header_name) = (CString::new(COMMON).unwrap(), c"common.cuh");
    let mut opts = vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()];
    // For A/B timing: element-at-a-time loads everywhere (common.cuh's `packs_fit`).
    if std::env::var("DMSAE_PACKS").is_ok_and(|v| v == "0") {
        opts.push("-DDMSAE_NO_PACKS".into());
    }
    let opts: Vec<CString> = opts.into_iter().map(|o| CString::new(o).unwrap()).collect();
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let check = |rc: c_int, what: &str| match rc {
        0 => Ok(()),
        // SAFETY: NVRTC returns a static string for any result code.
        _ => Err(format!("{name}: {what}: {}", unsafe {
            CStr::from_ptr((n.error_string)(rc)).to_string_lossy()
        })),
    };
    let mut prog: Handle = std::ptr::null_mut();
    // SAFETY: valid C strings and out-pointers; the program is destroyed below.
    unsafe {
        check(
            (n.create)(
                &mut prog,
                src_c.as_ptr(),
                name_c.as_ptr(),
                1,
                &header.as_ptr(),
                &header_name.as_ptr(),
            ),
            "nvrtcCreateProgram",
        )?;
        let rc = (n.compile)(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr());
        let out = match rc {
            0 => {
                let mut len = 0usize;
                check((n.cubin_size)(prog, &mut len), "nvrtcGetCUBINSize").and_then(|()| {
                    let mut buf = vec![0u8; len];
                    check((n.cubin)(prog, buf.as_mut_ptr().cast()), "nvrtcGetCUBIN").map(|()| buf)
                })
            }
            _ => {
                let mut len = 0usize;
                let mut log = String::new();
                if (n.log_size)(prog, &mut len) == 0 && len > 1 {
                    let mut buf = vec![0u8; len];
                    if (n.log)(prog, buf.as_mut_ptr().cast()) == 0 {
                        log = String::from_utf8_lossy(&buf[..len - 1]).trim().to_string();
                    }
                }
                let e = check(rc, "compile").err().unwrap_or_default();
                Err(format!("{e} for {arch}\n{log}"))
            }
        };
        (n.destroy)(&mut prog);
        out
    }
}

/// The driver API entry points used here (cuda.h; each returns a CUresult, 0 = success).
struct Driver {
    device_get: unsafe extern "C" fn(*mut c_int, c_int) -> c_int,
    attribute: unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int,
    retain_primary: unsafe extern "C" fn(*mut Handle, c_int) -> c_int,
    push: unsafe extern "C" fn(Handle) -> c_int,
    pop: unsafe extern "C" fn(*mut Handle) -> c_int,
    load: unsafe extern "C" fn(*mut Handle, *const c_void) -> c_int,
    function: unsafe extern "C" fn(*mut Handle, Handle, *const c_char) -> c_int,
    #[allow(clippy::type_complexity)]
    launch: unsafe extern "C" fn(
        Handle,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        Handle,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> c_int,
    error_string: unsafe extern "C" fn(c_int, *mut *const c_char) -> c_int,
    stream_create: unsafe extern "C" fn(*mut Handle, c_uint) -> c_int,
    event_create: unsafe extern "C" fn(*mut Handle, c_uint) -> c_int,
    event_record: unsafe extern "C" fn(Handle, Handle) -> c_int,
    event_sync: unsafe extern "C" fn(Handle) -> c_int,
    event_destroy: unsafe extern "C" fn(Handle) -> c_int,
    stream_wait_event: unsafe extern "C" fn(Handle, Handle, c_uint) -> c_int,
    copy_to_host: unsafe extern "C" fn(*mut c_void, u64, usize, Handle) -> c_int,
    copy_to_device: unsafe extern "C" fn(u64, *const c_void, usize, Handle) -> c_int,
}

// SAFETY: plain function pointers into a library that stays loaded.
unsafe impl Send for Driver {}
unsafe impl Sync for Driver {}

const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;

impl Driver {
    fn check(&self, rc: c_int, what: &str) -> Result<(), String> {
        if rc == 0 {
            return Ok(());
        }
        let mut s: *const c_char = std::ptr::null();
        // SAFETY: the driver sets a static string or leaves null.
        let msg = match unsafe { (self.error_string)(rc, &mut s) } == 0 && !s.is_null() {
            true => unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned(),
            false => format!("CUresult {rc}"),
        };
        Err(format!("{what}: {msg}"))
    }

    /// `f` with `ctx` current on this thread, the thread's own context restored after.
    fn in_ctx<T>(&self, ctx: Handle, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
        // SAFETY: ctx is a retained primary context.
        self.check(unsafe { (self.push)(ctx) }, "cuCtxPushCurrent")?;
        let r = f();
        let mut old: Handle = std::ptr::null_mut();
        // SAFETY: pops the context pushed above.
        unsafe { (self.pop)(&mut old) };
        r
    }
}

fn driver() -> Result<&'static Driver, String> {
    static DRIVER: OnceLock<Result<Driver, String>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            let (h, _) = open_first(&["libcuda.so.1".into(), "libcuda.so".into()])
                .map_err(|e| format!("CUDA driver not found: {e}"))?;
            // SAFETY: the types are cuda.h's signatures (the _v2 names are what cuda.h maps
            // the push and pop calls to).
            unsafe {
                let init: unsafe extern "C" fn(c_uint) -> c_int = sym(h, "cuInit")?;
                let d = Driver {
                    device_get: sym(h, "cuDeviceGet")?,
                    attribute: sym(h, "cuDeviceGetAttribute")?,
                    retain_primary: sym(h, "cuDevicePrimaryCtxRetain")?,
                    push: sym(h, "cuCtxPushCurrent_v2")?,
                    pop: sym(h, "cuCtxPopCurrent_v2")?,
                    load: sym(h, "cuModuleLoadData")?,
                    function: sym(h, "cuModuleGetFunction")?,
                    launch: sym(h, "cuLaunchKernel")?,
                    error_string: sym(h, "cuGetErrorString")?,
                    stream_create: sym(h, "cuStreamCreate")?,
                    event_create: sym(h, "cuEventCreate")?,
                    event_record: sym(h, "cuEventRecord")?,
                    event_sync: sym(h, "cuEventSynchronize")?,
                    event_destroy: sym(h, "cuEventDestroy_v2")?,
                    stream_wait_event: sym(h, "cuStreamWaitEvent")?,
                    copy_to_host: sym(h, "cuMemcpyDtoHAsync_v2")?,
                    copy_to_device: sym(h, "cuMemcpyHtoDAsync_v2")?,
                };
                d.check(init(0), "cuInit")?;
                Ok(d)
            }
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// CUDA device `ordinal` and its primary context (torch's), retained.
fn primary(ordinal: usize) -> Result<(c_int, Handle), String> {
    let d = driver()?;
    let (mut dev, mut ctx) = (0, std::ptr::null_mut());
    // SAFETY: out-pointers into locals.
    unsafe {
        d.check((d.device_get)(&mut dev, ordinal as c_int), "cuDeviceGet")?;
        d.check(
            (d.retain_primary)(&mut ctx, dev),
            "cuDevicePrimaryCtxRetain",
        )?;
    }
    Ok((dev, ctx))
}

/// A compiled source loaded into one device's primary context (torch's), with its kernels.
struct Loaded {
    ctx: Handle,
    kernels: HashMap<&'static str, Handle>,
}

// SAFETY: driver handles, valid in any thread once their context is made current.
unsafe impl Send for Loaded {}
unsafe impl Sync for Loaded {}

/// `src` compiled for CUDA device `ordinal` and loaded there, once per process.
fn loaded(src: &'static Source, ordinal: usize) -> Result<&'static Loaded, String> {
    type Cache = Mutex<HashMap<(&'static str, usize), &'static Result<Loaded, String>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    let entry = cache.entry((src.name, ordinal)).or_insert_with(|| {
        Box::leak(Box::new((|| {
            let d = driver()?;
            let (dev, ctx) = primary(ordinal)?;
            let (mut major, mut minor) = (0, 0);
            // SAFETY: as above.
            unsafe {
                let a = d.attribute;
                d.check(
                    a(
                        &mut major,
                        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                        dev,
                    ),
                    "cuDeviceGetAttribute",
                )?;
                d.check(
                    a(
                        &mut minor,
                        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                        dev,
                    ),
                    "cuDeviceGetAttribute",
                )?;
            }
            let cubin = compile(src.text, src.name, &format!("sm_{major}{minor}"))?;
            d.in_ctx(ctx, || {
                let mut module: Handle = std::ptr::null_mut();
                // SAFETY: a CUBIN NVRTC just produced for this device; the module stays loaded.
                d.check(
                    unsafe { (d.load)(&mut module, cubin.as_ptr().cast()) },
                    "cuModuleLoadData",
                )?;
                let mut out = HashMap::new();
                for &k in src.kernels {
                    let (kc, mut f) = (CString::new(k).unwrap(), std::ptr::null_mut());
                    // SAFETY: a loaded module and a valid C string.
                    d.check(unsafe { (d.function)(&mut f, module, kc.as_ptr()) }, k)?;
                    out.insert(k, f);
                }
                Ok(Loaded { ctx, kernels: out })
            })
        })()))
    });
    (*entry).as_ref().map_err(Clone::clone)
}

/// Next-token cross-entropy of each row of the pre-cap `logits` [rows, vocab] (CUDA, bf16 or
/// float32, contiguous) against `targets` [rows] (int64) times `has` [rows] (float32), after the
/// final soft-cap `cap`: float32 [rows]. With `grad`, `logits` is overwritten with
/// d(sum of the weighted CE)/d(logits) in its own dtype (kernels/softcap_ce.cu). Runs on
/// torch's default stream, ordered with everything torch queues around it.
pub fn softcap_ce(
    logits: &Tensor,
    targets: &Tensor,
    has: &Tensor,
    cap: Option<f64>,
    grad: bool,
) -> Result<Tensor, String> {
    // Emulated, two warps a block run the same code paths as 32 at a fraction of the threads.
    let threads = if logits.device().is_cuda() {
        ROW_THREADS
    } else {
        64
    };
    softcap_ce_in_blocks_of(logits, targets, has, cap, grad, threads)
}

/// `softcap_ce` with `threads` threads a block; CPU tensors are emulated (tests: slow).
fn softcap_ce_in_blocks_of(
    logits: &Tensor,
    targets: &Tensor,
    has: &Tensor,
    cap: Option<f64>,
    grad: bool,
    threads: c_uint,
) -> Result<Tensor, String> {
    let rows = match logits.size()[..] {
        [r, _] if logits.is_contiguous() => r,
        _ => {
            return Err(format!(
                "softcap_ce: logits must be contiguous [rows, vocab], got {:?}",
                logits.size()
            ))
        }
    };
    if cap.is_some_and(|c| c > CE_MAX_CAP) {
        return Err(format!(
            "softcap_ce: a soft-cap above {CE_MAX_CAP} is not supported, got {cap:?}"
        ));
    }
    let kernel = match logits.kind() {
        Kind::BFloat16 => "softcap_ce_bf16",
        Kind::Float => "softcap_ce_f32",
        k => return Err(format!("softcap_ce: no kernel for {k:?} logits")),
    };
    for (t, what, kind) in [(targets, "targets", Kind::Int64), (has, "has", Kind::Float)] {
        if t.size() != [rows]
            || t.kind() != kind
            || !t.is_contiguous()
            || t.device() != logits.device()
        {
            return Err(format!(
                "softcap_ce: {what} must be contiguous {kind:?} [{rows}] on {:?}, got {:?} {:?} on {:?}",
                logits.device(),
                t.kind(),
                t.size(),
                t.device()
            ));
        }
    }
    let loss = Tensor::empty([rows], (Kind::Float, logits.device()));
    if rows == 0 {
        return Ok(loss);
    }
    let mut args = CeArgs::new(logits, targets, has, &loss, cap, grad);
    // SAFETY: the argument list matches the kernel's signature and every pointer is a live
    // tensor of the checked shape and dtype on this device.
    unsafe {
        run(
            &SOFTCAP_CE,
            kernel,
            logits.device(),
            rows as c_uint,
            threads,
            &mut args.params(),
        )?
    };
    Ok(loss)
}

/// A kernel argument as cuLaunchKernel (and `run`) takes it: a pointer to its value.
pub fn addr<T>(x: &mut T) -> *mut c_void {
    (x as *mut T).cast()
}

/// Runs `kernel` of `src` over `grid` blocks of `block` threads: launched on a CUDA `device`
/// (see `launch`), emulated on the CPU (tests).
///
/// # Safety
/// As `launch`: `params` must match the kernel's signature, one pointer per argument, and
/// every tensor pointer among them must be on `device` and stay allocated until it runs.
pub unsafe fn run(
    src: &'static Source,
    kernel: &str,
    device: Device,
    grid: c_uint,
    block: c_uint,
    params: &mut [*mut c_void],
) -> Result<(), String> {
    match device {
        Device::Cuda(ordinal) => launch(loaded(src, ordinal)?, kernel, grid, block, params),
        _ => {
            let k = CString::new(kernel).unwrap();
            dmsae_emulate(k.as_ptr(), grid, block, params.as_mut_ptr());
            Ok(())
        }
    }
}

/// How many in-place changes `t` has seen through ATen (its version counter); a kernel that
/// writes its memory directly leaves the count as it was.
pub fn version(t: &Tensor) -> i64 {
    // SAFETY: a live tch handle.
    unsafe { dmsae_tensor_version(ptr(t)) }
}

extern "C" {
    // csrc/autograd.cpp.
    fn dmsae_tensor_version(t: CTensor) -> i64;
    // csrc/cuda_emulator.cpp: a kernel's own text run on the CPU, a thread per CUDA thread.
    fn dmsae_emulate(kernel: *const c_char, grid: c_uint, block: c_uint, args: *mut *mut c_void);
}

/// softcap_ce.cu's arguments, each addressable as cuLaunchKernel (and the emulator) wants them.
struct CeArgs {
    logits: Handle,
    targets: Handle,
    has: Handle,
    loss: Handle,
    vocab: i64,
    cap: f32,
    grad: c_int,
}

impl CeArgs {
    fn new(
        logits: &Tensor,
        targets: &Tensor,
        has: &Tensor,
        loss: &Tensor,
        cap: Option<f64>,
        grad: bool,
    ) -> CeArgs {
        CeArgs {
            logits: logits.data_ptr(),
            targets: targets.data_ptr(),
            has: has.data_ptr(),
            loss: loss.data_ptr(),
            vocab: logits.size()[1],
            cap: cap.unwrap_or(0.0) as f32,
            grad: grad as c_int,
        }
    }

    /// Pointers to each argument, in the kernel's order; valid while `self` is not moved.
    fn params(&mut self) -> [*mut c_void; 7] {
        [
            (&mut self.logits as *mut Handle).cast(),
            (&mut self.targets as *mut Handle).cast(),
            (&mut self.has as *mut Handle).cast(),
            (&mut self.loss as *mut Handle).cast(),
            (&mut self.vocab as *mut i64).cast(),
            (&mut self.cap as *mut f32).cast(),
            (&mut self.grad as *mut c_int).cast(),
        ]
    }
}

/// Launch `kernel` of `m` on the legacy default stream (torch's default stream), so it is
/// ordered with everything torch queues around it and the tensors' memory is not reused
/// before it runs.
///
/// # Safety
/// `params` must match the kernel's signature, each pointing at one argument, and every
/// device pointer among them must stay allocated until the stream reaches the kernel.
unsafe fn launch(
    m: &Loaded,
    kernel: &str,
    grid: c_uint,
    block: c_uint,
    params: &mut [*mut c_void],
) -> Result<(), String> {
    let d = driver()?;
    let f = *m.kernels.get(kernel).ok_or(format!("no kernel {kernel}"))?;
    d.in_ctx(m.ctx, || {
        let rc = (d.launch)(
            f,
            grid,
            1,
            1,
            block,
            1,
            1,
            0,
            std::ptr::null_mut(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        );
        d.check(rc, kernel)
    })
}

/// Launches one of the kernels of `SOURCES` for csrc/autograd.cpp; 0, or 1 with the reason in
/// `err`.
///
/// # Safety
/// `kernel` is a C string, `args` holds `n_args` pointers matching that kernel's signature,
/// `err` holds `err_len` bytes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn dmsae_launch(
    kernel: *const c_char,
    grid: c_uint,
    block: c_uint,
    args: *mut *mut c_void,
    n_args: usize,
    device: c_int,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    let name = CStr::from_ptr(kernel).to_string_lossy();
    let params = std::slice::from_raw_parts_mut(args, n_args);
    let r = SOURCES
        .iter()
        .find(|src| src.kernels.contains(&&*name))
        .ok_or(format!("no kernel {name}"))
        .and_then(|src| loaded(src, device as usize))
        .and_then(|m| launch(m, &name, grid, block, params));
    match r {
        Ok(()) => 0,
        Err(e) => {
            let b = e.as_bytes();
            let n = b.len().min(err_len.saturating_sub(1));
            std::ptr::copy_nonoverlapping(b.as_ptr(), err.cast::<u8>(), n);
            *err.add(n) = 0;
            1
        }
    }
}

type AutogradOp = unsafe extern "C" fn(
    *mut torch_sys::C_tensor,
    *mut torch_sys::C_tensor,
    f64,
    *mut *mut torch_sys::C_tensor,
    *mut c_char,
    usize,
) -> c_int;

/// csrc/autograd.cpp's entry points: each takes its arguments, then (out, err, err_len), and
/// returns 0 with its tensors in out[..], or 1 with the error in err. Grouped by arguments.
macro_rules! entry_points {
    ($($args:tt => $($name:ident),*;)*) => {
        $($(entry_point!($name $args);)*)*
    };
}
macro_rules! entry_point {
    ($name:ident ($($arg:ident: $ty:ty),*)) => {
        extern "C" {
            fn $name(
                $($arg: $ty,)*
                out: *mut *mut torch_sys::C_tensor,
                err: *mut c_char,
                err_len: usize,
            ) -> c_int;
        }
    };
}
type CTensor = *mut torch_sys::C_tensor;

/// A tch tensor's handle as the entry points take it.
fn ptr(t: &Tensor) -> CTensor {
    t.as_ptr() as *mut _
}

entry_points! {
    (t: CTensor) => dmsae_swap_heads, dmsae_empty_pinned, dmsae_pin_memory;
    (a: CTensor, b: CTensor) => dmsae_scores;
    (a: CTensor, x: f64) => dmsae_geglu;
    (a: CTensor, b: CTensor, x: f64) =>
        dmsae_softcap_softmax, dmsae_rope, dmsae_rms_norm, dmsae_pre_norm;
    (res: CTensor, x: CTensor, scale: CTensor, eps: f64) => dmsae_rms_norm_add;
    (qkv: CTensor, cs: CTensor, pre: f64, heads: i64, kv: i64) => dmsae_qkv_heads;
    (x: CTensor, b_dec: CTensor, parts: CTensor, core: CTensor) => dmsae_matryoshka_l2;
    (x: CTensor, w: CTensor, wt: CTensor) => dmsae_linear_t;
    (w: CTensor, vals: CTensor, cols: CTensor, bags: CTensor, n_bags: i64, stats: CTensor,
        wh: CTensor, sink: CTensor, out16: i64) => dmsae_bag_decode;
    (w: CTensor, bias: CTensor, b_dec: CTensor, xc: CTensor, vals: CTensor, rows: CTensor,
        cols: CTensor, sq: CTensor, sq_from: i64, sink: CTensor, host: i64) =>
        dmsae_encoder_entries;
}

type UnaryOp = unsafe extern "C" fn(
    *mut torch_sys::C_tensor,
    *mut *mut torch_sys::C_tensor,
    *mut c_char,
    usize,
) -> c_int;

/// One of csrc/autograd.cpp's functions of one tensor: a new tensor, or its error.
fn unary_op(op: UnaryOp, t: &Tensor) -> Result<Tensor, String> {
    // SAFETY: a live tch handle, and the out and error pointers `new_tensor` hands over.
    new_tensor(|out, err, len| unsafe { op(ptr(t), out, err, len) })
}

/// One of csrc/autograd.cpp's functions of two tensors and a number: a new tensor, or its error.
fn autograd_op(op: AutogradOp, a: &Tensor, b: &Tensor, x: f64) -> Result<Tensor, String> {
    // SAFETY: live tch handles, and the out and error pointers `new_tensor` hands over.
    new_tensor(|out, err, len| unsafe { op(ptr(a), ptr(b), x, out, err, len) })
}

/// Per token of x [B, d], the sum over prefixes p >= 1 of |x - core - b_dec - parts[:, 0] -
/// ... - parts[:, p]|^2 (parts [B, P, d]; `core` [B, d], the core's part decoded apart, or
/// none), differentiable in b_dec, parts and core (kernels/matryoshka_l2.cu through
/// csrc/autograd.cpp). Contiguous float32 on one device, but for parts, which may be bf16
/// (`bag_decode`'s `out16`; their gradient is then bf16 too); CPU tensors are emulated (tests:
/// slow).
pub fn matryoshka_l2(
    x: &Tensor,
    b_dec: &Tensor,
    parts: &Tensor,
    core: Option<&Tensor>,
) -> Result<Tensor, String> {
    let core = core.map_or(std::ptr::null_mut(), ptr);
    // SAFETY: live tch handles (or a null `core`), and the out and error pointers
    // `new_tensor` hands over.
    new_tensor(|out, err, len| unsafe {
        dmsae_matryoshka_l2(ptr(x), ptr(b_dec), ptr(parts), core, out, err, len)
    })
}

/// Copies of CUDA tensors to page-locked host memory on a stream of their own, started after
/// everything queued so far on torch's stream: the copies of batch n run beside batch n+1's
/// kernels instead of in front of them (on an H200, 1.4 ms of a 134 ms batch of 8 x 1,024 in
/// Gemma-2-2B's shapes). `wait` returns the host tensors once the copies are done; until then
/// the device tensors are held here, so their memory is not handed to later work.
pub struct HostCopies {
    hosts: Vec<Tensor>,
    /// The sources, on the device or (CPU tensors, copied at once) none.
    held: Vec<Tensor>,
    /// Recorded on the copy stream after the copies; null for CPU tensors.
    done: Handle,
    ctx: Handle,
}

// SAFETY: a driver event, valid in any thread with its context current; tensors are Send.
unsafe impl Send for HostCopies {}

/// The copy stream of CUDA device `ordinal` (non-blocking: no implicit order with the legacy
/// default stream, only the events below).
fn copy_stream(ordinal: usize) -> Result<(Handle, Handle), String> {
    type Streams = Mutex<HashMap<usize, (usize, usize)>>;
    static STREAMS: OnceLock<Streams> = OnceLock::new();
    let mut streams = STREAMS.get_or_init(Default::default).lock().unwrap();
    if let Some(&(ctx, s)) = streams.get(&ordinal) {
        return Ok((ctx as Handle, s as Handle));
    }
    let d = driver()?;
    let (_, ctx) = primary(ordinal)?;
    let s = d.in_ctx(ctx, || {
        let mut s: Handle = std::ptr::null_mut();
        const CU_STREAM_NON_BLOCKING: c_uint = 1;
        // SAFETY: an out-pointer into a local, the context current.
        d.check(
            unsafe { (d.stream_create)(&mut s, CU_STREAM_NON_BLOCKING) },
            "cuStreamCreate",
        )?;
        Ok(s)
    })?;
    streams.insert(ordinal, (ctx as usize, s as usize));
    Ok((ctx, s))
}

/// Runs `copies` (which queue their work on `stream`, the copy stream of context `ctx`) after
/// everything already queued on torch's stream, and returns an event recorded after them.
fn after_queued(
    ctx: Handle,
    stream: Handle,
    copies: impl FnOnce(&Driver) -> Result<(), String>,
) -> Result<Handle, String> {
    let d = driver()?;
    d.in_ctx(ctx, || {
        const CU_EVENT_DISABLE_TIMING: c_uint = 2;
        let (mut ready, mut done): (Handle, Handle) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: out-pointers into locals; the legacy default stream (null) is torch's.
        unsafe {
            d.check(
                (d.event_create)(&mut ready, CU_EVENT_DISABLE_TIMING),
                "cuEventCreate",
            )?;
            d.check(
                (d.event_record)(ready, std::ptr::null_mut()),
                "cuEventRecord",
            )?;
            d.check((d.stream_wait_event)(stream, ready, 0), "cuStreamWaitEvent")?;
            d.check((d.event_destroy)(ready), "cuEventDestroy")?;
        }
        copies(d)?;
        // SAFETY: as above.
        unsafe {
            d.check(
                (d.event_create)(&mut done, CU_EVENT_DISABLE_TIMING),
                "cuEventCreate",
            )?;
            d.check((d.event_record)(done, stream), "cuEventRecord")?;
        }
        Ok(done)
    })
}

/// Waits for `*done` (from `after_queued`) and destroys it, leaving null; null: nothing to
/// wait for.
fn wait_event(ctx: Handle, done: &mut Handle) -> Result<(), String> {
    if done.is_null() {
        return Ok(());
    }
    let d = driver()?;
    let done = std::mem::replace(done, std::ptr::null_mut());
    d.in_ctx(ctx, || {
        // SAFETY: an event recorded on the copy stream, destroyed once waited for.
        let rc = unsafe { (d.event_sync)(done) };
        unsafe { (d.event_destroy)(done) };
        d.check(rc, "cuEventSynchronize")
    })
}

impl HostCopies {
    /// Queue copies of `tensors` (all on one device) after the work queued on torch's stream.
    pub fn start(tensors: &[&Tensor]) -> Result<HostCopies, String> {
        let Some(dev) = tensors.first().map(|t| t.device()) else {
            return Err("HostCopies: no tensors".into());
        };
        let held = tensors
            .iter()
            .map(|t| t.f_contiguous().map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let tch::Device::Cuda(ordinal) = dev else {
            return Ok(HostCopies {
                hosts: held,
                held: Vec::new(),
                done: std::ptr::null_mut(),
                ctx: std::ptr::null_mut(),
            });
        };
        let (ctx, stream) = copy_stream(ordinal)?;
        if held.iter().any(|t| t.device() != dev) {
            return Err("HostCopies: tensors on more than one device".into());
        }
        let hosts = held
            .iter()
            .map(|t| unary_op(dmsae_empty_pinned, t))
            .collect::<Result<Vec<_>, _>>()?;
        // SAFETY: source and destination are live contiguous tensors of the same byte size,
        // held until `wait` has synchronised on `done`.
        let done = after_queued(ctx, stream, |d| unsafe {
            for (h, t) in hosts.iter().zip(&held) {
                let n = t.numel() * t.kind().elt_size_in_bytes();
                if n > 0 {
                    let rc = (d.copy_to_host)(h.data_ptr(), t.data_ptr() as u64, n, stream);
                    d.check(rc, "cuMemcpyDtoHAsync")?;
                }
            }
            Ok(())
        })?;
        Ok(HostCopies {
            hosts,
            held,
            done,
            ctx,
        })
    }

    /// The host copies, in the order given, once they are complete.
    pub fn wait(mut self) -> Result<Vec<Tensor>, String> {
        self.sync()?;
        Ok(std::mem::take(&mut self.hosts))
    }

    fn sync(&mut self) -> Result<(), String> {
        let r = wait_event(self.ctx, &mut self.done);
        self.held.clear();
        r
    }
}

impl Drop for HostCopies {
    fn drop(&mut self) {
        // Never free a source (or a destination) while a copy may still read (or write) it.
        let _ = self.sync();
    }
}

/// A host tensor in page-locked memory, ready for a non-blocking upload (needs CUDA loaded).
fn pin_memory(t: &Tensor) -> Result<Tensor, String> {
    unary_op(dmsae_pin_memory, t)
}

/// The host tensor `t` on `device`. On CUDA the copy is queued on torch's stream from
/// page-locked memory and the host goes on: from pageable memory the copy also waits for
/// everything queued before it (torch synchronises the stream), which held extraction's next
/// batch until the last one had finished, and took 2 ms of a 29 ms training step on an H100.
/// Pageable if pinning fails (out of page-locked memory): slower, the same numbers.
pub fn upload(t: &Tensor, device: Device) -> Result<Tensor, tch::TchError> {
    if t.device() == device {
        return Ok(t.shallow_clone());
    }
    match device {
        Device::Cuda(_) => pin_memory(t)
            .unwrap_or_else(|_| t.shallow_clone())
            .f_to_device_(device, t.kind(), true, false),
        _ => t.f_to_device(device),
    }
}

/// A host tensor's copy to a CUDA device on the copy stream (`copy_stream`), beside the work
/// on torch's stream rather than in its queue: the trainer's batch upload took 0.37 ms of each
/// 12.8 ms step on the H200, queued among the step's kernels by the thread that makes the
/// batches. `finish` waits for the copy (by then it has long run) and gives the device tensor.
/// `DMSAE_UPLOAD_STREAM=0`, or a device other than CUDA, uploads as `upload` does.
pub struct Upload {
    dev: Tensor,
    /// The page-locked source, held until the copy is done.
    host: Option<Tensor>,
    /// Recorded on the copy stream after the copy; null when there is none to wait for.
    done: Handle,
    ctx: Handle,
}

// SAFETY: a driver event, valid in any thread with its context current; tensors are Send.
unsafe impl Send for Upload {}

impl Upload {
    pub fn start(t: &Tensor, device: Device) -> Result<Upload, String> {
        let plain = |dev: Tensor| Upload {
            dev,
            host: None,
            done: std::ptr::null_mut(),
            ctx: std::ptr::null_mut(),
        };
        let ordinal = match device {
            Device::Cuda(o) if !std::env::var("DMSAE_UPLOAD_STREAM").is_ok_and(|v| v == "0") => o,
            _ => return upload(t, device).map(plain).map_err(|e| e.to_string()),
        };
        let host = pin_memory(&t.contiguous())?;
        let dev = Tensor::empty(t.size(), (t.kind(), device));
        let n = t.numel() * t.kind().elt_size_in_bytes();
        let (ctx, stream) = copy_stream(ordinal)?;
        // SAFETY: `dev` came from torch's allocator, which may hand back memory that work
        // already queued on torch's stream still reads: the copy follows that work. Source and
        // destination are live contiguous tensors of n bytes, held until `finish` has
        // synchronised on `done`.
        let done = after_queued(ctx, stream, |d| unsafe {
            if n > 0 {
                let rc = (d.copy_to_device)(dev.data_ptr() as u64, host.data_ptr(), n, stream);
                d.check(rc, "cuMemcpyHtoDAsync")?;
            }
            Ok(())
        })?;
        Ok(Upload {
            dev,
            host: Some(host),
            done,
            ctx,
        })
    }

    /// The device tensor, once its copy is done.
    pub fn finish(mut self) -> Result<Tensor, String> {
        self.sync()?;
        Ok(self.dev.shallow_clone())
    }

    fn sync(&mut self) -> Result<(), String> {
        let r = wait_event(self.ctx, &mut self.done);
        self.host = None;
        r
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Never free the source (or the destination) while the copy may still use it.
        let _ = self.sync();
    }
}

/// The tensor a csrc/autograd.cpp entry point makes through `call(out, err, err_len)`, or its
/// error message.
fn new_tensor(
    call: impl FnOnce(*mut *mut torch_sys::C_tensor, *mut c_char, usize) -> c_int,
) -> Result<Tensor, String> {
    new_tensors(call).map(|[t]| t)
}

/// `new_tensor` for an entry point that makes N tensors, into out[0..N].
fn new_tensors<const N: usize>(
    call: impl FnOnce(*mut *mut torch_sys::C_tensor, *mut c_char, usize) -> c_int,
) -> Result<[Tensor; N], String> {
    let mut out: [*mut torch_sys::C_tensor; N] = [std::ptr::null_mut(); N];
    let mut err = [0u8; 1024];
    match call(out.as_mut_ptr(), err.as_mut_ptr().cast(), err.len()) {
        // SAFETY: on success each is a new tensor handle, which its Tensor owns from here.
        0 => Ok(out.map(|t| unsafe { Tensor::from_ptr(t) })),
        _ => Err(error_text(&err)),
    }
}

/// The NUL-terminated message a csrc/autograd.cpp entry point left in `err`.
fn error_text(err: &[u8]) -> String {
    CStr::from_bytes_until_nul(err)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `vals` (codes' values from pre-activations computed without a graph) as a function of `w`
/// [d, W], `bias` [W] and `b_dec` [d]: as if vals[e] = xc[rows[e]] . w[:, cols[e]] +
/// bias[cols[e]] with xc = x - b_dec, so the backward gives their gradients from the entries
/// alone (kernels/encoder_grad.cu through csrc/autograd.cpp). Float32 values, `xc` float32 or
/// bf16 (as the product read it: W's gradient reads it so), int64 indices, contiguous on one
/// device. On the CPU the backward runs the kernel's sums as a loop, or the kernel emulated
/// while `emulate_on_cpu` (tests: slow). `sq` (`encoder_grad_sq`), when given, is filled by the
/// backward with the squared norm of W's gradient's columns from `sq_from` on, in parts.
/// `sink`, when given (bf16, W's shape, the kernel's path only), takes W's gradient in bf16
/// instead of autograd, which then gives W none: autograd would cast a bf16 gradient to W's
/// float32, a pass of its own.
#[allow(clippy::too_many_arguments)]
pub fn encoder_entries(
    w: &Tensor,
    bias: &Tensor,
    b_dec: &Tensor,
    xc: &Tensor,
    vals: &Tensor,
    rows: &Tensor,
    cols: &Tensor,
    sq: Option<&Tensor>,
    sq_from: i64,
    sink: Option<&Tensor>,
) -> Result<Tensor, String> {
    let sq = sq.map_or(std::ptr::null_mut(), ptr);
    let sink = sink.map_or(std::ptr::null_mut(), ptr);
    let host = w.device() == Device::Cpu && !EMULATE.with(|e| e.get());
    // SAFETY: live tch handles (or a null `sq`), and the out and error pointers `new_tensor`
    // hands over.
    new_tensor(|out, err, len| unsafe {
        dmsae_encoder_entries(
            ptr(w),
            ptr(bias),
            ptr(b_dec),
            ptr(xc),
            ptr(vals),
            ptr(rows),
            ptr(cols),
            sq,
            sq_from,
            sink,
            host as i64,
            out,
            err,
            len,
        )
    })
}

/// The sum of vals[e] w[cols[e]] over each bag's entries, [n_bags, d], differentiable in `w`
/// [rows, d] and `vals`; `bags` gives each entry's bag, non-decreasing (kernels/bag_decode.cu
/// through csrc/autograd.cpp). Float32 values, int64 indices, all contiguous on one device;
/// CPU tensors are emulated (tests: slow). `stats` (`bag_decode_stats`), when given, is
/// filled by the backward with W's gradient's figures for the update. `wh`, when given, is W
/// in bf16 (contiguous, as a cast rounds), which the forward reads in W's place. `sink`, when
/// given (bf16, W's shape), takes W's gradient in bf16 instead of autograd, as
/// `encoder_entries`' does. `out16`: the sums in bf16, each rounded once (the trainer's
/// `parts_bf16`); their gradient then comes back in bf16, and the backward reads it so.
#[allow(clippy::too_many_arguments)]
pub fn bag_decode(
    w: &Tensor,
    vals: &Tensor,
    cols: &Tensor,
    bags: &Tensor,
    n_bags: i64,
    stats: Option<&Tensor>,
    wh: Option<&Tensor>,
    sink: Option<&Tensor>,
    out16: bool,
) -> Result<Tensor, String> {
    let stats = stats.map_or(std::ptr::null_mut(), ptr);
    let wh = wh.map_or(std::ptr::null_mut(), ptr);
    let sink = sink.map_or(std::ptr::null_mut(), ptr);
    // SAFETY: live tch handles (or null `stats` and `wh`), and the out and error pointers
    // `new_tensor` hands over.
    new_tensor(|out, err, len| unsafe {
        dmsae_bag_decode(
            ptr(w),
            ptr(vals),
            ptr(cols),
            ptr(bags),
            n_bags,
            stats,
            wh,
            sink,
            out16 as i64,
            out,
            err,
            len,
        )
    })
}

/// For `bag_decode`'s backward to fill, float64 [ceil(d / 256), 3, rows] for W [rows, d]: each
/// 256-column span's dw.dw, dw.w and w.w a row. Summed over the spans, they give each row's
/// projected gradient (dw - (dw.w) w) and its squared norm, dw.dw - 2 c dw.w + c^2 w.w with
/// c = dw.w, as adam.cu's decoder_grad_stats would from another pass over W and dw.
pub fn bag_decode_stats(w: &Tensor) -> Tensor {
    let (rows, d) = (w.size()[0], w.size()[1]);
    Tensor::empty([(d + 255) / 256, 3, rows], (Kind::Double, w.device()))
}

/// `encoder_entries`' `sq` for W [d, W]: one float32 per encoder_grad block (a tile of 32
/// latents and 256 rows), each its part of the gradient's squared norm; their sum in float64
/// is that of the columns it covers, as the update's clip wants it, without a pass over the
/// gradient.
pub fn encoder_grad_sq(w: &Tensor) -> Tensor {
    let (d, width) = (w.size()[0], w.size()[1]);
    Tensor::empty(
        [(width + 31) / 32 * ((d + 255) / 256)],
        (Kind::Float, w.device()),
    )
}

/// BatchTopK's candidates without a [B, W] mask (kernels/select.cu): the kept entries of the
/// pre-activations `p` [B, W] (contiguous, bf16 or float32) are, in columns below `c`, those
/// where p > thr[j] and p > 0 (`thr` [c], any float kind), elsewhere those where p >= the cut
/// (a float32 scalar on the device, so the host need not wait for it). `count` queues each
/// block's count; the host reads their sum (`total`), and `write` lists the entries' (rows,
/// cols) in row-major order, as `nonzero` of that mask would. CPU tensors are emulated.
pub struct Candidates {
    p: Tensor,
    c: i64,
    thr: Option<Tensor>,
    cut: Tensor,
    counts: Tensor,
    suffix: &'static str,
}

/// select.cu's SEL_THREADS, each thread a run of SEL_RUN entries.
const SEL_THREADS: i64 = 256;
const SEL_RUN: i64 = 32;

/// The blocks of select.cu's count and write kernels over n entries.
fn select_blocks(n: i64) -> i64 {
    ((n + SEL_THREADS * SEL_RUN - 1) / (SEL_THREADS * SEL_RUN)).max(1)
}

/// Each block's first place in the list from the blocks' counts (their exclusive sum).
fn places(counts: &Tensor) -> Tensor {
    counts.cumsum(0, Kind::Int64) - counts
}

impl Candidates {
    pub fn count(p: &Tensor, c: i64, thr: Option<&Tensor>, cut: &Tensor) -> Result<Self, String> {
        let suffix = match p.kind() {
            Kind::BFloat16 => "bf16",
            Kind::Float => "f32",
            k => return Err(format!("select: {k:?} pre-activations")),
        };
        if p.dim() != 2 || !p.is_contiguous() {
            return Err("select: the pre-activations must be a contiguous [B, W]".into());
        }
        if cut.numel() != 1 || cut.kind() != Kind::Float || cut.device() != p.device() {
            return Err("select: the cut must be a float32 scalar beside p".into());
        }
        let thr = match (c, thr) {
            (0, _) => None,
            (_, Some(t)) if t.size() == [c] => Some(t.to_kind(Kind::Float).contiguous()),
            _ => return Err(format!("select: {c} core latents need {c} thresholds")),
        };
        let blocks = select_blocks(p.numel() as i64);
        let counts = Tensor::empty([blocks], (Kind::Int64, p.device()));
        let s = Candidates {
            p: p.shallow_clone(),
            c,
            thr,
            cut: cut.shallow_clone(),
            counts,
            suffix,
        };
        s.launch("select_count", &[&s.counts])?;
        Ok(s)
    }

    /// How many entries are kept, as an int64 scalar on the device.
    pub fn total(&self) -> Tensor {
        self.counts.sum(Kind::Int64)
    }

    /// The kept entries' (rows, cols); `total` is what `total()` read back.
    pub fn write(self, total: i64) -> Result<(Tensor, Tensor), String> {
        let starts = places(&self.counts);
        let dev = self.p.device();
        let rows = Tensor::empty([total], (Kind::Int64, dev));
        let cols = Tensor::empty([total], (Kind::Int64, dev));
        self.launch("select_write", &[&starts, &rows, &cols])?;
        Ok((rows, cols))
    }

    /// `kernel`(p, n, width, c, thr, cut, outs...).
    fn launch(&self, kernel: &str, outs: &[&Tensor]) -> Result<(), String> {
        let (mut pp, mut n, mut w, mut c) = (
            self.p.data_ptr(),
            self.p.numel() as i64,
            self.p.size()[1],
            self.c,
        );
        let mut tp = self
            .thr
            .as_ref()
            .map_or(std::ptr::null_mut(), |t| t.data_ptr());
        let mut cp = self.cut.data_ptr();
        let mut out_ptrs: Vec<*mut c_void> = outs.iter().map(|t| t.data_ptr()).collect();
        let mut params = vec![
            addr(&mut pp),
            addr(&mut n),
            addr(&mut w),
            addr(&mut c),
            addr(&mut tp),
            addr(&mut cp),
        ];
        params.extend(out_ptrs.iter_mut().map(addr));
        let blocks = u32::try_from(self.counts.numel())
            .map_err(|_| "select: too many entries".to_string())?;
        // SAFETY: select_count(p, n, width, c, thr, cut, counts) and select_write(p, n, width,
        // c, thr, cut, starts, rows, cols) over live contiguous tensors on one device: p [n] of
        // the kind the name says, c float32 thresholds (none when c is 0), the float32 cut,
        // [blocks] int64 counts or places, and rows and cols of as many entries as the counts
        // sum to; each held by `self` or the caller until the launch has run.
        unsafe {
            run(
                &SELECT,
                &format!("{kernel}_{}", self.suffix),
                self.p.device(),
                blocks,
                SEL_THREADS as c_uint,
                &mut params,
            )
        }
    }
}

/// BatchTopK without the host: the `keep` largest entries of the bf16 pre-activations `p`
/// [B, W] (contiguous; on CUDA, or emulated on the CPU) outside the core's first `c` columns,
/// as (rows, cols) [keep] in row-major order, ties at the smallest kept value taken in
/// row-major order (kernels/select.cu's `select_top_*`). Every size is known beforehand, so
/// nothing is read back. `cut` (a float32 scalar beside p, one of p's values) should have a
/// little over `keep` such entries at or above it: the trainer's sampled cut; 0, or one too
/// high or too low, costs one or two more passes over p, not the answer. Non-positive entries
/// count as one value below every positive one: they are listed only when fewer than `keep`
/// entries are positive.
///
/// `slot_cap` is how many of the entries that reach the cut a chunk of p (select.cu's
/// SEL_CHUNK entries) keeps aside so that p is read once, not three times; a chunk with more
/// is read again. None: eight times the chunks' mean share of 2 * keep (about what reaches the
/// trainer's cut), at least 64. Tests set it to force chunks either way.
pub fn top_entries(
    p: &Tensor,
    c: i64,
    cut: &Tensor,
    keep: i64,
    slot_cap: Option<i64>,
) -> Result<(Tensor, Tensor), String> {
    if p.kind() != Kind::BFloat16 || p.dim() != 2 || !p.is_contiguous() {
        return Err("select_top: the pre-activations must be a contiguous bf16 [B, W]".into());
    }
    if cut.numel() != 1 || cut.kind() != Kind::Float || cut.device() != p.device() {
        return Err("select_top: the cut must be a float32 scalar beside p".into());
    }
    let (mut n, mut width, mut c_, mut keep_) = (p.numel() as i64, p.size()[1], c, keep);
    let eligible = p.size()[0] * (width - c);
    if c < 0 || c > width || keep < 1 || keep > eligible {
        return Err(format!(
            "select_top: keep {keep} of {eligible} entries outside a core of {c}"
        ));
    }
    let dev = p.device();
    let mut chunks = select_blocks(n);
    let mut cap = slot_cap
        .unwrap_or_else(|| (8 * ((2 * keep + chunks - 1) / chunks)).max(64))
        .clamp(0, SEL_THREADS * SEL_RUN);
    let int64 = |len: i64| Tensor::empty([len], (Kind::Int64, dev));
    let int32 = |len: i64| Tensor::empty([len.max(1)], (Kind::Int, dev));
    let (st, hist, gt, eq) = (
        int64(ST_LEN),
        int64(TOP_BINS + 1),
        int64(chunks),
        int64(chunks),
    );
    let (slots, slot_n, over) = (int32(chunks * cap), int32(chunks), int32(chunks));
    let (rows, cols) = (int64(keep), int64(keep));
    let too_many = |_| "select_top: too many entries".to_string();
    let blocks = u32::try_from(chunks).map_err(too_many)?;
    let warps = u32::try_from((chunks * 32 + SEL_THREADS - 1) / SEL_THREADS).map_err(too_many)?;
    let (mut pp, mut sp, mut hp, mut cp) =
        (p.data_ptr(), st.data_ptr(), hist.data_ptr(), cut.data_ptr());
    let (mut gp, mut ep, mut rp, mut lp) = (
        gt.data_ptr(),
        eq.data_ptr(),
        rows.data_ptr(),
        cols.data_ptr(),
    );
    let (mut slp, mut snp, mut op) = (slots.data_ptr(), slot_n.data_ptr(), over.data_ptr());
    let go = |kernel: &str, grid: u32, block: i64, params: &mut [*mut c_void]| {
        // SAFETY: the select_top_* kernels over live contiguous tensors on one device, each
        // held here until the launches are queued on torch's stream, whose allocator reuses
        // their memory only behind them: p [n] bf16, the float32 cut, st [ST_LEN] int64,
        // hist [TOP_BINS + 1] (int64, read as unsigned), gt and eq [chunks] int64 (counts,
        // then places), rows and cols [keep] int64, slots [chunks * cap] (int32 read as
        // unsigned, at least one), slot_n and over [chunks] int32; keep is at most the
        // entries outside the core's c <= width columns, so the places stay within them.
        unsafe { run(&SELECT, kernel, dev, grid, block as c_uint, params) }
    };
    go(
        "select_top_init",
        1,
        TOP_THREADS,
        &mut [addr(&mut cp), addr(&mut sp), addr(&mut hp)],
    )?;
    // (Emulated, two blocks: the tests' inputs then take several turns of the loops.)
    let grid = blocks.min(if dev.is_cuda() { TOP_HIST_BLOCKS } else { 2 });
    // The kernels over p take (p, n, width, c, st, then the rest); the slots' (st, chunks,
    // cap, slots, slot_n, then the rest).
    let over_p = [
        addr(&mut pp),
        addr(&mut n),
        addr(&mut width),
        addr(&mut c_),
        addr(&mut sp),
    ];
    let over_slots = [
        addr(&mut sp),
        addr(&mut chunks),
        addr(&mut cap),
        addr(&mut slp),
        addr(&mut snp),
    ];
    let with = |kernel: &str, grid: u32, lead: &[*mut c_void], rest: &[*mut c_void]| {
        let mut params: Vec<*mut c_void> = lead.iter().chain(rest).copied().collect();
        go(kernel, grid, SEL_THREADS, &mut params)
    };
    // One round with the cut, which fills the slots, and the two of the whole range that
    // finding t can take without.
    let hist_rest = [
        addr(&mut hp),
        addr(&mut cap),
        addr(&mut slp),
        addr(&mut snp),
        addr(&mut op),
    ];
    for _ in 0..3 {
        with("select_top_hist", grid, &over_p, &hist_rest)?;
        go(
            "select_top_find",
            1,
            TOP_THREADS,
            &mut [addr(&mut keep_), addr(&mut sp), addr(&mut hp)],
        )?;
    }
    // Each chunk's counts, then places, then entries: the slotted chunks' from their slots (a
    // warp each), the others' from p.
    let (g, e, o) = (addr(&mut gp), addr(&mut ep), addr(&mut op));
    with("select_top_slot_count", warps, &over_slots, &[g, e])?;
    with("select_top_count", grid, &over_p, &[o, g, e])?;
    let (gt_starts, eq_starts) = (places(&gt), places(&eq));
    let (mut gsp, mut esp) = (gt_starts.data_ptr(), eq_starts.data_ptr());
    let (gs, es, r, l) = (addr(&mut gsp), addr(&mut esp), addr(&mut rp), addr(&mut lp));
    with(
        "select_top_slot_write",
        warps,
        &over_slots,
        &[gs, es, addr(&mut width), r, l],
    )?;
    with("select_top_write", grid, &over_p, &[o, gs, es, r, l])?;
    Ok((rows, cols))
}

/// select.cu's TOP_BINS, TOP_THREADS and ST_LEN; the histogram rounds' grid and the grid of
/// the chunks read again (grid-stride loops: each block adds its counts to the total once).
const TOP_BINS: i64 = 4096;
const TOP_THREADS: i64 = 256;
const ST_LEN: i64 = 9;
const TOP_HIST_BLOCKS: u32 = 1024;

/// gelu(gate) * up from `gu` [..., 2f] (contiguous, bf16 or float32; gate the first f columns,
/// up the last), gelu's tanh form if `tanh`: [..., f], differentiable in gu
/// (kernels/geglu.cu through csrc/autograd.cpp). CPU tensors are emulated (tests: slow).
pub fn geglu(gu: &Tensor, tanh: bool) -> Result<Tensor, String> {
    // SAFETY: a live tch handle, and the out and error pointers `new_tensor` hands over.
    new_tensor(|out, err, len| unsafe { dmsae_geglu(ptr(gu), tanh as u8 as f64, out, err, len) })
}

/// `q.matmul(k^T)` over the last two dimensions, differentiable in both, k's gradient made
/// contiguous like k (autograd's matmul makes it transposed, and a copy followed; through
/// csrc/autograd.cpp, ATen's products on any device).
pub fn scores(q: &Tensor, k: &Tensor) -> Result<Tensor, String> {
    // SAFETY: live tch handles, and the out and error pointers `new_tensor` hands over.
    new_tensor(|out, err, len| unsafe { dmsae_scores(ptr(q), ptr(k), out, err, len) })
}

/// `x w^T` (w `[out, in]`), differentiable in x, its gradient made as `dy wt^T` from `wt`, w^T
/// contiguous, so the backward's product reads its weight as the forward's does (csrc/autograd.cpp;
/// ATen's products on any device).
pub fn linear_t(x: &Tensor, w: &Tensor, wt: &Tensor) -> Result<Tensor, String> {
    // SAFETY: live tch handles, and the out and error pointers `new_tensor` hands over.
    new_tensor(|out, err, len| unsafe { dmsae_linear_t(ptr(x), ptr(w), ptr(wt), out, err, len) })
}

/// q, k and v heads first, each [B, n, T, Dh] contiguous, from `qkv` [B, T, (heads + 2 kv) Dh]
/// (contiguous, bf16 or float32: a token's query heads, then key heads, then value heads, as
/// one product makes them), q and k under `rope` (q times `pre`), v moved as `swap_heads`
/// moves it; differentiable in qkv, its gradient one tensor laid out as qkv
/// (kernels/rope.cu through csrc/autograd.cpp). CPU tensors are emulated (tests: slow).
pub fn qkv_heads(
    qkv: &Tensor,
    cs: &Tensor,
    pre: f64,
    heads: i64,
    kv: i64,
) -> Result<(Tensor, Tensor, Tensor), String> {
    // SAFETY: live tch handles, and the out and error pointers `new_tensors` hands over.
    let [q, k, v] = new_tensors(|out, err, len| unsafe {
        dmsae_qkv_heads(ptr(qkv), ptr(cs), pre, heads, kv, out, err, len)
    })?;
    Ok((q, k, v))
}

/// `res + rms_norm(x, scale, eps)` with the norm rounded to x's dtype before the add, as the
/// two ATen steps give it; differentiable in `res` and `x` (kernels/rms_norm.cu through
/// csrc/autograd.cpp). CPU tensors are emulated (tests: slow).
pub fn rms_norm_add(res: &Tensor, x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor, String> {
    // SAFETY: live tch handles, and the out and error pointers `new_tensor` hands over.
    new_tensor(|out, err, len| unsafe {
        dmsae_rms_norm_add(ptr(res), ptr(x), ptr(scale), eps, out, err, len)
    })
}

/// `x` [B, A, C, D] as [B, C, A, D], contiguous: `x.transpose(1, 2).contiguous()`, bit for
/// bit, differentiable in x (kernels/rope.cu through csrc/autograd.cpp). CPU tensors are
/// emulated (tests: slow).
pub fn swap_heads(x: &Tensor) -> Result<Tensor, String> {
    unary_op(dmsae_swap_heads, x)
}

/// Rotary embedding of `x` [B, T, heads, Dh] (contiguous, bf16 or float32) with `cs` = cos and
/// sin stacked [2, T, Dh] in x's dtype, times `pre` (1: none), each step rounded as
/// `apply_rope` and the scaling round it, as [B, heads, T, Dh] contiguous; differentiable in x
/// (kernels/rope.cu through csrc/autograd.cpp). CPU tensors are emulated (tests: slow).
pub fn rope(x: &Tensor, cs: &Tensor, pre: f64) -> Result<Tensor, String> {
    autograd_op(dmsae_rope, x, cs, pre)
}

/// `rms_norm(x, scale, eps)` and x itself, for a pre-norm whose input the residual stream carries
/// on: the two outputs' gradients are summed in the norm's backward kernel (kernels/rms_norm.cu
/// through csrc/autograd.cpp), not in a pass of autograd's own. CPU tensors are emulated
/// (tests: slow).
pub fn pre_norm(x: &Tensor, scale: &Tensor, eps: f64) -> Result<(Tensor, Tensor), String> {
    // SAFETY: live tch handles, and the out and error pointers `new_tensors` hands over.
    let [y, x] = new_tensors(|out, err, len| unsafe {
        dmsae_pre_norm(ptr(x), ptr(scale), eps, out, err, len)
    })?;
    Ok((y, x))
}

/// Gemma's RMSNorm of the last dimension of `x` (contiguous, bf16 or float32): in float32 with
/// the float32 `scale` (1 + weight), rounded once to x's dtype; differentiable in `x`
/// (kernels/rms_norm.cu through csrc/autograd.cpp). CPU tensors are emulated (tests: slow).
pub fn rms_norm(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor, String> {
    autograd_op(dmsae_rms_norm, x, scale, eps)
}

/// softmax over the last dimension of `s` [..., T, T] (contiguous, bf16 or float32) after the
/// soft-cap c * tanh(s) (`cap`; none for Gemma-3) and `mask` [T, T] (bool, true = masked),
/// differentiable in `s` (kernels/softcap_softmax.cu through csrc/autograd.cpp). On CUDA
/// tensors the kernels run on the GPU; on CPU tensors, emulated (for tests: slow).
pub fn softcap_softmax(s: &Tensor, mask: &Tensor, cap: Option<f64>) -> Result<Tensor, String> {
    autograd_op(dmsae_softcap_softmax, s, mask, cap.unwrap_or(0.0))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The whole model, every kernel emulated, against the ATen path: the fused path's wiring
    /// (heads split as rows and transposed after, the CE gradient written over the logits, five
    /// autograd functions) on the tiny Gemma-2 (both soft-caps, sliding window 5) and Gemma-3
    /// fixtures, in bf16 and float32: layer output, per-token loss and gradient. In bf16 the CE
    /// and attention kernels are float32 inside where ATen rounds to bf16 between steps, so
    /// there all three are held to the float32 model: no further from it than twice ATen's bf16.
    #[test]
    fn the_model_with_every_kernel_emulated_matches_aten() {
        use crate::models::Model;
        let rel = |a: &Tensor, b: &Tensor| {
            let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
            let ok = a.isfinite().logical_and(&b.isfinite());
            let (a, b) = (a.masked_select(&ok), b.masked_select(&ok));
            (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-300)
        };
        for fixture in ["gemma2-t5", "gemma3"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures")
                .join(fixture);
            let mut float32 = None;
            for kind in [Kind::Float, Kind::BFloat16] {
                let m = Model::load(&dir, Device::Cpu, kind).unwrap();
                tch::manual_seed(13);
                let vocab = m.config.vocab_size as i64;
                let ids = Tensor::randint(vocab, [2, 12], (Kind::Int64, Device::Cpu));
                let want = m.forward_layer(&ids, 1, true).unwrap();
                emulate_on_cpu(true);
                let got = m.forward_layer(&ids, 1, true);
                emulate_on_cpu(false);
                let got = got.unwrap();
                let d = [
                    rel(&got.resid, &want.resid),
                    rel(&got.loss, &want.loss),
                    rel(got.grad.as_ref().unwrap(), want.grad.as_ref().unwrap()),
                ];
                eprintln!("{fixture} {kind:?}, every kernel emulated: relative L2 layer output {:.2e}, loss {:.2e}, gradient {:.2e}", d[0], d[1], d[2]);
                // The loss is NaN exactly where there is no target, both ways.
                assert!(
                    got.loss.isnan().equal(&want.loss.isnan()),
                    "{fixture} {kind:?}"
                );
                let Some(f32) = &float32 else {
                    assert!(
                        d.iter().all(|&x| x <= 1e-5),
                        "{fixture} {kind:?}: differs by {d:?}"
                    );
                    float32 = Some(want);
                    continue;
                };
                for (what, ours, aten, exact) in [
                    ("layer output", &got.resid, &want.resid, &f32.resid),
                    ("loss", &got.loss, &want.loss, &f32.loss),
                    (
                        "gradient",
                        got.grad.as_ref().unwrap(),
                        want.grad.as_ref().unwrap(),
                        f32.grad.as_ref().unwrap(),
                    ),
                ] {
                    let (e, a) = (rel(ours, exact), rel(aten, exact));
                    eprintln!("  {what} against float32: emulated kernels {e:.2e}, ATen {a:.2e}");
                    assert!(
                        e <= 2.0 * a + 1e-7,
                        "{fixture} bf16 {what}: {e:e} from float32, ATen {a:e}"
                    );
                }
            }
        }
    }
    use crate::models::common::ce_rows;

    /// The kernel's (loss, gradient) for pre-cap logits `z`: on `z`'s CUDA device, or emulated
    /// on the CPU with `threads` threads a block.
    fn kernel_ce(
        z: &Tensor,
        targets: &Tensor,
        has: &Tensor,
        cap: Option<f64>,
        grad: bool,
        threads: u32,
    ) -> (Tensor, Tensor) {
        let z = z.copy();
        let loss = softcap_ce_in_blocks_of(&z, targets, has, cap, grad, threads).unwrap();
        (loss, z)
    }

    /// max |a - b| / (max |b| + tiny), in float64.
    fn rel_max(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
        let d = (&a - &b).abs().max().double_value(&[]);
        d / (b.abs().max().double_value(&[]) + 1e-30)
    }

    /// The cross-entropy and its gradient in float64 on the same pre-cap logits: the function
    /// itself, which the kernel (float32 inside) and the ATen sequence (bf16 between its steps)
    /// both approximate.
    fn exact_ce(z: &Tensor, targets: &Tensor, has: &Tensor, cap: Option<f64>) -> (Tensor, Tensor) {
        let s = z.to_kind(Kind::Double);
        let (zc, slope) = match cap {
            Some(c) => {
                let t = (&s / c).tanh();
                (&t * c, (&t * &t).neg() + 1.0)
            }
            None => (s.shallow_clone(), s.ones_like()),
        };
        let logp = zc.log_softmax(-1, Kind::Double);
        let (h, tg) = (has.to_kind(Kind::Double), targets.unsqueeze(1));
        let loss = logp.gather(1, &tg, false).squeeze_dim(1).neg() * &h;
        let onehot = logp.zeros_like().scatter_value(1, &tg, 1.0);
        let g = (logp.exp() - onehot) * h.unsqueeze(1) * slope;
        (loss, g)
    }

    /// The kernel against the function (float64) and the ATen sequence it replaces (`ce_rows`)
    /// on the same pre-cap logits: a vocabulary that is no multiple of the block, read in packs
    /// (1,000) and one element at a time (1,003, no multiple of a pack), a row without a
    /// target, targets at both ends of the row, logits large enough to saturate the cap.
    fn kernel_against_aten(device: Device, threads: u32) {
        for vocab in [1000, 1003] {
            kernel_against_aten_at(device, threads, vocab);
        }
    }

    fn kernel_against_aten_at(device: Device, threads: u32, vocab: i64) {
        let rows = 7i64;
        tch::manual_seed(3);
        let z32 = Tensor::randn([rows, vocab], (Kind::Float, device)) * 20.0;
        let last = vocab - 1;
        let targets = Tensor::from_slice(&[0i64, last, 5, 517, last - 1, 1, 42]).to_device(device);
        let has = Tensor::from_slice(&[1f32, 1., 1., 0., 1., 1., 1.]).to_device(device);
        // (dtype, cap, bound on the loss, bound on the gradient, each against the function).
        // The kernel is float32 inside: its loss is float32's, and its bf16 gradient is the
        // exact one rounded once (2^-9 relative), so within 2^-8 of the largest entry. ATen's
        // bf16 sequence rounds the capped logit to bf16 (ulp 0.125 near the cap) and is
        // printed beside it, not bounded. In float32 the kernel must also match ATen's.
        let cases = [
            (Kind::BFloat16, Some(32.0), 1e-5, 4e-3),
            (Kind::BFloat16, Some(30.0), 1e-5, 4e-3),
            (Kind::BFloat16, None, 1e-5, 4e-3),
            (Kind::Float, Some(30.0), 1e-5, 1e-5),
            (Kind::Float, None, 1e-5, 1e-5),
        ];
        for (kind, cap, loss_tol, grad_tol) in cases {
            let z = z32.to_kind(kind);
            let (exact_loss, exact_g) = exact_ce(&z, &targets, &has, cap);
            let (aten_loss, aten_g) =
                tch::no_grad(|| ce_rows(z.copy(), &targets, &has, cap, true)).unwrap();
            let aten_g = aten_g.unwrap();
            let (loss, g) = kernel_ce(&z, &targets, &has, cap, true, threads);
            let (loss_only, untouched) = kernel_ce(&z, &targets, &has, cap, false, threads);
            let (dl, dg) = (rel_max(&loss, &exact_loss), rel_max(&g, &exact_g));
            let (al, ag) = (rel_max(&aten_loss, &exact_loss), rel_max(&aten_g, &exact_g));
            eprintln!(
                "{kind:?} cap {cap:?} vocab {vocab} on {device:?}, against float64: kernel loss {dl:.2e}, gradient {dg:.2e}; ATen loss {al:.2e}, gradient {ag:.2e}"
            );
            assert!(dl <= loss_tol, "{kind:?} cap {cap:?}: loss off by {dl:e}");
            assert!(
                dg <= grad_tol,
                "{kind:?} cap {cap:?}: gradient off by {dg:e}"
            );
            if kind == Kind::Float {
                let (l, g) = (rel_max(&loss, &aten_loss), rel_max(&g, &aten_g));
                assert!(
                    l <= loss_tol && g <= grad_tol,
                    "float32: {l:e} {g:e} from ATen"
                );
            }
            assert_eq!(g.kind(), kind);
            // The row without a target: zero loss, zero gradient.
            assert_eq!(loss.double_value(&[3]), 0.0);
            assert_eq!(g.get(3).abs().max().double_value(&[]), 0.0);
            // Without grad the logits stay as they were and the loss is the same.
            assert!(untouched.equal(&z), "{kind:?}: logits changed without grad");
            assert!(loss_only.equal(&loss), "{kind:?}: loss depends on grad");
        }
    }

    /// Whether to run a GPU test: DMSAE_TEST_CUDA=1 set (libtorch_cuda is loaded only then, not
    /// beside ordinary tests), and then CUDA must be there.
    fn cuda_under_test() -> bool {
        if std::env::var_os("DMSAE_TEST_CUDA").is_none() {
            eprintln!("skipped: set DMSAE_TEST_CUDA=1 on a GPU machine");
            return false;
        }
        crate::runtime::load_cuda(option_env!("DMSAE_LIBTORCH_LIB")).unwrap();
        assert!(
            tch::Cuda::is_available(),
            "DMSAE_TEST_CUDA is set but CUDA is unavailable"
        );
        true
    }

    /// The fused attention softmax against the ATen chain it replaces (models/common.rs), forward
    /// and backward through autograd: GQA-shaped scores [B, KV, G, T, T] with T = 19 (no
    /// multiple of a warp, of a block's rows or of a pack: an element at a time) and T = 40 (in
    /// 16-byte packs, some wholly masked), a causal and a sliding-window mask, soft-cap or
    /// none, bf16 and float32. In bf16 the kernel is float32 inside and rounds each stored value
    /// once, where ATen's chain rounds five times on the way back: both are measured against
    /// the exact function (float64 on the same bf16 inputs), and the kernel must be within one
    /// bf16 rounding (2^-8) of its largest entry (two for the score gradient), and no further
    /// from it than ATen is, give or take one.
    ///
    /// T = 1,032 (one batch and head) takes the two-pass path for rows too long to hold in
    /// registers: float32 rows (258 packs) both ways, bf16 ones (129 packs) in the backward; the
    /// bf16 forward holds 8 packs a lane.
    fn attention_against_aten(device: Device) {
        for t in [19, 40] {
            attention_against_aten_at(device, [2, 2, 2], t);
        }
        attention_against_aten_at(device, [1, 1, 1], 1032);
    }

    fn attention_against_aten_at(device: Device, lead: [i64; 3], t: i64) {
        tch::manual_seed(5);
        let shape = [lead[0], lead[1], lead[2], t, t];
        let s32 = Tensor::randn(shape, (Kind::Float, device)) * 2.0;
        let r32 = Tensor::randn(shape, (Kind::Float, device));
        let q = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(1);
        let k = q.view([1, t]);
        let causal = k.gt_tensor(&q);
        let sliding = causal.logical_or(&(&q - &k).ge(5));
        for kind in [Kind::BFloat16, Kind::Float] {
            for cap in [Some(50.0), None] {
                for (mask, which) in [(&causal, "causal"), (&sliding, "sliding")] {
                    let case = format!("{kind:?} cap {cap:?} {which} T {t} on {device:?}");
                    // fused, ATen in `kind`, or ATen in float64 on the same (rounded) inputs.
                    let run = |fused: bool, k: Kind| {
                        let s = s32.to_kind(kind).to_kind(k).set_requires_grad(true);
                        let r = r32.to_kind(kind).to_kind(k);
                        let p = match fused {
                            true => softcap_softmax(&s, mask, cap).unwrap(),
                            false => {
                                let z = match cap {
                                    Some(c) => s.tanh() * c,
                                    None => s.shallow_clone(),
                                };
                                let f = if k == Kind::Double { k } else { Kind::Float };
                                z.masked_fill(mask, f64::NEG_INFINITY)
                                    .softmax(-1, f)
                                    .to_kind(k)
                            }
                        };
                        let g = Tensor::run_backward(
                            &[(&p * &r).sum(Kind::Double)],
                            &[&s],
                            false,
                            false,
                        );
                        (p.detach(), g[0].shallow_clone())
                    };
                    let ((p, ds), (want_p, want_ds)) = (run(true, kind), run(false, kind));
                    let (exact_p, exact_ds) = run(false, Kind::Double);
                    let (dp, dds) = (rel_max(&p, &want_p), rel_max(&ds, &want_ds));
                    let (ep, eds) = (rel_max(&p, &exact_p), rel_max(&ds, &exact_ds));
                    let (ap, ads) = (rel_max(&want_p, &exact_p), rel_max(&want_ds, &exact_ds));
                    eprintln!(
                        "{case}: against ATen: probabilities {dp:.2e}, score gradient {dds:.2e}; \
                         against float64: kernel {ep:.2e} and {eds:.2e}, ATen {ap:.2e} and {ads:.2e}"
                    );
                    assert_eq!((p.kind(), ds.kind()), (kind, kind), "{case}");
                    if kind == Kind::Float && device.is_cuda() {
                        // Measured, not asserted: the models keep ATen for float32 on CUDA
                        // (models/common.rs), where this gradient was 3.05e-5 from float64
                        // against ATen's 4.44e-6 on an H200.
                        eprintln!(
                            "{case}: float32 on CUDA is not used by the models; not asserted"
                        );
                    } else if kind == Kind::Float {
                        // float32: the same function but for summation order.
                        assert!(dp <= 1e-5, "{case}: probabilities differ by {dp:e}");
                        assert!(dds <= 1e-5, "{case}: score gradients differ by {dds:e}");
                    } else {
                        // The score gradient gets two steps: without the cap, where kernel
                        // and ATen agree bit for bit, both were 3.3e-3 from float64 (T 19).
                        let step = 2f64.powi(-8);
                        assert!(
                            ep <= step && ep <= ap + step,
                            "{case}: probabilities {ep:e} from float64, ATen's {ap:e}"
                        );
                        assert!(
                            eds <= 2.0 * step && eds <= ads + step,
                            "{case}: score gradient {eds:e} from float64, ATen's {ads:e}"
                        );
                    }
                    // Masked entries are exactly zero both ways.
                    let m = mask.expand_as(&p);
                    assert_eq!(
                        p.masked_select(&m).abs().sum(Kind::Float).double_value(&[]),
                        0.0
                    );
                    assert_eq!(
                        ds.masked_select(&m)
                            .abs()
                            .sum(Kind::Float)
                            .double_value(&[]),
                        0.0
                    );
                    // Without a graph the forward is the same.
                    let p_ng =
                        tch::no_grad(|| softcap_softmax(&s32.to_kind(kind), mask, cap).unwrap());
                    assert!(p_ng.equal(&p), "{case}: the forward depends on the graph");
                }
            }
        }
    }

    /// The fused RMSNorm against the ATen chain it replaces (models/common.rs: cast to float32,
    /// rms_norm, cast back), forward and backward through autograd, on [3, 7, d]: rows no
    /// multiple of a block's 8; d 77, no multiple of a warp or a pack (an element at a time),
    /// d 320, more 16-byte packs than a warp has lanes, and rows held in registers four or nine
    /// packs a lane, or too long for that and read twice: 2,304 (bf16 9, float32 the loops),
    /// 4,104 (the loops both ways).
    fn rms_norm_against_aten(device: Device) {
        for d in [77, 320, 2304, 4104] {
            rms_norm_against_aten_at(device, d);
        }
    }

    fn rms_norm_against_aten_at(device: Device, d: i64) {
        tch::manual_seed(7);
        let x32 = Tensor::randn([3, 7, d], (Kind::Float, device)) * 3.0;
        let r32 = Tensor::randn([3, 7, d], (Kind::Float, device));
        let scale = Tensor::randn([d], (Kind::Float, device)) * 0.5 + 1.0;
        let eps = 1e-6;
        // bf16: both round one float32 value once, and those can differ in float32's last
        // bits (the mean summed in another order), so an output may be one bf16 step apart:
        // at most 2^-7 of the largest (seen at d 4,104 on an H200: 4.02e-3).
        for (kind, tol) in [(Kind::BFloat16, 2f64.powi(-7)), (Kind::Float, 1e-5)] {
            let case = format!("{kind:?} d {d} on {device:?}");
            let r = r32.to_kind(kind);
            let run = |fused: bool| {
                let x = x32.to_kind(kind).set_requires_grad(true);
                let y = match fused {
                    true => rms_norm(&x, &scale, eps).unwrap(),
                    false => x
                        .to_kind(Kind::Float)
                        .rms_norm([d], Some(&scale), eps)
                        .to_kind(kind),
                };
                let g = Tensor::run_backward(&[(&y * &r).sum(Kind::Float)], &[&x], false, false);
                (y.detach(), g[0].shallow_clone())
            };
            let ((y, dx), (want_y, want_dx)) = (run(true), run(false));
            let (dy, ddx) = (rel_max(&y, &want_y), rel_max(&dx, &want_dx));
            eprintln!("rms_norm {case}: output {dy:.2e}, input gradient {ddx:.2e}");
            assert_eq!((y.kind(), dx.kind()), (kind, kind), "{case}");
            assert!(dy <= tol, "{case}: outputs differ by {dy:e}");
            assert!(ddx <= tol, "{case}: input gradients differ by {ddx:e}");
            // Onto a residual: the same norm, its rounding before the add as ATen's two steps
            // have it (so bit for bit the add of the fused norm's output), the residual's
            // gradient passed through.
            let h32 = Tensor::randn([3, 7, d], (Kind::Float, device)) * 2.0;
            let x = x32.to_kind(kind).set_requires_grad(true);
            let h = h32.to_kind(kind).set_requires_grad(true);
            let z = rms_norm_add(&h, &x, &scale, eps).unwrap();
            assert!(z.equal(&(&h + &y)), "{case}: the residual add differs");
            let g = Tensor::run_backward(&[(&z * &r).sum(Kind::Float)], &[&x, &h], false, false);
            assert!(
                g[0].equal(&dx),
                "{case}: the norm's gradient differs onto a residual"
            );
            assert!(
                g[1].equal(&r),
                "{case}: the residual's gradient is not passed through"
            );
            // As a pre-norm: the same norm, x handed on as the stream, and x's gradient the
            // norm's plus the stream's, summed before the one rounding (ATen: each rounded,
            // then their sum rounded).
            let q = Tensor::randn([3, 7, d], (Kind::Float, device)).to_kind(kind);
            let x = x32.to_kind(kind).set_requires_grad(true);
            let (y2, stream) = pre_norm(&x, &scale, eps).unwrap();
            assert!(y2.equal(&y), "{case}: the pre-norm's output differs");
            assert!(stream.equal(&x), "{case}: the stream is not x");
            let loss = (&y2 * &r).sum(Kind::Float) + (&stream * &q).sum(Kind::Float);
            let g = Tensor::run_backward(&[loss], &[&x], false, false);
            let sum = &want_dx.to_kind(Kind::Float) + q.to_kind(Kind::Float);
            let dsum = rel_max(&g[0], &sum);
            eprintln!("pre-norm {case}: input gradient {dsum:.2e} from ATen's two");
            assert_eq!(g[0].kind(), kind, "{case}");
            assert!(
                dsum <= tol,
                "{case}: the pre-norm's gradient differs by {dsum:e}"
            );
        }
    }

    /// The fused GeGLU against ATen's gelu and multiply on the halves of one [rows, 2f] product
    /// output, forward and backward through autograd, both gelu forms: f = 200 (half rows of
    /// whole 16-byte packs; 1,000 outputs, no multiple of a block) and f = 143 (an element at a
    /// time).
    fn geglu_against_aten(device: Device) {
        for shape in [[5, 200], [7, 143]] {
            geglu_against_aten_on(device, shape);
        }
    }

    fn geglu_against_aten_on(device: Device, [rows, f]: [i64; 2]) {
        tch::manual_seed(9);
        let gu32 = Tensor::cat(
            &[
                Tensor::randn([rows, f], (Kind::Float, device)) * 2.0,
                Tensor::randn([rows, f], (Kind::Float, device)),
            ],
            1,
        );
        let r32 = Tensor::randn([rows, f], (Kind::Float, device));
        for (kind, tol) in [(Kind::BFloat16, 4e-3), (Kind::Float, 1e-5)] {
            for tanh in [true, false] {
                let case = format!("{kind:?} tanh {tanh} [{rows}, 2 x {f}] on {device:?}");
                let r = r32.to_kind(kind);
                let run = |fused: bool| {
                    let gu = gu32.to_kind(kind).set_requires_grad(true);
                    let h = match fused {
                        true => geglu(&gu, tanh).unwrap(),
                        false => {
                            let parts = gu.split_with_sizes([f, f], 1);
                            parts[0].gelu(if tanh { "tanh" } else { "none" }) * &parts[1]
                        }
                    };
                    let g =
                        Tensor::run_backward(&[(&h * &r).sum(Kind::Float)], &[&gu], false, false);
                    (h.detach(), g[0].narrow(1, 0, f), g[0].narrow(1, f, f))
                };
                let ((h, dg, du), (want_h, want_dg, want_du)) = (run(true), run(false));
                let d = [
                    rel_max(&h, &want_h),
                    rel_max(&dg, &want_dg),
                    rel_max(&du, &want_du),
                ];
                eprintln!(
                    "geglu {case}: output {:.2e}, gate gradient {:.2e}, up gradient {:.2e}",
                    d[0], d[1], d[2]
                );
                assert!(d.iter().all(|&x| x <= tol), "{case}: differs by {d:?}");
                assert_eq!(h.size(), [rows, f], "{case}");
                assert_eq!((h.kind(), dg.kind()), (kind, kind), "{case}");
            }
        }
    }

    /// The scores' function against autograd's matmul, float32 and bf16: the same forward,
    /// q's and k's gradients within rounding (the same dot products, summed by other kernels),
    /// k's contiguous where autograd's is a transposed view. GQA's shape: 2 query heads a KV
    /// head as the rows of one [G T, Dh] matrix.
    fn scores_against_matmul(device: Device) {
        tch::manual_seed(14);
        let (q32, k32) = (
            Tensor::randn([2, 3, 2 * 7, 16], (Kind::Float, device)),
            Tensor::randn([2, 3, 7, 16], (Kind::Float, device)),
        );
        let r32 = Tensor::randn([2, 3, 2 * 7, 7], (Kind::Float, device));
        for (kind, tol) in [(Kind::BFloat16, 1e-2), (Kind::Float, 1e-6)] {
            let case = format!("{kind:?} on {device:?}");
            let run = |ours: bool| {
                let q = q32.to_kind(kind).set_requires_grad(true);
                let k = k32.to_kind(kind).set_requires_grad(true);
                let s = match ours {
                    true => scores(&q, &k).unwrap(),
                    false => q.matmul(&k.transpose(-1, -2)),
                };
                let loss = (&s * r32.to_kind(kind)).sum(Kind::Float);
                let g = Tensor::run_backward(&[loss], &[&q, &k], false, false);
                (s.detach(), g[0].shallow_clone(), g[1].shallow_clone())
            };
            let ((s, dq, dk), (want_s, want_dq, want_dk)) = (run(true), run(false));
            assert!(s.equal(&want_s), "{case}: scores differ");
            let d = [rel_max(&dq, &want_dq), rel_max(&dk, &want_dk)];
            assert!(
                d.iter().all(|&x| x <= tol),
                "{case}: gradients differ by {d:?}"
            );
            assert!(dk.is_contiguous(), "{case}: k's gradient not contiguous");
            assert!(
                !want_dk.is_contiguous(),
                "{case}: autograd's k gradient is contiguous now"
            );
        }
    }

    /// `linear_t` against ATen's linear: the same forward bit for bit, the input gradient
    /// within rounding (the same sums, the weight read the other way), none for the weight;
    /// a wrong wt (w itself where w is square) must fail.
    fn linear_t_against_linear(device: Device) {
        tch::manual_seed(15);
        let (x32, w32) = (
            Tensor::randn([2, 5, 24], (Kind::Float, device)),
            Tensor::randn([40, 24], (Kind::Float, device)),
        );
        let r32 = Tensor::randn([2, 5, 40], (Kind::Float, device));
        for (kind, tol) in [(Kind::BFloat16, 1e-2), (Kind::Float, 1e-6)] {
            let case = format!("{kind:?} on {device:?}");
            let w = w32.to_kind(kind);
            let wt = w.transpose(0, 1).contiguous();
            let run = |ours: bool| {
                let x = x32.to_kind(kind).set_requires_grad(true);
                let y = match ours {
                    true => linear_t(&x, &w, &wt).unwrap(),
                    false => x.linear::<Tensor>(&w, None),
                };
                let loss = (&y * r32.to_kind(kind)).sum(Kind::Float);
                let g = Tensor::run_backward(&[loss], &[&x], false, false);
                (y.detach(), g[0].shallow_clone())
            };
            let ((y, dx), (want_y, want_dx)) = (run(true), run(false));
            assert!(y.equal(&want_y), "{case}: outputs differ");
            let d = rel_max(&dx, &want_dx);
            assert!(d <= tol, "{case}: input gradients differ by {d}");
        }
        let sq = Tensor::randn([24, 24], (Kind::Float, device));
        let x = Tensor::randn([3, 24], (Kind::Float, device)).set_requires_grad(true);
        let y = linear_t(&x, &sq, &sq).unwrap();
        let g = Tensor::run_backward(&[y.sum(Kind::Float)], &[&x], false, false);
        let want = Tensor::ones([3, 24], (Kind::Float, device)).matmul(&sq);
        assert!(rel_max(&g[0], &want) > 1e-2, "a wrong wt went unnoticed");
    }

    /// q, k and v from one product's rows against the same heads split off, made contiguous
    /// and put through the fused RoPE and head swap one at a time (each checked against ATen
    /// by its own test): bit for bit forward, and the gradient laid out as the rows, bit for bit
    /// too. Dh 16 (16-byte packs) and Dh 6 (an element at a time), 4 query heads over 2 KV heads.
    fn qkv_heads_against_parts(device: Device) {
        use crate::config::Rope;
        use crate::models::common::rope_tables;
        tch::manual_seed(12);
        let (b, t, h, kv) = (2, 5, 4, 2);
        for dh in [16, 6] {
            for kind in [Kind::BFloat16, Kind::Float] {
                let case = format!("{kind:?} Dh {dh} on {device:?}");
                let rope_10k = Rope {
                    theta: 10_000.0,
                    factor: 1.0,
                };
                let (cos, sin) =
                    rope_tables(rope_10k, dh as usize, t as usize, device, kind).unwrap();
                let cs = Tensor::stack(&[&cos, &sin], 0);
                let pre = 1.0 / 16.0 / 50.0;
                let qkv32 = Tensor::randn([b, t, (h + 2 * kv) * dh], (Kind::Float, device));
                let rs: Vec<Tensor> = [h, kv, kv]
                    .iter()
                    .map(|&n| Tensor::randn([b, n, t, dh], (kind, device)))
                    .collect();
                let run = |fused: bool| {
                    let qkv = qkv32.to_kind(kind).set_requires_grad(true);
                    let (q, k, v) = match fused {
                        true => qkv_heads(&qkv, &cs, pre, h, kv).unwrap(),
                        false => {
                            let p = qkv.split_with_sizes([h * dh, kv * dh, kv * dh], -1);
                            let heads = |i: usize, n: i64| p[i].view([b, t, n, dh]).contiguous();
                            (
                                rope(&heads(0, h), &cs, pre).unwrap(),
                                rope(&heads(1, kv), &cs, 1.0).unwrap(),
                                swap_heads(&heads(2, kv)).unwrap(),
                            )
                        }
                    };
                    let loss = (&q * &rs[0]).sum(Kind::Float)
                        + (&k * &rs[1]).sum(Kind::Float)
                        + (&v * &rs[2]).sum(Kind::Float);
                    let g = Tensor::run_backward(&[loss], &[&qkv], false, false);
                    ([q.detach(), k.detach(), v.detach()], g[0].shallow_clone())
                };
                let ((got, dgot), (want, dwant)) = (run(true), run(false));
                for (name, x, y) in [
                    ("q", &got[0], &want[0]),
                    ("k", &got[1], &want[1]),
                    ("v", &got[2], &want[2]),
                ] {
                    assert!(x.is_contiguous(), "{case}: {name} not contiguous");
                    assert!(x.equal(y), "{case}: {name} differs");
                }
                assert!(dgot.equal(&dwant), "{case}: the gradient differs");
                // A loss without k: its gradient comes to the backward as zeros (torch
                // materialises it), so k's columns of the gradient are zero.
                let qkv = qkv32.to_kind(kind).set_requires_grad(true);
                let (q, _, v) = qkv_heads(&qkv, &cs, pre, h, kv).unwrap();
                let loss = (&q * &rs[0]).sum(Kind::Float) + (&v * &rs[2]).sum(Kind::Float);
                let g = Tensor::run_backward(&[loss], &[&qkv], false, false);
                let g_k = g[0].narrow(2, h * dh, kv * dh);
                assert!(g_k.eq(0.0).all().int64_value(&[]) == 1, "{case}: k unused");
                let rest = |x: &Tensor| x.narrow(2, 0, h * dh);
                assert!(
                    rest(&g[0]).equal(&rest(&dgot)),
                    "{case}: q's gradient without k"
                );
            }
        }
    }

    /// The fused RoPE (with q's scaling) against `apply_rope` and the scaling, forward and
    /// backward through autograd, on [2, 5, 3, 8] (heads 3, T 5, Dh 8) and [1, 3, 2, 320] (a
    /// block's 128 threads go round the 160 column pairs twice) with the model's tables.
    fn rope_against_aten(device: Device) {
        tch::manual_seed(11);
        for (b, t, n, dh) in [(2, 5, 3, 8), (1, 3, 2, 320)] {
            rope_against_aten_at(device, b, t, n, dh);
        }
    }

    fn rope_against_aten_at(device: Device, b: i64, t: i64, n: i64, dh: i64) {
        use crate::config::Rope;
        use crate::models::common::{apply_rope, rope_tables};
        let x32 = Tensor::randn([b, t, n, dh], (Kind::Float, device)) * 2.0;
        let r32 = Tensor::randn([b, n, t, dh], (Kind::Float, device));
        // pre: Gemma-2's 1/sqrt(256)/50 (not a power of two) and 1 (k, no scaling).
        for (kind, tol) in [(Kind::BFloat16, 4e-3), (Kind::Float, 1e-5)] {
            let rope_10k = Rope {
                theta: 10_000.0,
                factor: 1.0,
            };
            let (cos, sin) = rope_tables(rope_10k, dh as usize, t as usize, device, kind).unwrap();
            let cs = Tensor::stack(&[&cos, &sin], 0);
            for pre in [1.0 / 16.0 / 50.0, 1.0] {
                let case = format!("{kind:?} pre {pre} Dh {dh} on {device:?}");
                let r = r32.to_kind(kind);
                let run = |fused: bool| {
                    let x = x32.to_kind(kind).set_requires_grad(true);
                    let y = match fused {
                        true => rope(&x, &cs, pre).unwrap(),
                        false => {
                            let y = apply_rope(&x.transpose(1, 2), &cos, &sin).unwrap();
                            if pre == 1.0 {
                                y
                            } else {
                                y * pre
                            }
                        }
                    };
                    let g =
                        Tensor::run_backward(&[(&y * &r).sum(Kind::Float)], &[&x], false, false);
                    (y.detach(), g[0].shallow_clone())
                };
                let ((y, dx), (want_y, want_dx)) = (run(true), run(false));
                let (dy, ddx) = (rel_max(&y, &want_y), rel_max(&dx, &want_dx));
                eprintln!("rope {case}: output {dy:.2e}, input gradient {ddx:.2e}");
                assert!(
                    dy <= tol && ddx <= tol,
                    "{case}: differs by {dy:e}, {ddx:e}"
                );
                assert_eq!((y.kind(), dx.kind()), (kind, kind), "{case}");
                assert!(y.is_contiguous(), "{case}: not written heads first");
            }
        }
    }

    /// Each comparison as two tests: the kernels emulated on the CPU, and on a GPU through NVRTC
    /// and the driver (DMSAE_TEST_CUDA=1).
    macro_rules! on_cpu_and_cuda {
        ($($cpu:ident, $cuda:ident => $check:expr;)*) => {$(
            #[test]
            fn $cpu() {
                $check(Device::Cpu)
            }

            #[test]
            fn $cuda() {
                if cuda_under_test() {
                    $check(Device::Cuda(0))
                }
            }
        )*};
    }

    on_cpu_and_cuda! {
        the_fused_cross_entropy_matches_aten_emulated,
        the_fused_cross_entropy_matches_aten_on_cuda => ce_against_aten;
        the_fused_attention_softmax_matches_aten_emulated,
        the_fused_attention_softmax_matches_aten_on_cuda => attention_against_aten;
        the_fused_rms_norm_matches_aten_emulated,
        the_fused_rms_norm_matches_aten_on_cuda => rms_norm_against_aten;
        the_fused_geglu_matches_aten_emulated,
        the_fused_geglu_matches_aten_on_cuda => geglu_against_aten;
        the_fused_rope_matches_aten_emulated,
        the_fused_rope_matches_aten_on_cuda => rope_against_aten;
        the_scores_match_matmul_on_cpu,
        the_scores_match_matmul_on_cuda => scores_against_matmul;
        the_linear_t_matches_linear_on_cpu,
        the_linear_t_matches_linear_on_cuda => linear_t_against_linear;
        the_stacked_qkv_heads_match_their_parts_emulated,
        the_stacked_qkv_heads_match_their_parts_on_cuda => qkv_heads_against_parts;
        the_head_swap_matches_aten_emulated,
        the_head_swap_matches_aten_on_cuda => swap_heads_against_aten;
        the_trainers_sparse_kernels_match_float64_emulated,
        the_trainers_sparse_kernels_match_float64_on_cuda => sparse_kernels_against_float64;
    }

    /// The trainer's sparse decoder (bag_decode) and encoder gradient (encoder_entries) against
    /// float64 sums, both ways: bags and latents of more than 32 entries (the kernels read
    /// entries 32 at a time), an empty bag and a latent that never fires, rows of 42 floats (one
    /// at a time) and of 304 (16-byte packs of floats and of bf16; two spans of the W
    /// gradients). The decoder's forward also over W's bf16 copy, against the float64 sums of
    /// its rounded rows, and into bf16 sums, whose bf16 gradient the backward reads; the
    /// encoder's gradient also from a bf16 xc, against its rounded rows', and into a bf16
    /// sink, against the float32 kernel's rounded.
    fn sparse_kernels_against_float64(device: Device) {
        tch::manual_seed(5);
        let f64_ = (Kind::Double, device);
        let (latents, n_bags) = (20i64, 5i64);
        // Bag sizes 70, 0, 33, 1, 40; latent 3 takes every fifth entry (29 of 144) plus all
        // of bag 4's, latent 19 none.
        let bags: Vec<i64> = [(0, 70), (2, 33), (3, 1), (4, 40)]
            .iter()
            .flat_map(|&(b, n)| std::iter::repeat_n(b, n))
            .collect();
        let cols: Vec<i64> = (0..bags.len())
            .map(|e| match (e % 5, bags[e]) {
                (_, 4) | (0, _) => 3,
                _ => (e as i64 * 7) % 19,
            })
            .collect();
        let bags = Tensor::from_slice(&bags).to_device(device);
        let mut cols = Tensor::from_slice(&cols).to_device(device);
        let n = bags.size()[0];
        // The second and third rounds find the first one's grouping of `cols` kept
        // (csrc/autograd.cpp's `by_latent`); the third changes `cols` in place first, which
        // must not.
        for (d, shift) in [(42i64, false), (304, false), (42, true)] {
            if shift {
                cols.copy_(&((&cols + 1).remainder(latents)));
            }
            let case = format!(
                "d {d}{} on {device:?}",
                if shift { ", cols shifted" } else { "" }
            );
            // Each result against its float64 value, to 1e-5 of its largest entry.
            let check = |results: &[(&str, &Tensor, &Tensor)]| {
                for (what, got, want) in results {
                    let rel = rel_max(&got.to_kind(Kind::Double), want);
                    assert!(
                        rel <= 1e-5,
                        "{case}: {what} differs by {rel:e} of its largest entry"
                    );
                }
            };
            let w = Tensor::randn([latents, d], f64_);
            let vals = Tensor::randn([n], f64_);
            let r = Tensor::randn([n_bags, d], f64_);
            // The decoder: out[b] = sum vals[e] w[cols[e]]; the projection r's gradients.
            let w32 = w.to_kind(Kind::Float).set_requires_grad(true);
            let v32 = vals.to_kind(Kind::Float).set_requires_grad(true);
            let stats = bag_decode_stats(&w32);
            // These rows and values through the kernel, with the given stats, bf16 copy,
            // sink and kind of out.
            let bag = |stats: Option<&Tensor>,
                       wh: Option<&Tensor>,
                       sink: Option<&Tensor>,
                       out16: bool| {
                bag_decode(&w32, &v32, &cols, &bags, n_bags, stats, wh, sink, out16).unwrap()
            };
            let decode = |stats: &Tensor, sink: Option<&Tensor>| {
                let out = bag(Some(stats), None, sink, false);
                let g = Tensor::run_backward(
                    &[(&out * r.to_kind(Kind::Float)).sum(None)],
                    &[&w32, &v32],
                    false,
                    false,
                );
                (out, g)
            };
            let (out, g) = decode(&stats, None);
            // W's gradient into a bf16 sink (the update reads it so): the float32 one rounded
            // once, bit for bit, autograd giving W none; the figures are the rounded
            // gradient's (against the float32 ones from it: summed in another order).
            let sink = Tensor::empty(w32.size(), (Kind::BFloat16, device));
            let stats16 = bag_decode_stats(&w32);
            let (_, g16) = decode(&stats16, Some(&sink));
            assert!(!g16[0].defined(), "{case}: W given a gradient with a sink");
            assert!(
                sink.equal(&g[0].to_kind(Kind::BFloat16)),
                "{case}: the sink is not W's float32 gradient rounded"
            );
            assert!(g16[1].equal(&g[1]), "{case}: the values' gradient moved");
            // The sums in bf16 (the trainer's `parts_bf16`): the float32 sums rounded once,
            // bit for bit. Their gradient comes back in bf16 and the backward reads it so: W's
            // (in float32 and into a sink) and the values' equal, bit for bit, the float32
            // kernel's from the same gradient in float32.
            let r16 = r.to_kind(Kind::BFloat16);
            for sink in [
                None,
                Some(Tensor::empty(w32.size(), (Kind::BFloat16, device))),
            ] {
                let grads = |out16: bool| {
                    let out = bag(None, None, sink.as_ref(), out16);
                    let loss = match out16 {
                        true => (&out * &r16).sum(None),
                        false => (&out * r16.to_kind(Kind::Float)).sum(None),
                    };
                    let g = Tensor::run_backward(&[loss], &[&w32, &v32], true, false);
                    let dw = sink.as_ref().map_or(g[0].shallow_clone(), |s| s.copy());
                    (out, dw, g[1].shallow_clone())
                };
                let ((o32, dw32, dv32), (o16, dw16, dv16)) = (grads(false), grads(true));
                assert_eq!(o16.kind(), Kind::BFloat16, "{case}: bf16 sums' kind");
                assert!(
                    o16.equal(&o32.to_kind(Kind::BFloat16)),
                    "{case}: the bf16 sums are not the float32 ones rounded"
                );
                assert!(
                    dw16.equal(&dw32) && dv16.equal(&dv32),
                    "{case}: the gradients from a bf16 gradient of the sums (sink {})",
                    sink.is_some()
                );
            }
            let (s16, sd) = (
                sink.to_kind(Kind::Double),
                w32.detach().to_kind(Kind::Double),
            );
            let row_dot = |a: &Tensor, b: &Tensor| (a * b).sum_dim_intlist(1, false, None);
            let st16 = stats16.sum_dim_intlist(0, false, None);
            for (what, got, want) in [
                ("dw.dw", st16.get(0), row_dot(&s16, &s16)),
                ("dw.w", st16.get(1), row_dot(&s16, &sd)),
            ] {
                let rel = rel_max(&got, &want);
                assert!(
                    rel <= 1e-12,
                    "{case}: the sink's {what}, {rel:e} of its largest"
                );
            }
            let rows_w = w.index_select(0, &cols);
            let want = Tensor::zeros([n_bags, d], f64_).index_add(
                0,
                &bags,
                &(&rows_w * vals.unsqueeze(1)),
            );
            let r_e = r.index_select(0, &bags);
            let want_dw =
                Tensor::zeros([latents, d], f64_).index_add(0, &cols, &(&r_e * vals.unsqueeze(1)));
            let want_dv = (&rows_w * &r_e).sum_dim_intlist(1, false, None);
            // The W gradient's figures: dw.dw, dw.w and w.w a row (w.w 0 where no entry is).
            let fired = Tensor::zeros([latents], f64_)
                .index_add(0, &cols, &vals.ones_like())
                .gt(0.0);
            let w_fired = &w * fired.unsqueeze(1);
            let want_stats = Tensor::stack(
                &[
                    want_dw.square().sum_dim_intlist(1, false, None),
                    (&want_dw * &w).sum_dim_intlist(1, false, None),
                    w_fired.square().sum_dim_intlist(1, false, None),
                ],
                0,
            );
            check(&[
                ("decode", &out, &want),
                ("W gradient", &g[0], &want_dw),
                ("values' gradient", &g[1], &want_dv),
                (
                    "W gradient's figures",
                    &stats.sum_dim_intlist(0, false, None),
                    &want_stats,
                ),
            ]);
            // Over the bf16 copy: its rounded rows, not W's (which differ by about 2^-9).
            let wh = w32.detach().to_kind(Kind::BFloat16);
            let (out_h, out_h16) = (
                bag(None, Some(&wh), None, false),
                bag(None, Some(&wh), None, true),
            );
            assert!(
                out_h16.equal(&out_h.to_kind(Kind::BFloat16)),
                "{case}: the bf16 sums over bf16 rows are not the float32 ones rounded"
            );
            let want_h = Tensor::zeros([n_bags, d], f64_).index_add(
                0,
                &bags,
                &(wh.to_kind(Kind::Double).index_select(0, &cols) * vals.unsqueeze(1)),
            );
            check(&[("decode over bf16 rows", &out_h, &want_h)]);
            assert!(
                rel_max(&out_h.to_kind(Kind::Double), &want) > 1e-4,
                "{case}: W read"
            );
            assert_eq!(
                g[0].get(if shift { 0 } else { 19 })
                    .abs()
                    .max()
                    .double_value(&[]),
                0.0,
                "{case}: a quiet latent"
            );
            // The encoder: vals[e] = xc[bags[e]] . w_enc[:, cols[e]] + bias[cols[e]] in value
            // (passed through), xc = x - b_dec, so its gradients are dw[:, j] = sum dv[e]
            // xc[rows[e]] and db[j] = sum dv[e] over latent j's entries, and b_dec's -w_enc db.
            let w_enc = w
                .tr()
                .contiguous()
                .to_kind(Kind::Float)
                .set_requires_grad(true);
            let bias = Tensor::zeros([latents], (Kind::Float, device)).set_requires_grad(true);
            let b_dec = Tensor::zeros([d], (Kind::Float, device)).set_requires_grad(true);
            // xc in float32, and in bf16 (the trainer's bf16 encoder), against its rounded
            // values.
            for xc_kind in [Kind::Float, Kind::BFloat16] {
                let xc = Tensor::randn([n_bags, d], f64_).to_kind(xc_kind);
                let dv = vals.randn_like();
                // The gradients through encoder_entries, its kernel emulated on the CPU with
                // `emulate` (else there the host's loop), with blocks' squares `sq` and dW's
                // bf16 `sink`.
                let grads = |emulate: bool, sq: Option<&Tensor>, sink: Option<&Tensor>| {
                    emulate_on_cpu(emulate && device == Device::Cpu);
                    let ve = encoder_entries(
                        &w_enc,
                        &bias,
                        &b_dec,
                        &xc,
                        &v32.detach(),
                        &bags,
                        &cols,
                        sq,
                        2,
                        sink,
                    )
                    .unwrap();
                    let g = Tensor::run_backward(
                        &[(&ve * dv.to_kind(Kind::Float)).sum(None)],
                        &[&w_enc, &bias, &b_dec],
                        false,
                        false,
                    );
                    emulate_on_cpu(false);
                    g
                };
                // The blocks' squares `sq` sum to ||dW||^2 over latents 2.. of `dw`.
                let check_sq = |what: &str, sq: &Tensor, dw: &Tensor| {
                    let (got, want) = (
                        sq.sum(Kind::Double).double_value(&[]),
                        dw.narrow(1, 2, latents - 2)
                            .to_kind(Kind::Double)
                            .square()
                            .sum(Kind::Double)
                            .double_value(&[]),
                    );
                    assert!(
                        (got - want).abs() <= 1e-5 * want,
                        "{case}, xc {xc_kind:?}: {what}'s squared norm {got} against {want}"
                    );
                };
                let sq = encoder_grad_sq(&w_enc);
                let g = grads(false, Some(&sq), None);
                let x_e = xc.to_kind(Kind::Double).index_select(0, &bags) * dv.unsqueeze(1);
                let want_dw = Tensor::zeros([latents, d], f64_)
                    .index_add(0, &cols, &x_e)
                    .tr();
                let want_db = Tensor::zeros([latents], f64_).index_add(0, &cols, &dv);
                let want_d_b_dec = -w.tr().matmul(&want_db);
                check(&[
                    ("W_enc gradient", &g[0], &want_dw),
                    ("b_enc gradient", &g[1], &want_db),
                    ("b_dec gradient", &g[2], &want_d_b_dec),
                ]);
                // Latent 3 is the busiest; a block's or a row's squares missing, or columns 0
                // and 1 in, fail it.
                check_sq("W_enc gradient", &sq, &want_dw);
                // dW into a bf16 sink (the update reads it so; the kernel's alone, so emulated
                // on the CPU): the kernel's float32 sums, each rounded once, bit for bit;
                // autograd gives W_enc none; the squares are the rounded values'.
                let sink = Tensor::empty(w_enc.size(), (Kind::BFloat16, device));
                let sq16 = encoder_grad_sq(&w_enc);
                let g32 = grads(true, None, None);
                let g16 = grads(true, Some(&sq16), Some(&sink));
                assert!(
                    !g16[0].defined(),
                    "{case}, xc {xc_kind:?}: W_enc given a gradient"
                );
                assert!(
                    sink.equal(&g32[0].to_kind(Kind::BFloat16)),
                    "{case}, xc {xc_kind:?}: the bf16 sink is not the float32 gradient rounded"
                );
                assert!(
                    g16[1].equal(&g32[1]) && g16[2].equal(&g32[2]),
                    "{case}: b_enc, b_dec"
                );
                check_sq("the sink", &sq16, &sink);
            }
        }
    }

    /// `Upload` on the copy stream, on a GPU (DMSAE_TEST_CUDA=1): a batch-sized bf16 tensor
    /// arrives exactly, also while torch's stream is busy with a product that reads memory
    /// the allocator hands straight back to the upload, and with the stream off
    /// (DMSAE_UPLOAD_STREAM=0).
    #[test]
    fn the_upload_stream_copies_exactly_on_cuda() {
        if !cuda_under_test() {
            return;
        }
        let dev = Device::Cuda(0);
        tch::manual_seed(2);
        for round in 0..3 {
            let host =
                Tensor::randn([4096, 2304], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
            // Queued work that reads a tensor freed before the upload allocates.
            let busy = Tensor::randn([4096, 4096], (Kind::Float, dev));
            let y = busy.matmul(&busy);
            drop(busy);
            if round == 2 {
                std::env::set_var("DMSAE_UPLOAD_STREAM", "0");
            }
            let got = Upload::start(&host, dev).and_then(Upload::finish).unwrap();
            std::env::remove_var("DMSAE_UPLOAD_STREAM");
            assert!(
                got.to_device(Device::Cpu).equal(&host),
                "round {round}: differs"
            );
            assert!(y.isfinite().all().int64_value(&[]) == 1);
        }
    }

    /// The head swap against ATen's copy of the transposed view, bit for bit both ways: v's
    /// shape (heads after tokens, rows in 16-byte packs), the attention output's (heads
    /// first), and rows of 5 elements (one at a time).
    fn swap_heads_against_aten(device: Device) {
        tch::manual_seed(11);
        for shape in [[2, 5, 3, 16], [2, 3, 5, 16], [2, 3, 4, 5]] {
            for kind in [Kind::BFloat16, Kind::Float] {
                let case = format!("{kind:?} {shape:?} on {device:?}");
                let x = Tensor::randn(shape, (Kind::Float, device))
                    .to_kind(kind)
                    .set_requires_grad(true);
                let r = Tensor::randn([shape[0], shape[2], shape[1], shape[3]], (kind, device));
                let y = swap_heads(&x).unwrap();
                let want = x.transpose(1, 2).contiguous();
                assert!(y.is_contiguous(), "{case}: not contiguous");
                assert!(y.equal(&want), "{case}: forward differs");
                let g = Tensor::run_backward(&[(&y * &r).sum(Kind::Float)], &[&x], false, false);
                let want_g = r.transpose(1, 2).contiguous();
                assert!(g[0].equal(&want_g), "{case}: gradient differs");
            }
        }
    }

    /// The CE kernel emulated at 64 threads a block (two warps, so the cross-warp reduction
    /// runs) and at 1,024 (what launches use); on a GPU as launched.
    fn ce_against_aten(device: Device) {
        if device == Device::Cpu {
            kernel_against_aten(device, 64);
        }
        kernel_against_aten(device, ROW_THREADS);
    }

    /// NVRTC is part of `make setup`; elsewhere (a CPU-only libtorch) these tests say so and
    /// pass, unless DMSAE_REQUIRE_NVRTC is set.
    fn have_nvrtc() -> bool {
        match nvrtc() {
            Ok(_) => true,
            Err(e) if std::env::var_os("DMSAE_REQUIRE_NVRTC").is_none() => {
                eprintln!("skipped: {e}");
                false
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// What only NVRTC can check without a GPU: the sources compile for Ampere and Hopper, and
    /// each CUBIN exports its entry points by name (cuModuleGetFunction looks them up so).
    #[test]
    fn the_kernels_compile() {
        if !have_nvrtc() {
            return;
        }
        for (src, arch) in SOURCES
            .iter()
            .flat_map(|s| ["sm_80", "sm_90"].map(|a| (s, a)))
        {
            let name = src.name;
            let cubin = compile(src.text, name, arch).unwrap();
            assert_eq!(&cubin[..4], b"\x7fELF", "{name} {arch}: not an ELF CUBIN");
            for k in src.kernels {
                assert!(
                    cubin
                        .windows(k.len() + 1)
                        .any(|w| &w[..k.len()] == k.as_bytes() && w[k.len()] == 0),
                    "{name} {arch}: no entry point {k}"
                );
            }
        }
    }

    #[test]
    fn a_compile_error_carries_nvrtcs_log() {
        if !have_nvrtc() {
            return;
        }
        let e = compile(
            "extern \"C\" __global__ void k(int *p) { *p = q; }\n",
            "bad.cu",
            "sm_90",
        )
        .unwrap_err();
        assert!(e.starts_with("bad.cu: compile:"), "{e}");
        assert!(e.contains("\"q\" is undefined"), "{e}");
    }
}
