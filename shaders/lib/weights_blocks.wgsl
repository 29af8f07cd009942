// llama.cpp's block formats, read as stored: a matrix is whole blocks back to back, so element i
// is element i % B of block i / B. The words hold the bytes little-endian; blocks of 34, 18 and
// 210 bytes leave some fields at offsets that are not multiples of 4, hence byte reads. Each
// format's load_w decodes one element exactly as crate::quant::dequantize does.
alias WStore = u32;
fn w_byte(b: u32) -> u32 {
    return (w[b >> 2u] >> ((b & 3u) << 3u)) & 0xffu;
}
// The f16 at an even byte offset (never straddles a word).
fn w_half(b: u32) -> f32 {
    return f16_bits_to_f32((w[b >> 2u] >> ((b & 2u) << 3u)) & 0xffffu);
}
// Sub-block j's 6-bit scale (x) and min (y) from the 12 packed bytes at s (Q4_K, Q5_K).
fn w_scale_min_k4(j: u32, s: u32) -> vec2<u32> {
    if j < 4u {
        return vec2<u32>(w_byte(s + j) & 63u, w_byte(s + j + 4u) & 63u);
    }
    let packed = w_byte(s + j + 4u);
    return vec2<u32>((packed & 0xfu) | ((w_byte(s + j - 4u) >> 6u) << 4u), (packed >> 4u) | ((w_byte(s + j) >> 6u) << 4u));
}
