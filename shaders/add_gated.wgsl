// acc[t, :] += sigmoid(gate[t]) * x[t, :]: Qwen2-MoE's shared expert, scaled by its own gate.
struct Params {
    tokens: u32,
    dim: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> acc: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> gate: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = flat_workgroup(wg, nwg);
    if t >= p.tokens {
        return;
    }
    let g = 1.0 / (1.0 + exp(-gate[t]));
    for (var c = lid; c < p.dim; c += WG) {
        acc[t * p.dim + c] = fma(g, x[t * p.dim + c], acc[t * p.dim + c]);
    }
}
