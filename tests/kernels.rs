//! Every kernel against its CPU reference, on random inputs of awkward sizes, output buffers
//! poisoned with NaN first, compared by normalised mean squared error (as llama.cpp's
//! test-backend-ops does). Each runs on the device's full feature set and again with the optional
//! features (f16, subgroups) switched off, so both paths are checked.

use std::sync::OnceLock;

use moegen::gpu::{round_weights, AdapterChoice, Batch, DeviceChoice, Experimental, GpuBuffer, GpuContext, GpuWeight, KernelFeatures, WeightDtype};
use moegen::kernels::{attention, dequant, elementwise, embedding, head_matmul, matmul, matmul_int8, moe, norm, rope, router, softmax};
use moegen::Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One device for the whole test binary (creating one is slow on llvmpipe).
fn gpu() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        // The experimental kernels are allowed here, so that they are tested wherever the
        // adapter can run them (the tuning, not this, decides whether a job uses them).
        let experimental = Experimental { coop_matrix: true, subgroup_attention: true };
        let ctx = GpuContext::new(&AdapterChoice { device: DeviceChoice::Gpu, experimental, ..AdapterChoice::from_env(None) }).expect("a GPU adapter (install mesa-vulkan-drivers)");
        eprintln!("kernel tests on {} ({:?}), {:?}", ctx.info().name, ctx.info().backend, ctx.features());
        ctx
    })
}

/// The CPU device, whose kernels are the host implementations of `src/cpu/ops.rs`.
fn cpu() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(GpuContext::cpu)
}

/// The GPU as it is, with every optional feature off, and the CPU device.
fn variants() -> Vec<GpuContext> {
    let full = gpu().clone();
    let bare = full.with_features(KernelFeatures::basic(false, false, false));
    let mut out = vec![full.clone()];
    if bare.features() != full.features() {
        out.push(bare);
    }
    out.push(cpu().clone());
    out
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
}

/// A buffer of `n` f32 filled with NaN, so anything a kernel fails to write shows up.
fn poisoned(ctx: &GpuContext, n: usize) -> GpuBuffer {
    ctx.storage_from("poisoned output", &vec![f32::NAN; n]).unwrap()
}

fn upload(ctx: &GpuContext, data: &[f32]) -> GpuBuffer {
    ctx.storage_from("test input", data).unwrap()
}

/// sum((a - b)^2) / sum(b^2); NaN anywhere makes it NaN, which fails every bound.
fn nmse(actual: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(actual.len(), expected.len());
    let mut err = 0.0;
    let mut norm = 0.0;
    for (&a, &e) in actual.iter().zip(expected) {
        err += (a as f64 - e as f64).powi(2);
        norm += (e as f64).powi(2);
    }
    err / norm.max(f64::MIN_POSITIVE)
}

#[track_caller]
fn assert_close(what: &str, actual: &[f32], expected: &[f32], bound: f64) {
    let e = nmse(actual, expected);
    assert!(e <= bound, "{what}: normalised error {e:e} above {bound:e}");
}

const DTYPES: [WeightDtype; 3] = [WeightDtype::F32, WeightDtype::F16, WeightDtype::Bf16];

#[test]
fn embedding_gathers_rows_from_split_tables() {
    let mut rng = StdRng::seed_from_u64(1);
    for ctx in variants() {
        for dtype in DTYPES {
            let (vocab, dim) = (101, 37);
            let table = random(&mut rng, vocab * dim, 1.0);
            let ids: Vec<u32> = (0..33).map(|_| rng.random_range(0..vocab as u32)).collect();
            // A binding limit of ~20 rows splits the table into six parts.
            let small = ctx.with_binding_limit((20 * dtype.row_bytes(dim)) as u64 + 4);
            let w = GpuWeight::from_f32(&small, "table", &table, dtype, vocab, dim).unwrap();
            assert!(w.parts.len() >= 5, "table not split: {} parts", w.parts.len());
            let ids_buf = ctx.storage_from("ids", &ids).unwrap();
            let out = poisoned(&ctx, ids.len() * dim);
            let mut b = Batch::new(&ctx);
            embedding::embed(&mut b, &w, &ids_buf, ids.len(), &out).unwrap();
            b.submit().unwrap();
            let got = ctx.read_f32(&out, ids.len() * dim).unwrap();
            let want = embedding::reference(&round_weights(&table, dtype), dim, &ids);
            assert_eq!(got, want, "embedding {dtype:?} {:?}", ctx.features());
        }
    }
}

#[test]
fn rms_norm_over_rows_and_head_slices() {
    let mut rng = StdRng::seed_from_u64(2);
    for ctx in variants() {
        for (rows, dim) in [(1, 1000), (7, 333), (33 * 3, 48)] {
            let x = random(&mut rng, rows * dim, 3.0);
            let gamma = random(&mut rng, dim, 1.0);
            let out = poisoned(&ctx, rows * dim);
            let mut b = Batch::new(&ctx);
            norm::rms_norm(&mut b, &upload(&ctx, &x), &upload(&ctx, &gamma), &out, rows, dim, 1e-5).unwrap();
            b.submit().unwrap();
            let got = ctx.read_f32(&out, rows * dim).unwrap();
            assert_close(&format!("rms_norm {rows}x{dim}"), &got, &norm::reference(&x, &gamma, dim, 1e-5), 1e-10);
        }
    }
}

#[test]
fn residual_add_and_swiglu() {
    let mut rng = StdRng::seed_from_u64(3);
    for ctx in &variants() {
        for n in [1, 1001, 70_003] {
            let a = random(&mut rng, n, 2.0);
            let x = random(&mut rng, n, 2.0);
            let acc = upload(ctx, &a);
            let gate = random(&mut rng, n, 6.0);
            let up = random(&mut rng, n, 2.0);
            let out = poisoned(ctx, n);
            let mut b = Batch::new(ctx);
            elementwise::add_assign(&mut b, &acc, &upload(ctx, &x), n).unwrap();
            elementwise::swiglu(&mut b, &upload(ctx, &gate), &upload(ctx, &up), &out, n).unwrap();
            b.submit().unwrap();
            assert_close("add", &ctx.read_f32(&acc, n).unwrap(), &elementwise::add_reference(&a, &x), 1e-14);
            assert_close("swiglu", &ctx.read_f32(&out, n).unwrap(), &elementwise::swiglu_reference(&gate, &up), 1e-12);
            // A range touches only its own elements.
            if n > 10 {
                let part = poisoned(ctx, n);
                let mut b = Batch::new(ctx);
                elementwise::swiglu_range(&mut b, &upload(ctx, &gate), &upload(ctx, &up), &part, 3, n - 7).unwrap();
                b.submit().unwrap();
                let got = ctx.read_f32(&part, n).unwrap();
                assert!(got[..3].iter().chain(&got[n - 4..]).all(|v| v.is_nan()));
                assert_close("swiglu range", &got[3..n - 4], &elementwise::swiglu_reference(&gate, &up)[3..n - 4], 1e-12);
            }
        }
    }
}

#[test]
fn copy_rows_by_index_and_gated_add() {
    let mut rng = StdRng::seed_from_u64(15);
    for ctx in &variants() {
        let (n, dim, dst_len) = (7, 131, 20);
        let src = random(&mut rng, 9 * dim, 1.0);
        let src_rows: Vec<u32> = vec![8, 0, 3, 3, 5, 1, 2];
        let dst_rows: Vec<u32> = vec![19, 4, 0, 7, 11, 12, 2];
        let dst = poisoned(ctx, dst_len * dim);
        let picked = poisoned(ctx, n * dim);
        let mut b = Batch::new(ctx);
        let src_buf = upload(ctx, &src);
        let (sr, dr) = (ctx.storage_from("src rows", &src_rows).unwrap(), ctx.storage_from("dst rows", &dst_rows).unwrap());
        elementwise::copy_rows(&mut b, &src_buf, Some(&sr), &dst, Some(&dr), n, dim).unwrap();
        elementwise::copy_rows(&mut b, &src_buf, Some(&sr), &picked, None, n, dim).unwrap();
        b.submit().unwrap();
        let got = ctx.read_f32(&dst, dst_len * dim).unwrap();
        let got_picked = ctx.read_f32(&picked, n * dim).unwrap();
        for i in 0..n {
            let want = &src[src_rows[i] as usize * dim..][..dim];
            assert_eq!(&got[dst_rows[i] as usize * dim..][..dim], want);
            assert_eq!(&got_picked[i * dim..][..dim], want);
        }
        assert!(got[dim..2 * dim].iter().all(|v| v.is_nan()), "an unlisted row was written");

        let (tokens, dim) = (33, 77);
        let acc = random(&mut rng, tokens * dim, 1.0);
        let x = random(&mut rng, tokens * dim, 1.0);
        let gate = random(&mut rng, tokens, 4.0);
        let acc_buf = upload(ctx, &acc);
        let mut b = Batch::new(ctx);
        elementwise::add_gated(&mut b, &acc_buf, &upload(ctx, &x), &upload(ctx, &gate), tokens, dim).unwrap();
        b.submit().unwrap();
        let want = elementwise::add_gated_reference(&acc, &x, &gate, dim);
        assert_close("add_gated", &ctx.read_f32(&acc_buf, tokens * dim).unwrap(), &want, 1e-12);
    }
}

#[test]
fn rope_half_split_and_interleaved_with_partial_rotation() {
    let mut rng = StdRng::seed_from_u64(4);
    for ctx in &variants() {
        for layout in [rope::RopeLayout::HalfSplit, rope::RopeLayout::Interleaved] {
            for (tokens, heads, head_dim, rot_dim) in [(1, 1, 8, 8), (7, 3, 40, 24), (33, 5, 64, 64)] {
                let inv_freq = rope::default_inv_freq(10000.0, rot_dim);
                let table = rope::RopeTable::new(ctx, &inv_freq, 1.0, 300).unwrap();
                let positions: Vec<u32> = (0..tokens).map(|_| rng.random_range(0..300)).collect();
                let x = random(&mut rng, tokens * heads * head_dim, 1.0);
                let buf = upload(ctx, &x);
                let mut b = Batch::new(ctx);
                let pos = ctx.storage_from("positions", &positions).unwrap();
                rope::rope(&mut b, &buf, &pos, &table, tokens, heads, head_dim, layout).unwrap();
                b.submit().unwrap();
                let got = ctx.read_f32(&buf, x.len()).unwrap();
                let cs = rope::cos_sin_table(&inv_freq, 1.0, 300);
                let want = rope::reference(&x, &positions, &cs, rot_dim, heads, head_dim, 0, layout);
                assert_close(&format!("rope {layout:?} {tokens}x{heads}x{head_dim}/{rot_dim}"), &got, &want, 1e-12);
                // The dims past rot_dim pass through untouched.
                for h in 0..tokens * heads {
                    assert_eq!(got[h * head_dim + rot_dim..(h + 1) * head_dim], x[h * head_dim + rot_dim..(h + 1) * head_dim]);
                }
            }
        }
    }
}

#[test]
fn rope_on_a_part_of_each_head_past_an_offset() {
    let mut rng = StdRng::seed_from_u64(41);
    for ctx in &variants() {
        // DeepSeek's layout: 13 unrotated dims, then 10 rotated, then the rest of the row untouched.
        let (tokens, heads, head_dim, offset, rot_dim) = (9, 3, 27, 13, 10);
        let inv_freq = rope::default_inv_freq(10000.0, rot_dim);
        let table = rope::RopeTable::new(ctx, &inv_freq, 0.9, 50).unwrap();
        let positions: Vec<u32> = (0..tokens).map(|_| rng.random_range(0..50)).collect();
        let x = random(&mut rng, tokens * heads * head_dim, 1.0);
        let buf = upload(ctx, &x);
        let mut b = Batch::new(ctx);
        let pos = ctx.storage_from("positions", &positions).unwrap();
        rope::rope_at(&mut b, &buf, &pos, &table, tokens, heads, head_dim, offset, rope::RopeLayout::Interleaved).unwrap();
        b.submit().unwrap();
        let got = ctx.read_f32(&buf, x.len()).unwrap();
        let cs = rope::cos_sin_table(&inv_freq, 0.9, 50);
        let want = rope::reference(&x, &positions, &cs, rot_dim, heads, head_dim, offset, rope::RopeLayout::Interleaved);
        assert_close("rope past an offset", &got, &want, 1e-12);
        assert_ne!(got, x, "nothing rotated");
    }
}

#[test]
fn strided_norm_and_column_copies() {
    let mut rng = StdRng::seed_from_u64(42);
    for ctx in variants() {
        // MLA's cache row: a latent of 37 normed in place of rows 45 wide, rope key beside it.
        let (rows, dim, stride) = (11, 37, 45);
        let x = random(&mut rng, rows * stride, 2.0);
        let gamma = random(&mut rng, dim, 1.0);
        let out = poisoned(&ctx, rows * stride);
        let mut b = Batch::new(&ctx);
        norm::rms_norm_strided(&mut b, &upload(&ctx, &x), &upload(&ctx, &gamma), &out, rows, dim, stride, 1e-6).unwrap();
        let (from, to) = (elementwise::Cols { stride, col0: dim }, elementwise::Cols { stride, col0: dim });
        elementwise::copy_cols(&mut b, &upload(&ctx, &x), from, &out, to, rows, stride - dim).unwrap();
        b.submit().unwrap();
        let got = ctx.read_f32(&out, rows * stride).unwrap();
        let latent: Vec<f32> = x.chunks(stride).flat_map(|r| r[..dim].to_vec()).collect();
        let normed = norm::reference(&latent, &gamma, dim, 1e-6);
        let mut want = x.clone();
        for r in 0..rows {
            want[r * stride..r * stride + dim].copy_from_slice(&normed[r * dim..(r + 1) * dim]);
        }
        assert_close("strided rms_norm and column copy", &got, &want, 1e-10);
        // Columns between buffers of different widths, into a poisoned one that keeps the rest.
        let src = random(&mut rng, 7 * 19, 1.0);
        let dst = random(&mut rng, 7 * 23, 1.0);
        let dst_buf = upload(&ctx, &dst);
        let (from, to) = (elementwise::Cols { stride: 19, col0: 4 }, elementwise::Cols { stride: 23, col0: 11 });
        let mut b = Batch::new(&ctx);
        elementwise::copy_cols(&mut b, &upload(&ctx, &src), from, &dst_buf, to, 7, 9).unwrap();
        b.submit().unwrap();
        let want = elementwise::copy_cols_reference(&src, from, &dst, to, 7, 9);
        assert_eq!(ctx.read_f32(&dst_buf, 7 * 23).unwrap(), want);
    }
}

#[test]
fn bf16_rounding_and_widening_of_kv_values() {
    let mut rng = StdRng::seed_from_u64(45);
    for ctx in &variants() {
        // Awkward count, values across magnitudes, exact ties (low half 0x8000) both ways, NaN.
        let mut x: Vec<f32> = (0..1001).map(|i| rng.random_range(-1.0f32..1.0) * 10f32.powi(i % 9 - 4)).collect();
        x[3] = f32::from_bits(0x3f80_8000); // tie, rounds down to even
        x[4] = f32::from_bits(0x3f81_8000); // tie, rounds up to even
        x[5] = f32::NAN;
        let buf = upload(ctx, &x);
        let mut b = Batch::new(ctx);
        elementwise::round_bf16(&mut b, &buf, x.len()).unwrap();
        b.submit().unwrap();
        let got = ctx.read_f32(&buf, x.len()).unwrap();
        for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
            let want = elementwise::round_bf16_reference(v);
            assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "value {i}: {v} rounded to {g}, want {want}");
        }
        // Widening: the upper halves as packed bf16, back to the same f32 bits, into a poisoned buffer.
        let mut packed: Vec<u16> = got.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        packed.push(0); // whole words
        let src = ctx.storage_from("bf16", &packed).unwrap();
        let out = poisoned(ctx, x.len());
        let mut b = Batch::new(ctx);
        elementwise::expand_bf16(&mut b, &src, &out, x.len()).unwrap();
        b.submit().unwrap();
        let wide = ctx.read_f32(&out, x.len()).unwrap();
        assert!(wide.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
    }
}

#[test]
fn head_matmul_per_head_blocks_at_strides() {
    let mut rng = StdRng::seed_from_u64(43);
    for ctx in variants() {
        for dtype in DTYPES {
            // MLA's absorption: 5 heads, each its 13 nope dims (of 21 per head) times a 19 x 13
            // block, written into rows of 5 x 24 at column 2 of each head.
            for tokens in [1, 6, 37] {
                let (heads, out, inner) = (5, 19, 13);
                let xl = head_matmul::HeadLayout { stride: heads * 21, head_stride: 21, col0: 3 };
                let yl = head_matmul::HeadLayout { stride: heads * 24, head_stride: 24, col0: 2 };
                let x = random(&mut rng, tokens * heads * 21, 1.0);
                let w = random(&mut rng, heads * out * inner, 1.0);
                let wg = GpuWeight::from_f32(&ctx, "heads", &w, dtype, heads * out, inner).unwrap();
                let y0 = vec![f32::NAN; tokens * heads * 24];
                let y = upload(&ctx, &y0);
                let mut b = Batch::new(&ctx);
                head_matmul::head_matmul(&mut b, &upload(&ctx, &x), xl, &wg, heads, &y, yl, tokens).unwrap();
                b.submit().unwrap();
                let got = ctx.read_f32(&y, y0.len()).unwrap();
                let want = head_matmul::reference(&x, xl, &round_weights(&w, dtype), heads, out, inner, &y0, yl, tokens);
                // Only the written columns are compared; the rest stays poisoned in both.
                let pick = |v: &[f32]| v.iter().copied().filter(|f| !f.is_nan()).collect::<Vec<_>>();
                assert_eq!(pick(&want).len(), tokens * heads * out);
                assert_eq!(pick(&got).len(), tokens * heads * out, "head_matmul wrote outside its columns");
                assert_close(&format!("head_matmul {dtype:?} x{tokens}"), &pick(&got), &pick(&want), 1e-10);
            }
        }
    }
}

/// Reads a bf16 weight's parts back as f32 values, in row order.
fn read_bf16(ctx: &GpuContext, w: &GpuWeight) -> Vec<f32> {
    let mut out = Vec::new();
    for part in &w.parts {
        let words = ctx.read_u32(&part.buffer, part.rows * w.cols / 2).unwrap();
        out.extend(words.iter().flat_map(|&x| [f32::from_bits(x << 16), f32::from_bits(x & 0xffff0000)]));
    }
    out
}

#[test]
fn fp8_block_scaled_weights_dequantise_to_the_same_bf16_bits() {
    let mut rng = StdRng::seed_from_u64(44);
    for ctx in &variants() {
        // Every finite e4m3 code, subnormals and both signs included (0x7f and 0xff are NaN).
        let byte = |rng: &mut StdRng| loop {
            let b: u8 = rng.random();
            if b & 0x7f != 0x7f {
                break b;
            }
        };
        assert_eq!(dequant::e4m3_to_f32(0x7e), 448.0);
        assert_eq!(dequant::e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(dequant::e4m3_to_f32(0xb8), -1.0);
        // Awkward shapes: blocks that do not divide the matrix, three experts stacked, a binding
        // limit that splits the stack between pieces.
        let (rows, cols, block) = (37, 50, (16, 24));
        let scale_len: usize = dequant::scale_shape(rows, cols, block).iter().product();
        let data: Vec<Vec<u8>> = (0..3).map(|_| (0..rows * cols).map(|_| byte(&mut rng)).collect()).collect();
        let scales: Vec<Vec<f32>> = (0..3).map(|_| (0..scale_len).map(|_| rng.random_range(1e-3f32..0.05)).collect()).collect();
        let pieces: Vec<dequant::Fp8Matrix> = (0..3).map(|i| dequant::Fp8Matrix { data: &data[i], scales: &scales[i], block }).collect();
        for (label, c) in [("one binding", ctx.clone()), ("split", ctx.with_binding_limit((rows * cols * 2 * 2 + 4) as u64))] {
            let w = dequant::upload_fp8(&c, "experts", &pieces, rows, cols).unwrap();
            assert_eq!(w.parts.len(), if label == "split" { 2 } else { 1 });
            let got = read_bf16(ctx, &w);
            let want: Vec<f32> = pieces.iter().flat_map(|p| dequant::reference(p, rows, cols)).collect();
            assert_eq!(got.len(), want.len());
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{label}: dequantised bits differ");
        }
        let odd = dequant::upload_fp8(ctx, "odd", &[dequant::Fp8Matrix { data: &[1, 2, 3], scales: &[1.0], block }], 1, 3);
        assert!(odd.unwrap_err().to_string().contains("even number of columns"));
    }
}

#[test]
fn rope_table_holds_cos_and_sin_of_position_times_frequency() {
    let inv_freq = rope::default_inv_freq(10000.0, 4);
    assert_eq!(inv_freq, vec![1.0, 0.01]);
    let table = rope::cos_sin_table(&inv_freq, 0.5, 4);
    let [c, s] = table[3 * 2 + 1];
    assert!((c - 0.5 * 0.03f64.cos() as f32).abs() < 1e-7 && (s - 0.5 * 0.03f64.sin() as f32).abs() < 1e-7);
    assert_eq!(table[0], [0.5, 0.0]);
}

#[allow(clippy::too_many_arguments)]
fn check_matmul(ctx: &GpuContext, rng: &mut StdRng, m: usize, n: usize, k: usize, dtype: WeightDtype, bias: bool, path: Option<matmul::MatmulPath>) {
    let x = random(rng, m * k, 1.0);
    let wv = random(rng, n * k, 0.5);
    let bv = random(rng, n, 1.0);
    let w = GpuWeight::from_f32(ctx, "w", &wv, dtype, n, k).unwrap();
    let bias_buf = upload(ctx, &bv);
    let y = poisoned(ctx, m * n);
    let mut b = Batch::new(ctx);
    let rows = matmul::Rows::all(m);
    matmul::matmul_rows(&mut b, &upload(ctx, &x), &w, bias.then_some(&bias_buf), &y, rows, path).unwrap();
    b.submit().unwrap();
    let got = ctx.read_f32(&y, m * n).unwrap();
    let want = matmul::reference(&x, &round_weights(&wv, dtype), bias.then_some(&bv[..]), m, n, k);
    assert_close(&format!("matmul {m}x{n}x{k} {dtype:?} bias={bias} {path:?} {:?}", ctx.features()), &got, &want, 1e-10);
}

/// Block-quantised weights of `rows x cols`: from llama.cpp's quantisers where we have them
/// (Q8_0, Q4_0, Q4_K), else random blocks; with the f32 values every kernel must decode them to.
fn block_weights(rng: &mut StdRng, dtype: WeightDtype, rows: usize, cols: usize, extremes: bool) -> (Vec<u8>, Vec<f32>) {
    let bytes = match dtype {
        WeightDtype::Q5K | WeightDtype::Q6K | WeightDtype::Fp8 { .. } => moegen::quant::random_blocks(dtype, rows * cols / dtype.block_elems(), rng.random(), extremes),
        _ if extremes => moegen::quant::random_blocks(dtype, rows * cols / dtype.block_elems(), rng.random(), true),
        _ => moegen::quant::quantize(dtype, &random(rng, rows * cols, 0.5), cols).unwrap(),
    };
    let mut values = vec![0f32; rows * cols];
    moegen::quant::dequantize(dtype, &bytes, &mut values);
    (bytes, values)
}

/// The block formats and FP8 rows (in 32-wide scale blocks).
fn block_dtypes() -> Vec<WeightDtype> {
    WeightDtype::QUANTISED.into_iter().chain([WeightDtype::Fp8 { block: 32 }]).collect()
}

#[test]
fn block_formats_decode_to_the_reference_bits_on_every_device() {
    // The embedding lookup returns load_w's values as they are: each element of random blocks
    // (extreme scales included) must equal the host decoder's bits. Rows of an odd number of
    // 34-, 18- and 210-byte blocks put fields at every byte offset of a word.
    let mut rng = StdRng::seed_from_u64(40);
    for ctx in variants() {
        for dtype in block_dtypes() {
            let (rows, cols) = (7, 3 * dtype.block_elems());
            let (bytes, values) = block_weights(&mut rng, dtype, rows, cols, true);
            let w = GpuWeight::upload(&ctx, "blocks", &bytes, dtype, rows, cols).unwrap();
            let ids: Vec<u32> = vec![6, 0, 3, 1, 5, 2, 4, 6];
            let out = poisoned(&ctx, ids.len() * cols);
            let mut b = Batch::new(&ctx);
            embedding::embed(&mut b, &w, &ctx.storage_from("ids", &ids).unwrap(), ids.len(), &out).unwrap();
            b.submit().unwrap();
            let got = ctx.read_f32(&out, ids.len() * cols).unwrap();
            let want: Vec<u32> = ids.iter().flat_map(|&r| values[r as usize * cols..(r as usize + 1) * cols].iter().map(|v| v.to_bits())).collect();
            let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
            if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
                panic!("{dtype:?} {:?}: element {i} decodes to {} not {}", ctx.features(), f32::from_bits(got[i]), f32::from_bits(want[i]));
            }
        }
    }
}

#[test]
fn block_quantised_matmul_on_every_path() {
    let mut rng = StdRng::seed_from_u64(41);
    for ctx in variants() {
        for dtype in block_dtypes() {
            // Odd block counts per row and an awkward number of rows and columns.
            let (n, k) = (67, 3 * dtype.block_elems());
            let (bytes, values) = block_weights(&mut rng, dtype, n, k, false);
            let w = GpuWeight::upload(&ctx, "w", &bytes, dtype, n, k).unwrap();
            for (m, path) in [(1, None), (3, Some(matmul::MatmulPath::Vector { tok: 4, wg: 64 })), (7, None), (40, None)] {
                let x = random(&mut rng, m * k, 1.0);
                let bv = random(&mut rng, n, 1.0);
                let y = poisoned(&ctx, m * n);
                let mut b = Batch::new(&ctx);
                matmul::matmul_rows(&mut b, &upload(&ctx, &x), &w, Some(&upload(&ctx, &bv)), &y, matmul::Rows::all(m), path).unwrap();
                b.submit().unwrap();
                let got = ctx.read_f32(&y, m * n).unwrap();
                let want = matmul::reference(&x, &values, Some(&bv), m, n, k);
                assert_close(&format!("matmul {m}x{n}x{k} {dtype:?} {path:?} {:?}", ctx.features()), &got, &want, 1e-10);
            }
            if ctx.is_cpu() {
                continue;
            }
            // The vector path (four weights decoded at a time) gives each row the tiled path's
            // bits (one at a time), alone or with others: a sequence decodes alike in any batch.
            let m = 7;
            let (xb, bb) = (upload(&ctx, &random(&mut rng, m * k, 1.0)), upload(&ctx, &random(&mut rng, n, 1.0)));
            let run = |rows: matmul::Rows, path: matmul::MatmulPath| {
                let y = poisoned(&ctx, rows.m * n);
                let mut b = Batch::new(&ctx);
                matmul::matmul_rows(&mut b, &xb, &w, Some(&bb), &y, rows, Some(path)).unwrap();
                b.submit().unwrap();
                ctx.read_f32(&y, rows.m * n).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
            };
            let tiled = run(matmul::Rows::all(m), matmul::MatmulPath::Tiled { bm: 16 });
            assert_eq!(run(matmul::Rows::all(m), matmul::MatmulPath::Vector { tok: 4, wg: 64 }), tiled, "{dtype:?}: vector path's bits differ from the tiled path's");
            let alone = run(matmul::Rows { m: 1, x_row0: 3, y_row0: 0, y_stride: None }, matmul::MatmulPath::Vector { tok: 1, wg: 64 });
            assert_eq!(alone, tiled[3 * n..4 * n], "{dtype:?}: row 3 alone differs from row 3 among seven");
        }
    }
}

/// The paths a tuning may pick on `ctx` that add along k in order (all but cooperative tiles).
fn exact_paths(ctx: &GpuContext) -> Vec<matmul::MatmulPath> {
    matmul::MatmulPath::candidates(ctx.features(), ctx.limits()).into_iter().filter(|p| !matches!(p, matmul::MatmulPath::Coop { .. })).collect()
}

#[test]
fn matmul_every_path_and_weight_type() {
    let mut rng = StdRng::seed_from_u64(5);
    for ctx in variants() {
        let paths = if ctx.is_cpu() { vec![matmul::MatmulPath::ALL[0]] } else { exact_paths(&ctx) };
        for dtype in DTYPES {
            for &path in &paths {
                check_matmul(&ctx, &mut rng, 7, 67, 45, dtype, true, Some(path));
            }
        }
    }
}

/// The cooperative-matrix matmul at `path` against the reference on inputs rounded as its tiles
/// round them, with rows taken from an offset into a wider output, a bias, and edges that cut
/// every tile: the emulated tiles on any adapter, the hardware's where it has them.
fn check_coop_matmul(ctx: &GpuContext, rng: &mut StdRng, path: matmul::MatmulPath, bound: f64) {
    let matmul::MatmulPath::Coop { shape, .. } = path else { unreachable!() };
    let round = |v: &[f32]| -> Vec<f32> { if shape.f16_inputs { v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect() } else { v.to_vec() } };
    for (m, n, k, dtype) in [(37, 45, 70, WeightDtype::F32), (5, 33, 64, WeightDtype::Bf16), (19, 70, 96, WeightDtype::Q8_0), (1, 17, 9, WeightDtype::F16)] {
        let x = random(rng, (m + 2) * k, 1.0);
        let (w, values) = if dtype.is_quantised() {
            let (bytes, values) = block_weights(rng, dtype, n, k, false);
            (GpuWeight::upload(ctx, "w", &bytes, dtype, n, k).unwrap(), values)
        } else {
            let wv = random(rng, n * k, 0.5);
            (GpuWeight::from_f32(ctx, "w", &wv, dtype, n, k).unwrap(), round_weights(&wv, dtype))
        };
        let bv = random(rng, n, 1.0);
        let stride = n + 3;
        let y = poisoned(ctx, (m + 1) * stride);
        let mut b = Batch::new(ctx);
        let rows = matmul::Rows { m, x_row0: 2, y_row0: 1, y_stride: Some(stride) };
        matmul::matmul_rows(&mut b, &upload(ctx, &x), &w, Some(&upload(ctx, &bv)), &y, rows, Some(path)).unwrap();
        b.submit().unwrap();
        let got = ctx.read_f32(&y, (m + 1) * stride).unwrap();
        let want = matmul::reference(&round(&x[2 * k..]), &round(&values), Some(&bv), m, n, k);
        let got_rows: Vec<f32> = (0..m).flat_map(|r| got[(r + 1) * stride..(r + 1) * stride + n].to_vec()).collect();
        assert_close(&format!("{path:?} {m}x{n}x{k} {dtype:?}"), &got_rows, &want, bound);
        assert!(got[..stride].iter().all(|v| v.is_nan()), "{path:?} wrote above its rows");
        assert!((1..=m).all(|r| got[r * stride + n..(r + 1) * stride].iter().all(|v| v.is_nan())), "{path:?} wrote past its columns");
    }
}

#[test]
fn cooperative_matmul_with_emulated_tiles() {
    // What the kernel does around the cooperative-matrix built-ins (staging, tile offsets,
    // strides, edges, bias, output rows), with the built-ins replaced by plain WGSL.
    let mut rng = StdRng::seed_from_u64(17);
    let ctx = gpu();
    for shape in moegen::kernels::COOP_TEST_SHAPES {
        let path = matmul::MatmulPath::Coop { shape, emulated: true };
        if path.runs_with(ctx.features()) {
            check_coop_matmul(ctx, &mut rng, path, 1e-10);
        }
    }
}

#[test]
fn cooperative_matmul_on_the_adapters_tensor_cores() {
    let ctx = gpu();
    let Some(shape) = ctx.features().coop else {
        eprintln!("skipped: {} offers no cooperative matrices", ctx.info().name);
        return;
    };
    let mut rng = StdRng::seed_from_u64(18);
    check_coop_matmul(ctx, &mut rng, matmul::MatmulPath::Coop { shape, emulated: false }, 1e-9);
}

#[test]
fn matmul_paths_give_every_row_the_same_bits() {
    // A row's result must not depend on how many rows share the call, so that a sequence decodes
    // identically alone or in any batch: every path multiply-adds along k in order.
    let mut rng = StdRng::seed_from_u64(16);
    let ctx = gpu();
    let (m, n, k) = (7, 150, 333);
    let x = random(&mut rng, m * k, 1.0);
    let wv = random(&mut rng, n * k, 0.5);
    let bv = random(&mut rng, n, 1.0);
    for dtype in DTYPES {
        let w = GpuWeight::from_f32(ctx, "w", &wv, dtype, n, k).unwrap();
        let (xb, bb) = (upload(ctx, &x), upload(ctx, &bv));
        let mut results = Vec::new();
        // Every path the tuning may choose, at every workgroup and tile size.
        for path in exact_paths(ctx) {
            let y = poisoned(ctx, m * n);
            let mut b = Batch::new(ctx);
            matmul::matmul_rows(&mut b, &xb, &w, Some(&bb), &y, matmul::Rows::all(m), Some(path)).unwrap();
            b.submit().unwrap();
            results.push((path, ctx.read_f32(&y, m * n).unwrap()));
        }
        // And row 3 alone.
        let y = poisoned(ctx, n);
        let mut b = Batch::new(ctx);
        let one = matmul::Rows { m: 1, x_row0: 3, y_row0: 0, y_stride: None };
        matmul::matmul_rows(&mut b, &xb, &w, Some(&bb), &y, one, None).unwrap();
        b.submit().unwrap();
        let alone = ctx.read_f32(&y, n).unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for (path, r) in &results {
            assert_eq!(bits(r), bits(&results[0].1), "{dtype:?}: {path:?} differs from {:?}", results[0].0);
        }
        assert_eq!(bits(&alone), bits(&results[0].1[3 * n..4 * n]), "{dtype:?}: a row alone differs from the same row in a batch");
    }
}

#[test]
fn matmul_awkward_token_counts_on_the_chosen_path() {
    let mut rng = StdRng::seed_from_u64(6);
    for ctx in &variants() {
        for (i, m) in [1, 2, 7, 9, 33, 257].into_iter().enumerate() {
            check_matmul(ctx, &mut rng, m, 97, 129, DTYPES[i % 3], i % 2 == 0, None);
        }
    }
}

#[test]
fn matmul_with_weights_split_across_bindings_and_row_offsets() {
    let mut rng = StdRng::seed_from_u64(7);
    let (m, n, k) = (9, 70, 33);
    for ctx in variants() {
        let small = ctx.with_binding_limit((16 * k * 2) as u64 + 4);
        let x = random(&mut rng, (m + 3) * k, 1.0);
        let wv = random(&mut rng, n * k, 0.5);
        let bv = random(&mut rng, n, 1.0);
        let w = GpuWeight::from_f32(&small, "split w", &wv, WeightDtype::Bf16, n, k).unwrap();
        assert!(w.parts.len() >= 4);
        // Rows 3..3+m of x land at rows 1..1+m of a y whose rows are n + 5 wide.
        let stride = n + 5;
        let y = poisoned(&ctx, (m + 1) * stride);
        let mut b = Batch::new(&small);
        let rows = matmul::Rows { m, x_row0: 3, y_row0: 1, y_stride: Some(stride) };
        matmul::matmul_rows(&mut b, &upload(&ctx, &x), &w, Some(&upload(&ctx, &bv)), &y, rows, None).unwrap();
        b.submit().unwrap();
        let got = ctx.read_f32(&y, (m + 1) * stride).unwrap();
        let want = matmul::reference(&x[3 * k..], &round_weights(&wv, WeightDtype::Bf16), Some(&bv), m, n, k);
        let got_rows: Vec<f32> = (0..m).flat_map(|r| got[(r + 1) * stride..(r + 1) * stride + n].to_vec()).collect();
        assert_close("split matmul", &got_rows, &want, 1e-10);
        // Nothing outside the target rows and columns was written.
        assert!(got[..stride].iter().all(|v| v.is_nan()));
        assert!((1..=m).all(|r| got[r * stride + n..(r + 1) * stride].iter().all(|v| v.is_nan())));
    }
}

#[test]
fn softmax_and_argmax_rows() {
    let mut rng = StdRng::seed_from_u64(8);
    for ctx in variants() {
        for (rows, dim) in [(1, 5), (7, 1000), (9, 3001)] {
            let mut x = random(&mut rng, rows * dim, 8.0);
            // Plant ties: the first of two equal maxima must win.
            if dim > 10 {
                x[dim + 3] = 100.0;
                x[dim + 9] = 100.0;
            }
            let y = poisoned(&ctx, rows * dim);
            let ids = ctx.storage_from("ids", &vec![u32::MAX; rows]).unwrap();
            let xb = upload(&ctx, &x);
            let mut b = Batch::new(&ctx);
            softmax::softmax(&mut b, &xb, &y, rows, dim).unwrap();
            softmax::argmax(&mut b, &xb, &ids, rows, dim).unwrap();
            b.submit().unwrap();
            assert_close("softmax", &ctx.read_f32(&y, rows * dim).unwrap(), &softmax::softmax_reference(&x, dim), 1e-12);
            let got = ctx.read_u32(&ids, rows).unwrap();
            assert_eq!(got, softmax::argmax_reference(&x, dim), "argmax {rows}x{dim} {:?}", ctx.features());
            if dim > 10 {
                assert_eq!(got[1], 3);
            }
        }
    }
}

/// Router logits far enough apart that f32 and f64 agree on the order.
fn spaced_logits(rng: &mut StdRng, tokens: usize, n_experts: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for _ in 0..tokens {
        let mut order: Vec<usize> = (0..n_experts).collect();
        for i in (1..n_experts).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        out.extend(order.iter().map(|&r| r as f32 * 0.37 - 2.0 + rng.random_range(0.0..0.05)));
    }
    out
}

#[test]
fn router_softmax_sigmoid_renormalised_and_biased() {
    let mut rng = StdRng::seed_from_u64(9);
    for ctx in &variants() {
        let configs = [
            router::RouterConfig::softmax(8, 2, true),
            router::RouterConfig::softmax(60, 4, false),
            router::RouterConfig::softmax(7, 7, true),
            router::RouterConfig { sigmoid: true, scale: 2.5, ..router::RouterConfig::softmax(33, 6, true) },
            // DeepSeek-V2's group-limited greedy: 3 of 5 groups by their best expert, scaled.
            router::RouterConfig { n_group: 5, topk_group: 3, scale: 16.0, ..router::RouterConfig::softmax(40, 6, false) },
            // DeepSeek-V3: sigmoid, biased choice, 2 of 7 groups by the sum of their two best.
            router::RouterConfig { sigmoid: true, n_group: 7, topk_group: 2, group_by_top_two: true, scale: 2.5, ..router::RouterConfig::softmax(49, 5, true) },
        ];
        for (i, cfg) in configs.iter().enumerate() {
            let tokens = [1, 37, 5, 300, 61, 45][i];
            let logits = spaced_logits(&mut rng, tokens, cfg.n_experts);
            let bias = cfg.sigmoid.then(|| random(&mut rng, cfg.n_experts, 0.3));
            let bias_buf = bias.as_ref().map(|b| upload(ctx, b));
            let ids = ctx.storage_from("ids", &vec![u32::MAX; tokens * cfg.top_k]).unwrap();
            let weights = poisoned(ctx, tokens * cfg.top_k);
            let mut b = Batch::new(ctx);
            router::route(&mut b, cfg, &upload(ctx, &logits), bias_buf.as_ref(), &ids, &weights, tokens).unwrap();
            b.submit().unwrap();
            let (want_ids, want_w) = router::reference(cfg, &logits, bias.as_deref());
            assert_eq!(ctx.read_u32(&ids, tokens * cfg.top_k).unwrap(), want_ids, "router {cfg:?}");
            assert_close(&format!("router {cfg:?}"), &ctx.read_f32(&weights, tokens * cfg.top_k).unwrap(), &want_w, 1e-12);
        }
    }
}

fn check_attention(ctx: &GpuContext, rng: &mut StdRng, shape: attention::AttentionShape, ranges: &[u32], kv_rows: usize) {
    let nq = ranges.len() / 2;
    let q = random(rng, nq * shape.n_heads * shape.head_dim, 1.0);
    let k = random(rng, kv_rows * shape.n_kv_heads * shape.head_dim, 1.0);
    let v = random(rng, kv_rows * shape.n_kv_heads * shape.v_dim, 1.0);
    let out_len = nq * shape.n_heads * shape.v_dim;
    let ranges_buf = ctx.storage_from("ranges", ranges).unwrap();
    let k_buf = upload(ctx, &k);
    let v_buf = if shape.values_in_keys { k_buf.clone() } else { upload(ctx, &v) };
    let want = attention::reference(&shape, &q, &k, &v, ranges);
    let q_buf = upload(ctx, &q);
    // Every variant the tuning may choose on this device (one on the CPU device).
    let kernels = if ctx.is_cpu() { vec![attention::AttentionKernel::default()] } else { attention::AttentionKernel::candidates(ctx.features(), 256) };
    for kernel in kernels {
        let out = poisoned(ctx, out_len);
        let mut b = Batch::new(ctx);
        attention::attention_with(&mut b, kernel, &shape, &q_buf, &k_buf, &v_buf, &ranges_buf, &out, nq, kv_rows).unwrap();
        b.submit().unwrap();
        let got = ctx.read_f32(&out, out_len).unwrap();
        assert_close(&format!("attention {shape:?} {kernel:?} {:?}", ctx.features()), &got, &want, 1e-10);
    }
}

#[test]
fn attention_causal_prefill_of_a_ragged_batch() {
    let mut rng = StdRng::seed_from_u64(10);
    for ctx in variants() {
        let lens = [1, 7, 33, 70];
        let ranges = attention::prefill_ranges(&lens);
        check_attention(&ctx, &mut rng, attention::AttentionShape::new(4, 2, 64), &ranges, lens.iter().sum());
        check_attention(&ctx, &mut rng, attention::AttentionShape::new(3, 3, 80), &attention::prefill_ranges(&[5, 66]), 71);
    }
}

#[test]
fn attention_decode_over_a_ragged_cache() {
    let mut rng = StdRng::seed_from_u64(11);
    for ctx in variants() {
        // Three sequences whose caches lie apart in one buffer, with 1, 65 and 257 entries.
        let starts = [0, 10, 100];
        let lens = [1, 65, 257];
        let ranges = attention::decode_ranges(&starts, &lens);
        check_attention(&ctx, &mut rng, attention::AttentionShape::new(8, 2, 128), &ranges, 357);
        let mut shape = attention::AttentionShape::new(2, 1, 40);
        shape.scale = 0.3;
        check_attention(&ctx, &mut rng, shape, &attention::decode_ranges(&[3], &[29]), 32);
        // 24 query heads on 2 kv heads: groups of 12, served 6 heads to a workgroup.
        check_attention(&ctx, &mut rng, attention::AttentionShape::new(24, 2, 32), &attention::decode_ranges(&[0, 300], &[300, 1]), 301);
    }
}

#[test]
fn attention_over_a_latent_cache_whose_keys_hold_the_values() {
    let mut rng = StdRng::seed_from_u64(12);
    for ctx in variants() {
        // MLA's absorbed form: 6 heads on one row per token of 77 (latent 66 + rope 11), values
        // the latent; causal prefill and decode over a cache with gaps.
        let shape = attention::AttentionShape::latent(6, 77, 66, 0.2);
        check_attention(&ctx, &mut rng, shape, &attention::prefill_ranges(&[3, 40]), 43);
        check_attention(&ctx, &mut rng, shape, &attention::decode_ranges(&[0, 50], &[30, 270]), 320);
        // The real width, 576 with values of 512, on 16 heads.
        check_attention(&ctx, &mut rng, attention::AttentionShape::latent(16, 576, 512, 0.1), &attention::decode_ranges(&[0, 9], &[9, 21]), 30);
        // Values narrower than keys in their own buffer.
        let mut shape = attention::AttentionShape::new(4, 2, 48);
        shape.v_dim = 20;
        check_attention(&ctx, &mut rng, shape, &attention::prefill_ranges(&[9, 12]), 21);
    }
}

#[test]
fn moe_plan_groups_assignments_by_expert() {
    let mut rng = StdRng::seed_from_u64(12);
    for ctx in &variants() {
        let (tokens, top_k, n_experts) = (257, 3, 13);
        let mut ids: Vec<u32> = (0..tokens * top_k).map(|_| rng.random_range(0..n_experts as u32)).collect();
        ids[5] = 999; // an id out of range gets no row
        for tile in moe::GroupTile::ALL {
            let mut b = Batch::new(ctx);
            let plan = moe::plan(&mut b, &ctx.storage_from("ids", &ids).unwrap(), ids.len(), n_experts, tile).unwrap();
            b.submit().unwrap();
            let offsets = ctx.read_u32(&plan.offsets, n_experts + 1).unwrap();
            assert_eq!(offsets, moe::offsets_reference(&ids, n_experts));
            let tiles = ctx.read_u32(&plan.tile_starts, n_experts + 1).unwrap();
            for e in 0..n_experts {
                let rows = offsets[e + 1] - offsets[e];
                assert_eq!(tiles[e + 1] - tiles[e], rows.div_ceil(tile.rows()));
            }
            let assign_row = ctx.read_u32(&plan.assign_row, ids.len()).unwrap();
            let row_assign = ctx.read_u32(&plan.row_assign, ids.len()).unwrap();
            let mut seen = vec![false; ids.len()];
            for (a, &e) in ids.iter().enumerate() {
                if e as usize >= n_experts {
                    assert_eq!(assign_row[a], u32::MAX);
                    continue;
                }
                let row = assign_row[a];
                assert!(offsets[e as usize] <= row && row < offsets[e as usize + 1], "assignment {a} outside its expert's rows");
                assert_eq!(row_assign[row as usize], a as u32);
                assert!(!std::mem::replace(&mut seen[row as usize], true), "row {row} given twice");
            }
        }
    }
}

#[test]
fn moe_expert_ffn_grouped_matches_per_token_reference() {
    let mut rng = StdRng::seed_from_u64(13);
    for ctx in variants() {
        for (tokens, n_experts, top_k, dim, inter, dtype) in
            [
                (1, 5, 2, 40, 24, WeightDtype::Bf16),
                (33, 5, 2, 40, 24, WeightDtype::F16),
                (257, 7, 3, 72, 40, WeightDtype::F32),
                (9, 5, 2, 64, 96, WeightDtype::Q8_0),
                (3, 4, 2, 256, 256, WeightDtype::Q4K),
                (40, 3, 2, 96, 32, WeightDtype::Q4_0),
            ]
        {
            let x = random(&mut rng, tokens * dim, 1.0);
            let base = random(&mut rng, tokens * dim, 1.0);
            let gate = random(&mut rng, n_experts * inter * dim, 0.3);
            let up = random(&mut rng, n_experts * inter * dim, 0.3);
            let down = random(&mut rng, n_experts * dim * inter, 0.3);
            let logits = spaced_logits(&mut rng, tokens, n_experts);
            let (ids, weights) = router::reference(
                &router::RouterConfig::softmax(n_experts, top_k, true),
                &logits,
                None,
            );
            // The largest case stacks its experts in parts of two experts each.
            let split = tokens == 257;
            let wctx = if split { ctx.with_binding_limit((2 * dtype.bytes_of(inter * dim) + 8) as u64) } else { ctx.clone() };
            let stack = |what: &str, values: &[f32], rows_each: usize, cols: usize| {
                let bytes = moegen::gpu::encode_weights(values, dtype);
                let pieces: Vec<&[u8]> = bytes.chunks(dtype.bytes_of(rows_each * cols)).collect();
                GpuWeight::stack(&wctx, what, &pieces, dtype, rows_each, cols).unwrap()
            };
            let experts = moe::StackedExperts {
                gate: stack("gate", &gate, inter, dim),
                up: stack("up", &up, inter, dim),
                down: stack("down", &down, dim, inter),
                n_experts,
            };
            assert_eq!(experts.gate.parts.len() > 1, split);
            let out = upload(&ctx, &base);
            let mut b = Batch::new(&ctx);
            let ids_buf = ctx.storage_from("ids", &ids).unwrap();
            moe::expert_ffn(&mut b, &upload(&ctx, &x), &ids_buf, &upload(&ctx, &weights), tokens, top_k, &experts, &out).unwrap();
            b.submit().unwrap();
            let got = ctx.read_f32(&out, tokens * dim).unwrap();
            let r = |v: &[f32]| round_weights(v, dtype);
            let want = moe::expert_ffn_reference(&x, &ids, &weights, top_k, &r(&gate), &r(&up), &r(&down), inter, &base);
            assert_close(&format!("moe ffn tokens={tokens} {dtype:?} {:?}", ctx.features()), &got, &want, 1e-10);
        }
    }
}

#[test]
fn both_grouped_tiles_agree() {
    let mut rng = StdRng::seed_from_u64(14);
    let ctx = gpu();
    let (tokens, n_experts, top_k, k, n) = (40, 6, 2, 36, 50);
    let ids: Vec<u32> = (0..tokens * top_k).map(|_| rng.random_range(0..n_experts as u32)).collect();
    let x = random(&mut rng, tokens * k, 1.0);
    let wv = random(&mut rng, n_experts * n * k, 0.5);
    let w = GpuWeight::from_f32(ctx, "w", &wv, WeightDtype::Bf16, n_experts * n, k).unwrap();
    let rounded = round_weights(&wv, WeightDtype::Bf16);
    for tile in moe::GroupTile::ALL {
        let mut b = Batch::new(ctx);
        let plan = moe::plan(&mut b, &ctx.storage_from("ids", &ids).unwrap(), ids.len(), n_experts, tile).unwrap();
        let xg = moe::gather(&mut b, &upload(ctx, &x), &plan, k, top_k).unwrap();
        let y = moe::grouped_matmul(&mut b, &xg, &w, &plan).unwrap();
        b.submit().unwrap();
        let got = ctx.read_f32(&y, ids.len() * n).unwrap();
        let assign_row = ctx.read_u32(&plan.assign_row, ids.len()).unwrap();
        for (a, &e) in ids.iter().enumerate() {
            let t = a / top_k;
            let want = matmul::reference(&x[t * k..(t + 1) * k], &rounded[e as usize * n * k..][..n * k], None, 1, n, k);
            let row = assign_row[a] as usize;
            assert_close(&format!("grouped {tile:?} assignment {a}"), &got[row * n..(row + 1) * n], &want, 1e-10);
        }
    }
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let ctx = gpu();
    let x = upload(ctx, &[1.0; 16]);
    let small = upload(ctx, &[0.0; 4]);
    let w = GpuWeight::from_f32(ctx, "w", &[0.5; 32], WeightDtype::F32, 8, 4).unwrap();
    let mut b = Batch::new(ctx);
    let e = matmul::matmul(&mut b, &x, &w, None, &small, 4).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    assert!(e.to_string().contains("matmul output"), "{e}");
    let e = GpuWeight::upload(ctx, "model.layers.0.mlp.gate.weight", &[0u8; 10], WeightDtype::Bf16, 2, 3).unwrap_err();
    assert!(e.to_string().contains("model.layers.0.mlp.gate.weight"), "{e}");
    let e = ctx.storage("huge", ctx.binding_limit() + 4).unwrap_err();
    assert!(matches!(e, Error::BindingTooLarge { .. }), "{e}");
    // Split mid-expert (rows 0..3 and 3..6 of two 3-row experts... 4 rows a part): refused, not wrong.
    let split = GpuWeight::from_f32(&ctx.with_binding_limit(68), "experts", &[0.5; 24], WeightDtype::F32, 6, 4).unwrap();
    let ids = ctx.storage_from("ids", &[0u32, 1]).unwrap();
    let plan = moe::plan(&mut b, &ids, 2, 2, moe::GroupTile::Small).unwrap();
    let e = moe::grouped_matmul(&mut b, &x, &split, &plan).unwrap_err();
    assert!(e.to_string().contains("splits an expert"), "{e}");
    let e = router::route(
        &mut b,
        &router::RouterConfig::softmax(4, 5, true),
        &x,
        None,
        &ids,
        &small,
        1,
    )
    .unwrap_err();
    assert!(e.to_string().contains("top_k"), "{e}");
    b.submit().unwrap();
    ctx.wait_idle("bad-argument test").unwrap();
}

#[test]
fn a_shader_the_driver_rejects_is_an_error_naming_the_kernel() {
    let ctx = gpu();
    let broken = moegen::gpu::ShaderSource { key: "broken_kernel,WG=64".into(), code: "@compute @workgroup_size(64) fn main( {".into() };
    let e = ctx.pipeline(&broken).unwrap_err();
    assert!(matches!(e, Error::Validation { .. }), "{e}");
    assert!(e.to_string().contains("broken_kernel"), "{e}");
    // The device is still usable afterwards.
    ctx.wait_idle("after a rejected shader").unwrap();
    let buf = ctx.storage_from("after", &[1.0f32, 2.0]).unwrap();
    assert_eq!(ctx.read_f32(&buf, 2).unwrap(), vec![1.0, 2.0]);
}

#[test]
fn pool_reuses_buffers_and_uploads_are_chunked() {
    let ctx = gpu();
    // 20 MiB crosses several upload chunks; every byte must arrive.
    let n = 5 << 20;
    let data: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let buf = ctx.storage_from("big", &data).unwrap();
    assert_eq!(ctx.read_f32(&buf, n).unwrap(), data);
    drop(buf);
    let before = ctx.pool_stats();
    let again = ctx.storage("big again", (n * 4) as u64).unwrap();
    let after = ctx.pool_stats();
    assert_eq!(after.reused, before.reused + 1, "a freed buffer of the same size class was not reused");
    assert!(again.size() == (n * 4) as u64);
}

#[test]
fn timed_submission_reports_a_duration() {
    let ctx = gpu();
    let x = upload(ctx, &[1.0; 4096]);
    let w = GpuWeight::from_f32(ctx, "w", &vec![0.25; 4096 * 64], WeightDtype::F32, 4096, 64).unwrap();
    let y = poisoned(ctx, 64 * 4096);
    let mut b = Batch::new(ctx);
    matmul::matmul(&mut b, &x, &w, None, &y, 64).unwrap();
    let t = b.submit_timed().unwrap();
    assert!(t.as_nanos() > 0);
    assert_eq!(ctx.read_f32(&y, 1).unwrap(), vec![16.0]);
}

/// The int8 path's input rows as the GPU quantised them: values and `[scale, sum]` per unit.
fn read_quantised(ctx: &GpuContext, xq: &matmul_int8::QuantisedRows) -> (Vec<i8>, Vec<[f32; 2]>) {
    let q = ctx.read_bytes(&xq.q, 0, (xq.m * xq.k) as u64).unwrap().into_iter().map(|b| b as i8).collect();
    let s = ctx.read_f32(&xq.s, xq.m * xq.k / 16).unwrap().chunks_exact(2).map(|p| [p[0], p[1]]).collect();
    (q, s)
}

#[test]
fn int8_mode_swiglu_gives_the_hosts_bits() {
    // Under --gpu-compute int8 the activation is computed by fixed operations: the host experts
    // beside the GPU rely on getting its bits. Wide and extreme gates: the clamps, the exp
    // limits, values whose 1 + e^-g is a power of two.
    let mut rng = StdRng::seed_from_u64(62);
    let ctx = gpu().with_int8_products(true);
    let n = 40_007;
    let mut gate = random(&mut rng, n, 12.0);
    let edges = [0.0, -0.0, 1e-30, -1e-30, 79.9, -79.9, -80.0, -80.1, -88.0, -90.0, -1e30, 87.3, 87.4, 89.0, 1e30, std::f32::consts::LN_2, -std::f32::consts::LN_2];
    gate[..edges.len()].copy_from_slice(&edges);
    for (i, g) in gate.iter_mut().enumerate().skip(edges.len()).step_by(11) {
        *g = (i % 200) as f32 - 100.0;
    }
    let up = random(&mut rng, n, 2.0);
    let out = poisoned(&ctx, n);
    let mut b = Batch::new(&ctx);
    elementwise::swiglu_range(&mut b, &upload(&ctx, &gate), &upload(&ctx, &up), &out, 0, n).unwrap();
    b.submit().unwrap();
    let got = ctx.read_f32(&out, n).unwrap();
    let mut host = vec![f32::NAN; n];
    moegen::cpu::simd::swiglu_portable(&gate, &up, &mut host);
    for i in 0..n {
        assert_eq!(got[i].to_bits(), host[i].to_bits(), "gate {:e}, up {}: GPU {:e}, host {:e}", gate[i], up[i], got[i], host[i]);
        // And it is silu: within 4e-7 relative where silu is not negligible.
        let g = gate[i] as f64;
        let exact = g / (1.0 + (-g).exp()) * up[i] as f64;
        let silu = moegen::cpu::simd::silu_portable(gate[i]) as f64;
        if g >= -80.0 {
            assert!((silu - g / (1.0 + (-g).exp())).abs() <= 4e-7 * (g / (1.0 + (-g).exp())).abs() + 1e-38, "silu({g}) = {silu}");
        } else {
            assert!(silu.abs() < 1e-32 * g.abs().max(1.0) && exact.abs() < 1e-30, "silu({g}) = {silu}");
        }
    }
}

#[test]
fn int8_quantiser_rounds_each_unit_of_32_to_its_scale() {
    let mut rng = StdRng::seed_from_u64(60);
    let ctx = gpu();
    let (rows, k, row0) = (11, 96, 2);
    let mut x = random(&mut rng, rows * k, 3.0);
    // A unit of zeros (scale 0), one with a single huge value, one of tiny values, one below the
    // smallest scale (zeros too).
    x[(row0 + 1) * k..(row0 + 1) * k + 32].fill(0.0);
    x[(row0 + 2) * k + 40] = 1e30;
    x[(row0 + 3) * k + 64..(row0 + 3) * k + 96].iter_mut().for_each(|v| *v *= 1e-15);
    x[(row0 + 4) * k..(row0 + 4) * k + 32].iter_mut().for_each(|v| *v *= 1e-21);
    // Units of exact halves of their scale (short scales), and of the floats nearest the halves
    // of a full-length scale and a few steps either side: a reciprocal's rounding moves many of
    // these (one in two here on llvmpipe before the exact test), the exact test none.
    for (unit, top, exact) in [(row0 + 5, 127.0f32, true), (row0 + 6, -1.5 * 127.0 / 64.0, true), (row0 + 7, 2.423578, false)] {
        let d = top.abs() * matmul_int8::RECIP_127;
        let at = unit * k + 32;
        x[at] = top;
        for i in 1..32 {
            let half = (2 * 7 * (i as i64 - 16) + 1) as f64 / 2.0 * d as f64;
            let v = half as f32;
            assert!(!exact || v as f64 == half, "unit {unit}: {half} is not a float");
            let step = if exact { [0, 1, -1][i % 3] } else { i as i32 % 7 - 3 };
            x[at + i] = f32::from_bits((v.to_bits() as i32 + step) as u32);
        }
    }
    let m = rows - row0 - 1;
    let mut b = Batch::new(ctx);
    let xq = matmul_int8::quantize(&mut b, &upload(ctx, &x), row0, m, k).unwrap();
    b.submit().unwrap();
    let (q, s) = read_quantised(ctx, &xq);
    let (want_q, want_s) = matmul_int8::quantize_reference(&x[row0 * k..(row0 + m) * k]);
    // The same bytes and scales as the host's, every one (the host experts rely on it).
    for (u, (got, want)) in s.iter().zip(&want_s).enumerate() {
        assert_eq!(got[0].to_bits(), want[0].to_bits(), "unit {u}: scale {} not {}", got[0], want[0]);
        let sum: i32 = q[u * 32..(u + 1) * 32].iter().map(|&v| v as i32).sum();
        assert_eq!((got[1], want[1]), (sum as f32, sum as f32), "unit {u}: the sum is not the values'");
        for i in u * 32..(u + 1) * 32 {
            assert_eq!(q[i], want_q[i], "element {i}: x = {:e}, x / d = {}", x[row0 * k + i], x[row0 * k + i] as f64 / want[0] as f64);
        }
    }
    // The reference itself: ties to even, and each value the nearest to x / d.
    for (i, (&v, &qv)) in x[row0 * k..(row0 + m) * k].iter().zip(&want_q).enumerate() {
        let d = want_s[i / 32][0];
        if d > 0.0 {
            let exact = v as f64 / d as f64;
            let gap = (exact - qv as f64).abs();
            assert!(gap < 0.5 || (gap == 0.5 && qv % 2 == 0) || exact.abs() > 127.0, "element {i}: {qv} for {exact}");
        }
    }
    let units_per_row = k / 32;
    for zeros in [units_per_row, 4 * units_per_row] {
        assert!(s[zeros].iter().all(|&v| v == 0.0) && q[zeros * 32..(zeros + 1) * 32].iter().all(|&v| v == 0), "unit {zeros} quantises to zeros");
    }
    assert!(s[3 * units_per_row + 2][0] > 0.0, "tiny units above the bound keep their scale");
    let ties = (5 * units_per_row + 1..8 * units_per_row).step_by(units_per_row).flat_map(|u| u * 32 + 1..u * 32 + 32).filter(|&i| (x[row0 * k + i] as f64 / want_s[i / 32][0] as f64).fract().abs() == 0.5).count();
    assert!(ties >= 18, "only {ties} exact halves");
}

#[test]
fn int8_matmul_matches_its_model_on_every_format_and_path() {
    let mut rng = StdRng::seed_from_u64(61);
    let ctx = gpu().with_int8_products(true);
    let paths = [
        matmul_int8::Int8Path::Vector { tok: 1, wg: 64 },
        matmul_int8::Int8Path::Vector { tok: 4, wg: 32 },
        matmul_int8::Int8Path::Vector { tok: 8, wg: 128 },
        matmul_int8::Int8Path::Tiled { bm: 16 },
        matmul_int8::Int8Path::Tiled { bm: 32 },
        matmul_int8::Int8Path::Tiled { bm: 64 },
    ];
    for dtype in WeightDtype::QUANTISED {
        for extremes in [false, true] {
            // Three blocks a row (an odd count of 34-, 18- and 210-byte blocks) and columns that
            // fill neither a workgroup nor a tile.
            let (n, k) = (67, 3 * dtype.block_elems());
            let (bytes, values) = block_weights(&mut rng, dtype, n, k, extremes);
            let w = GpuWeight::upload(&ctx, "w", &bytes, dtype, n, k).unwrap();
            let (wq, wa) = matmul_int8::sub_blocks(dtype, &bytes);
            for m in [1, 3, 7, 40, 67] {
                let x = random(&mut rng, m * k, 1.0);
                let bv = random(&mut rng, n, 1.0);
                let (xb, bb) = (upload(&ctx, &x), upload(&ctx, &bv));
                let mut b = Batch::new(&ctx);
                let xq = matmul_int8::quantize(&mut b, &xb, 0, m, k).unwrap();
                b.submit().unwrap();
                let (q, s) = read_quantised(&ctx, &xq);
                let want = matmul_int8::model(&q, &s, &wq, &wa, Some(&bv), m, n, k);
                let mut first: Option<Vec<u32>> = None;
                for path in paths {
                    let y = poisoned(&ctx, m * n);
                    let mut b = Batch::new(&ctx);
                    matmul_int8::matmul_quantised(&mut b, &xq, &w, Some(&bb), &y, 0, None, path).unwrap();
                    b.submit().unwrap();
                    let got = ctx.read_f32(&y, m * n).unwrap();
                    let what = format!("int8 matmul {m}x{n}x{k} {dtype:?} extremes={extremes} {path:?}");
                    assert_close(&what, &got, &want, 1e-12);
                    // Every path adds the same terms in the same order: a row's bits do not
                    // depend on the path (nor, so, on the rows beside it).
                    let bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                    // The kernels round each product and sum on their own: the model's bits.
                    if let Some(i) = (0..bits.len()).find(|&i| bits[i] != want[i].to_bits()) {
                        panic!("{what}: output {i} is {} where the model gives {}", got[i], want[i]);
                    }
                    match &first {
                        Some(f) => assert_eq!(&bits, f, "{what}: bits differ from the first path's"),
                        None => first = Some(bits),
                    }
                }
                // Against the exact product on the decoded weights: within 8-bit rounding.
                if !extremes {
                    let exact = matmul::reference(&x, &values, Some(&bv), m, n, k);
                    let y = poisoned(&ctx, m * n);
                    let mut b = Batch::new(&ctx);
                    matmul::matmul_rows(&mut b, &xb, &w, Some(&bb), &y, matmul::Rows::all(m), None).unwrap();
                    b.submit().unwrap();
                    assert_close(&format!("int8 matmul {m}x{n}x{k} {dtype:?} against f32"), &ctx.read_f32(&y, m * n).unwrap(), &exact, 1e-3);
                }
            }
        }
    }
}

#[test]
fn int8_matmul_through_matmul_rows_at_offsets_and_split_bindings() {
    let mut rng = StdRng::seed_from_u64(62);
    let ctx = gpu().with_int8_products(true);
    for dtype in [WeightDtype::Q8_0, WeightDtype::Q6K] {
        let (m, n, k) = (9, 70, 2 * dtype.block_elems());
        let small = ctx.with_binding_limit((16 * k * dtype.block_bytes() / dtype.block_elems()) as u64);
        let (bytes, _) = block_weights(&mut rng, dtype, n, k, false);
        let w = GpuWeight::upload(&small, "split w", &bytes, dtype, n, k).unwrap();
        assert!(w.parts.len() >= 4, "{} parts", w.parts.len());
        let x = random(&mut rng, (m + 3) * k, 1.0);
        let bv = random(&mut rng, n, 1.0);
        let stride = n + 5;
        for m_here in [1, m] {
            let y = poisoned(&ctx, (m_here + 1) * stride);
            let mut b = Batch::new(&small);
            let rows = matmul::Rows { m: m_here, x_row0: 3, y_row0: 1, y_stride: Some(stride) };
            matmul::matmul_rows(&mut b, &upload(&ctx, &x), &w, Some(&upload(&ctx, &bv)), &y, rows, None).unwrap();
            b.submit().unwrap();
            let got = ctx.read_f32(&y, (m_here + 1) * stride).unwrap();
            let (q, s) = matmul_int8::quantize_reference(&x[3 * k..(3 + m_here) * k]);
            let (wq, wa) = matmul_int8::sub_blocks(dtype, &bytes);
            let want = matmul_int8::model(&q, &s, &wq, &wa, Some(&bv), m_here, n, k);
            let got_rows: Vec<f32> = (0..m_here).flat_map(|r| got[(r + 1) * stride..(r + 1) * stride + n].to_vec()).collect();
            assert_close(&format!("int8 matmul {dtype:?} split, {m_here} rows at offsets"), &got_rows, &want, 1e-9);
            assert!(got[..stride].iter().all(|v| v.is_nan()), "row 0 was written");
            assert!((1..=m_here).all(|r| got[r * stride + n..(r + 1) * stride].iter().all(|v| v.is_nan())), "columns past n were written");
        }
    }
}

#[test]
fn int8_grouped_expert_matmul_gives_each_row_the_models_bits() {
    let mut rng = StdRng::seed_from_u64(63);
    let ctx = gpu().with_int8_products(true);
    for dtype in [WeightDtype::Q4K, WeightDtype::Q8_0, WeightDtype::Q6K] {
        let (tokens, n_experts, top_k, n) = (40, 6, 2, 50);
        let k = if dtype.block_elems() == 32 { 96 } else { 512 };
        let ids: Vec<u32> = (0..tokens * top_k).map(|_| rng.random_range(0..n_experts as u32)).collect();
        let x = random(&mut rng, tokens * k, 1.0);
        let (bytes, _) = block_weights(&mut rng, dtype, n_experts * n, k, false);
        let w = GpuWeight::upload(&ctx, "w", &bytes, dtype, n_experts * n, k).unwrap();
        let (wq, wa) = matmul_int8::sub_blocks(dtype, &bytes);
        let xb = upload(&ctx, &x);
        // The tokens' rows as the GPU quantises them (each gathered row is a copy of one).
        let mut b = Batch::new(&ctx);
        let xq = matmul_int8::quantize(&mut b, &xb, 0, tokens, k).unwrap();
        b.submit().unwrap();
        let (q, s) = read_quantised(&ctx, &xq);
        let (per_w, per_a) = (n * k, n * k / 32);
        for tile in moe::GroupTile::ALL {
            let mut b = Batch::new(&ctx);
            let plan = moe::plan(&mut b, &ctx.storage_from("ids", &ids).unwrap(), ids.len(), n_experts, tile).unwrap();
            let xg = moe::gather(&mut b, &xb, &plan, k, top_k).unwrap();
            let y = moe::grouped_matmul(&mut b, &xg, &w, &plan).unwrap();
            b.submit().unwrap();
            let got = ctx.read_f32(&y, ids.len() * n).unwrap();
            let assign_row = ctx.read_u32(&plan.assign_row, ids.len()).unwrap();
            for (a, &e) in ids.iter().enumerate() {
                let (t, e) = (a / top_k, e as usize);
                let units = k / 32;
                let want = matmul_int8::model(&q[t * k..(t + 1) * k], &s[t * units..(t + 1) * units], &wq[e * per_w..(e + 1) * per_w], &wa[e * per_a..(e + 1) * per_a], None, 1, n, k);
                let row = assign_row[a] as usize;
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got[row * n..(row + 1) * n]), bits(&want), "{dtype:?} {tile:?}: assignment {a} (token {t}, expert {e})");
            }
        }
    }
}
