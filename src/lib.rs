//! moegen: high-throughput offline inference of Mixture-of-Experts language models on one GPU of
//! any vendor, through wgpu.

pub mod error;
pub mod gpu;
pub mod kernels;

pub use error::{Error, Result};
