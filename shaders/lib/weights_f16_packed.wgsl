// f16 pairs packed in u32 words, for devices without SHADER_F16.
alias WStore = u32;
fn load_w(i: u32) -> f32 {
    let pair = unpack2x16float(w[i >> 1u]);
    return select(pair.x, pair.y, (i & 1u) == 1u);
}
