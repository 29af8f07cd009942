//! `--cpu-compute bf16` on whole models: the CPU device with bf16 products (the inputs of every
//! matmul over bf16 weights rounded to bf16, AVX512-BF16's dot products) against the logits
//! transformers computed in f32 on the bf16 fixtures. A test binary of its own, because the
//! choice is the process's: here it is switched between the two runs of each fixture.

use std::path::PathBuf;

use moegen::cpu::bf16_products::{self, CpuCompute};
use moegen::gpu::GpuContext;
use moegen::model::Model;
use moegen::scheduler::prompt_logits;
use serde_json::Value;

/// Largest |ours - theirs| over the largest |theirs|, per prompt.
fn relative_errors(model: &Model, expected: &Value) -> Vec<f64> {
    let ids = |v: &Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    let prompts: Vec<Vec<u32>> = expected["prompts"].as_array().unwrap().iter().map(ids).collect();
    let logits = prompt_logits(model, &prompts).unwrap();
    let mut errors = Vec::new();
    for (ours, want) in logits.iter().zip(expected["logits"].as_array().unwrap()) {
        let want: Vec<f32> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(ours.len(), want.len());
        let scale = want.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
        errors.push(ours.iter().zip(&want).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs())) / scale);
    }
    errors
}

#[test]
fn bf16_products_stay_within_bf16_rounding_of_transformers() {
    if !bf16_products::supported() {
        eprintln!("no AVX512-BF16 (or not the avx512 path) here: --cpu-compute bf16 cannot be picked, nothing to check");
        assert!(bf16_products::set(CpuCompute::Bf16).is_err(), "asking for it on this CPU says why not");
        return;
    }
    let ctx = GpuContext::cpu();
    for name in ["mixtral-bf16-sharded", "qwen2-moe-bf16", "olmoe-bf16", "deepseek-v2-bf16"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        let expected: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let model = Model::load(&ctx, &dir, 64).unwrap();
        bf16_products::set(CpuCompute::F32).unwrap();
        let exact = relative_errors(&model, &expected);
        bf16_products::set(CpuCompute::Bf16).unwrap();
        let rounded = relative_errors(&model, &expected);
        let list = |e: &[f64]| e.iter().map(|v| format!("{v:.1e}")).collect::<Vec<_>>().join(" ");
        eprintln!("{name}: relative logit error by prompt {} in f32, {} with bf16 products", list(&exact), list(&rounded));
        let median = {
            let mut r = rounded.clone();
            r.sort_by(f64::total_cmp);
            r[r.len() / 2]
        };
        let (exact, rounded) = (exact.iter().copied().fold(0f64, f64::max), rounded.iter().copied().fold(0f64, f64::max));
        // f32 compute lands near 1e-6. Rounding the activations to bf16 (8 bits of mantissa)
        // moves the logits by about 5e-3 of their range; where it flips a token's choice of
        // expert, by more (DeepSeek-V2's longest prompt: 7e-2, group-limited routing over close
        // router scores on random weights). A wrong product (a lane or a pair out of place)
        // moves every prompt's logits by about their range.
        assert!(exact < 5e-6, "{name}: f32 compute {exact:e}");
        assert!(rounded > 10.0 * exact, "{name}: bf16 products ({rounded:e}) left the f32 result ({exact:e}) unchanged: the path was not taken");
        assert!(median < 1.5e-2 && rounded < 0.15, "{name}: bf16 products {median:e} (median prompt), {rounded:e} (worst) against transformers");
    }
}
