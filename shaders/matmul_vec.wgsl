// The same product as matmul_tiled for a few rows (decode). A workgroup computes ROWS output
// columns for a block of up to TOK rows: LANES threads per column split the k dimension (adjacent
// threads read adjacent weights), then one pass through workgroup memory sums their partials.
const LANES: u32 = WG / ROWS;

var<workgroup> partial: array<f32, TOK * WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = lid / LANES;
    let lane = lid % LANES;
    let o = (wg.x + wg.y * nwg.x) * ROWS + r;
    let t0 = wg.z * TOK;
    let count = min(TOK, p.m - t0);
    var acc: array<f32, TOK>;
    if o < p.n {
        let w_row = o * p.k;
        let x_base = (p.x_row0 + t0) * p.k;
        for (var i = lane; i < p.k; i += LANES) {
            let wv = load_w(w_row + i);
            for (var t = 0u; t < TOK; t++) {
                if t < count {
                    acc[t] = fma(wv, x[x_base + t * p.k + i], acc[t]);
                }
            }
        }
    }
    for (var t = 0u; t < TOK; t++) {
        partial[t * WG + lid] = acc[t];
    }
    workgroupBarrier();
    if lid < ROWS * TOK {
        let t = lid / ROWS;
        let row = lid % ROWS;
        let out_col = (wg.x + wg.y * nwg.x) * ROWS + row;
        if t < count && out_col < p.n {
            var s = 0.0;
            for (var l = 0u; l < LANES; l++) {
                s += partial[t * WG + row * LANES + l];
            }
            if p.has_bias == 1u {
                s += bias[p.y_col0 + out_col];
            }
            y[(p.y_row0 + t0 + t) * p.y_stride + p.y_col0 + out_col] = s;
        }
    }
}
