// Four Q6_K weights from element i (a multiple of 4: one quarter of 32, one 16-wide scale): the
// scale decoded once; each value is load_w's product.
fn load_w4(i: u32) -> vec4<f32> {
    let base = (i / 256u) * 210u;
    let j = i % 256u;
    let scale = q6_k_scale(base, j);
    var v: vec4<f32>;
    for (var t = 0u; t < 4u; t++) {
        v[t] = scale * f32(q6_k_q(base, j + t));
    }
    return v;
}
