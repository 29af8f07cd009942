// Four Q6_K weights from element i (a multiple of 4: one quarter of 32, one 16-wide scale): the
// scale decoded once; each value the same product as load_w's.
fn load_w4(i: u32) -> vec4<f32> {
    let base = (i / 256u) * 210u;
    let j = i % 256u;
    let n = j / 128u;
    let quarter = (j % 128u) / 32u;
    let s = w_byte(base + 192u + 8u * n + (j % 32u) / 16u + 2u * quarter);
    let scale = w_half(base + 208u) * f32(i32(s) - select(0, 256, s >= 128u));
    var v: vec4<f32>;
    for (var t = 0u; t < 4u; t++) {
        let l = (j + t) % 32u;
        let low = (w_byte(base + 64u * n + l + 32u * (quarter % 2u)) >> (4u * (quarter / 2u))) & 0xfu;
        let high = (w_byte(base + 128u + 32u * n + l) >> (2u * quarter)) & 3u;
        v[t] = scale * f32(i32(low | (high << 4u)) - 32);
    }
    return v;
}
