//! `config.json` and `generation_config.json`: one normalised description of the model, from the
//! old (`rope_theta`, `rope_scaling`) and transformers-5 (`rope_parameters`) forms alike.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::kernels::rope::RopeLayout;

/// The supported architectures, by their `architectures` name in `config.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    DeepseekV2,
    DeepseekV3,
}

impl Arch {
    pub const ALL: [(Arch, &'static str); 6] = [
        (Arch::Mixtral, "MixtralForCausalLM"),
        (Arch::Qwen2Moe, "Qwen2MoeForCausalLM"),
        (Arch::Qwen3Moe, "Qwen3MoeForCausalLM"),
        (Arch::Olmoe, "OlmoeForCausalLM"),
        (Arch::DeepseekV2, "DeepseekV2ForCausalLM"),
        (Arch::DeepseekV3, "DeepseekV3ForCausalLM"),
    ];

    pub fn is_deepseek(self) -> bool {
        matches!(self, Arch::DeepseekV2 | Arch::DeepseekV3)
    }

    pub fn name(self) -> &'static str {
        Arch::ALL.iter().find(|(a, _)| *a == self).map(|(_, n)| *n).unwrap_or("?")
    }

    fn from_name(name: &str) -> Option<Arch> {
        Arch::ALL.iter().find(|(_, n)| *n == name).map(|(a, _)| *a)
    }
}

/// How q and k are normalised before rope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// RMSNorm over each head's `head_dim` (Qwen3-MoE).
    PerHead,
    /// RMSNorm over all heads at once (OLMoE).
    FullWidth,
}

/// DeepSeek's multi-head latent attention: keys and values come from one compressed latent per
/// token (plus one shared rope key), which is all the cache keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct Mla {
    /// Queries go through a low-rank `q_a_proj` + norm + `q_b_proj` when set, else one `q_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Multiplies q.k: `qk_head_dim^-0.5`, times YaRN's `mscale_all_dim` factor squared.
    pub softmax_scale: f32,
}

impl Mla {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values one token keeps per layer: the latent and the rope key (576 for V2 and V3).
    pub fn cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// How a router turns logits into a choice of experts.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// Sigmoid scores (DeepSeek-V3) instead of a softmax over the experts.
    pub sigmoid: bool,
    /// Experts are split into `n_group` groups; only the best `topk_group` groups are chosen from.
    pub n_group: usize,
    pub topk_group: usize,
    /// A group's score is the sum of its two best (V3) rather than its best (V2).
    pub group_by_top_two: bool,
    /// The router has an `e_score_correction_bias` that steers the choice (V3).
    pub correction_bias: bool,
    /// Multiplies the chosen weights (`routed_scaling_factor`).
    pub scale: f32,
}

impl Routing {
    fn plain() -> Self {
        Routing { sigmoid: false, n_group: 1, topk_group: 1, group_by_top_two: false, correction_bias: false, scale: 1.0 }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    /// The rope frequencies after scaling, and the factor cos and sin are multiplied by.
    pub inv_freq: Vec<f32>,
    pub rope_attention_scaling: f32,
    pub max_position_embeddings: usize,
    pub sliding_window: Option<usize>,
    pub num_experts: usize,
    pub experts_per_token: usize,
    pub norm_topk_prob: bool,
    /// Width of each routed expert's hidden layer.
    pub moe_intermediate_size: usize,
    /// Width of the dense MLP of layers that have no experts (Qwen's `mlp_only_layers`).
    pub intermediate_size: usize,
    /// Layers that run a dense MLP instead of experts.
    pub dense_layers: Vec<usize>,
    /// Width of the shared expert every token goes through (Qwen2-MoE's; DeepSeek's
    /// `n_shared_experts` fused into one MLP).
    pub shared_expert_intermediate_size: Option<usize>,
    /// The shared expert's output is scaled by a sigmoid gate (Qwen2-MoE).
    pub shared_expert_gated: bool,
    pub routing: Routing,
    pub mla: Option<Mla>,
    pub rope_layout: RopeLayout,
    /// FP8 e4m3 weights with one scale per block of (rows, cols) (`quantization_config`).
    pub weight_block: Option<(usize, usize)>,
    /// Keys and values are rounded to bf16 as they are cached, and kept and sent over the link
    /// in 16 bits (`--kv-dtype bf16`; a run setting, not from config.json).
    pub kv_bf16: bool,
    /// Routed experts (and with `quantize_attention` the attention projections) quantised at
    /// load into this block format (`--quantize`; a run setting). Weights already in a block
    /// format (GGUF) stay as they are.
    pub quantize: Option<crate::gpu::WeightDtype>,
    pub quantize_attention: bool,
    pub attention_bias: bool,
    pub qk_norm: QkNorm,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn err(file: &Path, detail: impl Into<String>) -> Error {
    Error::invalid(file.display().to_string(), detail)
}

struct Fields<'a> {
    v: &'a Value,
    file: &'a Path,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| err(self.file, format!("missing field `{key}`")))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| err(self.file, format!("`{key}` should be a non-negative integer, found {v}"))),
        }
    }
    fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| err(self.file, format!("`{key}` should be a number, found {v}"))),
        }
    }
    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| err(self.file, format!("`{key}` should be true or false, found {v}"))),
        }
    }
    /// An id or a list of ids (`eos_token_id` takes both forms).
    fn ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_u64().map(|n| n as u32).ok_or_else(|| err(self.file, format!("`{key}` holds a non-integer {i}"))))
                .collect(),
            Some(v) => v.as_u64().map(|n| vec![n as u32]).ok_or_else(|| err(self.file, format!("`{key}` should be an id, found {v}"))),
        }
    }
}

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|error| Error::Io { path: path.to_path_buf(), error })?;
    serde_json::from_str(&text).map_err(|e| err(path, format!("not valid JSON: {e}")))
}

impl ModelConfig {
    /// Reads `config.json` (and `generation_config.json` for the EOS ids, when present) of `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let file = dir.join("config.json");
        let v = read_json(&file)?;
        let mut cfg = Self::parse(&v, &file)?;
        let gen_file = dir.join("generation_config.json");
        if gen_file.exists() {
            let g = read_json(&gen_file)?;
            let fields = Fields { v: &g, file: &gen_file };
            let eos = fields.ids("eos_token_id")?;
            if !eos.is_empty() {
                cfg.eos_token_ids = eos;
            }
            if let Some(bos) = fields.ids("bos_token_id")?.first() {
                cfg.bos_token_id = Some(*bos);
            }
        }
        Ok(cfg)
    }

    pub fn parse(v: &Value, file: &Path) -> Result<Self> {
        let f = Fields { v, file };
        let names: Vec<&str> = match f.get("architectures") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let supported = Arch::ALL.iter().map(|(_, n)| *n).collect::<Vec<_>>().join(", ");
        let arch = names.iter().find_map(|n| Arch::from_name(n)).ok_or_else(|| {
            err(file, format!("architecture {names:?} is not supported; supported: {supported}"))
        })?;

        // Settings that would change the computation in ways the engine does not implement are
        // refused rather than ignored.
        if let Some(act) = f.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(err(file, format!("hidden_act `{act}` is not supported (only silu)")));
            }
        }
        if let Some(clip) = f.f64("clip_qkv")? {
            return Err(err(file, format!("clip_qkv {clip} is not supported")));
        }
        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = f.opt_usize("head_dim")?.unwrap_or(hidden_size / num_heads.max(1));
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(err(file, format!("{num_heads} attention heads cannot share {num_kv_heads} key/value heads")));
        }
        let num_layers = f.usize("num_hidden_layers")?;
        let deepseek = arch.is_deepseek();
        let num_experts = match (f.opt_usize("num_local_experts")?, f.opt_usize("n_routed_experts")?) {
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => f.usize("num_experts")?,
        };
        let experts_per_token = f.usize("num_experts_per_tok")?;
        if experts_per_token == 0 || experts_per_token > num_experts {
            return Err(err(file, format!("num_experts_per_tok {experts_per_token} with {num_experts} experts")));
        }
        let intermediate_size = f.usize("intermediate_size")?;
        let moe_intermediate_size = match arch {
            Arch::Mixtral | Arch::Olmoe => intermediate_size,
            Arch::Qwen2Moe | Arch::Qwen3Moe => f.opt_usize("moe_intermediate_size")?.unwrap_or(intermediate_size),
            Arch::DeepseekV2 | Arch::DeepseekV3 => f.usize("moe_intermediate_size")?,
        };
        let mut dense_layers = Vec::new();
        if matches!(arch, Arch::Qwen2Moe | Arch::Qwen3Moe) {
            // Qwen: layer i has experts unless listed in mlp_only_layers or off the sparse step.
            let step = f.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1);
            let only: Vec<usize> = match f.get("mlp_only_layers") {
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|n| n as usize).collect(),
                _ => Vec::new(),
            };
            dense_layers = (0..num_layers).filter(|i| only.contains(i) || (i + 1) % step != 0).collect();
        } else if deepseek {
            // DeepSeek: the first `first_k_dense_replace` layers are dense, then every
            // `moe_layer_freq`-th has experts (1 in every released config).
            let first = f.opt_usize("first_k_dense_replace")?.unwrap_or(0);
            let freq = f.opt_usize("moe_layer_freq")?.unwrap_or(1).max(1);
            dense_layers = (0..num_layers).filter(|&i| i < first || i % freq != 0).collect();
        }
        let (shared_expert_intermediate_size, shared_expert_gated) = match arch {
            Arch::Qwen2Moe => (f.opt_usize("shared_expert_intermediate_size")?.filter(|&n| n > 0), true),
            Arch::DeepseekV2 | Arch::DeepseekV3 => (f.opt_usize("n_shared_experts")?.filter(|&n| n > 0).map(|n| n * moe_intermediate_size), false),
            _ => (None, false),
        };
        let norm_topk_prob = match arch {
            Arch::Mixtral => true,
            Arch::Qwen2Moe | Arch::Olmoe | Arch::DeepseekV2 => f.bool("norm_topk_prob")?.unwrap_or(false),
            Arch::Qwen3Moe | Arch::DeepseekV3 => f.bool("norm_topk_prob")?.unwrap_or(true),
        };
        let attention_bias = match arch {
            Arch::Qwen2Moe => f.bool("qkv_bias")?.unwrap_or(true),
            _ => f.bool("attention_bias")?.unwrap_or(false),
        };
        let qk_norm = match arch {
            Arch::Qwen3Moe => QkNorm::PerHead,
            Arch::Olmoe => QkNorm::FullWidth,
            _ => QkNorm::None,
        };
        let sliding_window = match arch {
            Arch::Mixtral => f.opt_usize("sliding_window")?,
            // Qwen windows only the layers from max_window_layers on; not implemented yet.
            Arch::Qwen2Moe | Arch::Qwen3Moe if f.bool("use_sliding_window")?.unwrap_or(false) => {
                return Err(err(file, "use_sliding_window is not supported for Qwen models yet"));
            }
            _ => None,
        };
        if deepseek && attention_bias {
            return Err(err(file, "attention_bias is not supported for DeepSeek models (no released checkpoint uses it)"));
        }
        let mla = if deepseek {
            let qk_nope_head_dim = f.usize("qk_nope_head_dim")?;
            let qk_rope_head_dim = f.usize("qk_rope_head_dim")?;
            if qk_rope_head_dim == 0 || qk_rope_head_dim % 2 != 0 {
                return Err(err(file, format!("qk_rope_head_dim {qk_rope_head_dim} should be even and positive")));
            }
            let qk_head_dim = (qk_nope_head_dim + qk_rope_head_dim) as f64;
            Some(Mla {
                q_lora_rank: f.opt_usize("q_lora_rank")?.filter(|&r| r > 0),
                kv_lora_rank: f.usize("kv_lora_rank")?,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim: f.usize("v_head_dim")?,
                softmax_scale: (qk_head_dim.powf(-0.5) * yarn_softmax_mscale(&f)?.powi(2)) as f32,
            })
        } else {
            None
        };
        let routing = if deepseek { deepseek_routing(&f, arch, num_experts, experts_per_token)? } else { Routing::plain() };
        let rope_layout = match arch {
            Arch::DeepseekV2 => RopeLayout::Interleaved,
            Arch::DeepseekV3 if f.bool("rope_interleave")?.unwrap_or(true) => RopeLayout::Interleaved,
            _ => RopeLayout::HalfSplit,
        };
        let (head_dim, num_kv_heads) = match &mla {
            // One latent "head" shared by every query head; `head_dim` is the query head's width.
            Some(m) => (m.qk_head_dim(), 1),
            None => (head_dim, num_kv_heads),
        };
        let rot_dim = match &mla {
            Some(m) => m.qk_rope_head_dim,
            None => ((head_dim as f64 * f.f64("partial_rotary_factor")?.unwrap_or(1.0)) as usize) & !1,
        };
        let (inv_freq, rope_attention_scaling) = rope(&f, rot_dim)?;
        let weight_block = quantization(&f)?;
        let mut eos_token_ids = f.ids("eos_token_id")?;
        eos_token_ids.dedup();
        Ok(ModelConfig {
            arch,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f.f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            inv_freq,
            rope_attention_scaling,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            sliding_window,
            num_experts,
            experts_per_token,
            norm_topk_prob,
            moe_intermediate_size,
            intermediate_size,
            dense_layers,
            shared_expert_intermediate_size,
            shared_expert_gated,
            routing,
            mla,
            rope_layout,
            weight_block,
            kv_bf16: false,
            quantize: None,
            quantize_attention: false,
            attention_bias,
            qk_norm,
            tie_word_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: f.ids("bos_token_id")?.first().copied(),
            eos_token_ids,
        })
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        !self.dense_layers.contains(&layer)
    }

    /// Floats one token keeps per layer as (key, value): the compressed latent and rope key
    /// alone under MLA, full keys and values otherwise.
    pub fn kv_widths(&self) -> [usize; 2] {
        match &self.mla {
            Some(m) => [m.cache_width(), 0],
            None => [self.num_kv_heads * self.head_dim; 2],
        }
    }

    /// Floats of one token's key and value in one layer, together.
    pub fn kv_row(&self) -> usize {
        self.kv_widths().iter().sum()
    }

    /// The config with keys and values kept in 16 bits (`--kv-dtype bf16`) or not.
    pub fn with_kv_bf16(mut self, on: bool) -> Result<Self> {
        if on && self.kv_widths().iter().any(|w| w % 2 != 0) {
            return Err(Error::invalid("--kv-dtype", format!("bf16 KV needs even key and value widths; this model's are {:?}", self.kv_widths())));
        }
        self.kv_bf16 = on;
        Ok(self)
    }

    /// The config with experts (and, with `attention`, the attention projections) quantised
    /// at load to `q` (`--quantize`), checked against the model's dimensions.
    pub fn with_quantize(mut self, q: Option<crate::gpu::WeightDtype>, attention: bool) -> Result<Self> {
        if let Some(q) = q {
            let mut cols = vec![("hidden_size", self.hidden_size), ("moe_intermediate_size", self.moe_intermediate_size)];
            if attention && self.mla.is_some() {
                return Err(Error::invalid("--quantize-attention", "MLA's attention (DeepSeek) keeps its stored dtype; quantise the experts only"));
            }
            if attention {
                cols.extend(self.attention_matrices().iter().map(|&(name, _, c)| (name, c)));
            }
            if let Some((name, c)) = cols.into_iter().find(|&(_, c)| !q.fits_cols(c)) {
                return Err(Error::invalid(
                    "--quantize",
                    format!("{} works on rows of {}-element blocks; this model's {name} rows have {c} elements", q.name(), q.block_elems()),
                ));
            }
        } else if attention {
            return Err(Error::invalid("--quantize-attention", "needs --quantize"));
        }
        self.quantize = q;
        self.quantize_attention = attention && q.is_some();
        Ok(self)
    }

    /// Bytes a cached key or value takes in host memory and over the link (on the GPU the
    /// attention reads f32).
    pub fn kv_value_bytes(&self) -> usize {
        if self.kv_bf16 {
            2
        } else {
            4
        }
    }

    /// The widest per-token activation of the attention block (queries, or MLA's absorbed ones).
    pub fn attention_width(&self) -> usize {
        match &self.mla {
            Some(m) => self.num_heads * (m.cache_width().max(m.qk_head_dim())),
            None => self.num_heads * self.head_dim,
        }
    }

    /// The attention's weight matrices as (name, rows, cols), in the order the forward pass uses
    /// them. MLA's `kv_b_proj` appears as its two absorbed halves: per head, the key half
    /// transposed (`[kv_lora_rank, qk_nope]`) and the value half (`[v_head, kv_lora_rank]`).
    pub fn attention_matrices(&self) -> Vec<(&'static str, usize, usize)> {
        let (h, heads) = (self.hidden_size, self.num_heads);
        match &self.mla {
            None => {
                let (q, kv) = (heads * self.head_dim, self.num_kv_heads * self.head_dim);
                vec![("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q)]
            }
            Some(m) => {
                let q = heads * m.qk_head_dim();
                let mut v = match m.q_lora_rank {
                    Some(r) => vec![("q_a_proj", r, h), ("q_b_proj", q, r)],
                    None => vec![("q_proj", q, h)],
                };
                v.extend([
                    ("kv_a_proj_with_mqa", m.cache_width(), h),
                    ("kv_b_proj.absorb_k", heads * m.kv_lora_rank, m.qk_nope_head_dim),
                    ("kv_b_proj.absorb_v", heads * m.v_head_dim, m.kv_lora_rank),
                    ("o_proj", h, heads * m.v_head_dim),
                ]);
                v
            }
        }
    }
}

/// Rope frequencies from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`.
/// The rope scaling block (`rope_parameters` or `rope_scaling`) and its type ("default" when
/// it names none).
fn rope_scaling<'a>(f: &Fields<'a>) -> Option<(Fields<'a>, &'a str)> {
    let field = |v: &'a Value, key: &str| v.get(key).filter(|x| !x.is_null());
    let v = field(f.v, "rope_parameters").or_else(|| field(f.v, "rope_scaling"))?;
    let kind = field(v, "rope_type").or_else(|| field(v, "type")).and_then(Value::as_str).unwrap_or("default");
    Some((Fields { v, file: f.file }, kind))
}

fn rope(f: &Fields, rot_dim: usize) -> Result<(Vec<f32>, f32)> {
    let scaling = rope_scaling(f);
    let pf = scaling.as_ref().map(|(p, _)| p);
    let theta = match pf.as_ref().map(|p| p.f64("rope_theta")).transpose()?.flatten() {
        Some(t) => t,
        None => f.f64("rope_theta")?.unwrap_or(10000.0),
    };
    let base = crate::kernels::rope::default_inv_freq(theta as f32, rot_dim);
    let Some((p, kind)) = scaling else { return Ok((base, 1.0)) };
    match kind {
        "default" => Ok((base, 1.0)),
        "linear" => {
            let factor = p.f64("factor")?.ok_or_else(|| err(f.file, "linear rope scaling without `factor`"))? as f32;
            Ok((base.iter().map(|x| x / factor).collect(), 1.0))
        }
        "yarn" => yarn(f, &p, theta as f32, rot_dim),
        other => Err(err(
            f.file,
            format!("rope type `{other}` is not supported yet; supported: default, linear, yarn"),
        )),
    }
}

/// DeepSeek's softmax scale factor: with a scaled rope that names `mscale_all_dim`, q.k is
/// multiplied by `(0.1 * mscale_all_dim * ln(factor) + 1)^2` as well.
fn yarn_softmax_mscale(f: &Fields) -> Result<f64> {
    let Some((p, kind)) = rope_scaling(f) else { return Ok(1.0) };
    let all_dim = p.f64("mscale_all_dim")?.unwrap_or(0.0);
    let factor = p.f64("factor")?.unwrap_or(1.0);
    Ok(if kind == "default" || all_dim == 0.0 || factor <= 1.0 { 1.0 } else { 0.1 * all_dim * factor.ln() + 1.0 })
}

/// DeepSeek's routing: V2 softmax scores, greedy or limited to the best groups by their best
/// expert; V3 sigmoid scores with a correction bias, groups ranked by their two best.
fn deepseek_routing(f: &Fields, arch: Arch, n_experts: usize, top_k: usize) -> Result<Routing> {
    let v3 = arch == Arch::DeepseekV3;
    let scoring = f.get("scoring_func").and_then(Value::as_str).unwrap_or(if v3 { "sigmoid" } else { "softmax" });
    let sigmoid = match scoring {
        "softmax" => false,
        "sigmoid" => true,
        other => return Err(err(f.file, format!("scoring_func `{other}` is not supported (softmax, sigmoid)"))),
    };
    let method = f.get("topk_method").and_then(Value::as_str).unwrap_or(if v3 { "noaux_tc" } else { "greedy" }).to_string();
    let grouped = match method.as_str() {
        "greedy" => false,
        "group_limited_greedy" | "noaux_tc" => true,
        other => return Err(err(f.file, format!("topk_method `{other}` is not supported (greedy, group_limited_greedy, noaux_tc)"))),
    };
    let (n_group, topk_group) = if grouped {
        (f.opt_usize("n_group")?.unwrap_or(1).max(1), f.opt_usize("topk_group")?.unwrap_or(1).max(1))
    } else {
        (1, 1)
    };
    if !n_experts.is_multiple_of(n_group) || topk_group > n_group || n_group > 32 {
        return Err(err(f.file, format!("{n_experts} experts in n_group {n_group} groups choosing topk_group {topk_group}: groups must divide the experts, number at most 32 and include the chosen")));
    }
    if topk_group * (n_experts / n_group) < top_k {
        return Err(err(f.file, format!("topk_group {topk_group} groups of {} experts cannot supply num_experts_per_tok {top_k}", n_experts / n_group)));
    }
    Ok(Routing {
        sigmoid,
        n_group,
        topk_group,
        group_by_top_two: method == "noaux_tc",
        correction_bias: method == "noaux_tc",
        scale: f.f64("routed_scaling_factor")?.unwrap_or(1.0) as f32,
    })
}

/// `quantization_config`: FP8 e4m3 with block scales is read (DeepSeek-V3's release); any other
/// scheme is refused rather than misread.
fn quantization(f: &Fields) -> Result<Option<(usize, usize)>> {
    let Some(q) = f.get("quantization_config") else { return Ok(None) };
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("?");
    let fmt = q.get("fmt").and_then(Value::as_str).unwrap_or("e4m3");
    if method != "fp8" || fmt != "e4m3" {
        return Err(err(f.file, format!("quantization_config `{method}` ({fmt}) is not supported; only fp8 e4m3 with block scales")));
    }
    let block: Vec<usize> = match q.get("weight_block_size") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|n| n as usize).collect(),
        _ => Vec::new(),
    };
    match block[..] {
        [r, c] if r > 0 && c > 0 => Ok(Some((r, c))),
        _ => Err(err(f.file, "fp8 quantization_config needs a weight_block_size of two positive sizes (per-tensor scales are not supported)")),
    }
}

/// YaRN (arXiv 2309.00071) as transformers computes it: frequencies blended between the
/// original and the `factor`-interpolated ones across a ramp of dimensions set by `beta_fast` and
/// `beta_slow`, and cos/sin scaled by the attention factor (given, or from `mscale` and
/// `mscale_all_dim`, or from `factor` alone).
fn yarn(f: &Fields, p: &Fields, theta: f32, dim: usize) -> Result<(Vec<f32>, f32)> {
    let max_pos = f.opt_usize("max_position_embeddings")?.unwrap_or(2048) as f64;
    let original = p.opt_usize("original_max_position_embeddings")?.map_or(max_pos, |v| v as f64);
    let factor = p.f64("factor")?.unwrap_or(max_pos / original);
    let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
    let attention = match (p.f64("attention_factor")?, p.f64("mscale")?, p.f64("mscale_all_dim")?) {
        (Some(a), _, _) => a,
        (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(factor, m) / mscale(factor, all),
        _ => mscale(factor, 1.0),
    };
    // `or` rather than a default: transformers treats 0 like a missing value here.
    let beta_fast = p.f64("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0);
    let beta_slow = p.f64("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0);
    let truncate = p.bool("truncate")?.unwrap_or(true);
    let (d, base) = (dim as f64, theta as f64);
    let correction_dim = |rotations: f64| d * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
    let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0) as f32, high.min(d - 1.0) as f32);
    if low == high {
        high += 0.001;
    }
    let inv = (0..dim / 2)
        .map(|i| {
            let pos_freq = theta.powf((2 * i) as f32 / dim as f32);
            let (extrapolated, interpolated) = (1.0 / pos_freq, 1.0 / (factor as f32 * pos_freq));
            let keep = 1.0 - ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
            interpolated * (1.0 - keep) + extrapolated * keep
        })
        .collect();
    Ok((inv, attention as f32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Frequencies and attention factors transformers 5.23.0 computes for these YaRN settings
    /// (`ROPE_INIT_FUNCTIONS["yarn"]` on a Qwen3MoeConfig with head_dim 16, max positions 512),
    /// as it printed them.
    #[test]
    #[allow(clippy::excessive_precision)]
    fn yarn_matches_transformers() {
        let cases: [(Value, [f32; 8], f32); 3] = [
            (
                json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}),
                [1.0, 0.23717081546783447, 0.04999999701976776, 0.007905694656074047, 0.0024999999441206455, 0.0007905694656074047, 0.0002500000118743628, 7.905694656074047e-05],
                1.138629436111989,
            ),
            (
                json!({"rope_type": "yarn", "rope_theta": 500000.0, "factor": 40.0, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
                [1.0, 0.09938541054725647, 0.0009401507559232414, 0.00018231662397738546, 3.535533687681891e-05, 6.856204436189728e-06, 1.3295739336172119e-06, 2.578346141035581e-07],
                1.0,
            ),
            (
                json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5}),
                [1.0, 0.03952847048640251, 0.012500000186264515, 0.0039528473280370235, 0.0012499999720603228, 0.00039528473280370235, 0.0001250000059371814, 3.9528473280370235e-05],
                1.094179988101349,
            ),
        ];
        for (rope, want, attention) in cases {
            let v = json!({
                "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16,
                "num_hidden_layers": 1, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 512, "rope_parameters": rope.clone()
            });
            let cfg = ModelConfig::parse(&v, Path::new("config.json")).unwrap();
            for (got, want) in cfg.inv_freq.iter().zip(want) {
                assert!((got - want).abs() <= 1e-6 * want.abs().max(1e-30) + 1e-12, "{rope}: {:?} vs {want:?}", cfg.inv_freq);
            }
            assert!((cfg.rope_attention_scaling - attention).abs() < 1e-6, "{rope}: {}", cfg.rope_attention_scaling);
        }
    }

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::parse(&v, Path::new("config.json"))
    }

    fn mixtral() -> Value {
        json!({
            "architectures": ["MixtralForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "num_local_experts": 4,
            "num_experts_per_tok": 2, "intermediate_size": 96, "vocab_size": 300,
            "rms_norm_eps": 1e-5, "rope_theta": 1e6, "eos_token_id": 2, "bos_token_id": 1
        })
    }

    #[test]
    fn old_and_new_rope_forms_agree() {
        let old = parse(mixtral()).unwrap();
        let mut v = mixtral();
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e6});
        assert_eq!(parse(v).unwrap(), old);
        assert_eq!(old.inv_freq.len(), 8);
        assert_eq!(old.head_dim, 16);
    }

    #[test]
    fn num_experts_or_num_local_experts() {
        let mut v = mixtral();
        v.as_object_mut().unwrap().remove("num_local_experts");
        v["num_experts"] = json!(4);
        assert_eq!(parse(v).unwrap().num_experts, 4);
    }

    #[test]
    fn unknown_architecture_lists_the_supported_ones() {
        let mut v = mixtral();
        v["architectures"] = json!(["LlamaForCausalLM"]);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("LlamaForCausalLM") && e.contains("Qwen3MoeForCausalLM") && e.contains("config.json"), "{e}");
    }

    #[test]
    fn bad_fields_are_named() {
        let mut v = mixtral();
        v["hidden_size"] = json!("big");
        assert!(parse(v).unwrap_err().to_string().contains("hidden_size"));
        let mut v = mixtral();
        v.as_object_mut().unwrap().remove("vocab_size");
        assert!(parse(v).unwrap_err().to_string().contains("vocab_size"));
        let mut v = mixtral();
        v["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 2.0});
        assert!(parse(v).unwrap_err().to_string().contains("dynamic"));
        let mut v = mixtral();
        v["hidden_act"] = json!("gelu");
        assert!(parse(v).unwrap_err().to_string().contains("gelu"));
        let mut v = mixtral();
        v["clip_qkv"] = json!(8.0);
        assert!(parse(v).unwrap_err().to_string().contains("clip_qkv"));
    }

    #[test]
    fn qwen_dense_layers_from_sparse_step_and_mlp_only() {
        let v = json!({
            "architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 4, "num_experts": 4, "num_experts_per_tok": 2,
            "intermediate_size": 96, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
            "vocab_size": 300, "decoder_sparse_step": 2, "mlp_only_layers": [3]
        });
        let c = parse(v).unwrap();
        assert_eq!(c.dense_layers, vec![0, 2, 3]);
        assert_eq!(c.moe_intermediate_size, 32);
        assert_eq!(c.shared_expert_intermediate_size, Some(48));
        assert!(c.attention_bias && !c.norm_topk_prob);
    }

    fn deepseek_v3() -> Value {
        json!({
            "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
            "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
            "v_head_dim": 128, "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256,
            "num_experts_per_tok": 8, "n_shared_experts": 1, "first_k_dense_replace": 3, "topk_method": "noaux_tc",
            "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": true, "vocab_size": 129280,
            "max_position_embeddings": 163840, "rope_theta": 10000,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
            "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        })
    }

    #[test]
    fn deepseek_v3_release_config() {
        let c = parse(deepseek_v3()).unwrap();
        assert_eq!(c.arch, Arch::DeepseekV3);
        assert_eq!(c.kv_widths(), [576, 0], "the cache keeps the latent and the rope key only");
        assert_eq!(c.dense_layers, vec![0, 1, 2]);
        assert_eq!(c.shared_expert_intermediate_size, Some(2048));
        assert!(!c.shared_expert_gated && c.norm_topk_prob);
        let r = &c.routing;
        assert!(r.sigmoid && r.correction_bias && r.group_by_top_two && r.n_group == 8 && r.topk_group == 4 && r.scale == 2.5);
        assert_eq!(c.rope_layout, RopeLayout::Interleaved);
        assert_eq!(c.inv_freq.len(), 32, "rope over qk_rope_head_dim");
        assert_eq!(c.weight_block, Some((128, 128)));
        let m = c.mla.as_ref().unwrap();
        // 192^-0.5 * (0.1 * ln 40 + 1)^2, as DeepseekV3Attention computes it.
        let want = 192f64.powf(-0.5) * (0.1 * 40f64.ln() + 1.0).powi(2);
        assert!((m.softmax_scale as f64 - want).abs() < 1e-7, "{}", m.softmax_scale);
        assert!((c.rope_attention_scaling - 1.0).abs() < 1e-7, "mscale / mscale_all_dim = 1");
        let names: Vec<&str> = c.attention_matrices().iter().map(|m| m.0).collect();
        assert_eq!(names, ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj.absorb_k", "kv_b_proj.absorb_v", "o_proj"]);
        let kv_b: usize = c.attention_matrices()[3..5].iter().map(|m| m.1 * m.2).sum();
        assert_eq!(kv_b, 128 * 256 * 512, "the absorbed halves are kv_b_proj's values");
    }

    #[test]
    fn deepseek_v2_greedy_and_group_limited_routing() {
        let mut v = deepseek_v3();
        v["architectures"] = json!(["DeepseekV2ForCausalLM"]);
        v.as_object_mut().unwrap().remove("quantization_config");
        v["topk_method"] = json!("group_limited_greedy");
        v["n_group"] = json!(8);
        v["topk_group"] = json!(3);
        v["q_lora_rank"] = Value::Null;
        v["norm_topk_prob"] = json!(false);
        let c = parse(v.clone()).unwrap();
        let r = &c.routing;
        assert!(!r.sigmoid && !r.correction_bias && !r.group_by_top_two && r.n_group == 8 && r.topk_group == 3);
        assert_eq!(c.attention_matrices()[0].0, "q_proj");
        v["topk_method"] = json!("greedy");
        assert_eq!(parse(v.clone()).unwrap().routing.n_group, 1, "greedy ignores the groups");
        v["topk_method"] = json!("random");
        assert!(parse(v.clone()).unwrap_err().to_string().contains("topk_method `random`"));
        v["topk_method"] = json!("group_limited_greedy");
        v["n_group"] = json!(7);
        assert!(parse(v.clone()).unwrap_err().to_string().contains("n_group 7"));
        v["n_group"] = json!(32);
        v["topk_group"] = json!(1);
        v["num_experts_per_tok"] = json!(9);
        assert!(parse(v).unwrap_err().to_string().contains("cannot supply"));
        let mut q = deepseek_v3();
        q["quantization_config"] = json!({"quant_method": "awq"});
        assert!(parse(q).unwrap_err().to_string().contains("`awq`"));
        let mut q = deepseek_v3();
        q["quantization_config"]["weight_block_size"] = Value::Null;
        assert!(parse(q).unwrap_err().to_string().contains("weight_block_size"));
    }

    /// DeepSeek-V2-Lite's rope and softmax scale as transformers 5.23.0 computes them from its
    /// release config (YaRN factor 40 from 4096 positions, mscale = mscale_all_dim = 0.707):
    /// `ROPE_INIT_FUNCTIONS["yarn"]` and `DeepseekV2Attention.scaling`, as printed.
    #[test]
    #[allow(clippy::excessive_precision)]
    fn deepseek_v2_lite_yarn_matches_transformers() {
        let c = crate::loader::synthetic::preset_config("deepseek-v2-lite").unwrap();
        let want = [(0, 1.0), (1, 0.7498942017555237), (8, 0.10000000149011612), (16, 0.005500000435858965), (24, 2.499999936844688e-05), (31, 3.3338035336782923e-06)];
        assert_eq!(c.inv_freq.len(), 32);
        for (i, w) in want {
            assert!((c.inv_freq[i] as f64 - w).abs() <= 1e-6 * w, "inv_freq[{i}] = {} vs {w}", c.inv_freq[i]);
        }
        assert_eq!(c.rope_attention_scaling, 1.0);
        assert!((c.mla.as_ref().unwrap().softmax_scale as f64 - 0.1147213867929261).abs() < 1e-7);
    }
}
