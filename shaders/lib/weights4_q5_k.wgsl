// Four Q5_K weights from element i (a multiple of 4: one sub-block of 32): its scale and min
// decoded once; each value is load_w's expression.
fn load_w4(i: u32) -> vec4<f32> {
    let base = (i / 256u) * 176u;
    let j = i % 256u;
    let sm = q5_k_scale_min(base, j);
    var v: vec4<f32>;
    for (var t = 0u; t < 4u; t++) {
        v[t] = sm.x * f32(q5_k_q(base, j + t)) - sm.y;
    }
    return v;
}
