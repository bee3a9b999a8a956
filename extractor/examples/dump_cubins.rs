//! Writes each kernel source's CUBIN, as NVRTC compiles it at run time, to DIR/NAME.cubin, so
//! that `cuobjdump -res-usage` (PyPI `nvidia-cuda-cuobjdump`) can count a kernel's registers
//! and shared memory without a GPU: a launch of more threads a block than its registers allow
//! fails only on the device.
//! `cargo run --release -p dmsae-extractor --example dump_cubins -- DIR [ARCH, default sm_90]`
fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: dump_cubins DIR [ARCH]");
    let arch = args.next().unwrap_or_else(|| "sm_90".into());
    for src in dmsae_extractor::kernels::SOURCES {
        let cubin = dmsae_extractor::kernels::compile(src.text, src.name, &arch)
            .unwrap_or_else(|e| panic!("{}: {e}", src.name));
        let path = std::path::Path::new(&dir).join(format!("{}.cubin", src.name));
        std::fs::write(&path, cubin).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        println!("{}", path.display());
    }
}
