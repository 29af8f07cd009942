// Q6_K blocks (weights_blocks.wgsl reads their bytes).
fn load_w(i: u32) -> f32 {
    let base = (i / 256u) * 210u;
    let j = i % 256u;
    let n = j / 128u;
    let quarter = (j % 128u) / 32u;
    let l = j % 32u;
    let low = (w_byte(base + 64u * n + l + 32u * (quarter % 2u)) >> (4u * (quarter / 2u))) & 0xfu;
    let high = (w_byte(base + 128u + 32u * n + l) >> (2u * quarter)) & 3u;
    let q = i32(low | (high << 4u)) - 32;
    let s = w_byte(base + 192u + 8u * n + l / 16u + 2u * quarter);
    return (w_half(base + 208u) * f32(i32(s) - select(0, 256, s >= 128u))) * f32(q);
}
