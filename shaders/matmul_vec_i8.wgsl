// The int8 matmul for a few rows (decode): one thread per output column and block of up to TOK
// rows; each weight sub-block is decoded once for the rows.
@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let o = (wg.x + wg.y * nwg.x) * WG + lid;
    if o >= p.n {
        return;
    }
    let t0 = wg.z * TOK;
    let count = min(TOK, p.m - t0);
    let subs = p.k / 32u;
    var acc: array<f32, TOK>;
    for (var s = 0u; s < subs; s++) {
        let wq = load_wsub(o * subs + s);
        for (var t = 0u; t < TOK; t++) {
            if t < count {
                let g = (t0 + t) * subs + s;
                acc[t] = sub_product(acc[t], wq, xq[2u * g], xq[2u * g + 1u], xs[g]);
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
