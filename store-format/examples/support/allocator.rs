//! The allocator the `dmsae` binary runs with (src/main.rs): mimalloc, freed pages kept. The
//! rate examples use it too, so that they time what the binary does: under glibc each batch's
//! multi-MB buffers are fresh mappings the kernel faults in and zeroes.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// As src/main.rs's `keep_freed_pages`: mimalloc's purge delay (option 15) set to never.
pub fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an allocator option; no memory is touched.
        unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    }
}
