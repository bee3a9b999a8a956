// tch gives test binaries no rpath to libtorch; torch-sys (a direct dependency for this reason)
// exports the directory it linked against, as in the root build.rs.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
