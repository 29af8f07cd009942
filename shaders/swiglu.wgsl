// out[i] = silu(gate[i]) * up[i] for i in [offset, offset + n): the gated activation of
// Mixtral/Qwen/OLMoE/DeepSeek experts (a range, for one streamed expert's rows).
struct Params {
    n: u32,
    offset: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = p.offset + flat_workgroup(wg, nwg) * WG + lid;
    if i < p.offset + p.n {
        let g = gate[i];
        out[i] = g / (1.0 + exp(-g)) * up[i];
    }
}
