//! Whole models against transformers: the fixtures under tests/fixtures (built by
//! scripts/make_fixtures.py) hold tiny random-weight checkpoints of every supported architecture,
//! the logits transformers computed for every position of several prompts, and its greedy
//! continuations. Prompts run together as one ragged batch here.

use std::path::PathBuf;
use std::sync::OnceLock;

use moegen::gpu::{AdapterChoice, DeviceChoice, GpuContext};
use moegen::model::Model;
use moegen::planner::Placement;
use moegen::scheduler::{generate, generate_module, prompt_logits, AttentionSite, GenerateOptions, ModuleSizes, Request};
use serde_json::Value;

fn gpu() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        GpuContext::new(&AdapterChoice { device: DeviceChoice::Gpu, ..AdapterChoice::from_env(None) }).expect("a GPU adapter (install mesa-vulkan-drivers)")
    })
}

/// The CPU device: the same forward pass on the host kernels.
fn cpu() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(GpuContext::cpu)
}

fn fixture(name: &str) -> (PathBuf, Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let expected = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (dir, expected)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Largest |ours - theirs| over the largest |theirs|, per prompt.
fn relative_error(ours: &[f32], theirs: &[f32]) -> f64 {
    let scale = theirs.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    ours.iter().zip(theirs).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs())) / scale
}

/// Every check of [`check_on`] on the GPU and on the CPU device.
fn check(name: &str) {
    check_on(gpu(), name);
    check_on(cpu(), name);
}

fn check_on(ctx: &GpuContext, name: &str) {
    let (dir, expected) = fixture(name);
    let name = &format!("{name} on {}", if ctx.is_cpu() { "the CPU" } else { "the GPU" });
    let resident = Model::load(ctx, &dir, 64).unwrap();
    if ctx.is_cpu() && resident.cfg.weight_block.is_none() {
        // The CPU device reads the checkpoint's matrices in place (no second copy): the
        // embedding and every layer's first attention projection, at least (FP8 ones are
        // dequantised into buffers of their own).
        let lent = |w: &moegen::gpu::GpuWeight| w.parts.iter().all(|p| p.buffer.is_lent());
        assert!(lent(&resident.weights.embed), "{name}: the embedding was copied");
        for (l, layer) in resident.weights.layers.iter().enumerate() {
            if let moegen::model::weights::Projections::Resident(w) = &layer.attn {
                assert!(lent(&w[0]), "{name}: layer {l}'s first projection was copied");
            }
        }
    }
    let resident_logits = check_model(name, &resident, &expected);
    // Streaming forced: every MoE layer's experts in host memory, two slots; then the first MoE
    // layer resident and three slots.
    let cfg = moegen::loader::config::ModelConfig::load(&dir).unwrap();
    let moe_layers: Vec<usize> = (0..cfg.num_layers).filter(|&l| cfg.is_moe_layer(l)).collect();
    // The first also streams every layer's attention through its slot.
    let all_layers: Vec<usize> = (0..cfg.num_layers).collect();
    for (resident, slots, streamed_attention) in [(vec![], 2, all_layers), (vec![moe_layers[0]], 3, vec![])] {
        let placement = Placement { resident_layers: resident, slots, streamed_attention, budget: None, resident_bytes: 0, reserved_bytes: 0 };
        let checkpoint = moegen::loader::checkpoint::Checkpoint::open(&dir).unwrap();
        let model = Model::load_placed(ctx, cfg.clone(), &checkpoint, 64, &placement).unwrap();
        assert_eq!(model.slots.len(), slots);
        let streamed = check_model(&format!("{name} streamed through {slots} slots"), &model, &expected);
        assert!(streamed == resident_logits, "{name}: streaming changed the logits' bits");
    }
}

/// Checks one loaded model against the fixture; returns its logits.
fn check_model(name: &str, model: &Model, expected: &Value) -> Vec<Vec<f32>> {
    let prompts: Vec<Vec<u32>> = expected["prompts"].as_array().unwrap().iter().map(ids).collect();
    let logits = prompt_logits(model, &prompts).unwrap();
    let mut worst = 0f64;
    for (i, want) in expected["logits"].as_array().unwrap().iter().enumerate() {
        let want: Vec<f32> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(logits[i].len(), want.len(), "{name}: prompt {i} logit count");
        worst = worst.max(relative_error(&logits[i], &want));
    }
    eprintln!("{name}: largest relative logit error {worst:.2e}");
    // Every fixture lands near 1e-6 (f32 arithmetic on the weights as stored). The bound is tight
    // on purpose: a wrong norm eps (DeepSeek's low-rank norms) showed as 1.5e-5 and nothing else.
    assert!(worst < 5e-6, "{name}: relative logit error {worst:e} against transformers");

    let max_new = expected["max_new_tokens"].as_u64().unwrap() as usize;
    let requests: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request { ignore_eos: true, ..Request::new(Value::from(i), p.clone(), max_new) })
        .collect();
    let outputs = greedy(model, &prompts, max_new);
    let opts = GenerateOptions::default();
    let want: Vec<Vec<u32>> = expected["greedy"].as_array().unwrap().iter().map(ids).collect();
    assert_eq!(outputs, want, "{name}: greedy tokens differ from transformers");

    // Prompts fed 3 tokens a step, and a cache that holds one sequence at a time (the others
    // wait and join as it finishes): the same tokens.
    let longest = requests.iter().map(|r| r.prompt.len() + r.max_new_tokens).max().unwrap();
    let tight = GenerateOptions { max_step_tokens: 3, cache_rows: longest, ..Default::default() };
    let mut chunked = vec![Vec::new(); requests.len()];
    generate(model, &requests, &tight, |f| {
        chunked[f.index] = f.output;
        Ok(())
    })
    .unwrap();
    assert_eq!(chunked, want, "{name}: chunked prefill or cache refill changed the tokens");

    // Model-based batching: two sequences at a time, the next pair only when both finished.
    let fixed = GenerateOptions { cache_rows: 2 * longest, fixed_batch: true, ..Default::default() };
    let mut batched = vec![Vec::new(); requests.len()];
    generate(model, &requests, &fixed, |f| {
        batched[f.index] = f.output;
        Ok(())
    })
    .unwrap();
    assert_eq!(batched, want, "{name}: model-based batching changed the tokens");

    // Module-based batching, sizes that split everything.
    let page_bytes = moegen::scheduler::host_kv::HostKv::page_bytes(&model.cfg, 4);
    let sizes = split_sizes(model, longest);
    let mut module = vec![Vec::new(); requests.len()];
    generate_module(model, &requests, &sizes, |f| {
        module[f.index] = f.output;
        Ok(())
    })
    .unwrap();
    assert_eq!(module, want, "{name}: module-based batching changed the tokens");

    // Every prompt in one step: enough tokens that streamed experts upload during attention.
    let wide = ModuleSizes { population: 8, step_tokens: 256, attn_tokens: 256, attn_kv_rows: 8 * longest, expert_chunk: 64, logit_rows: 8, ..sizes };
    let wide = ModuleSizes { host_kv_bytes: page_bytes * (8 * longest.div_ceil(4)) as u64, ..wide };
    let mut module = vec![Vec::new(); requests.len()];
    generate_module(model, &requests, &wide, |f| {
        module[f.index] = f.output;
        Ok(())
    })
    .unwrap();
    assert_eq!(module, want, "{name}: module-based batching with whole-job steps changed the tokens");

    // Attention on the host over the pages, and split between host and GPU, under both sizings,
    // with the step's hidden states in host memory and kept on the GPU.
    for site in [AttentionSite::Gpu, AttentionSite::Host, AttentionSite::Split { host_permille: 500 }] {
        for (sizing, base) in [("split sizes", sizes), ("whole-job steps", wide)] {
            // States in host memory; normed states on the GPU for steps of up to 4 tokens; all on the GPU.
            // And the whole states on the GPU in steps of up to 3 tokens (decode), in host
            // memory in longer ones.
            for (gpu_state_rows, gpu_norm_rows) in [(0, 0), (0, 4), (3, 0), (usize::MAX, 0)] {
                if site == AttentionSite::Gpu && (gpu_state_rows, gpu_norm_rows) == (0, 0) {
                    continue;
                }
                let placed = ModuleSizes { attention: site, gpu_state_rows, gpu_norm_rows, ..base };
                let mut module = vec![Vec::new(); requests.len()];
                generate_module(model, &requests, &placed, |f| {
                    module[f.index] = f.output;
                    Ok(())
                })
                .unwrap();
                let states = placed.describe_states("GPU");
                assert_eq!(module, want, "{name}: attention {} with {sizing}, states {states}, changed the tokens", site.describe("device"));
            }
        }
    }

    // Streamed experts computed on the host (every one, or those of at most 2 rows a step), with
    // the states in host memory, normed states on the GPU, and all states on the GPU: the same
    // tokens (the host matmul sums in another order than the GPU's, which no greedy token feels).
    for host_expert_rows in [usize::MAX, 2] {
        for (gpu_state_rows, gpu_norm_rows) in [(0, 0), (0, 4), (3, 0), (usize::MAX, 0)] {
            let placed = ModuleSizes { host_expert_rows, gpu_state_rows, gpu_norm_rows, attention: AttentionSite::Host, ..sizes };
            let mut module = vec![Vec::new(); requests.len()];
            generate_module(model, &requests, &placed, |f| {
                module[f.index] = f.output;
                Ok(())
            })
            .unwrap();
            assert_eq!(module, want, "{name}: experts of up to {host_expert_rows} rows on the host, hidden states {}, changed the tokens", placed.describe_states("GPU"));
        }
    }

    // The same with the population's KV kept on the GPU: three sequences' rows at a time.
    let on_gpu = ModuleSizes { gpu_kv_rows: 3 * longest, ..sizes };
    let mut module = vec![Vec::new(); requests.len()];
    generate_module(model, &requests, &on_gpu, |f| {
        module[f.index] = f.output;
        Ok(())
    })
    .unwrap();
    assert_eq!(module, want, "{name}: module-based batching with KV on the GPU changed the tokens");

    // A device whose bindings hold 40 tokens' worth of the widest activation: steps shrink to fit.
    let cfg = &model.cfg;
    let widest = cfg.experts_per_token * cfg.moe_intermediate_size.max(cfg.intermediate_size);
    let small = model.ctx.with_binding_limit((40 * 4 * widest.max(cfg.attention_width())) as u64);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name.split(' ').next().unwrap());
    let narrow = Model::load(&small, &dir, 64).unwrap();
    let mut out = vec![Vec::new(); requests.len()];
    generate(&narrow, &requests, &opts, |f| {
        out[f.index] = f.output;
        Ok(())
    })
    .unwrap();
    assert_eq!(out, want, "{name}: steps sized to a small binding changed the tokens");
    logits
}

/// Module-based sizes that split everything: a population of three (others join as sequences
/// finish), attention micro-batches of at most 5 tokens and 2 sequences' rows, expert chunks of
/// 3 rows, 4-token KV pages, 6 prompt tokens a step.
fn split_sizes(model: &Model, longest: usize) -> ModuleSizes {
    let page_bytes = moegen::scheduler::host_kv::HostKv::page_bytes(&model.cfg, 4);
    ModuleSizes {
        population: 3,
        step_tokens: 6,
        attn_tokens: 5,
        attn_kv_rows: 2 * longest,
        expert_chunk: 3,
        logit_rows: 2,
        host_kv_bytes: page_bytes * (3 * longest.div_ceil(4)) as u64,
        page_tokens: 4,
        gpu_kv_rows: 0,
        attention: AttentionSite::Gpu,
        gpu_state_rows: 0,
        gpu_norm_rows: 0,
        host_batches: 2,
        host_expert_rows: 0,
    }
}

/// Keys and values in 16 bits (`--kv-dtype bf16`): close to transformers' f32 logits, and the
/// GPU cache (model-based) and the host pages (module-based) give the same tokens, since every
/// policy rounds what it caches the same way. Host pages hold half the bytes.
fn check_bf16_kv(name: &str) {
    check_bf16_kv_on(gpu(), name);
    check_bf16_kv_on(cpu(), name);
}

fn check_bf16_kv_on(ctx: &GpuContext, name: &str) {
    let (dir, expected) = fixture(name);
    let name = &format!("{name} on {}", if ctx.is_cpu() { "the CPU" } else { "the GPU" });
    let cfg = moegen::loader::config::ModelConfig::load(&dir).unwrap().with_kv_bf16(true).unwrap();
    let checkpoint = moegen::loader::checkpoint::Checkpoint::open(&dir).unwrap();
    let model = Model::load_placed(ctx, cfg.clone(), &checkpoint, 64, &Placement::all_resident(&cfg)).unwrap();
    let prompts: Vec<Vec<u32>> = expected["prompts"].as_array().unwrap().iter().map(ids).collect();
    let logits = prompt_logits(&model, &prompts).unwrap();
    let mut worst = 0f64;
    for (i, want) in expected["logits"].as_array().unwrap().iter().enumerate() {
        let want: Vec<f32> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        worst = worst.max(relative_error(&logits[i], &want));
    }
    eprintln!("{name} with bf16 KV: largest relative logit error {worst:.2e}");
    assert!(worst > 1e-6 && worst < 1e-2, "{name}: bf16 KV relative logit error {worst:e}");
    let max_new = expected["max_new_tokens"].as_u64().unwrap() as usize;
    let requests: Vec<Request> = prompts.iter().enumerate().map(|(i, p)| Request { ignore_eos: true, ..Request::new(Value::from(i), p.clone(), max_new) }).collect();
    let longest = requests.iter().map(|r| r.prompt.len() + r.max_new_tokens).max().unwrap();
    let fixed = GenerateOptions { cache_rows: 2 * longest, fixed_batch: true, ..Default::default() };
    let mut gpu_kv = vec![Vec::new(); requests.len()];
    generate(&model, &requests, &fixed, |f| {
        gpu_kv[f.index] = f.output;
        Ok(())
    })
    .unwrap();
    let page_bytes = moegen::scheduler::host_kv::HostKv::page_bytes(&model.cfg, 4);
    let f32_page = moegen::scheduler::host_kv::HostKv::page_bytes(&model.cfg.clone().with_kv_bf16(false).unwrap(), 4);
    assert_eq!(2 * page_bytes, f32_page);
    let sizes = split_sizes(&model, longest);
    let mut host_pages = vec![Vec::new(); requests.len()];
    generate_module(&model, &requests, &sizes, |f| {
        host_pages[f.index] = f.output;
        Ok(())
    })
    .unwrap();
    assert_eq!(host_pages, gpu_kv, "{name}: bf16 KV in host pages and in the GPU cache disagree");
    for site in [AttentionSite::Host, AttentionSite::Split { host_permille: 400 }] {
        let placed = ModuleSizes { attention: site, ..sizes };
        let mut out = vec![Vec::new(); requests.len()];
        generate_module(&model, &requests, &placed, |f| {
            out[f.index] = f.output;
            Ok(())
        })
        .unwrap();
        assert_eq!(out, gpu_kv, "{name}: bf16 KV attended {} disagrees with the GPU cache", site.describe("device"));
    }
    let want: Vec<Vec<u32>> = expected["greedy"].as_array().unwrap().iter().map(ids).collect();
    let same = gpu_kv.iter().flatten().zip(want.iter().flatten()).filter(|(a, b)| a == b).count();
    eprintln!("{name} with bf16 KV: {same} of {} greedy tokens as transformers' (f32 KV)", want.iter().flatten().count());
}

#[test]
fn mixtral_f32() {
    check("mixtral-f32");
    check_bf16_kv("mixtral-f32");
}

#[test]
fn mixtral_bf16_sharded() {
    check("mixtral-bf16-sharded");
}

#[test]
fn qwen2_moe_bf16_shared_expert_bias_dense_layer_old_config() {
    check("qwen2-moe-bf16");
}

#[test]
fn qwen3_moe_f16_per_head_qk_norm() {
    check("qwen3-moe-f16");
}

#[test]
fn olmoe_bf16_full_width_qk_norm() {
    check("olmoe-bf16");
}

#[test]
fn qwen3_moe_f32_yarn_rope_scaling() {
    check("qwen3-moe-yarn-f32");
}

#[test]
fn deepseek_v2_bf16_mla_grouped_softmax_routing_shared_experts_yarn() {
    check("deepseek-v2-bf16");
}

#[test]
fn deepseek_v3_f32_low_rank_queries_sigmoid_bias_routing_yarn() {
    check("deepseek-v3-f32");
    check_bf16_kv("deepseek-v3-f32");
}

#[test]
fn deepseek_v3_fp8_block_scaled_weights_against_their_dequantised_reference() {
    check("deepseek-v3-fp8");
    // Streamed experts stay FP8 in host memory (and so across the link): a pack is the three
    // matrices at one byte a value plus their f32 block scales, about half of bf16's bytes.
    let (dir, _) = fixture("deepseek-v3-fp8");
    let cfg = moegen::loader::config::ModelConfig::load(&dir).unwrap();
    let placement = Placement { resident_layers: vec![], slots: 2, streamed_attention: vec![1], budget: None, resident_bytes: 0, reserved_bytes: 0 };
    let checkpoint = moegen::loader::checkpoint::Checkpoint::open(&dir).unwrap();
    let model = Model::load_placed(gpu(), cfg.clone(), &checkpoint, 64, &placement).unwrap();
    // So does streamed attention, kv_b_proj's halves included (its heads fall on block bounds).
    let moegen::model::weights::Projections::Streamed(attn) = &model.weights.layers[1].attn else {
        panic!("layer 1's attention should stream");
    };
    // Each matrix read as FP8 by the kernels where the 16-wide scale blocks divide its rows (an
    // f32 scale before each run of 16), else widened to bf16 in the slot.
    let fp8_rows = (0..attn.data.len()).filter(|&i| matches!(attn.dtypes[i], moegen::gpu::WeightDtype::Fp8 { block: 16 })).count();
    assert!(fp8_rows >= 4 && (0..attn.data.len()).all(|i| attn.fp8[i].is_some() || matches!(attn.dtypes[i], moegen::gpu::WeightDtype::Fp8 { .. })), "{:?} {:?}", attn.fp8, attn.dtypes);
    let bf16_bytes: usize = cfg.attention_matrices().iter().map(|&(_, r, c)| 2 * r * c).sum();
    assert!(attn.bytes() * 10 < bf16_bytes * 7, "{} bytes streamed for {bf16_bytes} in bf16", attn.bytes());
    let moegen::model::weights::Ffn::Moe { experts: moegen::model::weights::Experts::Streamed(host), .. } = &model.weights.layers[1].ffn else {
        panic!("layer 1's experts should stream");
    };
    let values = 3 * cfg.moe_intermediate_size * cfg.hidden_size;
    let scales = 3 * 2 * 4 * 4; // three matrices of 2 x 4 blocks of 16 x 16, f32
    assert_eq!(host.packs[0].len(), values + scales);
    assert!(host.fp8_block == Some((16, 16)) && host.packs[0].len() * 10 < 2 * values * 6);

    // A config without the quantization block, or a missing scale, is an error naming what.
    let broken = std::env::temp_dir().join(format!("moegen-fp8-{}", std::process::id()));
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(dir.join("model.safetensors"), broken.join("model.safetensors")).unwrap();
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(broken.join("config.json"), config.to_string()).unwrap();
    let e = Model::load(gpu(), &broken, 64).err().expect("FP8 weights without quantization_config").to_string();
    assert!(e.contains("quantization_config") && e.contains("weight"), "{e}");
    config["quantization_config"] = serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 16]});
    std::fs::write(broken.join("config.json"), config.to_string()).unwrap();
    let e = Model::load(gpu(), &broken, 64).err().expect("scales of the wrong block").to_string();
    assert!(e.contains("_scale_inv") && e.contains("shape"), "{e}");
    std::fs::remove_dir_all(&broken).ok();
}


/// GGUF files written by llama.cpp's converter from the transformers fixtures
/// (scripts/make_llama_fixtures.sh): the same logits and greedy tokens as transformers, on both
/// devices. The Mixtral one has its query and key rows interleaved by the converter.
#[test]
fn gguf_conversions_of_the_fixtures_match_transformers() {
    let gguf = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    // Qwen2-MoE's own fixture has a dense layer, which llama.cpp cannot hold: this one is all
    // sparse (shared expert with its gate, q/k/v biases), with transformers' figures beside it.
    let qwen2: Value = serde_json::from_str(&std::fs::read_to_string(gguf.join("qwen2-moe-bf16.expected.json")).unwrap()).unwrap();
    // DeepSeek-V2's fixture has unequal YaRN mscales, which GGUF cannot carry: this one's are
    // equal (group-limited softmax routing, full-rank queries, a dense first layer as there).
    let deepseek_v2: Value = serde_json::from_str(&std::fs::read_to_string(gguf.join("deepseek-v2-bf16.expected.json")).unwrap()).unwrap();
    for (file, expected) in [
        ("mixtral-f32.gguf", fixture("mixtral-f32").1),
        ("qwen3-moe-f16.gguf", fixture("qwen3-moe-f16").1),
        ("olmoe-bf16.gguf", fixture("olmoe-bf16").1),
        ("qwen2-moe-bf16.gguf", qwen2),
        // DeepSeek-V3: MLA's kv_b_proj put back together from the converter's two halves, YaRN
        // from the metadata, sigmoid routing over groups with the correction bias.
        ("deepseek-v3-f32.gguf", fixture("deepseek-v3-f32").1),
        ("deepseek-v2-bf16.gguf", deepseek_v2),
        // YaRN read from the metadata.
        ("qwen3-moe-yarn-f32.gguf", fixture("qwen3-moe-yarn-f32").1),
        // The OLMoE file split in three by llama-gguf-split, opened by its directory and by a part.
        ("olmoe-split", fixture("olmoe-bf16").1),
        ("olmoe-split/olmoe-bf16-00002-of-00003.gguf", fixture("olmoe-bf16").1),
    ] {
        let path = gguf.join(file);
        for ctx in [gpu(), cpu()] {
            let model = Model::load(ctx, &path, 64).unwrap();
            check_model(&format!("gguf/{file} on {}", if ctx.is_cpu() { "the CPU" } else { "the GPU" }), &model, &expected);
        }
    }
}

fn greedy(model: &Model, prompts: &[Vec<u32>], max_new: usize) -> Vec<Vec<u32>> {
    let requests: Vec<Request> =
        prompts.iter().enumerate().map(|(i, p)| Request { ignore_eos: true, ..Request::new(Value::from(i), p.clone(), max_new) }).collect();
    let mut outputs = vec![Vec::new(); requests.len()];
    let opts = GenerateOptions::default();
    generate(model, &requests, &opts, |f| {
        outputs[f.index] = f.output;
        Ok(())
    })
    .unwrap();
    outputs
}

/// llama-quantize's Q8_0, Q4_0, Q4_K_M (Q4_K with Q6_K) and Q5_K_M (Q5_K with Q6_K) files: the
/// kernels reading the blocks give the logits (to f32 rounding) and the greedy tokens of the same
/// model on the weights dequantised to f32, resident or with every expert streamed, on both
/// devices. llama.cpp's own greedy tokens on each file are reported beside ours.
#[test]
fn quantised_gguf_files_match_their_dequantised_weights() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("mixtral-256.json")).unwrap()).unwrap();
    let prompts: Vec<Vec<u32>> = recorded["prompts"].as_array().unwrap().iter().map(ids).collect();
    let max_new = recorded["max_new_tokens"].as_u64().unwrap() as usize;
    // DeepSeek-V3 quantised by llama-quantize to Q8_0 where rows allow (widths of 64; MLA's
    // halves and the narrower matrices fall back to f16), and its f32 conversion as it is, for
    // llama.cpp's tokens beside ours.
    let deepseek: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("deepseek.json")).unwrap()).unwrap();
    let files = ["q8_0", "q4_0", "q4_k_m", "q5_k_m"].map(|f| (format!("mixtral-256-{f}"), &recorded["llama_cpp"][f]));
    for (format, theirs) in files.iter().map(|(f, t)| (f.as_str(), *t)).chain(["deepseek-v3-q8_0", "deepseek-v3-f32"].map(|f| (f, &deepseek["llama_cpp"][f]))) {
        let path = dir.join(format!("{format}.gguf"));
        let files = moegen::loader::ModelFiles::open(&path).unwrap();
        let dtypes: std::collections::BTreeSet<String> =
            files.checkpoint.names().filter_map(|n| files.checkpoint.dtype_of(n)).map(|d| d.weight().name().to_string()).collect();
        let reference = files.checkpoint.dequantized().unwrap();
        for ctx in [gpu(), cpu()] {
            let name = format!("{format} ({dtypes:?}) on {}", if ctx.is_cpu() { "the CPU" } else { "the GPU" });
            let resident = Placement::all_resident(&files.config);
            let packed = Model::load_placed(ctx, files.config.clone(), &files.checkpoint, 64, &resident).unwrap();
            let wide = Model::load_placed(ctx, files.config.clone(), &reference, 64, &resident).unwrap();
            let (a, b) = (prompt_logits(&packed, &prompts).unwrap(), prompt_logits(&wide, &prompts).unwrap());
            let worst = a.iter().zip(&b).map(|(x, y)| relative_error(x, y)).fold(0f64, f64::max);
            assert!(worst < 1e-6, "{name}: logits {worst:e} from the dequantised model's");
            let ours = greedy(&packed, &prompts, max_new);
            assert_eq!(ours, greedy(&wide, &prompts, max_new), "{name}: greedy tokens differ from the dequantised weights'");
            let streamed = Placement { resident_layers: vec![], slots: 2, streamed_attention: vec![1], budget: None, resident_bytes: 0, reserved_bytes: 0 };
            let model = Model::load_placed(ctx, files.config.clone(), &files.checkpoint, 64, &streamed).unwrap();
            assert_eq!(greedy(&model, &prompts, max_new), ours, "{name}: streamed experts changed the tokens");
            let theirs: Vec<Vec<u32>> = theirs.as_array().unwrap().iter().map(ids).collect();
            let same = ours.iter().flatten().zip(theirs.iter().flatten()).filter(|(a, b)| a == b).count();
            let first = ours.iter().zip(&theirs).filter(|(a, b)| a[0] == b[0]).count();
            eprintln!("{name}: greedy agreement with llama.cpp {same}/{} tokens, first tokens {first}/{}", ours.len() * max_new, ours.len());
        }
    }
}

/// Under `--gpu-compute int8`, streamed experts computed on the host give the GPU's bits: the
/// same tokens and the same log-probabilities, bit for bit, with every expert on the host, those
/// of up to 2 rows, or none, and the states in host memory or the normed states on the GPU
/// (`--cpu-experts always` and `never` write the same files).
#[test]
fn host_experts_beside_gpu_int8_products_give_the_gpus_bits() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("mixtral-256.json")).unwrap()).unwrap();
    let prompts: Vec<Vec<u32>> = recorded["prompts"].as_array().unwrap().iter().map(ids).collect();
    let max_new = 6;
    let int8 = gpu().with_int8_products(true);
    let requests: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request { ignore_eos: true, logprobs: Some(3), ..Request::new(Value::from(i), p.clone(), max_new) })
        .collect();
    let longest = requests.iter().map(|r| r.prompt.len() + r.max_new_tokens).max().unwrap();
    for format in ["q8_0", "q4_0", "q4_k_m", "q5_k_m"] {
        let files = moegen::loader::ModelFiles::open(&dir.join(format!("mixtral-256-{format}.gguf"))).unwrap();
        let streamed = Placement { resident_layers: vec![], slots: 2, streamed_attention: vec![], budget: None, resident_bytes: 0, reserved_bytes: 0 };
        let model = Model::load_placed(&int8, files.config.clone(), &files.checkpoint, 64, &streamed).unwrap();
        let sizes = ModuleSizes { attention: AttentionSite::Host, ..split_sizes(&model, longest) };
        let run = |placed: &ModuleSizes| {
            let mut out = vec![(Vec::new(), Vec::new()); requests.len()];
            generate_module(&model, &requests, placed, |f| {
                out[f.index] = (f.output, f.logprobs);
                Ok(())
            })
            .unwrap();
            out
        };
        let on_gpu = run(&ModuleSizes { host_expert_rows: 0, ..sizes });
        let bits = |o: &[(Vec<u32>, Vec<moegen::sampler::TokenLogprob>)]| -> Vec<(Vec<u32>, Vec<u32>)> {
            o.iter().map(|(t, l)| (t.clone(), l.iter().flat_map(|p| std::iter::once(p.logprob.to_bits()).chain(p.top.iter().flat_map(|&(id, v)| [id, v.to_bits()]))).collect())).collect()
        };
        assert!(on_gpu.iter().all(|(t, l)| t.len() == max_new && l.len() == max_new));
        for host_expert_rows in [usize::MAX, 2] {
            for (gpu_state_rows, gpu_norm_rows) in [(0, 0), (0, 4)] {
                let placed = ModuleSizes { host_expert_rows, gpu_state_rows, gpu_norm_rows, ..sizes };
                assert!(bits(&run(&placed)) == bits(&on_gpu), "{format}: experts of up to {host_expert_rows} rows on the host, states {}, changed the tokens or log-probabilities", placed.describe_states("GPU"));
            }
        }
    }
}

/// `--gpu-compute int8` on llama-quantize's Q8_0, Q4_0, Q4_K_M and Q5_K_M files: the logits move
/// from f32 compute's by the inputs' 8-bit rounding (per 32), no more; the last prompt alone gets
/// the bits it gets among the others; streamed experts (matmul_rows' paths) give the tokens of
/// resident ones (the grouped matmul); greedy tokens are reported beside f32 compute's and
/// llama.cpp's own.
#[test]
fn gpu_int8_products_stay_within_8_bit_rounding_on_quantised_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("mixtral-256.json")).unwrap()).unwrap();
    let prompts: Vec<Vec<u32>> = recorded["prompts"].as_array().unwrap().iter().map(ids).collect();
    let max_new = recorded["max_new_tokens"].as_u64().unwrap() as usize;
    let int8 = gpu().with_int8_products(true);
    for format in ["q8_0", "q4_0", "q4_k_m", "q5_k_m"] {
        let files = moegen::loader::ModelFiles::open(&dir.join(format!("mixtral-256-{format}.gguf"))).unwrap();
        let resident = Placement::all_resident(&files.config);
        let exact_model = Model::load_placed(gpu(), files.config.clone(), &files.checkpoint, 64, &resident).unwrap();
        let model = Model::load_placed(&int8, files.config.clone(), &files.checkpoint, 64, &resident).unwrap();
        let (exact, ours) = (prompt_logits(&exact_model, &prompts).unwrap(), prompt_logits(&model, &prompts).unwrap());
        let errors: Vec<f64> = ours.iter().zip(&exact).map(|(a, b)| relative_error(a, b)).collect();
        let last = prompts.len() - 1;
        let alone = prompt_logits(&model, &prompts[last..]).unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&alone[0]), bits(&ours[last]), "{format}: the last prompt alone");
        let tokens = greedy(&model, &prompts, max_new);
        let streamed = Placement { resident_layers: vec![], slots: 2, streamed_attention: vec![1], budget: None, resident_bytes: 0, reserved_bytes: 0 };
        let streamed_model = Model::load_placed(&int8, files.config.clone(), &files.checkpoint, 64, &streamed).unwrap();
        assert_eq!(greedy(&streamed_model, &prompts, max_new), tokens, "{format}: streamed experts changed the int8 tokens");
        let exact_tokens = greedy(&exact_model, &prompts, max_new);
        let theirs: Vec<Vec<u32>> = recorded["llama_cpp"][format].as_array().unwrap().iter().map(ids).collect();
        let agree = |a: &[Vec<u32>], b: &[Vec<u32>]| a.iter().flatten().zip(b.iter().flatten()).filter(|(x, y)| x == y).count();
        let total = prompts.len() * max_new;
        eprintln!(
            "{format}: relative logit error from f32 compute by prompt {}; greedy tokens agree with f32 compute's {}/{total}, with llama.cpp's {}/{total} (f32 compute with llama.cpp's: {}/{total})",
            errors.iter().map(|v| format!("{v:.1e}")).collect::<Vec<_>>().join(" "),
            agree(&tokens, &exact_tokens),
            agree(&tokens, &theirs),
            agree(&exact_tokens, &theirs)
        );
        let worst = errors.iter().copied().fold(0f64, f64::max);
        let mut sorted = errors.clone();
        sorted.sort_by(f64::total_cmp);
        // As on the host (tests/cpu_bf16_products.rs): 8-bit inputs move the logits by about
        // 2e-2 of their range, more where a token's choice of expert flips; a wrong product
        // moves every prompt's by about their range; unchanged logits mean the path was not taken.
        assert!(worst > 1e-5, "{format}: int8 products ({worst:e}) left the f32 result unchanged: the path was not taken");
        assert!(sorted[sorted.len() / 2] < 5e-2 && worst < 0.3, "{format}: int8 products {:e} (median prompt), {worst:e} (worst) from f32 compute", sorted[sorted.len() / 2]);
    }
}

/// FP8 weights whose 32-wide scale blocks divide every row (the synthetic `deepseek-small`, as
/// DeepSeek-V3's 128-wide blocks divide its) are read as FP8 by the kernels, experts included:
/// the logits and greedy tokens of the same model on its weights dequantised to bf16 the way
/// DeepSeek's conversion does, resident and streamed, on both devices.
#[test]
fn fp8_rows_read_as_fp8_match_the_bf16_dequantised_model() {
    use moegen::kernels::dequant::{to_bf16_bytes, Fp8Matrix};
    use moegen::loader::checkpoint::{Checkpoint, Dtype};
    let cfg = moegen::loader::synthetic::preset_config("deepseek-small").unwrap();
    let fp8 = moegen::loader::synthetic::synthetic_checkpoint("deepseek-small", &cfg).unwrap();
    let block = cfg.weight_block.unwrap();
    let (mut blobs, mut tensors) = (Vec::new(), Vec::new());
    for name in fp8.names() {
        if name.ends_with("_scale_inv") {
            continue;
        }
        let shape = fp8.shape_of(name).to_vec();
        let t = fp8.get(name, &shape).unwrap();
        let (dtype, bytes) = if t.dtype == Dtype::F8E4M3 {
            let scales = fp8.get(&format!("{name}_scale_inv"), fp8.shape_of(&format!("{name}_scale_inv"))).unwrap().to_f32();
            (Dtype::Bf16, to_bf16_bytes(&Fp8Matrix { data: t.data, scales: &scales, block }, shape[0], shape[1]))
        } else {
            (t.dtype, t.data.to_vec())
        };
        tensors.push((name.to_string(), dtype, shape, blobs.len()));
        blobs.push(bytes);
    }
    let bf16 = Checkpoint::in_memory("deepseek-small in bf16", blobs, tensors).unwrap();
    let bf16_cfg = moegen::loader::config::ModelConfig { weight_block: None, ..cfg.clone() };
    let prompts: Vec<Vec<u32>> = (0..3).map(|p| (0..5 + 4 * p).map(|i| ((p * 71 + i * 13) % 250 + 3) as u32).collect()).collect();
    for ctx in [gpu(), cpu()] {
        let name = if ctx.is_cpu() { "the CPU" } else { "the GPU" };
        let resident = Placement::all_resident(&cfg);
        let packed = Model::load_placed(ctx, cfg.clone(), &fp8, 64, &resident).unwrap();
        let moegen::model::weights::Ffn::Moe { experts: moegen::model::weights::Experts::Resident(e), .. } = &packed.weights.layers[1].ffn else {
            panic!("layer 1 has resident experts");
        };
        assert_eq!(e.gate.dtype, moegen::gpu::WeightDtype::Fp8 { block: block.1 as u32 }, "{name}: experts widened");
        let wide = Model::load_placed(ctx, bf16_cfg.clone(), &bf16, 64, &Placement::all_resident(&bf16_cfg)).unwrap();
        let (a, b) = (prompt_logits(&packed, &prompts).unwrap(), prompt_logits(&wide, &prompts).unwrap());
        let worst = a.iter().zip(&b).map(|(x, y)| relative_error(x, y)).fold(0f64, f64::max);
        assert!(worst < 1e-6, "{name}: logits {worst:e} from the bf16 model's");
        let tokens = greedy(&packed, &prompts, 6);
        assert_eq!(tokens, greedy(&wide, &prompts, 6), "{name}: greedy tokens");
        let streamed = Placement { resident_layers: vec![], slots: 2, streamed_attention: vec![1], budget: None, resident_bytes: 0, reserved_bytes: 0 };
        let model = Model::load_placed(ctx, cfg.clone(), &fp8, 64, &streamed).unwrap();
        let moegen::model::weights::Ffn::Moe { experts: moegen::model::weights::Experts::Streamed(host), .. } = &model.weights.layers[1].ffn else {
            panic!("layer 1's experts stream");
        };
        assert!(host.fp8_block.is_none() && host.packs[0].len() < 2 * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 10 / 17, "{name}: pack of {} bytes", host.packs[0].len());
        assert_eq!(greedy(&model, &prompts, 6), tokens, "{name}: streamed FP8 rows changed the tokens");
    }
}

/// The check run before a job starts (`weights::check`) accepts every fixture the loader loads:
/// each architecture, dtype, FP8 and GGUF file, with and without `--quantize`.
#[test]
fn every_fixture_passes_the_tensor_check() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut models: Vec<PathBuf> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.join("config.json").exists()).collect();
    models.extend(std::fs::read_dir(root.join("gguf")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "gguf") && !p.to_string_lossy().contains("vocab")));
    assert!(models.len() >= 20, "{models:?}");
    for path in models {
        let files = moegen::loader::ModelFiles::open(&path).unwrap();
        moegen::model::weights::check(&files.checkpoint, &files.config).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let quantised = files.config.clone().with_quantize(Some(moegen::gpu::WeightDtype::Q8_0), true);
        if let Ok(cfg) = quantised {
            moegen::model::weights::check(&files.checkpoint, &cfg).unwrap_or_else(|e| panic!("{} with --quantize q8_0: {e}", path.display()));
        }
    }
}
