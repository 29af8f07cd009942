// Q8_0 blocks (weights_blocks.wgsl reads their bytes).
// The signed byte at b, as f32.
fn q8_0_q(b: u32) -> f32 {
    let q = w_byte(b);
    return f32(i32(q) - select(0, 256, q >= 128u));
}
fn load_w(i: u32) -> f32 {
    let base = (i / 32u) * 34u;
    return q8_0_q(base + 2u + i % 32u) * w_half(base);
}
