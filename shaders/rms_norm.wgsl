// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * gamma, one workgroup per row of dim values
// (rows stride apart). Per-head norms are the same with one row per (token, head).
struct Params {
    rows: u32,
    dim: u32,
    eps: f32,
    stride: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, lane: Lane) {
    let row = flat_workgroup(wg, nwg);
    if row >= p.rows {
        return;
    }
    let base = row * p.stride;
    var sum_sq = 0.0;
    for (var c = lane.id; c < p.dim; c += WG) {
        let v = x[base + c];
        sum_sq = fma(v, v, sum_sq);
    }
    let total = wg_sum(sum_sq, lane);
    let scale = inverseSqrt(total / f32(p.dim) + p.eps);
    for (var c = lane.id; c < p.dim; c += WG) {
        y[base + c] = x[base + c] * scale * gamma[c];
    }
}
