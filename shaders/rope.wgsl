// Rotary position embedding in place on x[token, head, :], dims offset..offset + rot_dim of each head.
// cos_sin[pos * rot_dim / 2 + i] holds (cos, sin) of position pos for pair i, built on the host
// with the model's frequencies and scaling, so any rope variant uses the same kernel.
// Pairs are (i, i + rot_dim/2) in the half-split (neox) layout, (2i, 2i+1) interleaved.
struct Params {
    tokens: u32,
    heads: u32,
    head_dim: u32,
    rot_dim: u32,
    interleaved: u32,
    table_rows: u32,
    offset: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read> cos_sin: array<vec2<f32>>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let half_rot = p.rot_dim / 2u;
    let idx = flat_workgroup(wg, nwg) * WG + lid;
    if idx >= p.tokens * p.heads * half_rot {
        return;
    }
    let i = idx % half_rot;
    let th = idx / half_rot;
    let t = th / p.heads;
    let base = th * p.head_dim + p.offset;
    let pos = positions[t];
    var a = base + i;
    var b = base + i + half_rot;
    if p.interleaved == 1u {
        a = base + 2u * i;
        b = a + 1u;
    }
    if pos >= p.table_rows {
        // A position past the table is a scheduler bug: make it visible, not plausible.
        x[a] = bitcast<f32>(0x7fc00000u);
        x[b] = bitcast<f32>(0x7fc00000u);
        return;
    }
    let cs = cos_sin[pos * half_rot + i];
    let x1 = x[a];
    let x2 = x[b];
    x[a] = x1 * cs.x - x2 * cs.y;
    x[b] = x2 * cs.x + x1 * cs.y;
}
