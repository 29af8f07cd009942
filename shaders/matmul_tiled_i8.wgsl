// The int8 matmul for many rows: BM x BN tiles (lib/matmul_tile_i8.wgsl).
@compute @workgroup_size(THREADS)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m0 = wg.y * BM;
    let n0 = wg.x * BN;
    let acc = mm_tile_i8(lid, m0, p.m, n0, p.n, p.k / 32u, 0u);
    let tx = lid % TX;
    let ty = lid / TX;
    for (var i = 0u; i < 4u; i++) {
        let row = m0 + ty * 4u + i;
        if row >= p.m {
            break;
        }
        for (var j = 0u; j < 8u; j++) {
            let col = n0 + tile_col(tx, j);
            if col < p.n {
                var v = acc[i * 8u + j];
                if p.has_bias == 1u {
                    v += bias[p.y_col0 + col];
                }
                y[(p.y_row0 + row) * p.y_stride + p.y_col0 + col] = v;
            }
        }
    }
}
