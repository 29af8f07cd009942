// The same product as matmul_tiled for a few rows (decode): one workgroup per output column and
// block of TOK rows; the threads split the k dimension and reduce.
@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, lane: Lane) {
    let o = wg.x + wg.y * nwg.x;
    if o >= p.n {
        return;
    }
    let t0 = wg.z * TOK;
    let count = min(TOK, p.m - t0);
    var acc: array<f32, TOK>;
    let w_row = o * p.k;
    let x_base = (p.x_row0 + t0) * p.k;
    for (var i = lane.id; i < p.k; i += WG) {
        let wv = load_w(w_row + i);
        for (var t = 0u; t < TOK; t++) {
            if t < count {
                acc[t] = fma(wv, x[x_base + t * p.k + i], acc[t]);
            }
        }
    }
    for (var t = 0u; t < TOK; t++) {
        let s = wg_sum(acc[t], lane);
        if lane.id == 0u && t < count {
            var v = s;
            if p.has_bias == 1u {
                v += bias[p.y_col0 + o];
            }
            y[(p.y_row0 + t0 + t) * p.y_stride + p.y_col0 + o] = v;
        }
    }
}
