alias WStore = f32;
fn load_w(i: u32) -> f32 {
    return w[i];
}
