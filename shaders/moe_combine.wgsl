// out[t, :] += sum_j weights[t, j] * y[row of (t, j), :]: expert outputs back in token order,
// summed in slot order so the result is deterministic.
struct Params {
    tokens: u32,
    dim: u32,
    top_k: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> y: array<f32>;
@group(0) @binding(2) var<storage, read> assign_row: array<u32>;
@group(0) @binding(3) var<storage, read> weights: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = flat_workgroup(wg, nwg);
    if t >= p.tokens {
        return;
    }
    for (var c = lid; c < p.dim; c += WG) {
        var s = out[t * p.dim + c];
        for (var j = 0u; j < p.top_k; j++) {
            let a = t * p.top_k + j;
            let row = assign_row[a];
            if row != 0xffffffffu {
                s = fma(weights[a], y[row * p.dim + c], s);
            }
        }
        out[t * p.dim + c] = s;
    }
}
