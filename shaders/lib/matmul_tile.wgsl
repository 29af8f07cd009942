// One BM x BN output tile of x . w^T, staged through workgroup memory in steps of BK along k.
// Each of the (BM/4) * (BN/4) threads owns a 4 x 4 block of the tile, kept as four vec4 rows so
// the inner step is four vector multiply-adds (no per-lane arrays indexed in loops).
const TX: u32 = BN / 4u;
const THREADS: u32 = (BM / 4u) * TX;

// xs[kk][r / 4][r % 4] = x[m0 + r, k0 + kk]; ws[kk][c / 4][c % 4] = w[n0 + c, k0 + kk].
var<workgroup> xs: array<vec4<f32>, BK * BM / 4u>;
var<workgroup> ws: array<vec4<f32>, BK * BN / 4u>;

// Rows [m0, m_end) of x (row r at x[r * k]) against weight rows [n0, n0 + BN) below n, the
// weight matrix starting at element w_base. Out-of-range rows and columns read as zero.
// Row i of the result is the thread's row ty * 4 + i, columns tx * 4 .. tx * 4 + 3.
fn mm_tile(lid: u32, m0: u32, m_end: u32, n0: u32, n: u32, k: u32, w_base: u32) -> array<vec4<f32>, 4> {
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
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
            let b = ws[kk * (BN / 4u) + tx];
            acc0 = fma(vec4<f32>(a.x), b, acc0);
            acc1 = fma(vec4<f32>(a.y), b, acc1);
            acc2 = fma(vec4<f32>(a.z), b, acc2);
            acc3 = fma(vec4<f32>(a.w), b, acc3);
        }
        workgroupBarrier();
    }
    return array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
}
