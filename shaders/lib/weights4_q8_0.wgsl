// Four Q8_0 weights from element i (a multiple of 4, so all in one block): the block's scale
// read once, each value the same product as load_w's.
fn load_w4(i: u32) -> vec4<f32> {
    let base = (i / 32u) * 34u;
    let d = w_half(base);
    let at = base + 2u + i % 32u;
    var v: vec4<f32>;
    for (var t = 0u; t < 4u; t++) {
        let q = w_byte(at + t);
        v[t] = f32(i32(q) - select(0, 256, q >= 128u)) * d;
    }
    return v;
}
