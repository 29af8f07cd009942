// f16 pairs packed in u32 words, for devices without SHADER_F16 (half_bits.wgsl decodes them).
alias WStore = u32;
fn load_w(i: u32) -> f32 {
    let word = w[i >> 1u];
    return f16_bits_to_f32(select(word & 0xffffu, word >> 16u, (i & 1u) == 1u));
}
