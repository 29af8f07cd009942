// Four Q4_K weights from element i (a multiple of 4: one sub-block of 32). The sub-block's scale
// and min are decoded once and its four nibbles come in one aligned word (blocks are 144 bytes,
// the nibbles at 16 + 32c + j % 32); each value is the same expression as load_w's.
fn load_w4(i: u32) -> vec4<f32> {
    let base = (i / 256u) * 144u;
    let j = i % 256u;
    let c = j / 64u;
    let hi = (j % 64u) / 32u;
    let word = w[(base + 16u + c * 32u + j % 32u) >> 2u];
    let sm = w_scale_min_k4(2u * c + hi, base + 4u);
    let scale = w_half(base) * f32(sm.x);
    let min = w_half(base + 2u) * f32(sm.y);
    var v: vec4<f32>;
    for (var t = 0u; t < 4u; t++) {
        let q = (word >> (8u * t + hi * 4u)) & 0xfu;
        v[t] = scale * f32(q) - min;
    }
    return v;
}
