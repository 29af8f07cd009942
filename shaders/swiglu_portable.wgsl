// out[i] = silu(gate[i]) * up[i] for i in [offset, offset + n), as swiglu.wgsl, in operations
// whose results IEEE rounding fixes (under --gpu-compute int8, so that the host experts beside
// the GPU give its bits): no division and no exp(), whose accuracy devices do not promise, and
// every product and sum passed through `kept` (p.zero is 0 at run time), so that no driver fuses
// a product into the add that follows or reassociates sums with constants (Mesa's did both until
// every sum was kept). The host's copy is `cpu::simd::silu_portable`, operation for operation.
struct Params {
    n: u32,
    offset: u32,
    zero: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn kept(v: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(v) ^ p.zero);
}

// e^x as cpu::simd::exp_approx (Cephes' expf) for x in [-87.33655, 80], without its branches
// for values outside (below, e^-87.33655, which 1 + e rounds away).
fn exp_portable(x: f32) -> f32 {
    let xc = clamp(x, -87.33655, 80.0);
    let n = floor(kept(kept(xc * 1.442695) + 0.5));
    let r = kept(kept(xc - kept(n * 0.6933594)) - kept(n * -2.1219444e-4));
    var q = kept(kept(1.9875691e-4 * r) + 1.3981999e-3);
    q = kept(kept(q * r) + 8.333452e-3);
    q = kept(kept(q * r) + 4.1665796e-2);
    q = kept(kept(q * r) + 1.6666665e-1);
    q = kept(kept(q * r) + 0.5);
    let e = kept(kept(kept(kept(q * r) * r) + r) + 1.0);
    return kept(e * bitcast<f32>(u32(i32(n) + 127) << 23u));
}

// 1 / y for y in [1, 2^116): three Newton steps from 48/17 - 32/17 m on the mantissa m in
// [1/2, 1), then the power of two.
fn recip_portable(y: f32) -> f32 {
    let bits = bitcast<u32>(y);
    let m = bitcast<f32>((bits & 0x007fffffu) | 0x3f000000u);
    var r = kept(2.8235295 - kept(1.882353 * m));
    for (var i = 0; i < 3; i++) {
        r = kept(r + kept(r * kept(1.0 - kept(m * r))));
    }
    return kept(r * bitcast<f32>((253u - (bits >> 23u)) << 23u));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = p.offset + flat_workgroup(wg, nwg) * WG + lid;
    if i < p.offset + p.n {
        let g = gate[i];
        let e = exp_portable(-max(g, -80.0));
        out[i] = kept(kept(g * recip_portable(1.0 + e)) * up[i]);
    }
}
