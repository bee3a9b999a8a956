// tch links libtorch but gives binaries no rpath; without one, `dmsae` and the test binaries
// only run with LD_LIBRARY_PATH set. torch-sys (a direct dependency of each crate for this
// reason) exports the library directory it linked against as DEP_TCH_LIBTORCH_LIB. The
// extractor and trainer crates use this same script; a crate with a csrc/ folder also gets
// its C++ compiled against that libtorch (ops tch does not bind).
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // Read back at run time to dlopen libtorch_cuda.so by absolute path first.
    println!("cargo:rustc-env=DMSAE_LIBTORCH_LIB={lib}");
    let csrc = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("csrc");
    if csrc.is_dir() {
        compile_csrc(&csrc, Path::new(&lib));
    }
}

fn compile_csrc(csrc: &Path, lib: &Path) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(csrc)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cpp"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed={}", csrc.display());
    // CUDA sources a csrc/ file may include (the CPU emulator of kernels/).
    let kernels = csrc.with_file_name("kernels");
    if kernels.is_dir() {
        println!("cargo:rerun-if-changed={}", kernels.display());
    }
    // The same headers and ABI as torch-sys's own C++: in its Python mode torch/include beside
    // the library; otherwise LIBTORCH_INCLUDE, else LIBTORCH, with the ABI it is told.
    for var in [
        "LIBTORCH_USE_PYTORCH",
        "LIBTORCH_INCLUDE",
        "LIBTORCH",
        "LIBTORCH_CXX11_ABI",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let beside_lib = || lib.parent().unwrap_or(lib).to_path_buf();
    let env = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
    let python = std::env::var("LIBTORCH_USE_PYTORCH").is_ok();
    let root = match python {
        true => beside_lib(),
        false => env("LIBTORCH_INCLUDE")
            .or_else(|| env("LIBTORCH"))
            .map_or_else(beside_lib, PathBuf::from),
    };
    let abi = match python {
        true => "1".to_string(), // torch >= 2.7 wheels, as torch-sys's pinned 2.11
        false => env("LIBTORCH_CXX11_ABI").unwrap_or_else(|| "1".into()),
    };
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .files(&files)
        // One archive name per crate: with a shared name the linker takes one crate's only.
        .compile(&format!(
            "{}_csrc",
            std::env::var("CARGO_PKG_NAME").unwrap().replace('-', "_")
        ));
}
