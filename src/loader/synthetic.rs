//! Synthetic models for benchmarks and plans: a preset's config with random weights built in
//! memory. Tensors of one shape share their random bytes (throughput does not depend on the
//! values), but each layer's router is its own, so routing varies by layer.

use crate::error::{Error, Result};
use crate::loader::checkpoint::{Checkpoint, Dtype};
use crate::loader::config::ModelConfig;

/// (name, what it is, config.json of the preset).
pub const PRESETS: [(&str, &str); 6] = [
    ("ci-small", "4 layers, 32 experts of 64x128, top-2: experts 95% of the weights, fits CI"),
    ("mixtral-small", "2 layers, 8 experts of 128x448, top-2: Mixtral's expert ratios at 5.3 MiB of experts"),
    ("mixtral-8x7b", "Mixtral-8x7B's shapes (46.7 B parameters, 87 GiB in bf16)"),
    ("mixtral-8x22b", "Mixtral-8x22B's shapes (141 B parameters, 262 GiB in bf16)"),
    ("qwen3-30b-a3b", "Qwen3-30B-A3B's shapes (128 experts, top-8)"),
    ("olmoe-1b-7b", "OLMoE-1B-7B's shapes (64 experts, top-8)"),
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
        _ => return None,
    })
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

/// A checkpoint with `cfg`'s tensors (Mixtral, Qwen3-MoE or OLMoE names) and random bf16 values.
pub fn synthetic_checkpoint(name: &str, cfg: &ModelConfig) -> Result<Checkpoint> {
    use crate::loader::config::{Arch, QkNorm};
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let (q_dim, kv_dim) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let inter = cfg.moe_intermediate_size;
    let mut t = Builder::default();
    t.matrix("model.embed_tokens.weight".into(), cfg.vocab_size, h, Some(1));
    t.matrix("lm_head.weight".into(), cfg.vocab_size, h, Some(2));
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
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        t.alias(format!("{p}.input_layernorm.weight"), vec![h], norm_h);
        t.alias(format!("{p}.post_attention_layernorm.weight"), vec![h], norm_h);
        t.matrix(format!("{p}.self_attn.q_proj.weight"), q_dim, h, None);
        t.matrix(format!("{p}.self_attn.k_proj.weight"), kv_dim, h, None);
        t.matrix(format!("{p}.self_attn.v_proj.weight"), kv_dim, h, None);
        // Outputs into the residual stream are damped, so that each token's embedding keeps
        // steering its routing and the experts stay about as evenly loaded as a trained model's.
        t.scaled_matrix(format!("{p}.self_attn.o_proj.weight"), h, q_dim, None, RESIDUAL_GAIN);
        if let Some((qn, kn)) = qk_norm {
            let (qw, kw) = if cfg.qk_norm == QkNorm::PerHead { (hd, hd) } else { (q_dim, kv_dim) };
            t.alias(format!("{p}.self_attn.q_norm.weight"), vec![qw], qn);
            t.alias(format!("{p}.self_attn.k_norm.weight"), vec![kw], kn);
        }
        if !cfg.is_moe_layer(l) {
            return Err(Error::invalid("--synthetic", format!("preset {name}: dense layers are not generated")));
        }
        t.matrix(format!("{p}.{moe}.gate.weight"), cfg.num_experts, h, Some(100 + l as u64));
        for e in 0..cfg.num_experts {
            t.matrix(format!("{p}.{moe}.experts.{e}.{gate}.weight"), inter, h, None);
            t.matrix(format!("{p}.{moe}.experts.{e}.{up}.weight"), inter, h, None);
            t.scaled_matrix(format!("{p}.{moe}.experts.{e}.{down}.weight"), h, inter, None, RESIDUAL_GAIN);
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
}

impl Builder {
    fn push(&mut self, bytes: Vec<u8>) -> usize {
        self.blobs.push(bytes);
        self.blobs.len() - 1
    }

    /// A `[rows, cols]` matrix, values uniform in +-sqrt(3 / cols): its own (with a seed) or the
    /// blob its shape shares.
    fn matrix(&mut self, name: String, rows: usize, cols: usize, own: Option<u64>) {
        self.scaled_matrix(name, rows, cols, own, 1.0)
    }

    /// [`Builder::matrix`] with the values scaled by `gain`.
    fn scaled_matrix(&mut self, name: String, rows: usize, cols: usize, own: Option<u64>, gain: f32) {
        let scale = gain * (3.0 / cols as f32).sqrt();
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
