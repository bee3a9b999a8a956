// tch links libtorch but gives binaries no rpath; without one, `dmsae` and the test binaries
// only run with LD_LIBRARY_PATH set. torch-sys (a direct dependency of each crate for this
// reason) exports the library directory it linked against as DEP_TCH_LIBTORCH_LIB. The
// extractor and trainer crates use this same script.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // Read back at run time to dlopen libtorch_cuda.so by absolute path first.
        println!("cargo:rustc-env=DMSAE_LIBTORCH_LIB={lib}");
    }
}
