// FP8 rows in runs of FP8_BLOCK e4m3 values, each run led by its f32 scale (weights_blocks.wgsl
// reads the bytes, fp8.wgsl decodes them); as crate::quant::dequantize, bf16(e4m3 * scale).
fn load_w(i: u32) -> f32 {
    let base = (i / FP8_BLOCK) * (FP8_BLOCK + 4u);
    let v = e4m3(w_byte(base + 4u + i % FP8_BLOCK)) * bitcast<f32>(w[base >> 2u]);
    return bitcast<f32>(to_bf16(v) << 16u);
}
