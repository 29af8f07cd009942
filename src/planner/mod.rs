//! Where weights live under a GPU memory budget: what stays resident, and how many slots the
//! streamed experts rotate through.
//!
//! This step places whole layers' experts: the non-expert weights (embeddings, attention, norms,
//! routers, shared experts, dense MLPs), the KV cache and the activations of a step always stay
//! on the GPU; the experts of the first layers stay resident while the budget allows, the rest
//! live in host memory and stream through N expert slots (N >= 2), which keep what they hold
//! until it is evicted (least recently used), so the experts in use stay on the GPU.

pub mod hardware;
pub mod policy;

pub use hardware::{calibrate_host, HardwareProfile, HostAttentionPoint, HostProfile};
pub use policy::{plan_job, Bound, JobPlan, JobShape, Prediction};

use crate::error::{Error, Result};
use crate::loader::checkpoint::Checkpoint;
use crate::gpu::WeightDtype;
use crate::loader::config::ModelConfig;

/// Parses `512MiB`, `24GiB`, `1.5GB`, `4096` (bytes): binary (KiB, MiB, GiB, TiB) and decimal
/// (KB, MB, GB, TB) units.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("`{text}` is not a size such as 512MiB or 24GiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        other => return Err(format!("`{text}`: unknown unit `{other}` (use B, KB, MB, GB, KiB, MiB, GiB)")),
    };
    Ok((value * scale) as u64)
}

/// Parses a transfer rate such as `4MB/s` or `2GiB/s` into bytes per second.
pub fn parse_rate(text: &str) -> std::result::Result<u64, String> {
    let size = text.trim().strip_suffix("/s").ok_or_else(|| format!("`{text}` is not a rate such as 4MB/s or 2GB/s"))?;
    match parse_size(size)? {
        0 => Err(format!("`{text}`: the rate must be above zero")),
        n => Ok(n),
    }
}

pub fn format_size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// The bytes the checkpoint's tensors take, split into routed experts and everything else.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WeightBytes {
    /// Weights that always stay on the GPU: embeddings, norms, routers, LM head, shared experts
    /// and dense MLPs.
    pub resident: u64,
    /// One layer's attention projections on the GPU (streamed when the budget is short).
    pub attention_per_layer: u64,
    /// The same as host memory holds them and the link carries them (less for FP8).
    pub attention_per_layer_stream: u64,
    /// One routed expert's three matrices on the GPU (every expert of the model is the same size).
    pub per_expert: u64,
    /// One routed expert as host memory holds it and the link carries it: less than on the GPU
    /// for FP8 weights, which the GPU dequantises to bf16.
    pub per_expert_stream: u64,
    pub experts_per_layer: usize,
    pub moe_layers: usize,
    /// The dtypes the kernels read, which price their matmuls: the routed experts' gate and up
    /// matrices, their down matrices (Q4_K_M files keep some downs in Q6_K), and attention.
    pub expert_dtypes: [WeightDtype; 2],
    pub attention_dtype: WeightDtype,
}

impl WeightBytes {
    pub fn of(ck: &Checkpoint, cfg: &ModelConfig) -> Self {
        let mut resident = 0u64;
        let (mut experts, mut experts_stored) = (0u64, 0u64);
        let (mut attention, mut attention_stored) = (0u64, 0u64);
        // How many matrices of each kernel dtype: the experts' gate/up and down, and attention.
        let mut dtype_counts: [std::collections::HashMap<WeightDtype, usize>; 3] = Default::default();
        for name in ck.names() {
            // Layers past num_hidden_layers (DeepSeek-V3's multi-token-prediction layer) are
            // never loaded.
            let layer = name.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|i| i.parse::<usize>().ok());
            if layer.is_some_and(|l| l >= cfg.num_layers) {
                continue;
            }
            let mut stored = ck.bytes_of(name);
            // FP8 weights whose scale blocks divide their rows stay FP8 everywhere, an f32 scale
            // before each block's run of a row; others take two bytes a value on the GPU and
            // their 2-D scales stay behind.
            let fp8_rows = |n: &str| match (cfg.weight_block, ck.shape_of(n)) {
                (Some((_, bc)), [_, cols]) => bc > 0 && cols % bc == 0 && bc % 4 == 0,
                _ => false,
            };
            let mut gpu = match ck.dtype_of(name) {
                Some(crate::loader::checkpoint::Dtype::F8E4M3) if fp8_rows(name) => {
                    stored += 4 * stored / cfg.weight_block.map_or(1, |b| b.1) as u64;
                    stored
                }
                Some(crate::loader::checkpoint::Dtype::F8E4M3) => 2 * stored,
                _ if name.ends_with("_scale_inv") => {
                    if fp8_rows(name.trim_end_matches("_scale_inv")) {
                        stored = 0;
                    }
                    0
                }
                _ => stored,
            };
            // `--quantize`: experts (and attention) at their packed size everywhere, FP8 scales gone.
            let quantized = is_routed_expert(name) || (cfg.quantize_attention && is_attention_projection(name));
            if let (Some(q), true, Some(dtype)) = (cfg.quantize, quantized, ck.dtype_of(name)) {
                if name.ends_with("_scale_inv") {
                    stored = 0;
                } else if !dtype.weight().is_quantised() {
                    (stored, gpu) = (q.bytes_of(ck.elements_of(name)) as u64, q.bytes_of(ck.elements_of(name)) as u64);
                }
            }
            // What the kernels read: FP8 as FP8 where its blocks divide the rows, else bf16.
            let kernel_dtype = |d: crate::loader::checkpoint::Dtype| match (cfg.quantize, quantized) {
                (Some(q), true) if !d.weight().is_quantised() => q,
                _ if d == crate::loader::checkpoint::Dtype::F8E4M3 && fp8_rows(name) => WeightDtype::Fp8 { block: cfg.weight_block.map_or(1, |b| b.1) as u32 },
                _ => d.weight(),
            };
            let kernel = ck.dtype_of(name).filter(|_| !name.ends_with("_scale_inv")).map(kernel_dtype);
            if is_routed_expert(name) {
                experts += gpu;
                experts_stored += stored;
                if let Some(d) = kernel {
                    *dtype_counts[usize::from(name.contains("down") || name.ends_with(".w2.weight"))].entry(d).or_default() += 1;
                }
            } else if is_attention_projection(name) {
                attention += gpu;
                attention_stored += stored;
                if let Some(d) = kernel {
                    *dtype_counts[2].entry(d).or_default() += 1;
                }
            } else {
                resident += gpu;
            }
        }
        let moe_layers = (0..cfg.num_layers).filter(|&l| cfg.is_moe_layer(l)).count();
        let count = (moe_layers * cfg.num_experts).max(1) as u64;
        // The most common dtype of each (a Q4_K_M file's downs mix Q4_K and Q6_K), the same
        // whatever order the index lists them in.
        let [gate_up, down, attention_dtype] = dtype_counts.map(|c| c.into_iter().max_by_key(|&(d, n)| (n, d.name())).map_or(WeightDtype::Bf16, |(d, _)| d));
        let expert_dtypes = [gate_up, down];
        WeightBytes {
            resident,
            attention_per_layer: attention / cfg.num_layers.max(1) as u64,
            attention_per_layer_stream: attention_stored / cfg.num_layers.max(1) as u64,
            per_expert: experts / count,
            per_expert_stream: experts_stored / count,
            experts_per_layer: cfg.num_experts,
            moe_layers,
            expert_dtypes,
            attention_dtype,
        }
    }

    /// The bytes a checkpoint of `cfg` would take with weights of `dtype_bytes` each (for
    /// synthetic models and plans without a checkpoint).
    pub fn of_config(cfg: &ModelConfig, dtype_bytes: u64) -> Self {
        let h = cfg.hidden_size as u64;
        let moe_layers = (0..cfg.num_layers).filter(|&l| cfg.is_moe_layer(l)).count();
        let dense = (cfg.num_layers - moe_layers) as u64 * 3 * h * cfg.intermediate_size as u64;
        let gate = if cfg.shared_expert_gated { h } else { 0 };
        let shared = cfg.shared_expert_intermediate_size.map_or(0, |s| 3 * h * s as u64 + gate) * moe_layers as u64;
        let router = moe_layers as u64 * cfg.num_experts as u64 * h;
        let embed = cfg.vocab_size as u64 * h * if cfg.tie_word_embeddings { 1 } else { 2 };
        let resident = (dense + shared + router + embed) * dtype_bytes + (cfg.num_layers as u64 * 2 + 1) * h * dtype_bytes;
        let (hh, ii) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let expert_values = 3 * (hh * ii) as u64;
        // FP8 weights stream as one byte a value plus an f32 scale per block.
        let stored = |shapes: &[(usize, usize)]| -> u64 {
            shapes
                .iter()
                .map(|&(r, c)| match cfg.weight_block {
                    Some((_, bc)) if c % bc == 0 && bc % 4 == 0 => (r * c) as u64 + 4 * (r * c / bc) as u64,
                    Some(block) => (r * c) as u64 + 4 * crate::kernels::dequant::scale_shape(r, c, block).iter().product::<usize>() as u64,
                    None => (r * c) as u64 * dtype_bytes,
                })
                .sum()
        };
        let mut per_expert_stream = stored(&[(ii, hh), (ii, hh), (hh, ii)]);
        // FP8 experts read as FP8 on the GPU too where their blocks divide the rows.
        let fp8_rows = cfg.weight_block.is_some_and(|(_, bc)| hh % bc == 0 && ii % bc == 0 && bc % 4 == 0);
        let mut per_expert = if fp8_rows { per_expert_stream } else { expert_values * dtype_bytes };
        if let Some(q) = cfg.quantize {
            per_expert = q.bytes_of(expert_values as usize) as u64;
            per_expert_stream = per_expert;
        }
        let attention_shapes: Vec<(usize, usize)> = cfg.attention_matrices().iter().map(|&(_, r, c)| (r, c)).collect();
        let (attention_per_layer, attention_per_layer_stream) = match cfg.quantize {
            Some(q) if cfg.quantize_attention => {
                let packed: u64 = attention_shapes.iter().map(|&(r, c)| q.bytes_of(r * c) as u64).sum();
                (packed, packed)
            }
            _ => {
                let on_gpu: u64 = attention_shapes
                    .iter()
                    .map(|&(r, c)| match cfg.weight_block {
                        Some((_, bc)) if c % bc == 0 && bc % 4 == 0 => (r * c + 4 * (r * c / bc)) as u64,
                        _ => (r * c) as u64 * dtype_bytes,
                    })
                    .sum();
                (on_gpu, stored(&attention_shapes))
            }
        };
        let float = if dtype_bytes == 4 { WeightDtype::F32 } else { WeightDtype::Bf16 };
        let fp8 = cfg.weight_block.filter(|&(_, bc)| bc % 4 == 0).map(|(_, bc)| WeightDtype::Fp8 { block: bc as u32 });
        let expert = cfg.quantize.or(fp8.filter(|_| fp8_rows)).unwrap_or(float);
        let attention_dtype = cfg.quantize.filter(|_| cfg.quantize_attention).or(fp8).unwrap_or(float);
        WeightBytes {
            resident,
            attention_per_layer,
            attention_per_layer_stream,
            per_expert,
            per_expert_stream,
            experts_per_layer: cfg.num_experts,
            moe_layers,
            expert_dtypes: [expert; 2],
            attention_dtype,
        }
    }

    pub fn per_layer(&self) -> u64 {
        self.per_expert * self.experts_per_layer as u64
    }

    /// One layer's experts as host memory holds them.
    pub fn per_layer_stream(&self) -> u64 {
        self.per_expert_stream * self.experts_per_layer as u64
    }
}

/// Today's date (UTC), for the provenance of measured figures.
/// (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's algorithm).
pub fn civil_date(days: i64) -> (i64, i64, i64) {
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

pub fn today() -> String {
    let days = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() / 86400).unwrap_or(0) as i64;
    let (y, m, d) = civil_date(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Host memory the job may use when `--host-memory` is not given: 80% of what the OS reports
/// available, else 16 GiB.
pub fn default_host_memory() -> (u64, &'static str) {
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().find(|l| l.starts_with("MemAvailable:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    });
    match available {
        Some(kib) => (kib * 1024 / 5 * 4, "80% of the available host memory"),
        None => (16 << 30, "a default of 16 GiB (the OS did not report available memory)"),
    }
}

/// GPU memory the job may use when `--gpu-memory` is not given. wgpu does not report an
/// adapter's memory, so this is a stated conservative default: 4 GiB, or for adapters that share
/// host memory (integrated, software) a quarter of the host budget up to 4 GiB. The CPU device's
/// memory is host memory: half the host budget, the rest left for the KV store and states.
pub fn default_gpu_memory(ctx: &crate::gpu::GpuContext, host_budget: u64) -> (u64, &'static str) {
    if ctx.is_cpu() {
        return (host_budget / 2, "half the host budget, since the CPU device's memory is host memory");
    }
    match ctx.info().device_type {
        wgpu::DeviceType::DiscreteGpu => (4 << 30, "a conservative default of 4 GiB (wgpu does not report the adapter's memory)"),
        _ => ((host_budget / 4).min(4 << 30), "a quarter of the host budget up to 4 GiB (this adapter shares host memory)"),
    }
}

/// An estimate of the activations one forward pass of `step_tokens` tokens keeps on the GPU at
/// once (hidden states, attention, the routed rows of a layer, the logits of up to 256 rows).
pub fn activation_bytes(cfg: &ModelConfig, step_tokens: usize) -> u64 {
    let (h, q, kv) = (cfg.hidden_size, cfg.attention_width(), cfg.kv_row());
    let inter = cfg.moe_intermediate_size.max(cfg.intermediate_size);
    let per_token = 6 * h + 3 * q + kv + cfg.experts_per_token * (2 * h + 3 * inter) + cfg.num_experts;
    (4 * (step_tokens * per_token + step_tokens.min(256) * cfg.vocab_size)) as u64
}

/// Bytes of one KV-cache row (one token, every layer, keys and values, f32; MLA's latent and
/// rope key).
pub fn kv_row_bytes(cfg: &ModelConfig) -> u64 {
    (cfg.num_layers * cfg.kv_row() * 4) as u64
}

/// The weight of an attention projection (q, k, v, o, and MLA's low-rank ones; biases and
/// norms stay resident), or its FP8 scales.
pub fn is_attention_projection(name: &str) -> bool {
    let name = name.strip_suffix("_scale_inv").unwrap_or(name);
    name.contains(".self_attn.")
        && ["q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"]
            .iter()
            .any(|p| name.ends_with(&format!(".{p}.weight")))
}

/// A routed expert's tensor (not a shared expert's, not the router's).
pub fn is_routed_expert(name: &str) -> bool {
    name.contains(".experts.") && !name.contains("shared_expert")
}

/// What messages call the compute device: the GPU, or on `--device cpu` the CPU device (its
/// memory is host memory, its "uploads" are copies within it).
pub fn device_noun(cpu_device: bool) -> &'static str {
    if cpu_device {
        "CPU device"
    } else {
        "GPU"
    }
}

/// The error for a GPU budget under `minimum`, with what the minimum is made of.
pub fn budget_too_small(budget: u64, minimum: u64, w: &WeightBytes, reserved: u64) -> Error {
    Error::invalid(
        "--gpu-memory",
        format!(
            "{} is below the minimum of {} for this model and job: weights that stay (embeddings, norms, routers, LM head) {}, one layer's attention {}, KV cache and activations {}, two expert slots {}",
            format_size(budget),
            format_size(minimum),
            format_size(w.resident),
            format_size(w.attention_per_layer),
            format_size(reserved),
            format_size(2 * w.per_expert)
        ),
    )
}

/// The decision, printed for the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// MoE layers (by index among all layers) whose experts stay on the GPU.
    pub resident_layers: Vec<usize>,
    /// Expert slots for the streamed layers (0 when nothing streams).
    pub slots: usize,
    /// Layers whose attention projections live in host memory and stream to one GPU slot.
    pub streamed_attention: Vec<usize>,
    pub budget: Option<u64>,
    pub resident_bytes: u64,
    pub reserved_bytes: u64,
}

impl Placement {
    /// Everything resident (no budget given).
    pub fn all_resident(cfg: &ModelConfig) -> Self {
        Placement {
            resident_layers: (0..cfg.num_layers).filter(|&l| cfg.is_moe_layer(l)).collect(),
            slots: 0,
            streamed_attention: Vec::new(),
            budget: None,
            resident_bytes: 0,
            reserved_bytes: 0,
        }
    }

    /// Places the weights within `budget` bytes, after the weights that always stay and
    /// `reserved` bytes (KV cache and activations): attention projections first, then whole
    /// layers of experts, while they fit; what does not fit streams from host memory (attention
    /// through one slot, experts through N >= 2 slots).
    pub fn plan(cfg: &ModelConfig, w: &WeightBytes, budget: u64, reserved: u64) -> Result<Self> {
        let slot_bytes = w.per_expert;
        let minimum = w.resident + w.attention_per_layer + reserved + 2 * slot_bytes;
        if budget < minimum {
            return Err(budget_too_small(budget, minimum, w, reserved));
        }
        let layers = cfg.num_layers;
        let all_attention = w.attention_per_layer * layers as u64;
        let moe_layers: Vec<usize> = (0..layers).filter(|&l| cfg.is_moe_layer(l)).collect();
        let free = budget - w.resident - reserved;
        let placed = |resident_layers: Vec<usize>, slots: usize, streamed_attention: Vec<usize>, weights: u64| Placement {
            resident_layers,
            slots,
            streamed_attention,
            budget: Some(budget),
            resident_bytes: weights,
            reserved_bytes: reserved,
        };
        if free >= all_attention + w.per_layer() * moe_layers.len() as u64 {
            return Ok(placed(moe_layers, 0, Vec::new(), w.resident + all_attention));
        }
        if free < all_attention + 2 * slot_bytes {
            // Attention of the first layers stays; the rest streams through one slot.
            let keep = ((free - 2 * slot_bytes - w.attention_per_layer) / w.attention_per_layer.max(1)) as usize;
            let keep = keep.min(layers.saturating_sub(1));
            let left = free - 2 * slot_bytes - w.attention_per_layer * (keep as u64 + 1);
            let slots = (2 + left.checked_div(slot_bytes).unwrap_or(0) as usize).min((cfg.num_experts * moe_layers.len()).max(2));
            return Ok(placed(Vec::new(), slots, (keep..layers).collect(), w.resident + w.attention_per_layer * keep as u64));
        }
        // Keep room for at least two slots, then as many whole layers resident as fit; the slots
        // take what is left, up to one per expert of a layer.
        let mut left = free - all_attention - 2 * slot_bytes;
        let mut resident_layers = Vec::new();
        for &l in &moe_layers {
            if left >= w.per_layer() && resident_layers.len() + 1 < moe_layers.len() {
                left -= w.per_layer();
                resident_layers.push(l);
            }
        }
        // Slots keep the experts they hold until evicted, so slots beyond a layer's worth still
        // save uploads: up to every streamed expert, and then nothing streams twice.
        let extra = left.checked_div(slot_bytes).unwrap_or(0) as usize;
        let streamed = moe_layers.len() - resident_layers.len();
        let slots = (2 + extra).min((cfg.num_experts * streamed).max(2));
        let weights = w.resident + all_attention + w.per_layer() * resident_layers.len() as u64;
        Ok(placed(resident_layers, slots, Vec::new(), weights))
    }

    pub fn streams(&self, layer: usize, cfg: &ModelConfig) -> bool {
        cfg.is_moe_layer(layer) && !self.resident_layers.contains(&layer)
    }

    /// Whether any layer's experts stream.
    pub fn streams_any(&self, cfg: &ModelConfig) -> bool {
        (0..cfg.num_layers).any(|l| self.streams(l, cfg))
    }

    /// `device` names the compute device ([`device_noun`]).
    pub fn describe(&self, cfg: &ModelConfig, w: &WeightBytes, device: &str) -> String {
        let streamed = (0..cfg.num_layers).filter(|&l| self.streams(l, cfg)).count();
        let budget = self.budget.map(format_size).unwrap_or_else(|| "none set".into());
        if streamed == 0 && self.streamed_attention.is_empty() {
            return format!("{device} budget {budget}: every weight resident ({} of experts)", format_size(w.per_layer() * w.moe_layers as u64));
        }
        let attention = if self.streamed_attention.is_empty() {
            String::new()
        } else {
            format!(
                "; attention of {} of {} layers streamed through one slot of {}",
                self.streamed_attention.len(),
                cfg.num_layers,
                format_size(w.attention_per_layer)
            )
        };
        format!(
            "{device} budget {budget}: {} of weights resident, experts of {} of {} MoE layers resident, {} streamed from host memory through {} slots of {}{attention}",
            format_size(self.resident_bytes),
            self.resident_layers.len(),
            w.moe_layers,
            streamed,
            self.slots,
            format_size(w.per_expert)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_past_the_last_layer_are_not_counted() {
        // A tiny config of 1 layer with a checkpoint that also holds a layer 1 (as DeepSeek-V3
        // ships its multi-token-prediction layer): layer 1's tensors are not the model's.
        let v = serde_json::json!({
            "architectures": ["MixtralForCausalLM"], "hidden_size": 4, "num_attention_heads": 2,
            "num_key_value_heads": 1, "num_hidden_layers": 1, "num_local_experts": 2,
            "num_experts_per_tok": 1, "intermediate_size": 8, "vocab_size": 10
        });
        let cfg = ModelConfig::parse(&v, std::path::Path::new("config.json")).unwrap();
        let expert = |l: usize, e: usize| (format!("model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight"), crate::loader::checkpoint::Dtype::F32, vec![8, 4], 0);
        let tensors = vec![expert(0, 0), expert(0, 1), expert(1, 0), expert(1, 1), ("model.layers.1.self_attn.q_proj.weight".into(), crate::loader::checkpoint::Dtype::F32, vec![8, 4], 0)];
        let ck = Checkpoint::in_memory("test", vec![vec![0u8; 8 * 4 * 4]], tensors).unwrap();
        let w = WeightBytes::of(&ck, &cfg);
        assert_eq!(w.per_expert, 128, "one w1 of 8 x 4 f32 per expert of layer 0 only");
        assert_eq!(w.attention_per_layer, 0);
    }

    #[test]
    fn sizes_in_binary_and_decimal_units() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("24GiB"), Ok(24 << 30));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").unwrap_err().contains("parsecs"));
        assert_eq!(parse_rate("4MB/s"), Ok(4_000_000));
        assert_eq!(parse_rate("2GiB/s"), Ok(2 << 30));
        assert!(parse_rate("4MB").is_err() && parse_rate("0MB/s").is_err());
    }

    fn cfg(layers: usize, experts: usize) -> ModelConfig {
        let v = serde_json::json!({
            "architectures": ["MixtralForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": layers, "num_local_experts": experts, "num_experts_per_tok": 2,
            "intermediate_size": 96, "vocab_size": 300
        });
        ModelConfig::parse(&v, std::path::Path::new("config.json")).unwrap()
    }

    /// The dtypes that price the kernels: as stored (the most common of a mixed file), or as
    /// `--quantize` makes them; and a block format's calibrated slowdown applied by rows.
    #[test]
    fn matmuls_are_priced_by_the_dtype_the_kernels_read() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let q4km = crate::loader::ModelFiles::open(&fixtures.join("gguf/mixtral-256-q4_k_m.gguf")).unwrap();
        let w = WeightBytes::of(&q4km.checkpoint, &q4km.config);
        assert_eq!(w.expert_dtypes[0], WeightDtype::Q4K);
        assert!(w.expert_dtypes[1].is_quantised() && w.attention_dtype.is_quantised(), "{w:?}");
        let f32 = crate::loader::ModelFiles::open(&fixtures.join("mixtral-f32")).unwrap();
        assert_eq!(WeightBytes::of(&f32.checkpoint, &f32.config).expert_dtypes, [WeightDtype::F32; 2]);
        let q8 = f32.config.clone().with_quantize(Some(WeightDtype::Q8_0), false).unwrap();
        let w = WeightBytes::of(&f32.checkpoint, &q8);
        assert_eq!((w.expert_dtypes, w.attention_dtype), ([WeightDtype::Q8_0; 2], WeightDtype::F32));
        assert_eq!(WeightBytes::of_config(&q8, 2).expert_dtypes, [WeightDtype::Q8_0; 2]);

        let mut hw = HardwareProfile::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/hardware/rtx-a5000-pcie4.json")).unwrap();
        let base = |rows: f64| hw.matmul_s(rows, 4096.0, 4096.0);
        let (b1, b4, b16, b999) = (base(1.0), base(4.0), base(16.0), base(999.0));
        assert_eq!(hw.matmul_s_as(WeightDtype::Q4K, 4.0, 4096.0, 4096.0), b4, "no calibration: priced as bf16");
        hw.block_matmul = vec![hardware::BlockMatmul { dtype: "q4_k".into(), slowdown: vec![[1.0, 1.0], [16.0, 3.0], [256.0, 2.0]] }];
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
        assert!(close(hw.matmul_s_as(WeightDtype::Q4K, 1.0, 4096.0, 4096.0), b1));
        assert!(close(hw.matmul_s_as(WeightDtype::Q4K, 4.0, 4096.0, 4096.0), 2.0 * b4), "log-linear between 1 and 16 rows");
        assert!(close(hw.matmul_s_as(WeightDtype::Q4K, 16.0, 4096.0, 4096.0), 3.0 * b16));
        assert!(close(hw.matmul_s_as(WeightDtype::Q4K, 999.0, 4096.0, 4096.0), 2.0 * b999), "flat past the last row");
        assert_eq!(hw.matmul_s_as(WeightDtype::Q8_0, 16.0, 4096.0, 4096.0), b16, "a format not measured");
        assert_eq!(hw.matmul_s_as(WeightDtype::Bf16, 16.0, 4096.0, 4096.0), b16);
    }

    #[test]
    fn streams_what_does_not_fit_and_refuses_below_the_minimum() {
        let c = cfg(4, 8);
        let w = WeightBytes {
            resident: 1000,
            attention_per_layer: 40,
            attention_per_layer_stream: 40,
            per_expert: 100,
            per_expert_stream: 100,
            experts_per_layer: 8,
            moe_layers: 4,
            expert_dtypes: [WeightDtype::Bf16; 2],
            attention_dtype: WeightDtype::Bf16,
        };
        let all = Placement::plan(&c, &w, 1000 + 160 + 50 + 3200, 50).unwrap();
        assert_eq!((all.resident_layers.len(), all.slots, all.streamed_attention.len()), (4, 0, 0));
        // Room for every layer's attention, two layers of experts (1600), two slots (200) and one more.
        let some = Placement::plan(&c, &w, 1000 + 160 + 50 + 1900, 50).unwrap();
        assert_eq!((some.resident_layers.clone(), some.slots), (vec![0, 1], 3));
        let tight = Placement::plan(&c, &w, 1000 + 160 + 50 + 200, 50).unwrap();
        assert_eq!((tight.resident_layers.len(), tight.slots, tight.streamed_attention.len()), (0, 2, 0));
        // Attention of one layer in its slot plus one more resident: layers 1..4 stream.
        let thin = Placement::plan(&c, &w, 1000 + 80 + 50 + 200, 50).unwrap();
        assert_eq!((thin.slots, thin.streamed_attention.clone()), (2, vec![1, 2, 3]));
        let least = Placement::plan(&c, &w, 1000 + 40 + 50 + 200, 50).unwrap();
        assert_eq!(least.streamed_attention, vec![0, 1, 2, 3]);
        let e = Placement::plan(&c, &w, 1000 + 40 + 50 + 199, 50).unwrap_err().to_string();
        assert!(e.contains("--gpu-memory") && e.contains("minimum") && e.contains("one layer's attention"), "{e}");
    }
}
