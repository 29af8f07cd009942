//! Synthetic models for benchmarks and plans: a preset's config with random weights built in
//! memory. Tensors of one shape share their random bytes (throughput does not depend on the
//! values), but each layer's router is its own, so routing varies by layer.

use crate::error::{Error, Result};
use crate::loader::checkpoint::{Checkpoint, Dtype};
use crate::loader::config::ModelConfig;

/// (name, what it is, config.json of the preset).
pub const PRESETS: [(&str, &str); 11] = [
    ("ci-small", "4 layers, 32 experts of 64x128, top-2: experts 95% of the weights, fits CI"),
    ("mixtral-small", "2 layers, 8 experts of 128x448, top-2: Mixtral's expert ratios at 5.3 MiB of experts"),
    ("mixtral-256", "2 layers, 8 experts of 256x256, top-2: every dimension whole K-quant blocks, for --quantize"),
    ("mixtral-8x7b", "Mixtral-8x7B's shapes (46.7 B parameters, 87 GiB in bf16)"),
    ("mixtral-8x22b", "Mixtral-8x22B's shapes (141 B parameters, 262 GiB in bf16)"),
    ("qwen3-30b-a3b", "Qwen3-30B-A3B's shapes (128 experts, top-8)"),
    ("olmoe-1b-7b", "OLMoE-1B-7B's shapes (64 experts, top-8)"),
    ("deepseek-small", "DeepSeek-V3's structure at CI size: MLA, FP8 weights, 1 dense + 2 MoE layers of 16 experts, top-4 of 2 groups"),
    ("deepseek-v2-lite", "DeepSeek-V2-Lite's shapes (15.7 B parameters, 64 experts, top-6, 2 shared)"),
    ("deepseek-v2", "DeepSeek-V2's shapes (236 B parameters, 160 experts, top-6 of 3 groups)"),
    ("deepseek-v3", "DeepSeek-V3's shapes (671 B parameters, FP8, 256 experts, top-8 of 4 groups)"),
];

fn preset_json(name: &str) -> Option<serde_json::Value> {
    use serde_json::json;
    let mixtral = |hidden: usize, layers: usize, heads: usize, kv: usize, inter: usize, experts: usize, top: usize, vocab: usize| {
        json!({
            "architectures": ["MixtralForCausalLM"], "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter,
            "num_local_experts": experts, "num_experts_per_tok": top, "vocab_size": vocab,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false, "eos_token_id": 2
        })
    };
    Some(match name {
        "ci-small" => mixtral(64, 4, 4, 2, 128, 32, 2, 256),
        "mixtral-small" => mixtral(128, 2, 4, 1, 448, 8, 2, 256),
        "mixtral-256" => mixtral(256, 2, 4, 2, 256, 8, 2, 256),
        "mixtral-8x7b" => mixtral(4096, 32, 32, 8, 14336, 8, 2, 32000),
        "mixtral-8x22b" => mixtral(6144, 56, 48, 8, 16384, 8, 2, 32768),
        "qwen3-30b-a3b" => json!({
            "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 48,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
            "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true,
            "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": false, "decoder_sparse_step": 1, "mlp_only_layers": []
        }),
        "olmoe-1b-7b" => json!({
            "architectures": ["OlmoeForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 16,
            "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 1024,
            "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": false, "vocab_size": 50304,
            "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": false
        }),
        "deepseek-small" => deepseek(json!({
            "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
            "q_lora_rank": 64, "kv_lora_rank": 64, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32,
            "intermediate_size": 384, "moe_intermediate_size": 64, "n_routed_experts": 16, "num_experts_per_tok": 4,
            "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
            "norm_topk_prob": true, "vocab_size": 256, "max_position_embeddings": 4096,
            "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 32]}
        })),
        "deepseek-v2-lite" => deepseek(json!({
            "architectures": ["DeepseekV2ForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 27, "num_attention_heads": 16,
            "q_lora_rank": null, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
            "intermediate_size": 10944, "moe_intermediate_size": 1408, "n_routed_experts": 64, "num_experts_per_tok": 6,
            "n_shared_experts": 2, "first_k_dense_replace": 1, "topk_method": "greedy", "routed_scaling_factor": 1.0,
            "norm_topk_prob": false, "vocab_size": 102400, "max_position_embeddings": 163840,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
        })),
        "deepseek-v2" => deepseek(json!({
            "architectures": ["DeepseekV2ForCausalLM"], "hidden_size": 5120, "num_hidden_layers": 60, "num_attention_heads": 128,
            "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
            "intermediate_size": 12288, "moe_intermediate_size": 1536, "n_routed_experts": 160, "num_experts_per_tok": 6,
            "n_shared_experts": 2, "first_k_dense_replace": 1, "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3,
            "routed_scaling_factor": 16.0, "norm_topk_prob": false, "vocab_size": 102400, "max_position_embeddings": 163840,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
        })),
        "deepseek-v3" => deepseek(json!({
            "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
            "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
            "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 8,
            "n_shared_experts": 1, "first_k_dense_replace": 3, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
            "routed_scaling_factor": 2.5, "norm_topk_prob": true, "vocab_size": 129280, "max_position_embeddings": 163840,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
            "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        })),
        _ => return None,
    })
}

/// A DeepSeek preset's config with the fields every release shares.
fn deepseek(mut v: serde_json::Value) -> serde_json::Value {
    let o = v.as_object_mut().expect("a JSON object");
    for (k, x) in [("num_key_value_heads", o["num_attention_heads"].clone()), ("rope_theta", 10000.0.into()), ("rms_norm_eps", 1e-6.into())] {
        o.entry(k).or_insert(x);
    }
    o.insert("tie_word_embeddings".into(), false.into());
    o.insert("eos_token_id".into(), 1.into());
    v
}

fn unknown(name: &str) -> Error {
    let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
    Error::invalid("--synthetic", format!("unknown preset `{name}`; presets: {}", names.join(", ")))
}

/// The config of preset `name`.
pub fn preset_config(name: &str) -> Result<ModelConfig> {
    let v = preset_json(name).ok_or_else(|| unknown(name))?;
    ModelConfig::parse(&v, std::path::Path::new(&format!("synthetic {name}")))
}

/// Scale of the layers' outputs relative to the embeddings.
const RESIDUAL_GAIN: f32 = 0.05;

/// Random bf16 values, uniform in +-`scale`, from a small fast generator.
fn random_bf16(n: usize, scale: f32, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(2 * n);
    for _ in 0..n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        out.extend_from_slice(&half::bf16::from_f32(u * scale).to_le_bytes());
    }
    out
}

/// Random FP8 e4m3 bytes (every finite code but the largest magnitudes), for which a scale of
/// `scale / 64` spreads the values over about +-`scale`.
fn random_fp8(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Exponent field at most 13: magnitudes up to 96, never the NaN code.
            let b = (s >> 32) as u8;
            if b & 0x78 > 0x68 { b & 0xe7 } else { b }
        })
        .collect()
}

/// A checkpoint with `cfg`'s tensors (Mixtral, Qwen3-MoE, OLMoE or DeepSeek names) and random
/// values: bf16, or FP8 with block scales where the config says so (as DeepSeek-V3 ships).
pub fn synthetic_checkpoint(name: &str, cfg: &ModelConfig) -> Result<Checkpoint> {
    use crate::loader::config::{Arch, QkNorm};
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let (q_dim, kv_dim) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let inter = cfg.moe_intermediate_size;
    let mut t = Builder { fp8_block: cfg.weight_block, ..Default::default() };
    t.plain_matrix("model.embed_tokens.weight".into(), cfg.vocab_size, h, Some(1));
    t.plain_matrix("lm_head.weight".into(), cfg.vocab_size, h, Some(2));
    let norm_h = t.ones(h);
    t.alias("model.norm.weight".into(), vec![h], norm_h);
    let moe = match cfg.arch {
        Arch::Mixtral => "block_sparse_moe",
        _ => "mlp",
    };
    let (gate, up, down) = match cfg.arch {
        Arch::Mixtral => ("w1", "w3", "w2"),
        _ => ("gate_proj", "up_proj", "down_proj"),
    };
    let qk_norm = match cfg.qk_norm {
        QkNorm::None => None,
        QkNorm::PerHead => Some((t.ones(hd), t.ones(hd))),
        QkNorm::FullWidth => Some((t.ones(q_dim), t.ones(kv_dim))),
    };
    let mla_norms = cfg.mla.as_ref().map(|m| (m.q_lora_rank.map(|r| (r, t.ones(r))), t.ones(m.kv_lora_rank)));
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let a = format!("{p}.self_attn");
        t.alias(format!("{p}.input_layernorm.weight"), vec![h], norm_h);
        t.alias(format!("{p}.post_attention_layernorm.weight"), vec![h], norm_h);
        match &cfg.mla {
            None => {
                t.matrix(format!("{a}.q_proj.weight"), q_dim, h, None);
                t.matrix(format!("{a}.k_proj.weight"), kv_dim, h, None);
                t.matrix(format!("{a}.v_proj.weight"), kv_dim, h, None);
            }
            Some(m) => {
                for (n, rows, cols) in cfg.attention_matrices() {
                    if n != "o_proj" && !n.starts_with("kv_b_proj") {
                        t.matrix(format!("{a}.{n}.weight"), rows, cols, None);
                    }
                }
                t.matrix(format!("{a}.kv_b_proj.weight"), cfg.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank, None);
                let (q_a, kv_a) = mla_norms.expect("built for MLA");
                if let Some((r, qn)) = q_a {
                    t.alias(format!("{a}.q_a_layernorm.weight"), vec![r], qn);
                }
                t.alias(format!("{a}.kv_a_layernorm.weight"), vec![m.kv_lora_rank], kv_a);
            }
        }
        // Outputs into the residual stream are damped, so that each token's embedding keeps
        // steering its routing and the experts stay about as evenly loaded as a trained model's.
        let attn_out = cfg.attention_matrices().last().map_or(q_dim, |o| o.2);
        t.scaled_matrix(format!("{a}.o_proj.weight"), h, attn_out, None, RESIDUAL_GAIN);
        if let Some((qn, kn)) = qk_norm {
            let (qw, kw) = if cfg.qk_norm == QkNorm::PerHead { (hd, hd) } else { (q_dim, kv_dim) };
            t.alias(format!("{a}.q_norm.weight"), vec![qw], qn);
            t.alias(format!("{a}.k_norm.weight"), vec![kw], kn);
        }
        let mlp = |t: &mut Builder, prefix: String, width: usize| {
            t.matrix(format!("{prefix}.{gate}.weight"), width, h, None);
            t.matrix(format!("{prefix}.{up}.weight"), width, h, None);
            t.scaled_matrix(format!("{prefix}.{down}.weight"), h, width, None, RESIDUAL_GAIN);
        };
        if !cfg.is_moe_layer(l) {
            if !cfg.arch.is_deepseek() {
                return Err(Error::invalid("--synthetic", format!("preset {name}: dense layers are generated for DeepSeek presets only")));
            }
            mlp(&mut t, format!("{p}.mlp"), cfg.intermediate_size);
            continue;
        }
        t.plain_matrix(format!("{p}.{moe}.gate.weight"), cfg.num_experts, h, Some(100 + l as u64));
        if cfg.routing.correction_bias {
            let bias = t.push(random_bf16(cfg.num_experts, 0.01, 200 + l as u64));
            t.alias(format!("{p}.{moe}.gate.e_score_correction_bias"), vec![cfg.num_experts], bias);
        }
        if let (Some(width), false) = (cfg.shared_expert_intermediate_size, cfg.shared_expert_gated) {
            mlp(&mut t, format!("{p}.{moe}.shared_experts"), width);
        }
        for e in 0..cfg.num_experts {
            mlp(&mut t, format!("{p}.{moe}.experts.{e}"), inter);
        }
    }
    Checkpoint::in_memory(&format!("synthetic {name}"), t.blobs, t.tensors)
}

#[derive(Default)]
struct Builder {
    blobs: Vec<Vec<u8>>,
    tensors: Vec<(String, Dtype, Vec<usize>, usize)>,
    /// The blob of random values each shape shares.
    by_shape: std::collections::HashMap<(usize, usize, u32), usize>,
    /// Linear weights are FP8 with scales of this block (but embeddings, LM head and routers).
    fp8_block: Option<(usize, usize)>,
}

impl Builder {
    fn push(&mut self, bytes: Vec<u8>) -> usize {
        self.blobs.push(bytes);
        self.blobs.len() - 1
    }

    /// A `[rows, cols]` linear weight, values uniform in +-sqrt(3 / cols): its own (with a seed)
    /// or the blob its shape shares; FP8 with block scales in an FP8 model.
    fn matrix(&mut self, name: String, rows: usize, cols: usize, own: Option<u64>) {
        self.scaled_matrix(name, rows, cols, own, 1.0)
    }

    /// [`Builder::matrix`] with the values scaled by `gain`.
    fn scaled_matrix(&mut self, name: String, rows: usize, cols: usize, own: Option<u64>, gain: f32) {
        let scale = gain * (3.0 / cols as f32).sqrt();
        if let Some(block) = self.fp8_block {
            let key = (rows, cols, gain.to_bits() ^ 0x8000_0000);
            let (values, scales) = match self.by_shape.get(&key) {
                Some(&b) => (b, b + 1),
                None => {
                    let values = self.push(random_fp8(rows * cols, (rows * 31 + cols) as u64));
                    let n: usize = crate::kernels::dequant::scale_shape(rows, cols, block).iter().product();
                    let scales = self.push((scale / 64.0).to_le_bytes().repeat(n));
                    self.by_shape.insert(key, values);
                    (values, scales)
                }
            };
            self.tensors.push((name.clone(), Dtype::F8E4M3, vec![rows, cols], values));
            let shape = crate::kernels::dequant::scale_shape(rows, cols, block).to_vec();
            self.tensors.push((format!("{name}_scale_inv"), Dtype::F32, shape, scales));
            return;
        }
        self.plain_matrix_scaled(name, rows, cols, own, gain, scale);
    }

    /// A bf16 matrix whatever the model's quantisation (embeddings, LM head, routers).
    fn plain_matrix(&mut self, name: String, rows: usize, cols: usize, own: Option<u64>) {
        let scale = (3.0 / cols as f32).sqrt();
        self.plain_matrix_scaled(name, rows, cols, own, 1.0, scale);
    }

    fn plain_matrix_scaled(&mut self, name: String, rows: usize, cols: usize, own: Option<u64>, gain: f32, scale: f32) {
        let blob = match own {
            Some(seed) => self.push(random_bf16(rows * cols, scale, seed)),
            None => match self.by_shape.get(&(rows, cols, gain.to_bits())) {
                Some(&b) => b,
                None => {
                    let b = self.push(random_bf16(rows * cols, scale, (rows * 31 + cols) as u64));
                    self.by_shape.insert((rows, cols, gain.to_bits()), b);
                    b
                }
            },
        };
        self.alias(name, vec![rows, cols], blob);
    }

    /// Norm weights: one plus noise.
    fn ones(&mut self, n: usize) -> usize {
        let noise = random_bf16(n, 0.1, n as u64 + 7);
        let v = noise
            .chunks_exact(2)
            .flat_map(|b| half::bf16::from_f32(1.0 + half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).to_le_bytes())
            .collect();
        self.push(v)
    }

    fn alias(&mut self, name: String, shape: Vec<usize>, blob: usize) {
        self.tensors.push((name, Dtype::Bf16, shape, blob));
    }
}
