// The int8 matmuls' product of a sub-block (src/kernels/matmul_int8.rs); the kernel's uniform p
// has a field `zero`, always 0.
// A value the compiler cannot see through (p.zero is 0 at run time): a product passed through it
// is rounded before the addition that follows, never fused into it. Drivers fuse or split
// multiply-adds as their code's shape suits (llvmpipe does both), which would let a row's bits
// depend on the path; with every product and sum rounded on its own, each path gives exactly
// `model`'s bits on every device.
fn kept(v: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(v) ^ p.zero);
}

// One sub-block's contribution to an output: the two 16-element integer sums scaled by the
// weights' affine map, scaled by the input's scale. Every path adds these in sub-block order
// with the same operations, so a row's result does not depend on the path or the rows beside it.
fn sub_product(acc: f32, wq: WSub, x_lo: vec4<u32>, x_hi: vec4<u32>, x_s: vec2<f32>) -> f32 {
    let lo = dot4I8Packed(wq.lo.x, x_lo.x) + dot4I8Packed(wq.lo.y, x_lo.y) + dot4I8Packed(wq.lo.z, x_lo.z) + dot4I8Packed(wq.lo.w, x_lo.w);
    let hi = dot4I8Packed(wq.hi.x, x_hi.x) + dot4I8Packed(wq.hi.y, x_hi.y) + dot4I8Packed(wq.hi.z, x_hi.z) + dot4I8Packed(wq.hi.w, x_hi.w);
    let v = kept(kept(wq.a.x * f32(lo)) + kept(wq.a.y * f32(hi))) + kept(wq.a.z * x_s.y);
    return acc + kept(x_s.x * kept(v));
}
