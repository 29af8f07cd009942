//! Every shader specialisation the engine uses goes through naga's WGSL front end and validator
//! and out through the SPIR-V (Vulkan), MSL (Metal) and HLSL (DX12) back ends, so a shader that
//! one vendor's path would reject fails here, on any machine, without a GPU.

use moegen::gpu::KernelFeatures;
use moegen::kernels::all_shaders;
use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};

fn check(features: KernelFeatures) -> Vec<String> {
    let mut caps = Capabilities::empty();
    if features.f16 {
        caps |= Capabilities::SHADER_FLOAT16;
    }
    if features.subgroups {
        caps |= Capabilities::SUBGROUP;
    }
    let mut failures = Vec::new();
    for shader in all_shaders(features) {
        let fail = |stage: &str, e: String| format!("{} [{stage}]: {e}", shader.key);
        let module = match naga::front::wgsl::parse_str(&shader.code) {
            Ok(m) => m,
            Err(e) => {
                failures.push(fail("wgsl", e.emit_to_string(&shader.code)));
                continue;
            }
        };
        let info = match Validator::new(ValidationFlags::all(), caps).validate(&module) {
            Ok(i) => i,
            Err(e) => {
                failures.push(fail("validate", e.emit_to_string(&shader.code)));
                continue;
            }
        };
        let spv_pipeline = spv::PipelineOptions { shader_stage: naga::ShaderStage::Compute, entry_point: "main".into() };
        if let Err(e) = spv::write_vec(&module, &info, &spv::Options::default(), Some(&spv_pipeline)) {
            failures.push(fail("spir-v", e.to_string()));
        }
        let msl_options = msl::Options { lang_version: (2, 4), ..Default::default() };
        if let Err(e) = msl::write_string(&module, &info, &msl_options, &msl::PipelineOptions::default()) {
            failures.push(fail("msl", e.to_string()));
        }
        // DX12 needs shader model 6.2 for f16 and 6.0 for wave (subgroup) operations.
        let shader_model = if features.f16 || features.subgroups { hlsl::ShaderModel::V6_2 } else { hlsl::ShaderModel::V5_1 };
        let hlsl_options = hlsl::Options { shader_model, ..Default::default() };
        let mut out = String::new();
        let mut writer = hlsl::Writer::new(&mut out, &hlsl_options, &hlsl::PipelineOptions { entry_point: None });
        if let Err(e) = writer.write(&module, &info, None) {
            failures.push(fail("hlsl", e.to_string()));
        }
    }
    failures
}

#[test]
fn every_specialisation_compiles_for_vulkan_metal_and_dx12() {
    let mut failures = Vec::new();
    for f16 in [false, true] {
        for subgroups in [false, true] {
            failures.extend(check(KernelFeatures { f16, subgroups, timestamps: false }));
        }
    }
    assert!(failures.is_empty(), "{} shader failures:\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn specialisation_count_is_what_the_engine_uses() {
    // The list must cover every weight type and path; a new kernel that is not listed is not
    // cross-compiled, so the count is pinned here to be updated on purpose.
    let n = all_shaders(KernelFeatures { f16: true, subgroups: true, timestamps: false }).len();
    // 12 single kernels, 7 attention shapes (one latent), column copy, FP8 dequantisation, bf16
    // rounding and widening, and per weight type: embedding, 6 matmul paths, 2 grouped tiles,
    // the per-head matmul; weight types: f32, f16, bf16, the five block formats and FP8 rows.
    assert_eq!(n, 12 + 7 + 4 + 9 * (1 + 6 + 2 + 1));
}
