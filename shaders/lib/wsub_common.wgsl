// A block format read 32 elements (a sub-block) at a time for the int8 matmul: the 32 values as
// eight words of signed bytes (lo: elements 0-15, hi: 16-31), and the affine map back to the
// weights, w = a.x * q (first 16) or a.y * q (last 16), plus a.z (-0 where there is no offset,
// so that a zero value keeps the sign of its scale as the decoder gives it). Sub-block s is elements
// 32s .. 32s + 31 of the matrix (rows are whole blocks, so a sub-block never straddles rows).
struct WSub {
    lo: vec4<u32>,
    hi: vec4<u32>,
    a: vec3<f32>,
}
// The four bytes from byte b on, which need not be word-aligned (34-, 18- and 210-byte blocks).
fn w_word_at(b: u32) -> u32 {
    let shift = (b & 3u) * 8u;
    let first = w[b >> 2u];
    if shift == 0u {
        return first;
    }
    return (first >> shift) | (w[(b >> 2u) + 1u] << (32u - shift));
}
