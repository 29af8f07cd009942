//! Kernels that run on the host CPU: each beside its CPU reference and tests, as the GPU
//! kernels are. Vector primitives come from [`simd`], chosen at run time for the CPU at hand;
//! work is spread over rayon's threads.

pub mod attention;
pub mod simd;
