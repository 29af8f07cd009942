// Q8_0: a block is one sub-block, its bytes the values.
fn load_wsub(s: u32) -> WSub {
    let base = s * 34u;
    let d = w_half(base);
    let q = base + 2u;
    return WSub(
        vec4<u32>(w_word_at(q), w_word_at(q + 4u), w_word_at(q + 8u), w_word_at(q + 12u)),
        vec4<u32>(w_word_at(q + 16u), w_word_at(q + 20u), w_word_at(q + 24u), w_word_at(q + 28u)),
        vec3<f32>(d, d, -0.0),
    );
}
