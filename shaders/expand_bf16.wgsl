// dst[i] = the bf16 value i of src (two to a u32, the lower half first) as f32: KV pages sent over
// the link in 16 bits, widened for the attention kernel.
struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_workgroup(wg, nwg) * WG + lid;
    if i >= p.n {
        return;
    }
    let word = src[i / 2u];
    dst[i] = bitcast<f32>(select(word << 16u, word & 0xffff0000u, (i & 1u) == 1u));
}
