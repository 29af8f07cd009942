//! The MoE dispatch: count tokens per expert, prefix offsets, gather each expert's rows together,
//! run every expert's rows in one grouped matmul dispatch, and scatter-add the weighted outputs
//! back in token order.

use crate::error::{ensure, Result};
use crate::gpu::{grid, Batch, GpuBuffer, GpuWeight, KernelFeatures, ShaderBuilder, ShaderSource, WeightDtype};
use crate::kernels::elementwise::{silu, swiglu};
use crate::kernels::matmul::{tile_constants, Rows, TILE_BN};
use crate::kernels::{need, u32_of, Dims4, ROW_WG};

/// Experts one plan can count (workgroup memory holds a counter per expert).
pub const MAX_EXPERTS: usize = 512;
const PLAN_WG: u32 = 256;

/// Row tiles of the grouped matmul: small when experts see few tokens (decode), large otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupTile {
    Small,
    Large,
}

impl GroupTile {
    pub const ALL: [GroupTile; 2] = [GroupTile::Small, GroupTile::Large];

    pub fn rows(self) -> u32 {
        match self {
            GroupTile::Small => 16,
            GroupTile::Large => 64,
        }
    }

    /// The tile for `n_assign` assignments spread over `n_experts`: large tiles once the mean
    /// rows per expert pass `large_from` (the device's tuning; 32 on llvmpipe).
    pub fn for_load(n_assign: usize, n_experts: usize, large_from: u32) -> Self {
        if n_assign <= large_from as usize * n_experts {
            GroupTile::Small
        } else {
            GroupTile::Large
        }
    }
}

pub fn plan_shader() -> ShaderSource {
    ShaderBuilder::new("moe_plan")
        .constant("WG", PLAN_WG)
        .constant("MAX_EXPERTS", MAX_EXPERTS as u32)
        .body(include_str!("../../shaders/moe_plan.wgsl"))
}

pub fn gather_shader() -> ShaderSource {
    ShaderBuilder::new("moe_gather").constant("WG", ROW_WG).body(include_str!("../../shaders/moe_gather.wgsl"))
}

pub fn combine_shader() -> ShaderSource {
    ShaderBuilder::new("moe_combine").constant("WG", ROW_WG).body(include_str!("../../shaders/moe_combine.wgsl"))
}

pub fn grouped_matmul_shader(tile: GroupTile, dtype: WeightDtype, features: KernelFeatures) -> ShaderSource {
    tile_constants(ShaderBuilder::new("moe_matmul"), tile.rows())
        .weights(dtype, features)
        .body(concat!(include_str!("../../shaders/lib/matmul_tile.wgsl"), include_str!("../../shaders/moe_matmul.wgsl"), include_str!("../../shaders/lib/moe_tiles.wgsl")))
}

/// Where each (token, slot) assignment's row is, grouped by expert.
pub struct MoePlan {
    /// `[n_experts + 1]`: expert e's rows are `offsets[e]..offsets[e + 1]`.
    pub offsets: GpuBuffer,
    /// `[n_experts + 1]`: the first row tile of each expert, counted over all experts.
    pub tile_starts: GpuBuffer,
    /// `[n_assign]`: the row of each assignment (`u32::MAX` for an expert id out of range).
    pub assign_row: GpuBuffer,
    /// `[n_assign]`: the assignment each row holds.
    pub row_assign: GpuBuffer,
    pub n_assign: usize,
    pub n_experts: usize,
    pub tile: GroupTile,
}

/// Plans the dispatch of `n_assign` expert ids (`tokens * top_k`, slot-major per token).
pub fn plan(b: &mut Batch, expert_ids: &GpuBuffer, n_assign: usize, n_experts: usize, tile: GroupTile) -> Result<MoePlan> {
    ensure!(n_assign > 0, "moe plan", "no assignments");
    ensure!(
        (1..=MAX_EXPERTS).contains(&n_experts),
        "moe plan",
        "{n_experts} experts; between 1 and {MAX_EXPERTS} are supported"
    );
    need(expert_ids, n_assign, "moe expert ids")?;
    let ctx = b.ctx().clone();
    let words = |n: usize| (n as u64 * 4).max(16);
    let plan = MoePlan {
        offsets: ctx.storage("moe offsets", words(n_experts + 1))?,
        tile_starts: ctx.storage("moe tile starts", words(n_experts + 1))?,
        assign_row: ctx.storage("moe assignment rows", words(n_assign))?,
        row_assign: ctx.storage("moe row assignments", words(n_assign))?,
        n_assign,
        n_experts,
        tile,
    };
    if b.on_host() {
        let (ids, o, t, ar, ra) = (expert_ids.clone(), plan.offsets.clone(), plan.tile_starts.clone(), plan.assign_row.clone(), plan.row_assign.clone());
        let tile_rows = tile.rows() as usize;
        b.host("moe_plan", move || crate::cpu::ops::moe_plan(&ids, n_assign, n_experts, tile_rows, &o, &t, &ar, &ra))?;
        return Ok(plan);
    }
    let params = Dims4 { a: u32_of(n_assign, "moe assignments")?, b: n_experts as u32, c: tile.rows(), d: 0 };
    let pipeline = ctx.pipeline(&plan_shader())?;
    b.dispatch(
        "moe_plan",
        &pipeline,
        &params,
        &[expert_ids, &plan.offsets, &plan.tile_starts, &plan.assign_row, &plan.row_assign],
        [1, 1, 1],
    )?;
    Ok(plan)
}

/// `xg[row, :] = x[token of row, :]`, `[n_assign, dim]`.
pub fn gather(b: &mut Batch, x: &GpuBuffer, plan: &MoePlan, dim: usize, top_k: usize) -> Result<GpuBuffer> {
    ensure!(top_k > 0 && plan.n_assign.is_multiple_of(top_k), "moe gather", "{} assignments for top_k {top_k}", plan.n_assign);
    need(x, plan.n_assign / top_k * dim, "moe gather input")?;
    let ctx = b.ctx().clone();
    let xg = ctx.storage("moe gathered rows", plan.n_assign as u64 * dim as u64 * 4)?;
    if b.on_host() {
        let (x, ra, o, out) = (x.clone(), plan.row_assign.clone(), plan.offsets.clone(), xg.clone());
        let (n_experts, n_rows) = (plan.n_experts, plan.n_assign);
        b.host("moe_gather", move || crate::cpu::ops::moe_gather(&x, &ra, &o, n_experts, n_rows, dim, top_k, &out))?;
        return Ok(xg);
    }
    let params = Dims4 { a: plan.n_assign as u32, b: u32_of(dim, "moe width")?, c: top_k as u32, d: plan.n_experts as u32 };
    let pipeline = ctx.pipeline(&gather_shader())?;
    let groups = grid(&ctx, params.a);
    b.dispatch("moe_gather", &pipeline, &params, &[x, &plan.row_assign, &plan.offsets, &xg], groups)?;
    Ok(xg)
}

/// Every expert's rows of `xg` times its `[n, k]` matrix from the stacked `w` (`[n_experts * n, k]`),
/// in one dispatch per part of `w` (one in all when the stack fits a binding; parts split at expert
/// boundaries, see [`GpuWeight::stack`]). Returns `[n_assign, n]`.
pub fn grouped_matmul(b: &mut Batch, xg: &GpuBuffer, w: &GpuWeight, plan: &MoePlan) -> Result<GpuBuffer> {
    ensure!(
        w.rows.is_multiple_of(plan.n_experts),
        "grouped matmul",
        "{} weight rows do not split into {} experts",
        w.rows,
        plan.n_experts
    );
    let (n, k) = (w.rows / plan.n_experts, w.cols);
    need(xg, plan.n_assign * k, "grouped matmul input")?;
    let ctx = b.ctx().clone();
    if let Some(xq) = crate::kernels::matmul_int8::shared_inputs(b, xg, Rows::all(plan.n_assign), &[w])? {
        return crate::kernels::matmul_int8::grouped_matmul(b, &xq, w, plan);
    }
    let y = ctx.storage("grouped matmul output", plan.n_assign as u64 * n as u64 * 4)?;
    if b.on_host() {
        let (xg, w, o, out, n_experts) = (xg.clone(), w.clone(), plan.offsets.clone(), y.clone(), plan.n_experts);
        b.host("moe_matmul", move || crate::cpu::ops::grouped_matmul(&xg, &w, &o, n_experts, &out))?;
        return Ok(y);
    }
    let pipeline = ctx.pipeline(&grouped_matmul_shader(plan.tile, w.dtype, ctx.features()))?;
    for (part, first, count) in expert_parts(w, n)? {
        let params = Dims4 { a: u32_of(n, "expert width")?, b: u32_of(k, "expert inner dim")?, c: first as u32, d: count as u32 };
        let max_tiles = plan.n_assign.div_ceil(plan.tile.rows() as usize) + count;
        let groups = [params.a.div_ceil(TILE_BN), u32_of(max_tiles, "grouped matmul tiles")?, 1];
        b.dispatch("moe_matmul", &pipeline, &params, &[xg, &part.buffer, &plan.offsets, &plan.tile_starts, &y], groups)?;
    }
    Ok(y)
}

/// The parts of stacked expert weights (experts `n` rows each), each with its first expert and
/// expert count; a part that splits an expert is an error.
pub(crate) fn expert_parts(w: &GpuWeight, n: usize) -> Result<Vec<(&crate::gpu::WeightPart, usize, usize)>> {
    w.parts
        .iter()
        .map(|part| {
            ensure!(
                part.first_row % n == 0 && part.rows % n == 0,
                "grouped matmul",
                "a part of the stacked weights splits an expert (rows {}..{})",
                part.first_row,
                part.first_row + part.rows
            );
            Ok((part, part.first_row / n, part.rows / n))
        })
        .collect()
}

/// `out[t, :] += sum_j weights[t, j] * y[row of (t, j), :]`.
pub fn combine(b: &mut Batch, y: &GpuBuffer, plan: &MoePlan, weights: &GpuBuffer, top_k: usize, dim: usize, out: &GpuBuffer) -> Result<()> {
    combine_rows(b, y, &plan.assign_row, plan.n_assign, weights, top_k, dim, out)
}

/// [`combine`] with the row of each of `n_assign` assignments given (`u32::MAX`: none), so
/// that expert outputs written anywhere (module-based batching's step-wide buffer) are summed
/// in slot order exactly as the fused path sums them.
#[allow(clippy::too_many_arguments)]
pub fn combine_rows(b: &mut Batch, y: &GpuBuffer, assign_row: &GpuBuffer, n_assign: usize, weights: &GpuBuffer, top_k: usize, dim: usize, out: &GpuBuffer) -> Result<()> {
    ensure!(top_k > 0 && n_assign > 0 && n_assign.is_multiple_of(top_k), "moe combine", "{n_assign} assignments of {top_k} slots");
    let tokens = n_assign / top_k;
    need(assign_row, n_assign, "moe combine rows")?;
    need(weights, n_assign, "moe combine weights")?;
    need(out, tokens * dim, "moe combine output")?;
    if b.on_host() {
        let (y, rows, weights, out) = (y.clone(), assign_row.clone(), weights.clone(), out.clone());
        return b.host("moe_combine", move || crate::cpu::ops::combine(&y, &rows, n_assign, &weights, top_k, dim, &out));
    }
    let params = Dims4 { a: u32_of(tokens, "moe combine tokens")?, b: dim as u32, c: top_k as u32, d: 0 };
    let pipeline = b.ctx().pipeline(&combine_shader())?;
    let groups = grid(b.ctx(), params.a);
    b.dispatch("moe_combine", &pipeline, &params, &[y, assign_row, weights, out], groups)
}

/// The experts of one MoE layer, each kind stacked `[n_experts * out, in]`.
pub struct StackedExperts {
    pub gate: GpuWeight,
    pub up: GpuWeight,
    pub down: GpuWeight,
    pub n_experts: usize,
}

/// `out[t] += sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))`, e = ids[t, j]:
/// the whole routed-expert block of a layer, every expert in one grouped dispatch per matrix.
#[allow(clippy::too_many_arguments)]
pub fn expert_ffn(
    b: &mut Batch,
    x: &GpuBuffer,
    ids: &GpuBuffer,
    weights: &GpuBuffer,
    tokens: usize,
    top_k: usize,
    experts: &StackedExperts,
    out: &GpuBuffer,
) -> Result<()> {
    let n_assign = tokens * top_k;
    let dim = experts.gate.cols;
    let inter = experts.gate.rows / experts.n_experts;
    let tile = GroupTile::for_load(n_assign, experts.n_experts, b.ctx().tuned(|t| t.grouped_large_from));
    let plan = plan(b, ids, n_assign, experts.n_experts, tile)?;
    let xg = gather(b, x, &plan, dim, top_k)?;
    // With 8-bit inputs, the gate and up matmuls share one quantising of the rows.
    let (gate, up) = match crate::kernels::matmul_int8::shared_inputs(b, &xg, Rows::all(n_assign), &[&experts.gate, &experts.up])? {
        Some(xq) => (crate::kernels::matmul_int8::grouped_matmul(b, &xq, &experts.gate, &plan)?, crate::kernels::matmul_int8::grouped_matmul(b, &xq, &experts.up, &plan)?),
        None => (grouped_matmul(b, &xg, &experts.gate, &plan)?, grouped_matmul(b, &xg, &experts.up, &plan)?),
    };
    let h = b.ctx().storage("expert activations", (n_assign * inter * 4) as u64)?;
    swiglu(b, &gate, &up, &h, n_assign * inter)?;
    let y = grouped_matmul(b, &h, &experts.down, &plan)?;
    combine(b, &y, &plan, weights, top_k, dim, out)
}

/// Row offsets per expert, `[n_experts + 1]`, as the plan computes them.
pub fn offsets_reference(ids: &[u32], n_experts: usize) -> Vec<u32> {
    let mut counts = vec![0u32; n_experts];
    for &e in ids {
        if (e as usize) < n_experts {
            counts[e as usize] += 1;
        }
    }
    let mut offsets = vec![0u32; n_experts + 1];
    for e in 0..n_experts {
        offsets[e + 1] = offsets[e] + counts[e];
    }
    offsets
}

/// One expert's SwiGLU MLP on one row, f64 accumulation. `gate`/`up` are `[inter, dim]`, `down` `[dim, inter]`.
pub fn expert_reference(x: &[f32], gate: &[f32], up: &[f32], down: &[f32], inter: usize) -> Vec<f32> {
    let dim = x.len();
    let dot = |w: &[f32], v: &[f32]| w.iter().zip(v).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32;
    let h: Vec<f32> = (0..inter)
        .map(|i| silu(dot(&gate[i * dim..][..dim], x)) * dot(&up[i * dim..][..dim], x))
        .collect();
    (0..dim).map(|d| dot(&down[d * inter..][..inter], &h)).collect()
}

/// The reference for [`expert_ffn`] with stacked weight values (already rounded to their dtype).
#[allow(clippy::too_many_arguments)]
pub fn expert_ffn_reference(
    x: &[f32],
    ids: &[u32],
    weights: &[f32],
    top_k: usize,
    gate: &[f32],
    up: &[f32],
    down: &[f32],
    inter: usize,
    out: &[f32],
) -> Vec<f32> {
    let dim = out.len() / (ids.len() / top_k);
    let mut result = out.to_vec();
    for (t, row) in x.chunks(dim).enumerate() {
        for j in 0..top_k {
            let e = ids[t * top_k + j] as usize;
            let y = expert_reference(
                row,
                &gate[e * inter * dim..][..inter * dim],
                &up[e * inter * dim..][..inter * dim],
                &down[e * dim * inter..][..dim * inter],
                inter,
            );
            for d in 0..dim {
                result[t * dim + d] += weights[t * top_k + j] * y[d];
            }
        }
    }
    result
}

