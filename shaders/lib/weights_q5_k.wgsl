// Q5_K blocks (weights_blocks.wgsl reads their bytes).
// Element j's sub-block scale (x) and min (y) of the block at byte base, as f32 products.
fn q5_k_scale_min(base: u32, j: u32) -> vec2<f32> {
    let sm = w_scale_min_k4(2u * (j / 64u) + (j % 64u) / 32u, base + 4u);
    return vec2<f32>(w_half(base) * f32(sm.x), w_half(base + 2u) * f32(sm.y));
}
// Element j's 5-bit value (j % 32 gives its bytes; the sub-block its nibble and high bit).
fn q5_k_q(base: u32, j: u32) -> u32 {
    let c = j / 64u;
    let hi = (j % 64u) / 32u;
    let low = (w_byte(base + 48u + c * 32u + j % 32u) >> (hi * 4u)) & 0xfu;
    return low + ((w_byte(base + 16u + j % 32u) >> (2u * c + hi)) & 1u) * 16u;
}
fn load_w(i: u32) -> f32 {
    let base = (i / 256u) * 176u;
    let j = i % 256u;
    let sm = q5_k_scale_min(base, j);
    return sm.x * f32(q5_k_q(base, j)) - sm.y;
}
