//! Router: expert scores (softmax or sigmoid), top-k choice, optional renormalisation.

use crate::error::{ensure, Result};
use crate::gpu::{grid, Batch, GpuBuffer, ShaderBuilder, ShaderSource};
use crate::kernels::{need, u32_of, optional_binding, ELEMENT_WG};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterConfig {
    pub n_experts: usize,
    pub top_k: usize,
    /// Sigmoid scores (DeepSeek-V3) instead of a softmax over the experts.
    pub sigmoid: bool,
    /// Make the chosen weights sum to one (Mixtral, Qwen3-MoE: `norm_topk_prob`).
    pub renormalize: bool,
    /// Multiplies the final weights (DeepSeek's `routed_scaling_factor`; 1 elsewhere).
    pub scale: f32,
    /// Experts form `n_group` equal groups and only the best `topk_group` groups are chosen from
    /// (1 and 1: no grouping).
    pub n_group: usize,
    pub topk_group: usize,
    /// A group scores the sum of its two best keys (DeepSeek-V3) rather than its best (V2).
    pub group_by_top_two: bool,
}

impl RouterConfig {
    /// Softmax over the experts, top k, no groups.
    pub fn softmax(n_experts: usize, top_k: usize, renormalize: bool) -> Self {
        RouterConfig { n_experts, top_k, sigmoid: false, renormalize, scale: 1.0, n_group: 1, topk_group: 1, group_by_top_two: false }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    tokens: u32,
    n_experts: u32,
    top_k: u32,
    sigmoid: u32,
    renormalize: u32,
    has_bias: u32,
    scale: f32,
    n_group: u32,
    topk_group: u32,
    group_by_top_two: u32,
    _pad: [u32; 2],
}

pub fn shader() -> ShaderSource {
    ShaderBuilder::new("router").constant("WG", ELEMENT_WG).body(include_str!("../../shaders/router.wgsl"))
}

/// From `logits[tokens, n_experts]`, writes the chosen `ids[tokens, top_k]` (best first) and
/// their `weights`. `bias`, if given, is added to the scores for the choice only.
pub fn route(
    b: &mut Batch,
    cfg: &RouterConfig,
    logits: &GpuBuffer,
    bias: Option<&GpuBuffer>,
    ids: &GpuBuffer,
    weights: &GpuBuffer,
    tokens: usize,
) -> Result<()> {
    ensure!(tokens > 0, "router", "no tokens");
    ensure!(
        cfg.top_k >= 1 && cfg.top_k <= cfg.n_experts,
        "router",
        "top_k {} with {} experts",
        cfg.top_k,
        cfg.n_experts
    );
    need(logits, tokens * cfg.n_experts, "router logits")?;
    need(ids, tokens * cfg.top_k, "router ids")?;
    need(weights, tokens * cfg.top_k, "router weights")?;
    if let Some(bias) = bias {
        need(bias, cfg.n_experts, "router bias")?;
    }
    ensure!(
        cfg.n_group >= 1 && cfg.n_group <= 32 && cfg.n_experts.is_multiple_of(cfg.n_group) && cfg.topk_group >= 1 && cfg.topk_group <= cfg.n_group,
        "router",
        "{} experts in {} groups choosing {}",
        cfg.n_experts,
        cfg.n_group,
        cfg.topk_group
    );
    ensure!(cfg.topk_group * (cfg.n_experts / cfg.n_group) >= cfg.top_k, "router", "the chosen groups hold fewer than top_k experts");
    if b.on_host() {
        let (cfg, logits, bias, ids, weights) = (*cfg, logits.clone(), bias.cloned(), ids.clone(), weights.clone());
        return b.host("router", move || crate::cpu::ops::route(&cfg, &logits, bias.as_ref(), &ids, &weights, tokens));
    }
    let params = Params {
        tokens: u32_of(tokens, "router tokens")?,
        n_experts: cfg.n_experts as u32,
        top_k: cfg.top_k as u32,
        sigmoid: cfg.sigmoid as u32,
        renormalize: cfg.renormalize as u32,
        has_bias: bias.is_some() as u32,
        scale: cfg.scale,
        n_group: cfg.n_group as u32,
        topk_group: cfg.topk_group as u32,
        group_by_top_two: cfg.group_by_top_two as u32,
        _pad: [0; 2],
    };
    let ctx = b.ctx().clone();
    let pipeline = ctx.pipeline(&shader())?;
    let bias = &optional_binding(&ctx, bias)?;
    let groups = grid(&ctx, params.tokens.div_ceil(ELEMENT_WG));
    b.dispatch("router", &pipeline, &params, &[logits, bias, ids, weights], groups)
}

/// The CPU reference: (ids, weights) per token, best first, ties to the lower index.
pub fn reference(cfg: &RouterConfig, logits: &[f32], bias: Option<&[f32]>) -> (Vec<u32>, Vec<f32>) {
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    for row in logits.chunks(cfg.n_experts) {
        let scores: Vec<f64> = if cfg.sigmoid {
            row.iter().map(|&z| 1.0 / (1.0 + (-(z as f64)).exp())).collect()
        } else {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&z| (z as f64 - m).exp()).sum();
            row.iter().map(|&z| (z as f64 - m).exp() / sum).collect()
        };
        let key = |e: usize| scores[e] + bias.map_or(0.0, |b| b[e] as f64);
        let per = cfg.n_experts / cfg.n_group;
        let mut groups: Vec<(f64, usize)> = (0..cfg.n_group)
            .map(|g| {
                let mut keys: Vec<f64> = (g * per..(g + 1) * per).map(key).collect();
                keys.sort_by(|a, b| b.total_cmp(a));
                let score = if cfg.group_by_top_two { keys.iter().take(2).sum() } else { keys[0] };
                (score, g)
            })
            .collect();
        groups.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let allowed: Vec<usize> = groups[..cfg.topk_group].iter().map(|g| g.1).collect();
        let mut order: Vec<usize> = (0..cfg.n_experts).filter(|e| allowed.contains(&(e / per))).collect();
        order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
        let chosen = &order[..cfg.top_k];
        let total: f64 = chosen.iter().map(|&e| scores[e]).sum();
        for &e in chosen {
            ids.push(e as u32);
            let w = if cfg.renormalize { scores[e] / total } else { scores[e] };
            weights.push((w * cfg.scale as f64) as f32);
        }
    }
    (ids, weights)
}
