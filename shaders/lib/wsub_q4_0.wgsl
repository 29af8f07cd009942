// Q4_0: a block is one sub-block; element j < 16 is the low nibble of byte j, element 16 + j its
// high nibble. Values 0..15 with w = d * q - 8 d.
fn load_wsub(s: u32) -> WSub {
    let base = s * 18u;
    let d = w_half(base);
    let q = base + 2u;
    let bytes = vec4<u32>(w_word_at(q), w_word_at(q + 4u), w_word_at(q + 8u), w_word_at(q + 12u));
    return WSub(bytes & vec4<u32>(0x0f0f0f0fu), (bytes >> vec4<u32>(4u)) & vec4<u32>(0x0f0f0f0fu), vec3<f32>(d, d, -8.0 * d));
}
