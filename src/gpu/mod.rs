//! The GPU runtime: adapter and device, buffers, pipelines, batched submission.

mod batch;
mod buffers;
mod context;
mod devices;
mod link;
mod pipelines;
mod trace;

pub use batch::{grid, Batch};
pub(crate) use buffers::stacked_parts;
pub use buffers::{
    encode_weights, round_weights, BufferPool, HostRead, PendingRead, GpuBuffer, GpuWeight, PoolStats, WeightDtype, WeightPart, STORAGE,
    UNIFORM,
};
pub use context::{instance, list_adapters, AdapterChoice, CoopShape, DeviceChoice, Experimental, GpuCompute, GpuContext, KernelFeatures, WANTED_FEATURES};
pub use devices::describe_adapters;
pub use link::{Link, RateLimit};
pub use pipelines::{ShaderBuilder, ShaderSource};
pub use trace::{Event, Track, TraceSummary, Tracer};
