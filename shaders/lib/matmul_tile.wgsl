// One BM x BN output tile of x . w^T, staged through workgroup memory in steps of BK along k.
// Each of the (BM/4) * (BN/8) threads owns a 4 x 8 block of the tile, kept as eight vec4
// accumulators (4 rows x 2 column quads) so the inner step is eight vector multiply-adds per two
// vector loads of w and one of x, with no per-lane arrays indexed in loops.
const TX: u32 = BN / 8u;
const THREADS: u32 = (BM / 4u) * TX;

// xs[kk][r / 4][r % 4] = x[m0 + r, k0 + kk]; ws[kk][c / 4][c % 4] = w[n0 + c, k0 + kk].
var<workgroup> xs: array<vec4<f32>, BK * BM / 4u>;
var<workgroup> ws: array<vec4<f32>, BK * BN / 4u>;

// Rows [m0, m_end) of x (row r at x[r * k]) against weight rows [n0, n0 + BN) below n, the
// weight matrix starting at element w_base. Out-of-range rows and columns read as zero.
// Result [i] (i < 4) holds row ty * 4 + i, columns tx * 4 .. tx * 4 + 3; [4 + i] the same row,
// columns BN / 2 + tx * 4 .. + 3.
fn mm_tile(lid: u32, m0: u32, m_end: u32, n0: u32, n: u32, k: u32, w_base: u32) -> array<vec4<f32>, 8> {
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    var b0 = vec4<f32>(0.0);
    var b1 = vec4<f32>(0.0);
    var b2 = vec4<f32>(0.0);
    var b3 = vec4<f32>(0.0);
    let tx = lid % TX;
    let ty = lid / TX;
    for (var k0 = 0u; k0 < k; k0 += BK) {
        for (var e = lid; e < BK * BM; e += THREADS) {
            let r = e / BK;
            let kk = e % BK;
            var v = 0.0;
            if m0 + r < m_end && k0 + kk < k {
                v = x[(m0 + r) * k + k0 + kk];
            }
            xs[kk * (BM / 4u) + r / 4u][r % 4u] = v;
        }
        for (var e = lid; e < BK * BN; e += THREADS) {
            let c = e / BK;
            let kk = e % BK;
            var v = 0.0;
            if n0 + c < n && k0 + kk < k {
                v = load_w(w_base + (n0 + c) * k + k0 + kk);
            }
            ws[kk * (BN / 4u) + c / 4u][c % 4u] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let a = xs[kk * (BM / 4u) + ty];
            let lo = ws[kk * (BN / 4u) + tx];
            let hi = ws[kk * (BN / 4u) + TX + tx];
            a0 = fma(vec4<f32>(a.x), lo, a0);
            a1 = fma(vec4<f32>(a.y), lo, a1);
            a2 = fma(vec4<f32>(a.z), lo, a2);
            a3 = fma(vec4<f32>(a.w), lo, a3);
            b0 = fma(vec4<f32>(a.x), hi, b0);
            b1 = fma(vec4<f32>(a.y), hi, b1);
            b2 = fma(vec4<f32>(a.z), hi, b2);
            b3 = fma(vec4<f32>(a.w), hi, b3);
        }
        workgroupBarrier();
    }
    return array<vec4<f32>, 8>(a0, a1, a2, a3, b0, b1, b2, b3);
}

// The tile column of element (i, j) of a thread's 4 x 8 block.
fn tile_col(tx: u32, j: u32) -> u32 {
    return select(tx * 4u + j, BN / 2u + tx * 4u + j - 4u, j >= 4u);
}
