// Q6_K: sub-block j of a 210-byte block is quarter r = j % 4 of half n = j / 4: low nibbles from
// bytes 64 n + 32 (r % 2) .. (nibble r / 2), two high bits from bytes 128 + 32 n .. (bits 2r, 2r+1).
// Values 0..63 less 32 (as signed bytes); each 16 elements have their own signed scale.
fn q6_k_less_32(q: vec4<u32>) -> vec4<u32> {
    // Per byte q - 32 in two's complement, without borrows crossing bytes (every byte is < 64).
    return ((q | vec4<u32>(0x80808080u)) - vec4<u32>(0x20202020u)) ^ vec4<u32>(0x80808080u);
}
fn q6_k_scale_at(b: u32) -> f32 {
    let s = w_byte(b);
    return f32(i32(s) - select(0, 256, s >= 128u));
}
fn load_wsub(s: u32) -> WSub {
    let base = (s / 8u) * 210u;
    let j = s % 8u;
    let n = j / 4u;
    let r = j % 4u;
    let low = base + 64u * n + 32u * (r % 2u);
    let high = base + 128u + 32u * n;
    let shift = vec4<u32>(4u * (r / 2u));
    let hshift = vec4<u32>(2u * r);
    let mask = vec4<u32>(0x0f0f0f0fu);
    let three = vec4<u32>(0x03030303u);
    let lo = ((vec4<u32>(w_word_at(low), w_word_at(low + 4u), w_word_at(low + 8u), w_word_at(low + 12u)) >> shift) & mask)
        | (((vec4<u32>(w_word_at(high), w_word_at(high + 4u), w_word_at(high + 8u), w_word_at(high + 12u)) >> hshift) & three) << vec4<u32>(4u));
    let hi = ((vec4<u32>(w_word_at(low + 16u), w_word_at(low + 20u), w_word_at(low + 24u), w_word_at(low + 28u)) >> shift) & mask)
        | (((vec4<u32>(w_word_at(high + 16u), w_word_at(high + 20u), w_word_at(high + 24u), w_word_at(high + 28u)) >> hshift) & three) << vec4<u32>(4u));
    let d = w_half(base + 208u);
    let sc = base + 192u + 8u * n + 2u * r;
    return WSub(q6_k_less_32(lo), q6_k_less_32(hi), vec3<f32>(d * q6_k_scale_at(sc), d * q6_k_scale_at(sc + 1u), -0.0));
}
