// Four consecutive weights (from element i) for the vector matmul: each as load_w gives it.
fn load_w4(i: u32) -> vec4<f32> {
    return vec4<f32>(load_w(i), load_w(i + 1u), load_w(i + 2u), load_w(i + 3u));
}
