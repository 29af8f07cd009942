// Q6_K blocks (weights_blocks.wgsl reads their bytes).
// Element j's 16-wide scale of the block at byte base, times the block's f16 scale.
fn q6_k_scale(base: u32, j: u32) -> f32 {
    let s = w_byte(base + 192u + 8u * (j / 128u) + (j % 32u) / 16u + 2u * ((j % 128u) / 32u));
    return w_half(base + 208u) * f32(i32(s) - select(0, 256, s >= 128u));
}
// Element j's 6-bit value, less 32.
fn q6_k_q(base: u32, j: u32) -> i32 {
    let n = j / 128u;
    let quarter = (j % 128u) / 32u;
    let l = j % 32u;
    let low = (w_byte(base + 64u * n + l + 32u * (quarter % 2u)) >> (4u * (quarter / 2u))) & 0xfu;
    let high = (w_byte(base + 128u + 32u * n + l) >> (2u * quarter)) & 3u;
    return i32(low | (high << 4u)) - 32;
}
fn load_w(i: u32) -> f32 {
    let base = (i / 256u) * 210u;
    let j = i % 256u;
    return q6_k_scale(base, j) * f32(q6_k_q(base, j));
}
