// dst[r * dst_stride + dst_col0 + c] = src[r * src_stride + src_col0 + c] for r < rows, c < width:
// a block of columns between row-major buffers of different widths (MLA's rope parts, which sit
// beside the latent in the cache row and beside the absorbed query in each head).
struct Params {
    rows: u32,
    width: u32,
    src_stride: u32,
    src_col0: u32,
    dst_stride: u32,
    dst_col0: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_workgroup(wg, nwg) * WG + lid;
    if i >= p.rows * p.width {
        return;
    }
    let r = i / p.width;
    let c = i % p.width;
    dst[r * p.dst_stride + p.dst_col0 + c] = src[r * p.src_stride + p.src_col0 + c];
}
