// Q4_0 blocks (weights_blocks.wgsl reads their bytes).
// Element j's value of the block at byte base, less 8, as f32.
fn q4_0_q(base: u32, j: u32) -> f32 {
    let q = (w_byte(base + 2u + j % 16u) >> ((j / 16u) * 4u)) & 0xfu;
    return f32(i32(q) - 8);
}
fn load_w(i: u32) -> f32 {
    let base = (i / 32u) * 18u;
    return q4_0_q(base, i % 32u) * w_half(base);
}
