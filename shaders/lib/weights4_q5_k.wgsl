// Four Q5_K weights from element i (a multiple of 4: one sub-block of 32): its scale, min and
// high-bit plane position decoded once; each value the same expression as load_w's.
fn load_w4(i: u32) -> vec4<f32> {
    let base = (i / 256u) * 176u;
    let j = i % 256u;
    let c = j / 64u;
    let hi = (j % 64u) / 32u;
    let sub = 2u * c + hi;
    let sm = w_scale_min_k4(sub, base + 4u);
    let scale = w_half(base) * f32(sm.x);
    let min = w_half(base + 2u) * f32(sm.y);
    var v: vec4<f32>;
    for (var t = 0u; t < 4u; t++) {
        let l = (j + t) % 32u;
        let low = (w_byte(base + 48u + c * 32u + l) >> (hi * 4u)) & 0xfu;
        let q = low + ((w_byte(base + 16u + l) >> sub) & 1u) * 16u;
        v[t] = scale * f32(q) - min;
    }
    return v;
}
