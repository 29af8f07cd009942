//! The GPU runtime: adapter and device, buffers, pipelines, batched submission.

mod batch;
mod buffers;
mod context;
mod devices;
mod pipelines;

pub use batch::{grid, Batch};
pub use buffers::{
    encode_weights, round_weights, BufferPool, GpuBuffer, GpuWeight, PoolStats, WeightDtype, WeightPart, STORAGE,
    UNIFORM,
};
pub use context::{instance, list_adapters, AdapterChoice, GpuContext, KernelFeatures, WANTED_FEATURES};
pub use devices::describe_adapters;
pub use pipelines::{ShaderBuilder, ShaderSource};
