// x[i] rounded to the nearest bf16 (ties to even), kept as f32: keys and values about to be cached
// when the KV is kept in 16 bits, so the GPU cache and the host pages hold the same values.
struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<u32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_workgroup(wg, nwg) * WG + lid;
    if i >= p.n {
        return;
    }
    let bits = x[i];
    if (bits & 0x7fffffffu) > 0x7f800000u {
        x[i] = (bits | 0x400000u) & 0xffff0000u; // NaN stays NaN
        return;
    }
    x[i] = ((bits + 0x7fffu + ((bits >> 16u) & 1u)) >> 16u) << 16u;
}
