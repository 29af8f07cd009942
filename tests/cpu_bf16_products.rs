//! `--cpu-compute bf16` and `int8` on whole models: the CPU device with bf16 products (the
//! inputs of every matmul over bf16 weights rounded to bf16, AVX512-BF16's dot products) against
//! the logits transformers computed in f32 on the bf16 fixtures, and with int8 products (the
//! inputs of every matmul over K-format weights quantised to 8 bits, AVX512-VNNI's dot products)
//! against the same GGUF files in f32 compute. A test binary of its own, because the choice is
//! the process's: here it is switched between the runs of each model, one test at a time.

use std::path::PathBuf;
use std::sync::Mutex;

use moegen::cpu::bf16_products::{self, CpuCompute};
use moegen::cpu::simd::Isa;
use moegen::gpu::WeightDtype;
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

/// The process's choice is switched by one test at a time.
static CHOICE: Mutex<()> = Mutex::new(());

#[test]
fn bf16_products_stay_within_bf16_rounding_of_transformers() {
    let _one = CHOICE.lock().unwrap_or_else(|e| e.into_inner());
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

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn greedy(model: &Model, prompts: &[Vec<u32>], max_new: usize) -> Vec<Vec<u32>> {
    use moegen::scheduler::{generate, GenerateOptions, Request};
    let requests: Vec<Request> = prompts.iter().enumerate().map(|(i, p)| Request { ignore_eos: true, ..Request::new(Value::from(i), p.clone(), max_new) }).collect();
    let mut outputs = vec![Vec::new(); requests.len()];
    generate(model, &requests, &GenerateOptions::default(), |f| {
        outputs[f.index] = f.output;
        Ok(())
    })
    .unwrap();
    outputs
}

/// llama-quantize's Q4_K_M and Q5_K_M files (Q4_K or Q5_K with Q6_K), Q8_0 and Q4_0 files on the
/// CPU device with int8 products: the logits move from f32 compute's by the inputs' 8-bit rounding, no more; each
/// prompt gets the same logits alone as among the others; greedy tokens are reported beside f32
/// compute's and llama.cpp's own (which quantises the inputs the same way, per 256).
#[test]
fn int8_products_stay_within_8_bit_rounding_on_k_format_files() {
    let _one = CHOICE.lock().unwrap_or_else(|e| e.into_inner());
    if !moegen::cpu::int8_products::supported() {
        eprintln!("no AVX512-VNNI (or not the avx512 path) here: --cpu-compute int8 cannot be picked, nothing to check");
        assert!(bf16_products::set(CpuCompute::Int8).is_err(), "asking for it on this CPU says why not");
        bf16_products::set(CpuCompute::F32).unwrap();
        return;
    }
    let ctx = GpuContext::cpu();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("mixtral-256.json")).unwrap()).unwrap();
    let prompts: Vec<Vec<u32>> = recorded["prompts"].as_array().unwrap().iter().map(ids).collect();
    let max_new = recorded["max_new_tokens"].as_u64().unwrap() as usize;
    // The K formats quantise the inputs per 256 (`cpu::int8_products`), Q8_0 and Q4_0 per 32
    // (`cpu::gpu_int8`, the GPU's int8 bits).
    for format in ["q4_k_m", "q5_k_m", "q8_0", "q4_0"] {
        let model = Model::load(&ctx, &dir.join(format!("mixtral-256-{format}.gguf")), 64).unwrap();
        bf16_products::set(CpuCompute::F32).unwrap();
        let exact = prompt_logits(&model, &prompts).unwrap();
        let exact_tokens = greedy(&model, &prompts, max_new);
        bf16_products::set(CpuCompute::Int8).unwrap();
        let int8 = prompt_logits(&model, &prompts).unwrap();
        let int8_tokens = greedy(&model, &prompts, max_new);
        let errors: Vec<f64> = int8
            .iter()
            .zip(&exact)
            .map(|(a, b)| {
                let scale = b.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
                a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs())) / scale
            })
            .collect();
        let last = prompts.len() - 1;
        let alone = prompt_logits(&model, &prompts[last..]).unwrap();
        let q8_0_taken = moegen::cpu::matmul::takes_int8_32(Isa::detected(), WeightDtype::Q8_0);
        bf16_products::set(CpuCompute::F32).unwrap();
        if format == "q8_0" && !q8_0_taken {
            // Q8_0 and Q4_0 keep f32 compute where their 8-bit path is not the faster one, so the
            // Q8_0 file (every matrix Q8_0) is unchanged; the Q4_0 file's output matrix is Q6_K,
            // which takes the K formats' path either way.
            assert!(int8.iter().zip(&exact).all(|(a, b)| a.iter().map(|v| v.to_bits()).eq(b.iter().map(|v| v.to_bits()))), "{format}: kept f32 compute on the {} path", Isa::detected().name());
            eprintln!("{format}: f32 compute kept on the {} path", Isa::detected().name());
            continue;
        }
        assert_eq!(alone[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), int8[last].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{format}: the last prompt alone");
        let theirs: Vec<Vec<u32>> = recorded["llama_cpp"][format].as_array().unwrap().iter().map(ids).collect();
        let agree = |a: &[Vec<u32>], b: &[Vec<u32>]| a.iter().flatten().zip(b.iter().flatten()).filter(|(x, y)| x == y).count();
        let total = prompts.len() * max_new;
        eprintln!(
            "{format}: relative logit error from f32 compute by prompt {}; greedy tokens agree with f32 compute's {}/{total}, with llama.cpp's {}/{total} (f32 compute with llama.cpp's: {}/{total})",
            errors.iter().map(|v| format!("{v:.1e}")).collect::<Vec<_>>().join(" "),
            agree(&int8_tokens, &exact_tokens),
            agree(&int8_tokens, &theirs),
            agree(&exact_tokens, &theirs)
        );
        let worst = errors.iter().copied().fold(0f64, f64::max);
        let median = {
            let mut e = errors.clone();
            e.sort_by(f64::total_cmp);
            e[e.len() / 2]
        };
        // 8-bit inputs (a step of 1/127 of each block's largest magnitude) move the logits by
        // about 2e-2 of their range; where that flips a token's choice of expert, by more (one
        // prompt of the Q4_K_M file: 0.15). A wrong product (a chunk, scale or offset out of
        // place) moves every prompt's by about their range. Unchanged logits mean the path was
        // not taken.
        assert!(worst > 1e-5, "{format}: int8 products ({worst:e}) left the f32 result unchanged: the path was not taken");
        assert!(median < 5e-2 && worst < 0.3, "{format}: int8 products {median:e} (median prompt), {worst:e} (worst) from f32 compute");
    }
}

/// Q8_0 and Q4_0 through the host matmul with int8 products on the AVX2 path (where they take
/// `cpu::gpu_int8`; on AVX-512 they keep f32 compute): the GPU int8 model's bits, whatever the
/// row count, and the path left with the choice off.
#[test]
fn int8_products_over_q8_0_and_q4_0_give_the_gpu_int8_bits_on_avx2() {
    let _one = CHOICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(isa) = Isa::available().into_iter().find(|i| i.name() == "avx2") else {
        eprintln!("no AVX2 here: nothing to check");
        return;
    };
    if bf16_products::set(CpuCompute::Int8).is_err() {
        eprintln!("--cpu-compute int8 cannot be picked here: nothing to check");
        return;
    }
    use moegen::cpu::matmul::{matmul, WeightRows};
    use moegen::kernels::matmul_int8::{model, quantize_reference, sub_blocks};
    for dtype in [WeightDtype::Q8_0, WeightDtype::Q4_0] {
        assert!(moegen::cpu::matmul::takes_int8_32(isa, dtype));
        let (n, k) = (21, 160);
        let bytes = moegen::quant::random_blocks(dtype, n * k / dtype.block_elems(), 7, false);
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
        let w = WeightRows { words: &words, dtype, cols: k };
        let (wq, wa) = sub_blocks(dtype, &bytes);
        for m in [1usize, 5, 40] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            let (q, s) = quantize_reference(&x);
            let want = model(&q, &s, &wq, &wa, None, m, n, k);
            let mut y = vec![f32::NAN; m * n];
            matmul(isa, &x, m, w, 0, n, None, &mut y, n);
            assert!(y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{dtype:?} m={m}: not the GPU int8 model's bits");
        }
    }
    bf16_products::set(CpuCompute::F32).unwrap();
    assert!(!moegen::cpu::matmul::takes_int8_32(isa, WeightDtype::Q8_0), "f32 compute again");
}
