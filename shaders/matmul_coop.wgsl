// y[y_row0 + r, y_col0 + c] = sum_i x[x_row0 + r, i] * w[c, i] (+ bias[y_col0 + c]) through
// cooperative matrices. A workgroup is one subgroup (SG invocations) and computes a BM x BN block
// as 2 x 2 tiles of S x S: each step stages BK columns of x's rows and of w's rows in workgroup
// memory, rounded to AB (f16 or f32), then multiply-adds the tiles into f32 accumulators. The
// accumulators go out through workgroup memory, so partial blocks at the edges are cut there.
// The helpers (tile_begin, tile_a, tile_b, tile_mma, tile_store, tile_zero) are the cooperative-matrix
// built-ins, or their emulation (src/kernels/matmul.rs).
var<workgroup> xs: array<AB, BM * BK>;
var<workgroup> ws: array<AB, BN * BK>;
var<workgroup> cs: array<f32, BM * BN>;

@compute @workgroup_size(SG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n0 = wg.x * BN;
    let m0 = p.x_row0 + wg.y * BM;
    let m_end = p.x_row0 + p.m;
    tile_begin(lid);
    var c00 = tile_zero();
    var c01 = tile_zero();
    var c10 = tile_zero();
    var c11 = tile_zero();
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // xs[r * BK + kk] = x[m0 + r, k0 + kk]: A's rows, row-major.
        for (var e = lid; e < BM * BK; e += SG) {
            let r = e / BK;
            let kk = e % BK;
            var v = 0.0;
            if m0 + r < m_end && k0 + kk < p.k {
                v = x[(m0 + r) * p.k + k0 + kk];
            }
            xs[e] = AB(v);
        }
        // ws[c * BK + kk] = w[n0 + c, k0 + kk]: B (k x n) column-major.
        for (var e = lid; e < BN * BK; e += SG) {
            let c = e / BK;
            let kk = e % BK;
            var v = 0.0;
            if n0 + c < p.n && k0 + kk < p.k {
                v = load_w((n0 + c) * p.k + k0 + kk);
            }
            ws[e] = AB(v);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += S) {
            let a0 = tile_a(kk);
            let a1 = tile_a(S * BK + kk);
            let b0 = tile_b(kk);
            let b1 = tile_b(S * BK + kk);
            c00 = tile_mma(a0, b0, c00);
            c01 = tile_mma(a0, b1, c01);
            c10 = tile_mma(a1, b0, c10);
            c11 = tile_mma(a1, b1, c11);
        }
        workgroupBarrier();
    }
    tile_store(c00, 0u, lid);
    tile_store(c01, S, lid);
    tile_store(c10, S * BN, lid);
    tile_store(c11, S * BN + S, lid);
    workgroupBarrier();
    for (var e = lid; e < BM * BN; e += SG) {
        let row = m0 + e / BN;
        let col = n0 + e % BN;
        if row < m_end && col < p.n {
            var v = cs[e];
            if p.has_bias == 1u {
                v += bias[p.y_col0 + col];
            }
            y[(row - p.x_row0 + p.y_row0) * p.y_stride + p.y_col0 + col] = v;
        }
    }
}
