// Four Q4_0 weights from element i (a multiple of 4: one block, one half of its nibbles): the
// scale read once, each value the same product as load_w's.
fn load_w4(i: u32) -> vec4<f32> {
    let base = (i / 32u) * 18u;
    let j = i % 32u;
    let d = w_half(base);
    var v: vec4<f32>;
    for (var t = 0u; t < 4u; t++) {
        let q = (w_byte(base + 2u + (j + t) % 16u) >> ((j / 16u) * 4u)) & 0xfu;
        v[t] = f32(i32(q) - 8) * d;
    }
    return v;
}
