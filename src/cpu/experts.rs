//! A streamed expert computed on the host from its pack in host memory, instead of being sent
//! to a GPU slot: `down(silu(gate(x)) * up(x))` over the rows routed to it, on the host matmul.
//! Worth it when an expert received few tokens in a step and the link is the bottleneck: reading
//! its weights from host memory costs less than sending them (the planner decides from the
//! calibrated rates). FP8 packs are dequantised to the same bf16 values the GPU's slots hold.

use std::borrow::Cow;

use crate::cpu::matmul::{matmul, WeightRows};
use crate::cpu::simd::Isa;
use crate::error::{ensure, Result};
use crate::gpu::WeightDtype;
use crate::kernels::dequant::{reference as dequant_reference, scale_shape, Fp8Matrix};
use crate::model::weights::HostExperts;

/// A pack's matrices as the host matmul reads them: their 4-byte words in place, or a copy when
/// the bytes are not word-aligned or FP8 (widened to bf16-valued f32).
fn matrices<'a>(host: &HostExperts, pack: &'a [u8]) -> Result<[(Cow<'a, [u32]>, WeightDtype); 3]> {
    let shapes = [(host.inter, host.hidden), (host.inter, host.hidden), (host.hidden, host.inter)];
    let sections = host.sections();
    match (host.fp8_block, host.scale_offsets()) {
        (Some(block), Some(scale0)) => {
            let mut out = Vec::new();
            for ((range, s0), (rows, cols)) in sections.into_iter().zip(scale0).zip(shapes) {
                let n: usize = scale_shape(rows, cols, block).iter().product();
                let scale_bytes = &pack[s0 * 4..(s0 + n) * 4];
                let scales: Vec<f32> = bytemuck::pod_collect_to_vec(scale_bytes);
                let values = dequant_reference(&Fp8Matrix { data: &pack[range], scales: &scales, block }, rows, cols);
                out.push((Cow::Owned(bytemuck::cast_slice::<f32, u32>(&values).to_vec()), WeightDtype::F32));
            }
            Ok(out.try_into().expect("three matrices"))
        }
        _ => Ok([0, 1, 2].map(|i| {
            let (r, dtype) = (sections[i].clone(), host.dtypes[i]);
            let bytes = &pack[r];
            let words = match bytemuck::try_cast_slice::<u8, u32>(bytes) {
                Ok(w) => Cow::Borrowed(w),
                Err(_) => {
                    let mut words = vec![0u32; bytes.len().div_ceil(4)];
                    bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
                    Cow::Owned(words)
                }
            };
            (words, dtype)
        })),
    }
}

/// How the host experts compute: as the host's own matmuls do, or as a GPU with
/// `--gpu-compute int8` does (its bits, so that where an expert runs changes nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Numbers {
    Host,
    GpuInt8,
}

/// Expert `e`'s outputs `[m, hidden]` for the rows `x` (`[m, hidden]`), computed as `numbers`
/// says.
pub fn expert_ffn(host: &HostExperts, e: usize, x: &[f32], m: usize, numbers: Numbers) -> Result<Vec<f32>> {
    match numbers {
        Numbers::Host => expert_ffn_host(host, e, x, m),
        Numbers::GpuInt8 => expert_ffn_gpu_int8(host, e, x, m),
    }
}

/// The GPU's int8 expert on the host: block-format matrices through [`crate::cpu::gpu_int8`]
/// (the gate and up sharing one quantising, as on the GPU), others through the host matmul as
/// the GPU's f32 path takes them, and the portable SwiGLU the GPU runs in that mode.
fn expert_ffn_gpu_int8(host: &HostExperts, e: usize, x: &[f32], m: usize) -> Result<Vec<f32>> {
    use crate::cpu::gpu_int8;
    use crate::kernels::matmul_int8::supports;
    let (h, inter) = (host.hidden, host.inter);
    ensure!(e < host.packs.len(), "host expert", "expert {e} of {}", host.packs.len());
    ensure!(m > 0 && x.len() == m * h, "host expert", "{} values for {m} rows of {h}", x.len());
    let isa = Isa::detected();
    let [(g, gd), (u, ud), (d, dd)] = matrices(host, &host.packs[e])?;
    let xq = (supports(gd) || supports(ud)).then(|| gpu_int8::quantise(x, m, h));
    let product = |xq: Option<&gpu_int8::Quantised>, x: &[f32], words: &[u32], dtype: WeightDtype, cols: usize, n: usize| {
        let mut y = vec![0f32; m * n];
        let w = WeightRows { words, dtype, cols };
        match xq {
            Some(xq) if supports(dtype) => gpu_int8::matmul(isa, xq, w, n, &mut y),
            _ => matmul(isa, x, m, w, 0, n, None, &mut y, n),
        }
        y
    };
    let gate = product(xq.as_ref(), x, &g, gd, h, inter);
    let up = product(xq.as_ref(), x, &u, ud, h, inter);
    let mut act = vec![0f32; m * inter];
    crate::cpu::simd::swiglu_portable(&gate, &up, &mut act);
    let aq = supports(dd).then(|| gpu_int8::quantise(&act, m, inter));
    Ok(product(aq.as_ref(), &act, &d, dd, inter, h))
}

fn expert_ffn_host(host: &HostExperts, e: usize, x: &[f32], m: usize) -> Result<Vec<f32>> {
    let (h, inter) = (host.hidden, host.inter);
    ensure!(e < host.packs.len(), "host expert", "expert {e} of {}", host.packs.len());
    ensure!(m > 0 && x.len() == m * h, "host expert", "{} values for {m} rows of {h}", x.len());
    let isa = Isa::detected();
    let [(g, gd), (u, ud), (d, dd)] = matrices(host, &host.packs[e])?;
    let mut gate = vec![0f32; m * inter];
    let mut up = vec![0f32; m * inter];
    matmul(isa, x, m, WeightRows { words: &g, dtype: gd, cols: h }, 0, inter, None, &mut gate, inter);
    matmul(isa, x, m, WeightRows { words: &u, dtype: ud, cols: h }, 0, inter, None, &mut up, inter);
    for (g, &u) in gate.iter_mut().zip(&up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
    let mut out = vec![0f32; m * h];
    matmul(isa, &gate, m, WeightRows { words: &d, dtype: dd, cols: inter }, 0, h, None, &mut out, h);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::moe::expert_reference;

    /// bf16 and FP8 packs, awkward shapes, against the per-row reference on the values the GPU
    /// slots would hold.
    #[test]
    fn matches_the_reference_on_bf16_and_fp8_packs() {
        let (h, inter, m) = (40, 24, 5);
        let mut s = 11u64;
        let mut rand = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let mats: Vec<Vec<f32>> = (0..3).map(|_| (0..h * inter).map(|_| rand() * 0.3).collect()).collect();
        let x: Vec<f32> = (0..m * h).map(|_| rand()).collect();
        // bf16
        let pack: Vec<u8> = mats.iter().flat_map(|v| crate::gpu::encode_weights(v, WeightDtype::Bf16)).collect();
        let host = HostExperts { packs: vec![vec![0u8; 6], pack], dtypes: [WeightDtype::Bf16; 3], fp8_block: None, inter, hidden: h };
        let got = expert_ffn(&host, 1, &x, m, Numbers::Host).unwrap();
        let r: Vec<Vec<f32>> = mats.iter().map(|v| crate::gpu::round_weights(v, WeightDtype::Bf16)).collect();
        check(&got, &x, &r, inter, h);
        // FP8 with 8 x 8 blocks: bytes, then every matrix's scales.
        let block = (8, 8);
        let bytes: Vec<Vec<u8>> = (0..3).map(|_| (0..h * inter).map(|i| ((i * 37 + 11) % 120) as u8 | if i % 3 == 0 { 0x80 } else { 0 }).collect()).collect();
        let shapes = [(inter, h), (inter, h), (h, inter)];
        let scales: Vec<Vec<f32>> = shapes.iter().map(|&(r, c)| (0..scale_shape(r, c, block).iter().product::<usize>()).map(|i| 0.01 + i as f32 * 0.003).collect()).collect();
        let mut pack: Vec<u8> = bytes.concat();
        for sc in &scales {
            pack.extend(bytemuck::cast_slice::<f32, u8>(sc));
        }
        let host = HostExperts { packs: vec![pack], dtypes: [WeightDtype::Bf16; 3], fp8_block: Some(block), inter, hidden: h };
        let got = expert_ffn(&host, 0, &x, m, Numbers::Host).unwrap();
        let r: Vec<Vec<f32>> = (0..3).map(|i| dequant_reference(&Fp8Matrix { data: &bytes[i], scales: &scales[i], block }, shapes[i].0, shapes[i].1)).collect();
        check(&got, &x, &r, inter, h);
    }

    fn check(got: &[f32], x: &[f32], w: &[Vec<f32>], inter: usize, h: usize) {
        let want: Vec<f32> = x.chunks(h).flat_map(|row| expert_reference(row, &w[0], &w[1], &w[2], inter)).collect();
        let err: f64 = got.iter().zip(&want).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>() / want.iter().map(|&b| (b as f64).powi(2)).sum::<f64>();
        assert!(err < 1e-10, "nmse {err:e}");
    }
}
