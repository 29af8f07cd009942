// One BM x BN output tile of the int8 matmul, one weight sub-block (32 elements of k) per step:
// the rows' quantised inputs and the columns' decoded sub-blocks are staged in workgroup memory,
// and each of the (BM/4) * (BN/8) threads owns a 4 x 8 block, the columns of tile_col.
const TX: u32 = BN / 8u;
const THREADS: u32 = (BM / 4u) * TX;

var<workgroup> xs_q: array<vec4<u32>, 2u * BM>;
var<workgroup> xs_s: array<vec2<f32>, BM>;
var<workgroup> ws_q: array<vec4<u32>, 2u * BN>;
var<workgroup> ws_a: array<vec3<f32>, BN>;

// The tile column of element (i, j) of a thread's 4 x 8 block.
fn tile_col(tx: u32, j: u32) -> u32 {
    return select(tx * 4u + j, BN / 2u + tx * 4u + j - 4u, j >= 4u);
}

// Quantised rows [m0, m_end) (row r's sub-blocks at r * subs) against weight rows [n0, n0 + BN)
// below n, the matrix's first sub-block at w_sub0. Result [i * 8 + j]: row ty * 4 + i, column
// tile_col(tx, j). Rows and columns out of range read as zero.
fn mm_tile_i8(lid: u32, m0: u32, m_end: u32, n0: u32, n: u32, subs: u32, w_sub0: u32) -> array<f32, 32> {
    var acc: array<f32, 32>;
    let tx = lid % TX;
    let ty = lid / TX;
    for (var s = 0u; s < subs; s++) {
        for (var r = lid; r < BM; r += THREADS) {
            var lo = vec4<u32>(0u);
            var hi = vec4<u32>(0u);
            var sc = vec2<f32>(0.0);
            if m0 + r < m_end {
                let g = (m0 + r) * subs + s;
                lo = xq[2u * g];
                hi = xq[2u * g + 1u];
                sc = xs[g];
            }
            xs_q[2u * r] = lo;
            xs_q[2u * r + 1u] = hi;
            xs_s[r] = sc;
        }
        for (var c = lid; c < BN; c += THREADS) {
            var wq = WSub(vec4<u32>(0u), vec4<u32>(0u), vec3<f32>(0.0));
            if n0 + c < n {
                wq = load_wsub(w_sub0 + (n0 + c) * subs + s);
            }
            ws_q[2u * c] = wq.lo;
            ws_q[2u * c + 1u] = wq.hi;
            ws_a[c] = wq.a;
        }
        workgroupBarrier();
        for (var i = 0u; i < 4u; i++) {
            let r = ty * 4u + i;
            let x_lo = xs_q[2u * r];
            let x_hi = xs_q[2u * r + 1u];
            let x_s = xs_s[r];
            for (var j = 0u; j < 8u; j++) {
                let c = tile_col(tx, j);
                acc[i * 8u + j] = sub_product(acc[i * 8u + j], WSub(ws_q[2u * c], ws_q[2u * c + 1u], ws_a[c]), x_lo, x_hi, x_s);
            }
        }
        workgroupBarrier();
    }
    return acc;
}
