// Large grids are laid out in two dimensions (each is capped by the adapter); kernels see one index.
fn flat_workgroup(wg: vec3<u32>, n: vec3<u32>) -> u32 {
    return wg.x + wg.y * n.x;
}
