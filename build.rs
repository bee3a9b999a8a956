// tch links libtorch but gives binaries no rpath; without one, `dmsae` only runs with
// LD_LIBRARY_PATH set. torch-sys (a direct dependency for this reason) exports the
// library directory it linked against as DEP_TCH_LIBTORCH_LIB.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // Read back at run time to dlopen libtorch_cuda.so by absolute path first.
        println!("cargo:rustc-env=DMSAE_LIBTORCH_LIB={lib}");
    }
}
