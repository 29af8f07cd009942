//! The model's weights on the GPU, read by tensor name from the checkpoint per architecture.

use crate::error::{Error, Result};
use crate::gpu::{GpuBuffer, GpuContext, GpuWeight, WeightDtype};
use crate::kernels::moe::StackedExperts;
use crate::kernels::dequant::{scale_shape, to_bf16_bytes, upload_fp8, Fp8Matrix};
use crate::loader::checkpoint::{Checkpoint, Dtype, TensorRef};
use std::borrow::Cow;

use crate::loader::config::{Arch, ModelConfig, QkNorm};
use crate::planner::Placement;

pub struct Mlp {
    pub gate: GpuWeight,
    pub up: GpuWeight,
    pub down: GpuWeight,
}

pub struct SharedExpert {
    pub mlp: Mlp,
    /// `[1, hidden]`: the sigmoid gate of the shared expert's output (Qwen2-MoE; DeepSeek adds
    /// its shared experts ungated).
    pub gate: Option<GpuWeight>,
}

pub enum Ffn {
    Moe {
        router: GpuWeight,
        /// DeepSeek-V3's `e_score_correction_bias`, added to the scores for the choice only.
        correction_bias: Option<GpuBuffer>,
        experts: Experts,
        shared: Option<Box<SharedExpert>>,
    },
    Dense(Mlp),
}

/// A layer's routed experts: on the GPU, or in host memory to be streamed through the slots.
pub enum Experts {
    Resident(Box<StackedExperts>),
    Streamed(HostExperts),
}

/// Experts in host memory, each packed contiguously (gate rows, up rows, down rows) so that one
/// expert is one contiguous read when it streams to a slot.
pub struct HostExperts {
    pub packs: Vec<Vec<u8>>,
    /// The dtypes the kernels read from the slots, of gate, up and down (bf16 for FP8 packs;
    /// GGUF files mix block formats, such as Q4_K gates with Q6_K downs).
    pub dtypes: [WeightDtype; 3],
    /// FP8 packs: the scale block; each pack holds the three FP8 matrices, then their f32 scales.
    pub fp8_block: Option<(usize, usize)>,
    pub inter: usize,
    pub hidden: usize,
}

impl HostExperts {
    /// Byte ranges of the gate, up and down matrices within a pack (FP8 values for FP8 packs).
    pub fn sections(&self) -> [std::ops::Range<usize>; 3] {
        let [g, u, d] = self.matrix_bytes();
        [0..g, g..g + u, g + u..g + u + d]
    }

    /// Bytes of the gate, up and down matrices in a pack.
    pub fn matrix_bytes(&self) -> [usize; 3] {
        let n = self.inter * self.hidden;
        self.dtypes.map(|d| if self.fp8_block.is_some() { n } else { d.bytes_of(n) })
    }

    /// Bytes of the gate, up and down matrices in a GPU slot.
    pub fn slot_bytes(&self) -> [usize; 3] {
        self.dtypes.map(|d| d.bytes_of(self.inter * self.hidden))
    }

    /// Float offsets, within a pack read as floats, of the gate, up and down scales.
    pub fn scale_offsets(&self) -> Option<[usize; 3]> {
        let block = self.fp8_block?;
        let each: usize = crate::kernels::dequant::scale_shape(self.inter, self.hidden, block).iter().product();
        let start = 3 * self.inter * self.hidden / 4;
        Some([start, start + each, start + 2 * each])
    }
}

/// The experts' matrices in place in the checkpoint, one slice per expert and kind (with their
/// scales when FP8).
struct ExpertPieces<'a> {
    kinds: [Vec<Cow<'a, [u8]>>; 3],
    scales: [Vec<Vec<f32>>; 3],
    dtypes: [WeightDtype; 3],
    fp8: bool,
    names: [String; 3],
}

/// A layer's attention matrices, as [`ModelConfig::attention_matrices`] lists them: on the GPU,
/// or in host memory to be streamed through the attention slot.
pub enum Projections {
    Resident(Vec<GpuWeight>),
    Streamed(HostProjections),
}

pub struct HostProjections {
    /// Each matrix's bytes; an FP8 one's values, padded to 4 bytes, then its f32 block scales.
    pub data: Vec<Vec<u8>>,
    /// The dtype the kernels read of each (bf16 for FP8 matrices, dequantised in the slot).
    pub dtypes: Vec<WeightDtype>,
    /// (rows, cols) of each.
    pub shapes: Vec<(usize, usize)>,
    /// The scale block of each FP8 matrix.
    pub fp8: Vec<Option<(usize, usize)>>,
}

impl HostProjections {
    /// Bytes that cross the link for the layer.
    pub fn bytes(&self) -> usize {
        self.data.iter().map(Vec::len).sum()
    }

    /// Bytes matrix `i` takes in its GPU slot.
    pub fn gpu_bytes(&self, i: usize) -> usize {
        match self.fp8[i] {
            Some(_) => self.dtypes[i].bytes_of(self.shapes[i].0 * self.shapes[i].1),
            None => self.data[i].len(),
        }
    }
}

/// MLA's norms: of the low-rank query (when there is one) and of the KV latent.
pub struct MlaNorms {
    pub q_a: Option<GpuBuffer>,
    pub kv_a: GpuBuffer,
}

pub struct Layer {
    pub input_norm: GpuBuffer,
    pub mla: Option<MlaNorms>,
    pub post_attention_norm: GpuBuffer,
    pub attn: Projections,
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

/// An FP8 tensor's block scales and the block they cover.
type Fp8Scales = (Vec<f32>, (usize, usize));

/// One attention matrix as loaded: its bytes in the dtype the kernels read, or FP8 with scales.
struct AttentionMatrix<'a> {
    name: String,
    bytes: Cow<'a, [u8]>,
    dtype: WeightDtype,
    fp8: Option<Fp8Scales>,
}

/// The block scales of an FP8 tensor (`<name>_scale_inv`), or None for other dtypes.
fn fp8_scales(ck: &Checkpoint, cfg: &ModelConfig, t: &TensorRef) -> Result<Option<Fp8Scales>> {
    if t.dtype != Dtype::F8E4M3 {
        return Ok(None);
    }
    let block = cfg.weight_block.ok_or_else(|| {
        Error::invalid(t.name, "FP8 tensor in a checkpoint whose config.json has no fp8 quantization_config (weight_block_size)")
    })?;
    let shape = scale_shape(t.shape[0], t.shape[1], block);
    let scales = ck.get(&format!("{}_scale_inv", t.name), &shape)?;
    if scales.dtype == Dtype::F8E4M3 {
        return Err(Error::invalid(scales.name, "scales stored as FP8"));
    }
    Ok(Some((scales.to_f32(), block)))
}

/// Layer `i`'s MoE block: Mixtral's `block_sparse_moe`, the others' `mlp`.
fn moe_prefix(cfg: &ModelConfig, i: usize) -> String {
    match cfg.arch {
        Arch::Mixtral => format!("model.layers.{i}.block_sparse_moe"),
        _ => format!("model.layers.{i}.mlp"),
    }
}

/// The per-expert tensor names of gate, up and down.
fn expert_names(cfg: &ModelConfig) -> [&'static str; 3] {
    match cfg.arch {
        Arch::Mixtral => ["w1", "w3", "w2"],
        _ => ["gate_proj", "up_proj", "down_proj"],
    }
}

/// Checks every tensor the model reads (present, shape, dtype, FP8 scales, one dtype across a
/// layer's experts) without reading the weights' values (only FP8 scales, a 16384th of their
/// weights at 128 x 128 blocks): the tensors `Weights::load` reads, by the same names, so that a
/// bad checkpoint fails in a second, before any device is opened or output touched, instead of
/// after calibration and minutes of upload.
pub fn check(ck: &Checkpoint, cfg: &ModelConfig) -> Result<()> {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let matrix = |name: &str, rows: usize, cols: usize| -> Result<Dtype> {
        let t = ck.get(name, &[rows, cols])?;
        fp8_scales(ck, cfg, &t)?;
        Ok(t.dtype)
    };
    let vector = |name: &str, len: usize| ck.get(name, &[len]).map(|_| ());
    let mlp = |prefix: &str, inter: usize| -> Result<()> {
        matrix(&format!("{prefix}.gate_proj.weight"), inter, h)?;
        matrix(&format!("{prefix}.up_proj.weight"), inter, h)?;
        matrix(&format!("{prefix}.down_proj.weight"), h, inter).map(|_| ())
    };
    matrix("model.embed_tokens.weight", cfg.vocab_size, h)?;
    if ck.contains("lm_head.weight") || !cfg.tie_word_embeddings {
        matrix("lm_head.weight", cfg.vocab_size, h)?;
    }
    vector("model.norm.weight", h)?;
    let (q_dim, kv_dim) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        let a = format!("{p}.self_attn");
        vector(&format!("{p}.input_layernorm.weight"), h)?;
        vector(&format!("{p}.post_attention_layernorm.weight"), h)?;
        match cfg.qk_norm {
            QkNorm::None => {}
            QkNorm::PerHead => {
                vector(&format!("{a}.q_norm.weight"), hd)?;
                vector(&format!("{a}.k_norm.weight"), hd)?;
            }
            QkNorm::FullWidth => {
                vector(&format!("{a}.q_norm.weight"), q_dim)?;
                vector(&format!("{a}.k_norm.weight"), kv_dim)?;
            }
        }
        for (bias, len) in [("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)] {
            ck.get_opt(&format!("{a}.{bias}.bias"), &[len])?;
        }
        for (name, rows, cols) in cfg.attention_matrices() {
            if !name.starts_with("kv_b_proj.") {
                matrix(&format!("{a}.{name}.weight"), rows, cols)?;
            }
        }
        if let Some(m) = &cfg.mla {
            matrix(&format!("{a}.kv_b_proj.weight"), cfg.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)?;
            if let Some(r) = m.q_lora_rank {
                vector(&format!("{a}.q_a_layernorm.weight"), r)?;
            }
            vector(&format!("{a}.kv_a_layernorm.weight"), m.kv_lora_rank)?;
        }
        if !cfg.is_moe_layer(i) {
            mlp(&format!("{p}.mlp"), cfg.intermediate_size)?;
            continue;
        }
        let moe = moe_prefix(cfg, i);
        match cfg.shared_expert_intermediate_size {
            Some(inter) if cfg.shared_expert_gated => {
                mlp(&format!("{moe}.shared_expert"), inter)?;
                matrix(&format!("{moe}.shared_expert_gate.weight"), 1, h)?;
            }
            Some(inter) => mlp(&format!("{moe}.shared_experts"), inter)?,
            None => {}
        }
        if cfg.routing.correction_bias {
            vector(&format!("{moe}.gate.e_score_correction_bias"), cfg.num_experts)?;
        }
        matrix(&format!("{moe}.gate.weight"), cfg.num_experts, h)?;
        let (inter, n) = (cfg.moe_intermediate_size, cfg.num_experts);
        let fused = format!("{moe}.experts.gate_up_proj");
        if ck.contains(&fused) {
            let gate_up = ck.get(&fused, &[n, 2 * inter, h])?;
            let down = ck.get(&format!("{moe}.experts.down_proj"), &[n, h, inter])?;
            if gate_up.dtype == Dtype::F8E4M3 || down.dtype == Dtype::F8E4M3 {
                return Err(Error::invalid(&fused, "FP8 experts in the fused layout are not supported (per-expert tensors are)"));
            }
            continue;
        }
        let mut fp8 = Vec::new();
        for (kind, name) in expert_names(cfg).iter().enumerate() {
            let (rows, cols) = if kind == 2 { (h, inter) } else { (inter, h) };
            let first = matrix(&format!("{moe}.experts.0.{name}.weight"), rows, cols)?;
            for e in 1..n {
                let t = format!("{moe}.experts.{e}.{name}.weight");
                let dtype = matrix(&t, rows, cols)?;
                if dtype != first {
                    return Err(Error::invalid(&t, format!("dtype {dtype:?} differs from the layer's other experts ({first:?})")));
                }
            }
            fp8.push(first == Dtype::F8E4M3);
        }
        if fp8.iter().any(|&f| f != fp8[0]) {
            return Err(Error::invalid(format!("{moe}.experts.*"), "a layer's experts mix FP8 and other dtypes across gate, up and down"));
        }
    }
    Ok(())
}

struct Loader<'a> {
    ctx: &'a GpuContext,
    ck: &'a Checkpoint,
    cfg: &'a ModelConfig,
}

impl Loader<'_> {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<GpuWeight> {
        let t = self.ck.get(name, &[rows, cols])?;
        match self.fp8_scales(&t)? {
            // FP8 stays FP8 on the GPU where the scale blocks divide the rows, else bf16.
            Some((scales, block)) => match crate::quant::pack_fp8_rows(t.data, &scales, block, rows, cols) {
                Some((bytes, dtype)) => GpuWeight::upload(self.ctx, name, &bytes, dtype, rows, cols),
                None => upload_fp8(self.ctx, name, &[Fp8Matrix { data: t.data, scales: &scales, block }], rows, cols),
            },
            None => matrix(self.ctx, &t),
        }
    }

    fn fp8_scales(&self, t: &TensorRef) -> Result<Option<Fp8Scales>> {
        fp8_scales(self.ck, self.cfg, t)
    }

    /// A tensor's bytes in the dtype the GPU reads, FP8 dequantised on the host (for weights the
    /// host rearranges before upload).
    fn host_bytes<'t>(&self, t: &TensorRef<'t>) -> Result<(Cow<'t, [u8]>, WeightDtype)> {
        Ok(match self.fp8_scales(t)? {
            Some((scales, block)) => {
                (Cow::Owned(to_bf16_bytes(&Fp8Matrix { data: t.data, scales: &scales, block }, t.shape[0], t.shape[1])), WeightDtype::Bf16)
            }
            // Block formats hold no single element's bytes: widened for rearranging.
            None if t.dtype.weight().is_quantised() => (Cow::Owned(bytemuck::cast_slice(&t.to_f32()).to_vec()), WeightDtype::F32),
            None => (Cow::Borrowed(t.data), t.dtype.weight()),
        })
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

    /// The routed experts of a layer, from per-expert tensors (the Hub format) or from
    /// transformers 5's fused `experts.gate_up_proj` / `experts.down_proj`.
    fn expert_pieces(&self, prefix: &str) -> Result<ExpertPieces<'_>> {
        let (h, inter, n) = (self.cfg.hidden_size, self.cfg.moe_intermediate_size, self.cfg.num_experts);
        let fused = format!("{prefix}.experts.gate_up_proj");
        if self.ck.contains(&fused) {
            let gate_up = self.ck.get(&fused, &[n, 2 * inter, h])?;
            let down = self.ck.get(&format!("{prefix}.experts.down_proj"), &[n, h, inter])?;
            let each = gate_up.dtype.bytes_of(inter * h);
            let halves: Vec<&[u8]> = gate_up.data.chunks(each).collect();
            if gate_up.dtype == Dtype::F8E4M3 || down.dtype == Dtype::F8E4M3 {
                return Err(Error::invalid(&fused, "FP8 experts in the fused layout are not supported (per-expert tensors are)"));
            }
            return Ok(ExpertPieces {
                kinds: [
                    halves.iter().step_by(2).map(|&b| Cow::Borrowed(b)).collect(),
                    halves.iter().skip(1).step_by(2).map(|&b| Cow::Borrowed(b)).collect(),
                    down.data.chunks(down.dtype.bytes_of(h * inter)).map(Cow::Borrowed).collect(),
                ],
                scales: Default::default(),
                dtypes: [gate_up.dtype.weight(), gate_up.dtype.weight(), down.dtype.weight()],
                fp8: false,
                names: [fused.clone(), fused, down.name.to_string()],
            });
        }
        let names = expert_names(self.cfg);
        let mut kinds: [Vec<Cow<[u8]>>; 3] = Default::default();
        let mut scales: [Vec<Vec<f32>>; 3] = Default::default();
        let mut fp8 = [false; 3];
        let mut dtypes = [WeightDtype::F32; 3];
        for (kind, name) in names.iter().enumerate() {
            let shape = if kind == 2 { [h, inter] } else { [inter, h] };
            let tensors = (0..n)
                .map(|e| self.ck.get(&format!("{prefix}.experts.{e}.{name}.weight"), &shape))
                .collect::<Result<Vec<_>>>()?;
            let dtype = tensors[0].dtype;
            if let Some(t) = tensors.iter().find(|t| t.dtype != dtype) {
                return Err(Error::invalid(t.name, format!("dtype {:?} differs from the layer's other experts ({dtype:?})", t.dtype)));
            }
            kinds[kind] = tensors.iter().map(|t| Cow::Borrowed(t.data)).collect();
            dtypes[kind] = dtype.weight();
            fp8[kind] = dtype == Dtype::F8E4M3;
            if fp8[kind] {
                scales[kind] = tensors.iter().map(|t| self.fp8_scales(t).map(|s| s.expect("FP8 tensor").0)).collect::<Result<_>>()?;
            }
        }
        let names = names.map(|n| format!("{prefix}.experts.*.{n}.weight"));
        if fp8.iter().any(|&f| f != fp8[0]) {
            return Err(Error::invalid(&names[0], "a layer's experts mix FP8 and other dtypes across gate, up and down"));
        }
        Ok(ExpertPieces { kinds, scales, dtypes, fp8: fp8[0], names })
    }

    /// The experts quantised to `--quantize`'s format (from their stored values; FP8 through
    /// its scales), unless they are in a block format already.
    fn quantize_experts<'p>(&self, mut p: ExpertPieces<'p>) -> Result<ExpertPieces<'p>> {
        let Some(q) = self.cfg.quantize else { return Ok(p) };
        let (h, inter) = (self.cfg.hidden_size, self.cfg.moe_intermediate_size);
        let block = self.cfg.weight_block.unwrap_or((1, 1));
        for k in 0..3 {
            if p.dtypes[k].is_quantised() {
                continue;
            }
            let (rows, cols) = if k == 2 { (h, inter) } else { (inter, h) };
            for e in 0..p.kinds[k].len() {
                let values = if p.fp8 {
                    crate::kernels::dequant::reference(&Fp8Matrix { data: &p.kinds[k][e], scales: &p.scales[k][e], block }, rows, cols)
                } else {
                    let mut v = vec![0f32; rows * cols];
                    crate::quant::dequantize(p.dtypes[k], &p.kinds[k][e], &mut v);
                    v
                };
                p.kinds[k][e] = Cow::Owned(crate::quant::quantize(q, &values, cols)?);
            }
            p.dtypes[k] = q;
        }
        p.fp8 = false;
        Ok(p)
    }

    /// FP8 experts in the layout the kernels read as FP8 ([`WeightDtype::Fp8`]), when the scale
    /// blocks divide both row lengths (hidden and the expert's width, as in every DeepSeek-V3
    /// release); else they stay FP8 with 2-D scales, for the GPU to widen to bf16.
    fn pack_fp8_experts<'p>(&self, mut p: ExpertPieces<'p>) -> ExpertPieces<'p> {
        let (h, inter) = (self.cfg.hidden_size, self.cfg.moe_intermediate_size);
        let Some(block) = self.cfg.weight_block.filter(|_| p.fp8) else { return p };
        let shapes = [(inter, h), (inter, h), (h, inter)];
        let mut packed: [Vec<Cow<'p, [u8]>>; 3] = Default::default();
        let mut dtypes = p.dtypes;
        for k in 0..3 {
            let (rows, cols) = shapes[k];
            for e in 0..p.kinds[k].len() {
                match crate::quant::pack_fp8_rows(&p.kinds[k][e], &p.scales[k][e], block, rows, cols) {
                    Some((bytes, dtype)) => {
                        packed[k].push(Cow::Owned(bytes));
                        dtypes[k] = dtype;
                    }
                    None => return p,
                }
            }
        }
        p.kinds = packed;
        p.dtypes = dtypes;
        p.scales = Default::default();
        p.fp8 = false;
        p
    }

    fn experts(&self, prefix: &str, stream: bool) -> Result<Experts> {
        let (h, inter, n) = (self.cfg.hidden_size, self.cfg.moe_intermediate_size, self.cfg.num_experts);
        let p = self.pack_fp8_experts(self.quantize_experts(self.expert_pieces(prefix)?)?);
        let block = self.cfg.weight_block.unwrap_or((1, 1));
        if !stream {
            let stack = |k: usize, rows: usize, cols: usize| {
                if p.fp8 {
                    let pieces: Vec<Fp8Matrix> = (0..n).map(|e| Fp8Matrix { data: &p.kinds[k][e], scales: &p.scales[k][e], block }).collect();
                    upload_fp8(self.ctx, &p.names[k], &pieces, rows, cols)
                } else {
                    let pieces: Vec<&[u8]> = p.kinds[k].iter().map(|c| &c[..]).collect();
                    GpuWeight::stack(self.ctx, &p.names[k], &pieces, p.dtypes[k], rows, cols)
                }
            };
            return Ok(Experts::Resident(Box::new(StackedExperts {
                gate: stack(0, inter, h)?,
                up: stack(1, inter, h)?,
                down: stack(2, h, inter)?,
                n_experts: n,
            })));
        }
        if p.fp8 && p.dtypes.iter().any(|&d| d != p.dtypes[0]) {
            return Err(Error::invalid(&p.names[2], format!("streamed FP8 experts need one dtype for all three matrices, found {:?}", p.dtypes)));
        }
        if p.fp8 && (inter * h) % 4 != 0 {
            return Err(Error::invalid(&p.names[0], format!("streamed FP8 experts need {inter} x {h} to be a multiple of 4")));
        }
        let packs = (0..n)
            .map(|e| {
                let mut pack = [&p.kinds[0][e][..], &p.kinds[1][e][..], &p.kinds[2][e][..]].concat();
                if p.fp8 {
                    for k in 0..3 {
                        pack.extend_from_slice(bytemuck::cast_slice(&p.scales[k][e]));
                    }
                }
                pack
            })
            .collect();
        Ok(Experts::Streamed(HostExperts { packs, dtypes: p.dtypes, fp8_block: p.fp8.then_some(block), inter, hidden: h }))
    }

    /// Each attention matrix the forward pass uses, checked against the config. MLA's
    /// `kv_b_proj` is split per head into its key half, transposed so that queries can be
    /// multiplied into it, and its value half. FP8 matrices stay FP8 (the halves too when the
    /// heads fall on block boundaries, as in DeepSeek-V3; else they are dequantised here).
    fn attention_data(&self, prefix: &str) -> Result<Vec<AttentionMatrix<'_>>> {
        let cfg = self.cfg;
        let mut out = Vec::new();
        for (name, rows, cols) in cfg.attention_matrices() {
            if name.starts_with("kv_b_proj.") {
                continue;
            }
            let t = self.ck.get(&format!("{prefix}.{name}.weight"), &[rows, cols])?;
            let fp8 = self.fp8_scales(&t)?;
            out.push(AttentionMatrix { name: t.name.to_string(), bytes: Cow::Borrowed(t.data), dtype: t.dtype.weight(), fp8 });
        }
        if let Some(m) = &cfg.mla {
            let (heads, dn, dv, r) = (cfg.num_heads, m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank);
            let t = self.ck.get(&format!("{prefix}.kv_b_proj.weight"), &[heads * (dn + dv), r])?;
            let scales = self.fp8_scales(&t)?;
            let aligned = scales.as_ref().is_some_and(|(_, (br, bc))| dn % br == 0 && dv % br == 0 && r % bc == 0);
            let (data, dtype) = if aligned { (Cow::Borrowed(t.data), WeightDtype::Bf16) } else { self.host_bytes(&t)? };
            let e = if aligned { 1 } else { dtype.block_bytes() };
            let (mut absorb_k, mut absorb_v) = (Vec::with_capacity(heads * r * dn * e), Vec::with_capacity(heads * dv * r * e));
            for h in 0..heads {
                let head = &data[h * (dn + dv) * r * e..(h + 1) * (dn + dv) * r * e];
                for j in 0..r {
                    for i in 0..dn {
                        absorb_k.extend_from_slice(&head[(i * r + j) * e..][..e]);
                    }
                }
                absorb_v.extend_from_slice(&head[dn * r * e..]);
            }
            // Block scales follow: the value half keeps its heads' block rows; the transposed key
            // half has blocks of (bc, br) whose scales are each head's block rows transposed.
            let (k_fp8, v_fp8) = match (aligned, scales) {
                (true, Some((s, (br, bc)))) => {
                    let cols = r.div_ceil(bc);
                    let (head_blocks, k_blocks, v_blocks) = ((dn + dv) / br, dn / br, dv / br);
                    let (mut sk, mut sv) = (Vec::new(), Vec::new());
                    for h in 0..heads {
                        let head = &s[h * head_blocks * cols..(h + 1) * head_blocks * cols];
                        for jb in 0..cols {
                            sk.extend((0..k_blocks).map(|ib| head[ib * cols + jb]));
                        }
                        sv.extend_from_slice(&head[k_blocks * cols..(k_blocks + v_blocks) * cols]);
                    }
                    (Some((sk, (bc, br))), Some((sv, (br, bc))))
                }
                _ => (None, None),
            };
            // In the order attention_matrices lists them: before o_proj.
            let o = out.pop().expect("o_proj is listed");
            out.push(AttentionMatrix { name: format!("{} (keys, transposed)", t.name), bytes: Cow::Owned(absorb_k), dtype, fp8: k_fp8 });
            out.push(AttentionMatrix { name: format!("{} (values)", t.name), bytes: Cow::Owned(absorb_v), dtype, fp8: v_fp8 });
            out.push(o);
        }
        Ok(out)
    }

    fn projections(&self, prefix: &str, stream: bool) -> Result<Projections> {
        let shapes: Vec<(usize, usize)> = self.cfg.attention_matrices().iter().map(|&(_, r, c)| (r, c)).collect();
        let mut data = self.attention_data(prefix)?;
        if let (Some(q), true) = (self.cfg.quantize, self.cfg.quantize_attention) {
            for (m, &(rows, cols)) in data.iter_mut().zip(&shapes) {
                if m.dtype.is_quantised() {
                    continue;
                }
                let values = match &m.fp8 {
                    Some((scales, block)) => crate::kernels::dequant::reference(&Fp8Matrix { data: &m.bytes, scales, block: *block }, rows, cols),
                    None => {
                        let mut v = vec![0f32; rows * cols];
                        crate::quant::dequantize(m.dtype, &m.bytes, &mut v);
                        v
                    }
                };
                (m.bytes, m.dtype, m.fp8) = (Cow::Owned(crate::quant::quantize(q, &values, cols)?), q, None);
            }
        }
        // FP8 matrices whose scale blocks divide their rows stay FP8 on the GPU.
        for (m, &(rows, cols)) in data.iter_mut().zip(&shapes) {
            if let Some((scales, block)) = &m.fp8 {
                if let Some((bytes, dtype)) = crate::quant::pack_fp8_rows(&m.bytes, scales, *block, rows, cols) {
                    (m.bytes, m.dtype, m.fp8) = (Cow::Owned(bytes), dtype, None);
                }
            }
        }
        if !stream {
            return data
                .iter()
                .zip(&shapes)
                .map(|(m, &(rows, cols))| match &m.fp8 {
                    Some((scales, block)) => upload_fp8(self.ctx, &m.name, &[Fp8Matrix { data: &m.bytes, scales, block: *block }], rows, cols),
                    None => GpuWeight::upload(self.ctx, &m.name, &m.bytes, m.dtype, rows, cols),
                })
                .collect::<Result<Vec<_>>>()
                .map(Projections::Resident);
        }
        let dtypes = data.iter().map(|m| m.dtype).collect();
        for (m, &(_, cols)) in data.iter().zip(&shapes) {
            if m.fp8.is_some() && !cols.is_multiple_of(2) {
                return Err(Error::invalid(&m.name, format!("FP8 weights need an even number of columns, found {cols}")));
            }
        }
        // FP8 matrices travel as their values (padded to 4 bytes) followed by their f32 scales.
        let fp8 = data.iter().map(|m| m.fp8.as_ref().map(|(_, block)| *block)).collect();
        let data = data
            .into_iter()
            .map(|m| match m.fp8 {
                Some((scales, _)) => {
                    let mut bytes = m.bytes.into_owned();
                    bytes.resize(bytes.len().next_multiple_of(4), 0);
                    bytes.extend_from_slice(bytemuck::cast_slice(&scales));
                    bytes
                }
                None => m.bytes.into_owned(),
            })
            .collect();
        Ok(Projections::Streamed(HostProjections { data, dtypes, shapes, fp8 }))
    }

    fn layer(&self, i: usize, placement: &Placement) -> Result<Layer> {
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
        let moe_prefix = moe_prefix(cfg, i);
        let ffn = if cfg.is_moe_layer(i) {
            let shared = match cfg.shared_expert_intermediate_size {
                Some(inter) if cfg.shared_expert_gated => Some(Box::new(SharedExpert {
                    mlp: self.mlp(&format!("{moe_prefix}.shared_expert"), inter)?,
                    gate: Some(self.matrix(&format!("{moe_prefix}.shared_expert_gate.weight"), 1, h)?),
                })),
                Some(inter) => Some(Box::new(SharedExpert { mlp: self.mlp(&format!("{moe_prefix}.shared_experts"), inter)?, gate: None })),
                None => None,
            };
            let correction_bias = if cfg.routing.correction_bias {
                Some(self.vector(&format!("{moe_prefix}.gate.e_score_correction_bias"), cfg.num_experts)?)
            } else {
                None
            };
            Ffn::Moe {
                router: self.matrix(&format!("{moe_prefix}.gate.weight"), cfg.num_experts, h)?,
                correction_bias,
                experts: self.experts(&moe_prefix, placement.streams(i, cfg))?,
                shared,
            }
        } else {
            Ffn::Dense(self.mlp(&format!("{p}.mlp"), cfg.intermediate_size)?)
        };
        let mla = match &cfg.mla {
            Some(m) => Some(MlaNorms {
                q_a: m.q_lora_rank.map(|r| self.vector(&format!("{a}.q_a_layernorm.weight"), r)).transpose()?,
                kv_a: self.vector(&format!("{a}.kv_a_layernorm.weight"), m.kv_lora_rank)?,
            }),
            None => None,
        };
        Ok(Layer {
            input_norm: self.vector(&format!("{p}.input_layernorm.weight"), h)?,
            mla,
            post_attention_norm: self.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            attn: self.projections(&a, placement.streamed_attention.contains(&i))?,
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
    /// Uploads every weight the model needs (but the experts `placement` streams, which are
    /// packed in host memory), checking each tensor's presence, shape and dtype.
    pub fn load(ctx: &GpuContext, ck: &Checkpoint, cfg: &ModelConfig, placement: &Placement) -> Result<Self> {
        let l = Loader { ctx, ck, cfg };
        let embed = l.matrix("model.embed_tokens.weight", cfg.vocab_size, cfg.hidden_size)?;
        let lm_head = if ck.contains("lm_head.weight") || !cfg.tie_word_embeddings {
            Some(l.matrix("lm_head.weight", cfg.vocab_size, cfg.hidden_size)?)
        } else {
            None
        };
        let layers = (0..cfg.num_layers).map(|i| l.layer(i, placement)).collect::<Result<Vec<_>>>()?;
        let final_norm = l.vector("model.norm.weight", cfg.hidden_size)?;
        ctx.wait_idle("uploading the weights")?;
        Ok(Weights { embed, layers, final_norm, lm_head })
    }
}
