// The parameters and bindings of the int8 matmul (see src/kernels/matmul_int8.rs): the inputs
// quantised by quantize_q8 (rows 0 .. m), the weights as stored, bias and output as matmul's.
struct Params {
    m: u32,
    n: u32,
    k: u32,
    y_row0: u32,
    y_stride: u32,
    y_col0: u32,
    has_bias: u32,
    // Always 0; the compiler cannot know it (see kept).
    zero: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xq: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> xs: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> w: array<WStore>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
