// FP8 e4m3 weights times their block scales, rounded to bf16 (nearest even) as DeepSeek's own
// conversion and transformers' dequantisation do. One thread per output word (two bf16 values
// of one row: the columns are even). The source rows are `rows` rows of the matrix starting at
// its row `row0`, their bytes from byte 4 * src_word0 of `src`; scales are
// [ceil(total_rows / block_rows), scale_cols] from float `scale0` of `scales`.
struct Params {
    rows: u32,
    cols: u32,
    row0: u32,
    src_word0: u32,
    scale0: u32,
    scale_cols: u32,
    block_rows: u32,
    block_cols: u32,
    dst_word0: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<f32>;
@group(0) @binding(3) var<storage, read_write> dst: array<u32>;

fn value(i: u32) -> u32 {
    let r = i / p.cols;
    let c = i % p.cols;
    let byte = (src[p.src_word0 + i / 4u] >> (8u * (i % 4u))) & 0xffu;
    let scale = scales[p.scale0 + ((p.row0 + r) / p.block_rows) * p.scale_cols + c / p.block_cols];
    return to_bf16(e4m3(byte) * scale);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let w = flat_workgroup(wg, nwg) * WG + lid;
    if w >= p.rows * p.cols / 2u {
        return;
    }
    dst[p.dst_word0 + w] = value(2u * w) | (value(2u * w + 1u) << 16u);
}
