// A matmul per attention head: y[t, h, :] = W_h x[t, h, :] for W = [heads * out, in] (head h's
// rows h*out..), x and y heads laid out at strides, so MLA's absorbed projections read a head's
// slice of the queries and write theirs beside the rope part without copies. One thread per
// output column and TOK tokens, multiply-adding along `in` in order, like matmul_vec.
struct Params {
    tokens: u32,
    heads: u32,
    out_dim: u32,
    in_dim: u32,
    x_stride: u32,
    x_head_stride: u32,
    x_col0: u32,
    y_stride: u32,
    y_head_stride: u32,
    y_col0: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<WStore>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let o = wg.x * WG + lid;
    let h = wg.y;
    if o >= p.out_dim {
        return;
    }
    let t0 = wg.z * TOK;
    let count = min(TOK, p.tokens - t0);
    var acc: array<f32, TOK>;
    let w_row = (h * p.out_dim + o) * p.in_dim;
    let x_base = t0 * p.x_stride + h * p.x_head_stride + p.x_col0;
    for (var i = 0u; i < p.in_dim; i++) {
        let wv = load_w(w_row + i);
        for (var t = 0u; t < TOK; t++) {
            if t < count {
                acc[t] = fma(x[x_base + t * p.x_stride + i], wv, acc[t]);
            }
        }
    }
    for (var t = 0u; t < count; t++) {
        y[(t0 + t) * p.y_stride + h * p.y_head_stride + p.y_col0 + o] = acc[t];
    }
}
