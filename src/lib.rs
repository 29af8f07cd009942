//! moegen: high-throughput offline inference of Mixture-of-Experts language models on one GPU of
//! any vendor, through wgpu.

pub mod bench;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod gpu;
pub mod input;
pub mod interrupt;
pub mod job;
pub mod kernels;
pub mod loader;
pub mod model;
pub mod output;
pub mod planner;
pub mod quant;
pub mod sampler;
pub mod scheduler;

pub use error::{Error, Result};
