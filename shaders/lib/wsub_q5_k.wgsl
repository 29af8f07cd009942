// Q5_K: Q4_K's nibbles (bytes 48 + 32 (j / 2) ..) and, as the fifth bit, bit j of bytes 16 .. 47.
fn load_wsub(s: u32) -> WSub {
    let base = (s / 8u) * 176u;
    let j = s % 8u;
    let sm = w_scale_min_k4(j, base + 4u);
    let word = (base + 48u + (j / 2u) * 32u) >> 2u;
    let high = (base + 16u) >> 2u;
    let shift = vec4<u32>((j % 2u) * 4u);
    let mask = vec4<u32>(0x0f0f0f0fu);
    let bit = vec4<u32>(j);
    let one = vec4<u32>(0x01010101u);
    let lo = ((vec4<u32>(w[word], w[word + 1u], w[word + 2u], w[word + 3u]) >> shift) & mask)
        | (((vec4<u32>(w[high], w[high + 1u], w[high + 2u], w[high + 3u]) >> bit) & one) << vec4<u32>(4u));
    let hi = ((vec4<u32>(w[word + 4u], w[word + 5u], w[word + 6u], w[word + 7u]) >> shift) & mask)
        | (((vec4<u32>(w[high + 4u], w[high + 5u], w[high + 6u], w[high + 7u]) >> bit) & one) << vec4<u32>(4u));
    let a = w_half(base) * f32(sm.x);
    return WSub(lo, hi, vec3<f32>(a, a, -(w_half(base + 2u) * f32(sm.y))));
}
