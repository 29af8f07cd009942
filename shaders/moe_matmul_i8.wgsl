// The grouped expert matmul (moe_matmul.wgsl) on 8-bit inputs: every expert's quantised rows in
// one dispatch, the tiles of lib/matmul_tile_i8.wgsl, so a row gets the bits matmul_rows' int8
// paths give it.
struct Params {
    n: u32,
    k: u32,
    first: u32,
    count: u32,
    // Always 0 (see kept).
    zero: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xq: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> xs: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> w: array<WStore>;
@group(0) @binding(4) var<storage, read> offsets: array<u32>;
@group(0) @binding(5) var<storage, read> tile_starts: array<u32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(THREADS)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let tile = tile_starts[p.first] + wg.y;
    if tile >= tile_starts[p.first + p.count] {
        return;
    }
    let e = tile_expert(tile, p.first, p.count);
    let m0 = offsets[e] + (tile - tile_starts[e]) * BM;
    let m_end = offsets[e + 1u];
    let n0 = wg.x * BN;
    let subs = p.k / 32u;
    let acc = mm_tile_i8(lid, m0, m_end, n0, p.n, subs, (e - p.first) * p.n * subs);
    let tx = lid % TX;
    let ty = lid / TX;
    for (var i = 0u; i < 4u; i++) {
        let row = m0 + ty * 4u + i;
        if row >= m_end {
            break;
        }
        for (var j = 0u; j < 8u; j++) {
            let col = n0 + tile_col(tx, j);
            if col < p.n {
                y[row * p.n + col] = acc[i * 8u + j];
            }
        }
    }
}
