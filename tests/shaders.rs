//! Every shader specialisation the engine uses goes through naga's WGSL front end and validator
//! and out through the SPIR-V (Vulkan), MSL (Metal) and HLSL (DX12) back ends, so a shader that
//! one vendor's path would reject fails here, on any machine, without a GPU.

use moegen::gpu::{CoopShape, KernelFeatures};
use moegen::kernels::all_shaders;
use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};

fn check(features: KernelFeatures) -> Vec<String> {
    check_each(&all_shaders(features), features)
}

fn check_each(shaders: &[moegen::gpu::ShaderSource], features: KernelFeatures) -> Vec<String> {
    let mut caps = Capabilities::empty();
    if features.f16 {
        caps |= Capabilities::SHADER_FLOAT16;
    }
    if features.subgroups {
        caps |= Capabilities::SUBGROUP;
    }
    if features.coop.is_some() {
        caps |= Capabilities::COOPERATIVE_MATRIX;
    }
    let mut failures = Vec::new();
    for shader in shaders {
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
        let coop = shader.code.contains("enable wgpu_cooperative_matrix;");
        if let Err(e) = msl::write_string(&module, &info, &msl_options, &msl::PipelineOptions::default()) {
            failures.push(fail("msl", e.to_string()));
        }
        if coop {
            // wgpu offers cooperative matrices on Vulkan and Metal only.
            continue;
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
            let mut features = KernelFeatures::basic(f16, subgroups, false);
            features.subgroup_attention = subgroups;
            failures.extend(check(features));
        }
    }
    assert!(failures.is_empty(), "{} shader failures:\n{}", failures.len(), failures.join("\n\n"));
}

/// The cooperative-matrix matmul in every shape an adapter may offer (16x16 and 8x8, f16 and
/// f32 inputs, subgroups of 32 and 64), through naga to SPIR-V (VK_KHR_cooperative_matrix) and
/// MSL (simdgroup matrices): what runs where `MOEGEN_EXPERIMENTAL=coop-matrix` finds tensor cores.
#[test]
fn cooperative_matrix_matmul_compiles_for_vulkan_and_metal() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for (size, f16_inputs) in [(16, true), (8, true), (16, false), (8, false)] {
        for subgroup in [32, 64] {
            let mut features = KernelFeatures::basic(true, true, false);
            features.coop = Some(CoopShape { size, f16_inputs, subgroup });
            let coop: Vec<_> = all_shaders(features).into_iter().filter(|s| s.key.contains("tiles=coop")).collect();
            assert_eq!(coop.len(), 9, "one cooperative matmul per weight type");
            checked += coop.len();
            failures.extend(check_each(&coop, features));
        }
    }
    assert_eq!(checked, 72);
    assert!(failures.is_empty(), "{} shader failures:\n{}", failures.len(), failures.join("\n\n"));

    // And what comes out multiplies on the matrix units: SPIR-V's cooperative multiply-add
    // (OpCooperativeMatrixMulAddKHR, 4459), loads (4457) and stores (4458), Metal's simdgroup multiply-accumulate.
    let mut features = KernelFeatures::basic(true, true, false);
    features.coop = Some(CoopShape { size: 16, f16_inputs: true, subgroup: 32 });
    let shader = all_shaders(features).into_iter().find(|s| s.key.contains("tiles=coop") && s.key.contains("w=bf16")).unwrap();
    let module = naga::front::wgsl::parse_str(&shader.code).unwrap();
    let caps = Capabilities::SHADER_FLOAT16 | Capabilities::SUBGROUP | Capabilities::COOPERATIVE_MATRIX;
    let info = Validator::new(ValidationFlags::all(), caps).validate(&module).unwrap();
    let spv_pipeline = spv::PipelineOptions { shader_stage: naga::ShaderStage::Compute, entry_point: "main".into() };
    let words = spv::write_vec(&module, &info, &spv::Options::default(), Some(&spv_pipeline)).unwrap();
    let opcodes = |op: u32| {
        // Instructions start after the 5-word header; each word's low half is its opcode, the
        // high half its length in words.
        let mut i = 5;
        let mut n = 0;
        while i < words.len() {
            if words[i] & 0xffff == op {
                n += 1;
            }
            i += (words[i] >> 16).max(1) as usize;
        }
        n
    };
    // (Each helper is one function: one multiply-add, a load for A and one for B, a store.)
    assert_eq!(opcodes(4459), 1, "the tile product");
    assert_eq!(opcodes(4457), 2, "the A and B tile loads");
    assert_eq!(opcodes(4458), 1, "the accumulator store");
    let msl_options = msl::Options { lang_version: (2, 4), ..Default::default() };
    let (metal, _) = msl::write_string(&module, &info, &msl_options, &msl::PipelineOptions::default()).unwrap();
    assert!(metal.contains("simdgroup_multiply_accumulate"), "{metal}");
}

#[test]
fn specialisation_count_is_what_the_engine_uses() {
    // The list must cover every weight type and path; a new kernel that is not listed is not
    // cross-compiled, so the count is pinned here to be updated on purpose.
    let mut features = KernelFeatures::basic(true, true, false);
    let n = all_shaders(features).len();
    // 14 single kernels (the int8 quantiser and the portable SwiGLU among them), 7 attention shapes (one latent) at 3 workgroup sizes, column copy, FP8
    // dequantisation, bf16 rounding and widening, and per weight type: embedding, 7 matmul paths
    // and the vector path's 4 row counts at 3 other workgroup sizes, 2 emulated cooperative
    // matmuls, 2 grouped tiles, the per-head matmul; weight types: f32, f16, bf16, the five block
    // formats and FP8 rows; per block format the int8 matmul's 16 vector and 3 tiled variants and 2 grouped tiles.
    assert_eq!(n, 14 + 7 * 3 + 4 + 9 * (1 + 7 + 12 + 2 + 2 + 1) + 5 * (16 + 3 + 2));
    // Subgroup key reads in attention double its variants; cooperative matrices add a matmul.
    features.subgroup_attention = true;
    assert_eq!(all_shaders(features).len(), n + 7 * 3);
    features.coop = Some(CoopShape { size: 16, f16_inputs: true, subgroup: 32 });
    assert_eq!(all_shaders(features).len(), n + 7 * 3 + 9);
}
