// Q8_0 blocks (weights_blocks.wgsl reads their bytes).
fn load_w(i: u32) -> f32 {
    let base = (i / 32u) * 34u;
    let q = w_byte(base + 2u + i % 32u);
    return f32(i32(q) - select(0, 256, q >= 128u)) * w_half(base);
}
