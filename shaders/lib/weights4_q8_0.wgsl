// Four Q8_0 weights from element i (a multiple of 4, so all in one block): the block's scale
// read once, each value load_w's product.
fn load_w4(i: u32) -> vec4<f32> {
    let base = (i / 32u) * 34u;
    let d = w_half(base);
    let at = base + 2u + i % 32u;
    return vec4<f32>(q8_0_q(at) * d, q8_0_q(at + 1u) * d, q8_0_q(at + 2u) * d, q8_0_q(at + 3u) * d);
}
