// The same product as matmul_tiled for a few rows (decode): one thread per output column and
// block of up to TOK rows, multiply-adding along k in order. That is the tiled path's order too,
// so a row's result does not depend on how many rows share the call (or which path ran it): a
// sequence decodes to the same bits alone or in any batch.
@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let o = (wg.x + wg.y * nwg.x) * WG + lid;
    if o >= p.n {
        return;
    }
    let t0 = wg.z * TOK;
    let count = min(TOK, p.m - t0);
    var acc: array<f32, TOK>;
    let w_row = o * p.k;
    let x_base = (p.x_row0 + t0) * p.k;
    // Four weights at a time (a block format decodes its scales once for them), then the rest;
    // each row still adds its products in order along k. Rows of block formats are whole blocks,
    // so w_row + i is a multiple of 4 for them, as load_w4 needs.
    let body = p.k / 4u * 4u;
    for (var i = 0u; i < body; i += 4u) {
        let w4 = load_w4(w_row + i);
        for (var t = 0u; t < TOK; t++) {
            if t < count {
                let xi = x_base + t * p.k + i;
                var a = fma(x[xi], w4.x, acc[t]);
                a = fma(x[xi + 1u], w4.y, a);
                a = fma(x[xi + 2u], w4.z, a);
                acc[t] = fma(x[xi + 3u], w4.w, a);
            }
        }
    }
    for (var i = body; i < p.k; i++) {
        let wv = load_w(w_row + i);
        for (var t = 0u; t < TOK; t++) {
            if t < count {
                acc[t] = fma(x[x_base + t * p.k + i], wv, acc[t]);
            }
        }
    }
    for (var t = 0u; t < count; t++) {
        var v = acc[t];
        if p.has_bias == 1u {
            v += bias[p.y_col0 + o];
        }
        y[(p.y_row0 + t0 + t) * p.y_stride + p.y_col0 + o] = v;
    }
}
