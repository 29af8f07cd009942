// WGSL has no bf16: a bf16 is the high half of an f32, so a shift recovers it exactly.
alias WStore = u32;
fn load_w(i: u32) -> f32 {
    let word = w[i >> 1u];
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (i & 1u) == 1u));
}
