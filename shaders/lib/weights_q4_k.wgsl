// Q4_K blocks (weights_blocks.wgsl reads their bytes).
// Element j's sub-block scale (x) and min (y) of the block at byte base, as f32 products.
fn q4_k_scale_min(base: u32, j: u32) -> vec2<f32> {
    let sm = w_scale_min_k4(2u * (j / 64u) + (j % 64u) / 32u, base + 4u);
    return vec2<f32>(w_half(base) * f32(sm.x), w_half(base + 2u) * f32(sm.y));
}
fn load_w(i: u32) -> f32 {
    let base = (i / 256u) * 144u;
    let j = i % 256u;
    let c = j / 64u;
    let hi = (j % 64u) / 32u;
    let q = (w_byte(base + 16u + c * 32u + j % 32u) >> (hi * 4u)) & 0xfu;
    let sm = q4_k_scale_min(base, j);
    return sm.x * f32(q) - sm.y;
}
