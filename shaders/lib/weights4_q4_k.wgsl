// Four Q4_K weights from element i (a multiple of 4: one sub-block of 32). The sub-block's scale
// and min are decoded once and its four nibbles come in one aligned word (blocks are 144 bytes,
// the nibbles at 16 + 32c + j % 32); each value is load_w's expression.
fn load_w4(i: u32) -> vec4<f32> {
    let base = (i / 256u) * 144u;
    let j = i % 256u;
    let c = j / 64u;
    let hi = (j % 64u) / 32u;
    let word = w[(base + 16u + c * 32u + j % 32u) >> 2u];
    let sm = q4_k_scale_min(base, j);
    var v: vec4<f32>;
    for (var t = 0u; t < 4u; t++) {
        v[t] = sm.x * f32((word >> (8u * t + hi * 4u)) & 0xfu) - sm.y;
    }
    return v;
}
