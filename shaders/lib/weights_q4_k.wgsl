// Q4_K blocks (weights_blocks.wgsl reads their bytes).
fn load_w(i: u32) -> f32 {
    let base = (i / 256u) * 144u;
    let j = i % 256u;
    let c = j / 64u;
    let hi = (j % 64u) / 32u;
    let q = (w_byte(base + 16u + c * 32u + j % 32u) >> (hi * 4u)) & 0xfu;
    let sm = w_scale_min_k4(2u * c + hi, base + 4u);
    return (w_half(base) * f32(sm.x)) * f32(q) - w_half(base + 2u) * f32(sm.y);
}
