// Q4_K: sub-block j of a 144-byte block takes nibble j % 2 of bytes 16 + 32 (j / 2) ..; its scale
// and min are the j-th 6-bit pair. w = (d sc) q - (dmin m), as load_w.
fn load_wsub(s: u32) -> WSub {
    let base = (s / 8u) * 144u;
    let j = s % 8u;
    let sm = w_scale_min_k4(j, base + 4u);
    let word = (base + 16u + (j / 2u) * 32u) >> 2u;
    let shift = vec4<u32>((j % 2u) * 4u);
    let mask = vec4<u32>(0x0f0f0f0fu);
    let lo = (vec4<u32>(w[word], w[word + 1u], w[word + 2u], w[word + 3u]) >> shift) & mask;
    let hi = (vec4<u32>(w[word + 4u], w[word + 5u], w[word + 6u], w[word + 7u]) >> shift) & mask;
    let a = w_half(base) * f32(sm.x);
    return WSub(lo, hi, vec3<f32>(a, a, -(w_half(base + 2u) * f32(sm.y))));
}
