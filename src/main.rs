//! `dmsae`: argument parsing and dispatch. The work lives in the library crates.
//!
//! Exit codes: 0 success; 1 `store verify` found problems; 2 an error (printed on one line);
//! 3 `extract` stopped by SIGTERM/SIGINT after committing its work (rerun to continue), or
//! `train` stopped by them after writing a checkpoint (rerun with --resume), or `train-cycle` /
//! `distill` / `sweep` stopped by them (rerun the same command), or `eval` stopped by them (nothing written).

mod cli;
mod distill_cmd;
mod eval_cmd;
mod extract_cmd;
mod store_cmd;
mod sweep_cmd;
mod train_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

// Decoding allocates and frees multi-MB buffers across threads; glibc returns them to the
// kernel and page-faults them back (1.5x slower streams measured), mimalloc keeps them. The
// `override` feature makes it libtorch's malloc too: every temporary tensor above glibc's
// mmap threshold was a fresh mapping, and page faults took a quarter of a CPU training step
// (2.2x faster steps at width 16,384, measured with `make bench-train`; 2.6x with
// `keep_freed_pages`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc returns freed pages to the OS after a delay, and libtorch's next temporaries fault
/// them back in, zeroed by the kernel (a fifth of a CPU step at width 16,384; keeping them made
/// steps 15% faster). A training or extraction job's working set is its peak anyway.
fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return; // the user's choice
    }
    // mi_option_purge_delay in the option enum of mimalloc 3 (libmimalloc-sys 0.1.49's
    // default; Cargo.lock pins it): -1 never purges.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an allocator option; no memory is touched.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

#[derive(Parser)]
#[command(
    name = "dmsae",
    version,
    about = "Distilled Matryoshka SAEs: extract activations and gradients, train, distill"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the torch version, CUDA availability, device count and store format version.
    Env,
    /// Create, check, inspect, import and export activation stores.
    Store {
        #[command(subcommand)]
        cmd: Box<store_cmd::StoreCmd>,
    },
    /// Run a Gemma checkpoint over text; store layer-L activations, loss gradients, tokens, losses.
    Extract(Box<extract_cmd::ExtractArgs>),
    /// Train a Matryoshka BatchTopK SAE (optionally from a given core) on a store.
    Train(Box<train_cmd::TrainArgs>),
    /// One distillation cycle: train with the previous cycle's core, attribute, select the next core.
    TrainCycle(Box<distill_cmd::TrainCycleArgs>),
    /// Run distillation cycles (resumable) and write the distilled core and the run summary.
    Distill(Box<distill_cmd::DistillArgs>),
    /// Train SAEs at several k reusing the distilled core, with a no-core baseline and a
    /// random-core ablation, in one pass over the store.
    Sweep(Box<sweep_cmd::SweepArgs>),
    /// Print a distillation run's summary or a sweep's table (and refresh their plots).
    Report(distill_cmd::ReportArgs),
    /// Splice SAE reconstructions into the model: CE-loss recovered, KL, FVU, L0 on held-out text.
    Eval(Box<eval_cmd::EvalArgs>),
}

fn env() -> Result<ExitCode> {
    let note = dmsae_extractor::runtime::load_cuda(option_env!("DMSAE_LIBTORCH_LIB")).err();
    let info = dmsae_extractor::runtime::info(note);
    println!("dmsae {}", env!("CARGO_PKG_VERSION"));
    println!("torch {}", info.torch_version);
    println!(
        "libtorch {}",
        info.libtorch_dir
            .map_or("unknown".into(), |d| d.display().to_string())
    );
    println!("cuda available: {}", info.cuda_available);
    println!("cuda devices: {}", info.cuda_devices);
    if let (false, Some(n)) = (info.cuda_available, info.cuda_note) {
        println!(
            "cuda note: libtorch_cuda not loaded ({})",
            n.lines().next().unwrap_or("")
        );
    }
    use dmsae_extractor::kernels;
    match kernels::nvrtc_location() {
        Ok(at) => println!("nvrtc: {at}"),
        Err(e) => println!("nvrtc: {e} (the ATen fallbacks run instead of dmsae's kernels)"),
    }
    if info.cuda_available {
        let dev = dmsae_extractor::tch::Device::Cuda(0);
        match kernels::ready(dev) {
            Ok(()) => println!("fused kernels on cuda:0: compiled and loaded"),
            Err(e) => println!("fused kernels on cuda:0: unavailable, ATen runs instead ({e})"),
        }
    }
    println!("store format version: {}", dmsae_store::FORMAT_VERSION);
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Env => env(),
        Cmd::Store { cmd } => store_cmd::run(*cmd),
        Cmd::Extract(a) => extract_cmd::run(*a),
        Cmd::Train(a) => train_cmd::run(*a),
        Cmd::TrainCycle(a) => distill_cmd::train_cycle(*a),
        Cmd::Distill(a) => distill_cmd::distill(*a),
        Cmd::Sweep(a) => sweep_cmd::run(*a),
        Cmd::Report(a) => distill_cmd::report(a),
        Cmd::Eval(a) => eval_cmd::run(*a),
    }
}

fn main() -> ExitCode {
    keep_freed_pages();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            // A closed stdout (`dmsae store inspect | head`) is not a failure.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("dmsae: error: {}", one_line(&format!("{e:#}")));
            ExitCode::from(2)
        }
    }
}

/// An error as one line: libtorch's messages go on with the C++ frames that raised them.
fn one_line(msg: &str) -> String {
    let cut = ["\nException raised from", "\nframe #"]
        .iter()
        .filter_map(|m| msg.find(m))
        .min()
        .unwrap_or(msg.len());
    msg[..cut].trim_end().replace('\n', " ")
}
