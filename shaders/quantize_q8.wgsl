// Rows x_row0 .. x_row0 + m of x (k wide) quantised for the int8 matmul, 32 elements at a time
// (as llama.cpp's Q8_1): d = max |x| / 127, q = round(x / d) (ties to even), kept as two vec4s of
// signed-byte words (elements 0-15, 16-31) with (d, sum of q). A run of zeros gets d = 0, q = 0.
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
    let d = amax / 127.0;
    let inv = select(0.0, 1.0 / d, d > 0.0);
    var sum = 0i;
    var words: array<u32, 8>;
    for (var j = 0u; j < 8u; j++) {
        var word = 0u;
        for (var t = 0u; t < 4u; t++) {
            let q = clamp(i32(round(x[base + 4u * j + t] * inv)), -127, 127);
            sum += q;
            word |= (u32(q) & 0xffu) << (8u * t);
        }
        words[j] = word;
    }
    xq[2u * g] = vec4<u32>(words[0], words[1], words[2], words[3]);
    xq[2u * g + 1u] = vec4<u32>(words[4], words[5], words[6], words[7]);
    xs[g] = vec2<f32>(d, f32(sum));
}
