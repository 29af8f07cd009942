// Four Q4_0 weights from element i (a multiple of 4: one block, one half of its nibbles): the
// scale read once, each value load_w's product.
fn load_w4(i: u32) -> vec4<f32> {
    let base = (i / 32u) * 18u;
    let j = i % 32u;
    let d = w_half(base);
    return vec4<f32>(q4_0_q(base, j) * d, q4_0_q(base, j + 1u) * d, q4_0_q(base, j + 2u) * d, q4_0_q(base, j + 3u) * d);
}
