// Rows x_row0 .. x_row0 + m of x (k wide) quantised for the int8 matmul, 32 elements at a time
// (as llama.cpp's Q8_1): d = max |x| * RECIP_127, q = the integer nearest x / d (ties to even),
// kept as two vec4s of signed-byte words (elements 0-15, 16-31) with (d, sum of q). A unit whose
// largest magnitude is below 2^-64 (zeros among them) gets d = 0, q = 0.
//
// The values are exact on every device, although a GPU's division or reciprocal need not be
// correctly rounded: x * (1 / d) only picks between the two integers around it, and where it
// lies within 1/16 of the half between them, the exact sign of x - (f + 1/2) d decides. d splits
// into its top 12 significant bits and the rest, so both products with f + 1/2 (9 bits) are
// exact, and x minus the first is exact (Sterbenz: x is within 15% of it). The host quantiser
// (`quantize_reference`, and the host experts beside a GPU) gives the same bytes.
struct Params {
    m: u32,
    k: u32,
    x_row0: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> xq: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> xs: array<vec2<f32>>;

// f32 nearest 1 / 127.
const RECIP_127: f32 = 0.0078740157480315; // 0x3c010204
// Units below this are zeros: their products would need subnormals, which devices may flush.
const TINY: f32 = 5.421010862427522e-20; // 2^-64

fn nearest(v: f32, d: f32, inv: f32) -> i32 {
    let t = v * inv;
    let f = floor(t);
    let b = f + 0.5;
    if abs(t - b) >= 0.0625 {
        return i32(round(t));
    }
    let dh = bitcast<f32>(bitcast<u32>(d) & 0xfffff000u);
    let above = (v - b * dh) - b * (d - dh);
    if above > 0.0 {
        return i32(f) + 1;
    }
    if above < 0.0 {
        return i32(f);
    }
    // A tie: the even one of f and f + 1.
    return i32(f) + (i32(f) & 1);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = flat_workgroup(wg, nwg) * WG + lid;
    let per_row = p.k / 32u;
    if g >= p.m * per_row {
        return;
    }
    let base = (p.x_row0 + g / per_row) * p.k + (g % per_row) * 32u;
    var amax = 0.0;
    for (var i = 0u; i < 32u; i++) {
        amax = max(amax, abs(x[base + i]));
    }
    let live = amax >= TINY;
    let d = select(0.0, amax * RECIP_127, live);
    let inv = select(0.0, 1.0 / d, live);
    var sum = 0i;
    var words: array<u32, 8>;
    for (var j = 0u; j < 8u; j++) {
        var word = 0u;
        for (var t = 0u; t < 4u; t++) {
            let q = select(0i, clamp(nearest(x[base + 4u * j + t], d, inv), -127, 127), live);
            sum += q;
            word |= (u32(q) & 0xffu) << (8u * t);
        }
        words[j] = word;
    }
    xq[2u * g] = vec4<u32>(words[0], words[1], words[2], words[3]);
    xq[2u * g + 1u] = vec4<u32>(words[4], words[5], words[6], words[7]);
    xs[g] = vec2<f32>(d, f32(sum));
}
