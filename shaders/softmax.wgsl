// y[r, :] = softmax(x[r, :]), one workgroup per row, max-subtracted.
struct Params {
    rows: u32,
    dim: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, lane: Lane) {
    let row = flat_workgroup(wg, nwg);
    if row >= p.rows {
        return;
    }
    let base = row * p.dim;
    var m = -3.4028235e38;
    for (var c = lane.id; c < p.dim; c += WG) {
        m = max(m, x[base + c]);
    }
    let row_max = wg_max(m, lane);
    var s = 0.0;
    for (var c = lane.id; c < p.dim; c += WG) {
        s += exp(x[base + c] - row_max);
    }
    let inv = 1.0 / wg_sum(s, lane);
    for (var c = lane.id; c < p.dim; c += WG) {
        y[base + c] = exp(x[base + c] - row_max) * inv;
    }
}
