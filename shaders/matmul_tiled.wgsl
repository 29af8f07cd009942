// y[y_row0 + r, y_col0 + c] = sum_i x[x_row0 + r, i] * w[c, i] (+ bias[y_col0 + c]), for many rows:
// tiles of BM rows x BN columns. w is one part of a [out, in] weight, its rows landing at y_col0.
@compute @workgroup_size(THREADS)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n0 = wg.x * BN;
    let m0 = p.x_row0 + wg.y * BM;
    let m_end = p.x_row0 + p.m;
    var acc = mm_tile(lid, m0, m_end, n0, p.n, p.k, 0u);
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
                var v = acc[i + 4u * (j / 4u)][j % 4u];
                if p.has_bias == 1u {
                    v += bias[p.y_col0 + col];
                }
                y[(row - p.x_row0 + p.y_row0) * p.y_stride + p.y_col0 + col] = v;
            }
        }
    }
}
