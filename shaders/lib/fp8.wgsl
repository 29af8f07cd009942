// e4m3fn bytes, and f32 to bf16 bits rounded to nearest even (DeepSeek's dequantisation).
fn e4m3(byte: u32) -> f32 {
    let sign = select(1.0, -1.0, (byte & 0x80u) != 0u);
    let e = (byte >> 3u) & 0xfu;
    let m = f32(byte & 7u);
    if e == 15u && (byte & 7u) == 7u {
        return bitcast<f32>(0x7fc00000u);
    }
    if e == 0u {
        return sign * m * 0.001953125; // m / 8 * 2^-6
    }
    return sign * (1.0 + m * 0.125) * exp2(f32(e) - 7.0);
}

fn to_bf16(v: f32) -> u32 {
    let bits = bitcast<u32>(v);
    if (bits & 0x7fffffffu) > 0x7f800000u {
        return (bits >> 16u) | 0x40u; // NaN stays NaN
    }
    return (bits + 0x7fffu + ((bits >> 16u) & 1u)) >> 16u;
}

