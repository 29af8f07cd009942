// Q5_K blocks (weights_blocks.wgsl reads their bytes).
fn load_w(i: u32) -> f32 {
    let base = (i / 256u) * 176u;
    let j = i % 256u;
    let c = j / 64u;
    let hi = (j % 64u) / 32u;
    let sub = 2u * c + hi;
    let low = (w_byte(base + 48u + c * 32u + j % 32u) >> (hi * 4u)) & 0xfu;
    let q = low + ((w_byte(base + 16u + j % 32u) >> sub) & 1u) * 16u;
    let sm = w_scale_min_k4(sub, base + 4u);
    return (w_half(base) * f32(sm.x)) * f32(q) - w_half(base + 2u) * f32(sm.y);
}
