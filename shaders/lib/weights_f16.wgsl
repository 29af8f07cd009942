alias WStore = f16;
fn load_w(i: u32) -> f32 {
    return f32(w[i]);
}
