// The grouped expert matmul: every expert's rows in one dispatch. Rows of expert e are
// [offsets[e], offsets[e+1]) of x; its weight is the e-th [n, k] matrix of the stacked w. Workgroup
// (x, y) computes column tile x of the y-th row tile counted over the experts of this dispatch:
// experts [first, first + count), whose weights the bound part of w holds (a weight too large for
// one binding is split at expert boundaries, one dispatch per part).
struct Params {
    n: u32,
    k: u32,
    first: u32,
    count: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<WStore>;
@group(0) @binding(3) var<storage, read> offsets: array<u32>;
@group(0) @binding(4) var<storage, read> tile_starts: array<u32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

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
    var acc = mm_tile(lid, m0, m_end, n0, p.n, p.k, (e - p.first) * p.n * p.k);
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
                y[row * p.n + col] = acc[i + 4u * (j / 4u)][j % 4u];
            }
        }
    }
}
