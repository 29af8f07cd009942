//! The crate's error type: every failure a user can cause or meet names what it concerns.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no GPU adapter found{0}")]
    NoAdapter(String),
    #[error("GPU adapter request failed: {0}")]
    RequestDevice(String),
    #[error("GPU out of memory while {what}: {detail}")]
    OutOfMemory { what: String, detail: String },
    #[error("GPU validation error in {what}: {detail}")]
    Validation { what: String, detail: String },
    #[error("GPU device lost ({reason}): {detail}")]
    DeviceLost { reason: String, detail: String },
    #[error("GPU error: {0}")]
    Gpu(String),
    #[error("{what} needs {needed} bytes in one binding, but this adapter binds at most {limit}")]
    BindingTooLarge { what: String, needed: u64, limit: u64 },
    // `what` names the file (and line), tensor, flag or kernel argument at fault.
    #[error("{what}: {detail}")]
    InvalidArgument { what: String, detail: String },
    /// The I/O error is part of the message, not chained again as a cause.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::InvalidArgument { what: what.into(), detail: detail.into() }
    }
}

/// Fails with an `InvalidArgument` naming `what` unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $what:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::error::Error::invalid($what, format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure;
