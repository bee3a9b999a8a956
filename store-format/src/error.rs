//! One error type for the store. Every variant that can come from a file names it, and the
//! chunk where there is one, so the CLI can print a single line that says where to look.

use std::path::PathBuf;

/// What went wrong while reading or writing a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An operating-system error on a file. (Not a `source`: the message already carries it,
    /// and `{:#}` would print it twice.)
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },

    /// The file is not a shard, or its structure breaks SPEC.md (magic, version, lengths, limits).
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },

    /// A stored BLAKE3 checksum does not match the bytes it covers.
    #[error("{path}: checksum mismatch in {region}: expected {expected}, got {got}")]
    Checksum {
        path: PathBuf,
        region: String,
        expected: String,
        got: String,
    },

    /// A block passed its checksum but does not decode to the size the header implies.
    #[error("{path}: chunk {chunk}, array {array}: {what}")]
    Decode {
        path: PathBuf,
        chunk: usize,
        array: String,
        what: String,
    },

    /// The manifest disagrees with itself or with the shards.
    #[error("{path}: {what}")]
    Manifest { path: PathBuf, what: String },

    /// A caller asked for something the store does not have or cannot do.
    #[error("{0}")]
    Usage(String),
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.into(),
            err: source,
        }
    }
    pub(crate) fn format(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        StoreError::Format {
            path: path.into(),
            what: what.into(),
        }
    }
    pub(crate) fn manifest(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        StoreError::Manifest {
            path: path.into(),
            what: what.into(),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
