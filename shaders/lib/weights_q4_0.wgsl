// Q4_0 blocks (weights_blocks.wgsl reads their bytes).
fn load_w(i: u32) -> f32 {
    let base = (i / 32u) * 18u;
    let j = i % 32u;
    let q = (w_byte(base + 2u + j % 16u) >> ((j / 16u) * 4u)) & 0xfu;
    return f32(i32(q) - 8) * w_half(base);
}
