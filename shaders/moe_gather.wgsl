// xg[row, :] = x[token of row, :]: each expert's tokens become contiguous rows.
struct Params {
    n_rows: u32,
    dim: u32,
    top_k: u32,
    n_experts: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> row_assign: array<u32>;
@group(0) @binding(3) var<storage, read> offsets: array<u32>;
@group(0) @binding(4) var<storage, read_write> xg: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = flat_workgroup(wg, nwg);
    // Assignments to no expert (ids out of range) have no row: the last offset counts the real ones.
    if row >= min(p.n_rows, offsets[p.n_experts]) {
        return;
    }
    let token = row_assign[row] / p.top_k;
    for (var c = lid; c < p.dim; c += WG) {
        xg[row * p.dim + c] = x[token * p.dim + c];
    }
}
