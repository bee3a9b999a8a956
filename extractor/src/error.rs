//! The extractor's errors; each names the file or tensor concerned.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `config.json` is malformed or describes an unsupported model.
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    /// A checkpoint tensor is missing, has the wrong shape or dtype, or its file is malformed.
    #[error("{}: {msg}", path.display())]
    Weights { path: PathBuf, msg: String },
    /// Input data is missing, malformed or unusable (names the file, and the line for jsonl).
    #[error("{}: {msg}", path.display())]
    Data { path: PathBuf, msg: String },
    /// A request the model cannot serve (layer out of range, bad input shape).
    #[error("{0}")]
    Usage(String),
    /// NaN or inf in what a batch computed (the message names the batch).
    #[error("{0}")]
    NonFinite(String),
    /// Writing the store failed.
    #[error(transparent)]
    Store(#[from] dmsae_store::StoreError),
    /// One of dmsae's own CUDA kernels (kernels.rs) failed to launch.
    #[error("cuda: {0}")]
    Kernel(String),
    /// libtorch failed (out of memory, device errors).
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
