// out[t, :] = table[ids[t], :] for the ids that fall in this part's rows [first_row, first_row + rows).
struct Params {
    n_tokens: u32,
    dim: u32,
    first_row: u32,
    rows: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<WStore>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = flat_workgroup(wg, nwg);
    if t >= p.n_tokens {
        return;
    }
    let id = ids[t];
    if id < p.first_row || id - p.first_row >= p.rows {
        return;
    }
    let src = (id - p.first_row) * p.dim;
    for (var c = lid; c < p.dim; c += WG) {
        out[t * p.dim + c] = load_w(src + c);
    }
}
