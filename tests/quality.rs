//! What `--quantize` costs in accuracy: each block format's logit error and top-1 agreement
//! against the weights as stored, on the fixtures whose dimensions are whole blocks and on the
//! default model, and the default model's perplexity on held-out text (a Python standard library
//! module outside its training set: `email/feedparser.py`, the first 12 kB) beside the stored
//! weights'. Run on the CPU device; the figures are printed (`-- --nocapture`) and recorded in
//! BENCHMARKS.md, and bounded here so that a broken quantiser or kernel fails.

use std::path::PathBuf;

use moegen::gpu::{GpuContext, WeightDtype};
use moegen::loader::ModelFiles;
use moegen::model::Model;
use moegen::planner::Placement;
use moegen::scheduler::prompt_logits;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load(ctx: &GpuContext, files: &ModelFiles, q: Option<WeightDtype>) -> Model {
    let cfg = files.config.clone().with_quantize(q, false).unwrap();
    let placement = Placement::all_resident(&cfg);
    Model::load_placed(ctx, cfg, &files.checkpoint, 1024, &placement).unwrap()
}

/// (root of the normalised squared logit error, top-1 agreement) of `b` against `a`.
fn compare(a: &[Vec<f32>], b: &[Vec<f32>], vocab: usize) -> (f64, f64) {
    let (mut err, mut norm, mut same, mut n) = (0f64, 0f64, 0usize, 0usize);
    let argmax = |r: &[f32]| r.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0;
    for (x, y) in a.iter().zip(b) {
        err += x.iter().zip(y).map(|(&p, &q)| (p as f64 - q as f64).powi(2)).sum::<f64>();
        norm += x.iter().map(|&p| (p as f64).powi(2)).sum::<f64>();
        for (rx, ry) in x.chunks(vocab).zip(y.chunks(vocab)) {
            same += (argmax(rx) == argmax(ry)) as usize;
            n += 1;
        }
    }
    ((err / norm).sqrt(), same as f64 / n as f64)
}

/// exp(mean negative log-likelihood) of each next token of `tokens`, in windows of `window`.
fn perplexity(model: &Model, tokens: &[u32], window: usize) -> f64 {
    let vocab = model.cfg.vocab_size;
    let chunks: Vec<Vec<u32>> = tokens.chunks(window).filter(|c| c.len() > 1).map(|c| c.to_vec()).collect();
    let logits = prompt_logits(model, &chunks).unwrap();
    let (mut nll, mut n) = (0f64, 0usize);
    for (chunk, l) in chunks.iter().zip(&logits) {
        for (i, &next) in chunk.iter().enumerate().skip(1) {
            let row = &l[(i - 1) * vocab..i * vocab];
            let max = row.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            nll += max + sum.ln() - row[next as usize] as f64;
            n += 1;
        }
    }
    (nll / n as f64).exp()
}

#[test]
fn quantised_experts_stay_close_to_the_stored_weights() {
    let ctx = GpuContext::cpu();
    // (model, formats whose blocks divide its dimensions, bounds on top-1 agreement per format)
    let fixture = ModelFiles::open(&root().join("tests/fixtures/mixtral-f32")).unwrap();
    let prompts: Vec<Vec<u32>> = (0..4).map(|p| (0..40).map(|i| ((p * 131 + i * 37) % 250 + 3) as u32).collect()).collect();
    let default = ModelFiles::open(&root().join("assets/default-model")).unwrap();
    let text = std::fs::read_to_string(root().join("tests/fixtures/heldout/feedparser.py.txt")).unwrap();
    let tokens = default.codec.as_ref().unwrap().encode(&text).unwrap();
    let base_ppl = perplexity(&load(&ctx, &default, None), &tokens, 256);
    eprintln!("default model, {} held-out tokens: perplexity {base_ppl:.3} with its bf16 experts", tokens.len());
    for (name, files, formats) in [
        ("mixtral-f32 fixture", &fixture, &[WeightDtype::Q8_0, WeightDtype::Q4_0][..]),
        ("default model", &default, &[WeightDtype::Q8_0, WeightDtype::Q4_0, WeightDtype::Q4K][..]),
    ] {
        let vocab = files.config.vocab_size;
        // The default model is compared over the held-out text; the fixture (no tokenizer) on
        // token-id prompts.
        let prompts: Vec<Vec<u32>> = if std::ptr::eq(files, &default) { tokens.chunks(256).map(|c| c.to_vec()).collect() } else { prompts.clone() };
        let stored = prompt_logits(&load(&ctx, files, None), &prompts).unwrap();
        for &q in formats {
            let model = load(&ctx, files, Some(q));
            let (err, top1) = compare(&stored, &prompt_logits(&model, &prompts).unwrap(), vocab);
            let ppl = if std::ptr::eq(files, &default) { format!(", perplexity {:.3}", perplexity(&model, &tokens, 256)) } else { String::new() };
            eprintln!("{name}, experts {}: relative RMS logit error {err:.2e}, top-1 agreement {:.1}%{ppl}", q.name(), 100.0 * top1);
            // Random weights (the fixture) have nearly flat logits, which 4-bit error reorders
            // far more than a trained model's.
            let trained = std::ptr::eq(files, &default);
            let (min_top1, max_err) = match (q == WeightDtype::Q8_0, trained) {
                (true, _) => (0.97, 0.02),
                (false, true) => (0.85, 0.12),
                (false, false) => (0.6, 0.3),
            };
            assert!(top1 >= min_top1 && err <= max_err, "{name} {}: top-1 {top1}, error {err}", q.name());
            if std::ptr::eq(files, &default) {
                let ratio = perplexity(&model, &tokens, 256) / base_ppl;
                assert!(ratio < if q == WeightDtype::Q8_0 { 1.01 } else { 1.10 }, "{}: perplexity {ratio}x the stored weights'", q.name());
            }
        }
    }
}
