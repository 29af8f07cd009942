//! The model's weights on the GPU, read by tensor name from the checkpoint per architecture.

use crate::error::{Error, Result};
use crate::gpu::{GpuBuffer, GpuContext, GpuWeight};
use crate::kernels::moe::StackedExperts;
use crate::loader::checkpoint::{Checkpoint, TensorRef};
use crate::loader::config::{Arch, ModelConfig, QkNorm};

pub struct Mlp {
    pub gate: GpuWeight,
    pub up: GpuWeight,
    pub down: GpuWeight,
}

pub struct SharedExpert {
    pub mlp: Mlp,
    /// `[1, hidden]`: the sigmoid gate of the shared expert's output.
    pub gate: GpuWeight,
}

pub enum Ffn {
    Moe { router: GpuWeight, experts: Box<StackedExperts>, shared: Option<Box<SharedExpert>> },
    Dense(Mlp),
}

pub struct Layer {
    pub input_norm: GpuBuffer,
    pub post_attention_norm: GpuBuffer,
    pub q: GpuWeight,
    pub k: GpuWeight,
    pub v: GpuWeight,
    pub o: GpuWeight,
    pub q_bias: Option<GpuBuffer>,
    pub k_bias: Option<GpuBuffer>,
    pub v_bias: Option<GpuBuffer>,
    pub q_norm: Option<GpuBuffer>,
    pub k_norm: Option<GpuBuffer>,
    pub ffn: Ffn,
}

pub struct Weights {
    pub embed: GpuWeight,
    pub layers: Vec<Layer>,
    pub final_norm: GpuBuffer,
    /// None when the embeddings are tied.
    pub lm_head: Option<GpuWeight>,
}

impl Weights {
    pub fn lm_head(&self) -> &GpuWeight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

fn matrix(ctx: &GpuContext, t: &TensorRef) -> Result<GpuWeight> {
    GpuWeight::upload(ctx, t.name, t.data, t.dtype.weight(), t.shape[0], t.shape[1])
}

fn vector(ctx: &GpuContext, t: &TensorRef) -> Result<GpuBuffer> {
    ctx.storage_from(t.name, &t.to_f32())
}

struct Loader<'a> {
    ctx: &'a GpuContext,
    ck: &'a Checkpoint,
    cfg: &'a ModelConfig,
}

impl Loader<'_> {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<GpuWeight> {
        matrix(self.ctx, &self.ck.get(name, &[rows, cols])?)
    }

    fn vector(&self, name: &str, len: usize) -> Result<GpuBuffer> {
        vector(self.ctx, &self.ck.get(name, &[len])?)
    }

    fn opt_vector(&self, name: &str, len: usize) -> Result<Option<GpuBuffer>> {
        self.ck.get_opt(name, &[len])?.map(|t| vector(self.ctx, &t)).transpose()
    }

    fn mlp(&self, prefix: &str, inter: usize) -> Result<Mlp> {
        let h = self.cfg.hidden_size;
        Ok(Mlp {
            gate: self.matrix(&format!("{prefix}.gate_proj.weight"), inter, h)?,
            up: self.matrix(&format!("{prefix}.up_proj.weight"), inter, h)?,
            down: self.matrix(&format!("{prefix}.down_proj.weight"), h, inter)?,
        })
    }

    /// The routed experts of a layer, stacked per matrix kind, from per-expert tensors (the Hub
    /// format) or from transformers 5's fused `experts.gate_up_proj` / `experts.down_proj`.
    fn experts(&self, prefix: &str) -> Result<StackedExperts> {
        let (h, inter, n) = (self.cfg.hidden_size, self.cfg.moe_intermediate_size, self.cfg.num_experts);
        let fused = format!("{prefix}.experts.gate_up_proj");
        if self.ck.contains(&fused) {
            let gate_up = self.ck.get(&fused, &[n, 2 * inter, h])?;
            let down = self.ck.get(&format!("{prefix}.experts.down_proj"), &[n, h, inter])?;
            let dtype = gate_up.dtype.weight();
            let each = inter * h * gate_up.dtype.bytes();
            let halves: Vec<&[u8]> = gate_up.data.chunks(each).collect();
            let gates: Vec<&[u8]> = halves.iter().step_by(2).copied().collect();
            let ups: Vec<&[u8]> = halves.iter().skip(1).step_by(2).copied().collect();
            let downs: Vec<&[u8]> = down.data.chunks(h * inter * down.dtype.bytes()).collect();
            return Ok(StackedExperts {
                gate: GpuWeight::stack(self.ctx, &fused, &gates, dtype, inter, h)?,
                up: GpuWeight::stack(self.ctx, &fused, &ups, dtype, inter, h)?,
                down: GpuWeight::stack(self.ctx, down.name, &downs, down.dtype.weight(), h, inter)?,
                n_experts: n,
            });
        }
        let names: [&str; 3] = match self.cfg.arch {
            Arch::Mixtral => ["w1", "w3", "w2"],
            _ => ["gate_proj", "up_proj", "down_proj"],
        };
        let mut kinds = Vec::new();
        for (kind, name) in names.iter().enumerate() {
            let shape = if kind == 2 { [h, inter] } else { [inter, h] };
            let tensors = (0..n)
                .map(|e| self.ck.get(&format!("{prefix}.experts.{e}.{name}.weight"), &shape))
                .collect::<Result<Vec<_>>>()?;
            let dtype = tensors[0].dtype;
            if let Some(t) = tensors.iter().find(|t| t.dtype != dtype) {
                return Err(Error::invalid(t.name, format!("dtype {:?} differs from the layer's other experts ({dtype:?})", t.dtype)));
            }
            let pieces: Vec<&[u8]> = tensors.iter().map(|t| t.data).collect();
            let what = format!("{prefix}.experts.*.{name}.weight");
            kinds.push(GpuWeight::stack(self.ctx, &what, &pieces, dtype.weight(), shape[0], shape[1])?);
        }
        let down = kinds.pop().expect("three kinds");
        let up = kinds.pop().expect("three kinds");
        let gate = kinds.pop().expect("three kinds");
        Ok(StackedExperts { gate, up, down, n_experts: n })
    }

    fn layer(&self, i: usize) -> Result<Layer> {
        let cfg = self.cfg;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let p = format!("model.layers.{i}");
        let a = format!("{p}.self_attn");
        let (q_norm, k_norm) = match cfg.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (Some(self.vector(&format!("{a}.q_norm.weight"), hd)?), Some(self.vector(&format!("{a}.k_norm.weight"), hd)?)),
            QkNorm::FullWidth => {
                (Some(self.vector(&format!("{a}.q_norm.weight"), q_dim)?), Some(self.vector(&format!("{a}.k_norm.weight"), kv_dim)?))
            }
        };
        let moe_prefix = match cfg.arch {
            Arch::Mixtral => format!("{p}.block_sparse_moe"),
            _ => format!("{p}.mlp"),
        };
        let ffn = if cfg.is_moe_layer(i) {
            let shared = match cfg.shared_expert_intermediate_size {
                Some(inter) => Some(Box::new(SharedExpert {
                    mlp: self.mlp(&format!("{moe_prefix}.shared_expert"), inter)?,
                    gate: self.matrix(&format!("{moe_prefix}.shared_expert_gate.weight"), 1, h)?,
                })),
                None => None,
            };
            Ffn::Moe {
                router: self.matrix(&format!("{moe_prefix}.gate.weight"), cfg.num_experts, h)?,
                experts: Box::new(self.experts(&moe_prefix)?),
                shared,
            }
        } else {
            Ffn::Dense(self.mlp(&format!("{p}.mlp"), cfg.intermediate_size)?)
        };
        Ok(Layer {
            input_norm: self.vector(&format!("{p}.input_layernorm.weight"), h)?,
            post_attention_norm: self.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            q: self.matrix(&format!("{a}.q_proj.weight"), q_dim, h)?,
            k: self.matrix(&format!("{a}.k_proj.weight"), kv_dim, h)?,
            v: self.matrix(&format!("{a}.v_proj.weight"), kv_dim, h)?,
            o: self.matrix(&format!("{a}.o_proj.weight"), h, q_dim)?,
            q_bias: self.opt_vector(&format!("{a}.q_proj.bias"), q_dim)?,
            k_bias: self.opt_vector(&format!("{a}.k_proj.bias"), kv_dim)?,
            v_bias: self.opt_vector(&format!("{a}.v_proj.bias"), kv_dim)?,
            q_norm,
            k_norm,
            ffn,
        })
    }
}

impl Weights {
    /// Uploads every weight the model needs, checking each tensor's presence, shape and dtype.
    pub fn load(ctx: &GpuContext, ck: &Checkpoint, cfg: &ModelConfig) -> Result<Self> {
        let l = Loader { ctx, ck, cfg };
        let embed = l.matrix("model.embed_tokens.weight", cfg.vocab_size, cfg.hidden_size)?;
        let lm_head = if ck.contains("lm_head.weight") || !cfg.tie_word_embeddings {
            Some(l.matrix("lm_head.weight", cfg.vocab_size, cfg.hidden_size)?)
        } else {
            None
        };
        let layers = (0..cfg.num_layers).map(|i| l.layer(i)).collect::<Result<Vec<_>>>()?;
        let final_norm = l.vector("model.norm.weight", cfg.hidden_size)?;
        ctx.wait_idle("uploading the weights")?;
        Ok(Weights { embed, layers, final_norm, lm_head })
    }
}
