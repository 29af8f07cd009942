// ids[r] = the index of the largest x[r, :] (the lowest such index on ties; NaN never wins).
struct Params {
    rows: u32,
    dim: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, lane: Lane) {
    let row = flat_workgroup(wg, nwg);
    if row >= p.rows {
        return;
    }
    let base = row * p.dim;
    var best = -3.4028235e38;
    var best_i = 0xffffffffu;
    for (var c = lane.id; c < p.dim; c += WG) {
        let v = x[base + c];
        // Ascending c: only a strictly larger value replaces, so the lowest index wins ties.
        if v > best || (best_i == 0xffffffffu && v == best) {
            best = v;
            best_i = c;
        }
    }
    let row_best = wg_max(best, lane);
    let candidate = select(0xffffffffu, best_i, best == row_best);
    let winner = wg_min_u32(candidate, lane);
    if lane.id == 0u {
        ids[row] = select(winner, 0u, winner == 0xffffffffu);
    }
}
