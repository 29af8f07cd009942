//! The WGSL kernel library. Each op has its shader specialisations, a function that records it
//! into a [`Batch`](crate::gpu::Batch) after checking its arguments, and a CPU reference in Rust
//! that the tests hold it to.

pub mod attention;
pub mod dequant;
pub mod elementwise;
pub mod embedding;
pub mod head_matmul;
pub mod matmul;
pub mod matmul_int8;
pub mod moe;
pub mod norm;
pub mod rope;
pub mod router;
pub mod softmax;
pub mod tuning;

use crate::error::{Error, Result};
use crate::gpu::{GpuBuffer, GpuContext, KernelFeatures, ShaderSource, WeightDtype};

/// Threads per workgroup of the row kernels (one workgroup per row, reducing across it).
pub(crate) const ROW_WG: u32 = 128;
/// Threads per workgroup of the elementwise kernels.
pub(crate) const ELEMENT_WG: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Dims4 {
    pub a: u32,
    pub b: u32,
    pub c: u32,
    pub d: u32,
}

/// Fails unless `buf` holds at least `elements` 4-byte values.
pub(crate) fn need(buf: &GpuBuffer, elements: usize, what: &str) -> Result<()> {
    let bytes = elements as u64 * 4;
    if buf.size() < bytes {
        return Err(Error::invalid(what, format!("needs {bytes} bytes, the buffer has {}", buf.size())));
    }
    Ok(())
}

/// Converts a size to the u32 the kernels index with, or fails naming it.
pub(crate) fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::invalid(what, format!("{v} does not fit in 32 bits")))
}

/// A stand-in for an optional binding that a dispatch does not use.
pub(crate) fn unused_binding(ctx: &GpuContext) -> Result<GpuBuffer> {
    ctx.storage("unused binding", 16)
}

/// The buffer to bind for an optional input: it, or a small unused one in its place.
pub(crate) fn optional_binding(ctx: &GpuContext, buf: Option<&GpuBuffer>) -> Result<GpuBuffer> {
    match buf {
        Some(b) => Ok(b.clone()),
        None => unused_binding(ctx),
    }
}

/// Limits generous enough that every candidate is listed.
const LISTING_LIMITS: wgpu::Limits = wgpu::Limits {
    max_compute_workgroup_storage_size: 32768,
    max_compute_invocations_per_workgroup: 1024,
    max_compute_workgroup_size_x: 1024,
    ..wgpu::Limits::defaults()
};

/// Cooperative shapes the emulated kernel is tested at (the two WGSL sizes, f16 and f32 inputs).
pub const COOP_TEST_SHAPES: [crate::gpu::CoopShape; 2] =
    [crate::gpu::CoopShape { size: 16, f16_inputs: true, subgroup: 32 }, crate::gpu::CoopShape { size: 8, f16_inputs: false, subgroup: 16 }];

/// Every shader specialisation the engine can compile on a device with `features`: what the
/// cross-compiler test validates for Vulkan, Metal and DX12.
pub fn all_shaders(features: KernelFeatures) -> Vec<ShaderSource> {
    // FP8 rows in DeepSeek-V3's 128-wide scale blocks.
    let dtypes: Vec<WeightDtype> = WeightDtype::ALL.into_iter().chain([WeightDtype::Fp8 { block: 128 }]).collect();
    let mut out = vec![
        norm::rms_norm_shader(features),
        elementwise::add_shader(),
        elementwise::swiglu_shader(),
        elementwise::swiglu_portable_shader(),
        elementwise::add_gated_shader(),
        elementwise::copy_rows_shader(),
        rope::shader(),
        softmax::softmax_shader(features),
        softmax::argmax_shader(features),
        router::shader(),
        moe::plan_shader(),
        moe::gather_shader(),
        moe::combine_shader(),
        matmul_int8::quantize_shader(),
    ];
    // Every variant the tuning may pick on these features (subgroup key reads only where allowed).
    for kernel in attention::AttentionKernel::candidates(features, 1024) {
        for (hd, group) in [(64, 1), (64, 4), (128, 2), (128, 8), (192, 1), (256, 16)] {
            out.push(attention::shader(kernel, features, &attention::AttentionShape::new(group, 1, hd), 16384));
        }
        out.push(attention::shader(kernel, features, &attention::AttentionShape::latent(16, 576, 512, 0.1), 16384));
    }
    out.push(elementwise::copy_cols_shader());
    out.push(dequant::shader());
    out.push(elementwise::round_bf16_shader());
    out.push(elementwise::expand_bf16_shader());
    for &dtype in &dtypes {
        out.push(head_matmul::shader(dtype, features));
    }
    for dtype in dtypes {
        out.push(embedding::shader(dtype, features));
        for path in matmul::MatmulPath::candidates(features, &LISTING_LIMITS) {
            out.push(matmul::shader(path, dtype, features));
        }
        // The emulated cooperative tiles the tests run on adapters without them.
        for shape in COOP_TEST_SHAPES.into_iter().filter(|s| !s.f16_inputs || features.f16) {
            out.push(matmul::shader(matmul::MatmulPath::Coop { shape, emulated: true }, dtype, features));
        }
        for tile in moe::GroupTile::ALL {
            out.push(moe::grouped_matmul_shader(tile, dtype, features));
        }
        if matmul_int8::supports(dtype) {
            let mut paths: Vec<matmul_int8::Int8Path> = Vec::new();
            for path in matmul::MatmulPath::candidates(features, &LISTING_LIMITS).into_iter().map(matmul_int8::Int8Path::of) {
                if !paths.contains(&path) {
                    paths.push(path);
                }
            }
            out.extend(paths.into_iter().map(|path| matmul_int8::shader(path, dtype)));
            out.extend(moe::GroupTile::ALL.map(|tile| matmul_int8::grouped_shader(tile.rows(), dtype)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specialisations_have_distinct_keys() {
        for f16 in [false, true] {
            for subgroups in [false, true] {
                let mut features = KernelFeatures::basic(f16, subgroups, false);
                features.subgroup_attention = subgroups;
                let shaders = all_shaders(features);
                // Two shapes may need the same specialisation; different code never shares a key.
                let mut by_key = std::collections::HashMap::new();
                for s in &shaders {
                    let code = by_key.entry(s.key.clone()).or_insert(&s.code);
                    assert_eq!(*code, &s.code, "two specialisations share the cache key {}", s.key);
                }
            }
        }
    }
}
