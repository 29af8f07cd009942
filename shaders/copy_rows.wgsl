// dst[dst_rows[i], :] = src[src_rows[i], :] for i < n: appends new keys and values to their
// sequences' cache rows, and picks the rows that need logits. An index list may be the identity.
struct Params {
    n: u32,
    dim: u32,
    src_identity: u32,
    dst_identity: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> src_rows: array<u32>;
@group(0) @binding(3) var<storage, read> dst_rows: array<u32>;
@group(0) @binding(4) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_workgroup(wg, nwg);
    if i >= p.n {
        return;
    }
    let s = select(src_rows[i], i, p.src_identity == 1u);
    let d = select(dst_rows[i], i, p.dst_identity == 1u);
    for (var c = lid; c < p.dim; c += WG) {
        dst[d * p.dim + c] = src[s * p.dim + c];
    }
}
