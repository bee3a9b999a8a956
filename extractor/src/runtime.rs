//! The libtorch runtime: which torch is loaded, and making CUDA visible to it.
//!
//! Rust links with `--as-needed`, so `libtorch_cuda.so` (which nothing calls by name) is
//! dropped from the binary and CUDA looks absent. Loading it with `dlopen` at start-up brings
//! its kernels' static registrations in where it exists and keeps one binary working on
//! CPU-only installs where it does not.

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// What `dmsae env` reports.
#[derive(Debug, Clone)]
pub struct RuntimeInfo {
    pub torch_version: String,
    pub libtorch_dir: Option<PathBuf>,
    pub cuda_available: bool,
    pub cuda_devices: i64,
    /// Why CUDA could not be loaded, when it could not.
    pub cuda_note: Option<String>,
}

/// dlopen `path` with `flags`: the handle, kept for the process lifetime, or dlerror's message.
pub(crate) fn dlopen(path: &str, flags: libc::c_int) -> Result<*mut libc::c_void, String> {
    let c = CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: dlopen with a valid C string; the handle is kept for the process lifetime.
    let h = unsafe { libc::dlopen(c.as_ptr(), flags) };
    if h.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let e = unsafe { libc::dlerror() };
        let msg = if e.is_null() {
            "unknown error".into()
        } else {
            unsafe { std::ffi::CStr::from_ptr(e) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(msg);
    }
    Ok(h)
}

/// libtorch_cuda joins the process's global symbols, as a library linked at start-up would.
const GLOBAL: libc::c_int = libc::RTLD_NOW | libc::RTLD_GLOBAL;

/// Load `libtorch_cuda.so`: first from `build_dir` (where the binary was linked), then by
/// name (LD_LIBRARY_PATH, e.g. a different torch install on a GPU node). Call before any tch use.
pub fn load_cuda(build_dir: Option<&str>) -> Result<(), String> {
    let mut errs = Vec::new();
    if let Some(d) = build_dir {
        let p = Path::new(d).join("libtorch_cuda.so");
        if p.exists() {
            match dlopen(&p.to_string_lossy(), GLOBAL) {
                Ok(_) => return Ok(()),
                Err(e) => errs.push(e),
            }
        }
    }
    match dlopen("libtorch_cuda.so", GLOBAL) {
        Ok(_) => Ok(()),
        Err(e) => {
            errs.push(e);
            Err(errs.join("; "))
        }
    }
}

/// The directory of the libtorch actually mapped into this process.
pub(crate) fn loaded_libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
}

/// The torch version of the loaded libtorch: the pip wheel's `version.py` or a libtorch
/// archive's `build-version`, beside its `lib/`.
fn torch_version(lib: Option<&Path>) -> String {
    let Some(root) = lib.and_then(Path::parent) else {
        return "unknown".into();
    };
    if let Ok(t) = std::fs::read_to_string(root.join("version.py")) {
        if let Some(v) = t.lines().find_map(|l| l.strip_prefix("__version__ = ")) {
            return v.trim().trim_matches('\'').to_string();
        }
    }
    std::fs::read_to_string(root.join("build-version"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn info(cuda_note: Option<String>) -> RuntimeInfo {
    let cuda_available = tch::Cuda::is_available();
    let cuda_devices = if cuda_available {
        tch::Cuda::device_count()
    } else {
        0
    };
    let libtorch_dir = loaded_libtorch_dir();
    RuntimeInfo {
        torch_version: torch_version(libtorch_dir.as_deref()),
        libtorch_dir,
        cuda_available,
        cuda_devices,
        cuda_note,
    }
}
