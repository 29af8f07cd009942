// One BM x BN output tile of x . w^T, staged through workgroup memory in steps of BK along k.
// Each of the (BM/TM) * (BN/TN) threads owns a TM x TN block of the tile.
const TX: u32 = BN / TN;
const THREADS: u32 = (BM / TM) * TX;

var<workgroup> xs: array<f32, BK * BM>;
var<workgroup> ws: array<f32, BK * BN>;

// Rows [m0, m_end) of x (row r at x[r * k]) against weight rows [n0, n0 + BN) below n, the
// weight matrix starting at element w_base. Out-of-range rows and columns read as zero.
fn mm_tile(lid: u32, m0: u32, m_end: u32, n0: u32, n: u32, k: u32, w_base: u32) -> array<array<f32, TN>, TM> {
    var acc: array<array<f32, TN>, TM>;
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
            xs[kk * BM + r] = v;
        }
        for (var e = lid; e < BK * BN; e += THREADS) {
            let c = e / BK;
            let kk = e % BK;
            var v = 0.0;
            if n0 + c < n && k0 + kk < k {
                v = load_w(w_base + (n0 + c) * k + k0 + kk);
            }
            ws[kk * BN + c] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var a: array<f32, TM>;
            var b: array<f32, TN>;
            for (var i = 0u; i < TM; i++) {
                a[i] = xs[kk * BM + ty * TM + i];
            }
            for (var j = 0u; j < TN; j++) {
                b[j] = ws[kk * BN + tx * TN + j];
            }
            for (var i = 0u; i < TM; i++) {
                for (var j = 0u; j < TN; j++) {
                    acc[i][j] = fma(a[i], b[j], acc[i][j]);
                }
            }
        }
        workgroupBarrier();
    }
    return acc;
}
