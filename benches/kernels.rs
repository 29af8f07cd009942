//! Kernel benchmarks: `cargo bench`. Prints, for each shape, the median GPU time (timestamp
//! queries where the adapter has them, else wall time to completion) and the rate it implies.
//! Figures are side by side from one run; record them in BENCHMARKS.md with the adapter name.
//! `MOEGEN_BENCH_QUICK=1` runs fewer repetitions; `MOEGEN_BENCH_TOKENS=1,16` picks the matmul
//! token counts (default 1,16,256,2048).

use std::time::Duration;

use moegen::gpu::{AdapterChoice, Batch, DeviceChoice, GpuBuffer, GpuContext, GpuWeight, WeightDtype};
use moegen::cpu::attention::{attention_with, KeySpan, PagedRows};
use moegen::cpu::simd::{Isa, Values};
use moegen::kernels::{attention, matmul};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(ctx: &GpuContext, reps: usize, mut record: impl FnMut(&mut Batch)) -> Duration {
    let mut warm = Batch::new(ctx);
    record(&mut warm);
    warm.submit_timed().expect("warm-up run");
    median(
        (0..reps)
            .map(|_| {
                let mut b = Batch::new(ctx);
                record(&mut b);
                b.submit_timed().expect("timed run")
            })
            .collect(),
    )
}

/// The tuned decode attention kernel, and the subgroup one beside it where it may run.
fn attention_variants(ctx: &GpuContext) -> Vec<attention::AttentionKernel> {
    let tuned = ctx.tuning().attention;
    let mut out = vec![tuned];
    if ctx.features().subgroup_attention {
        let other = attention::AttentionKernel { subgroup_keys: !tuned.subgroup_keys, ..tuned };
        out.push(other);
    }
    out
}

fn attention_name(ctx: &GpuContext, kernel: attention::AttentionKernel) -> String {
    let tuned = if kernel == ctx.tuning().attention { ", tuned" } else { "" };
    format!("{} threads, {}{tuned}", kernel.wg, if kernel.subgroup_keys { "a subgroup per key" } else { "a thread per key" })
}

fn filled(ctx: &GpuContext, n: usize, seed: u32) -> GpuBuffer {
    let v: Vec<f32> = (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0) - 0.5).collect();
    ctx.storage_from("bench data", &v).expect("upload")
}

/// The CPU device's matmul (the op the forward pass records, on the host) at the GPU table's
/// shapes, beside this machine's f32 peak measured in the same run: the `gemm` crate's sgemm on
/// f32 matrices of the same shape, called directly.
fn cpu_matmul(quick: bool) {
    let cpu = GpuContext::cpu();
    let (n, k) = (5632, 2048);
    let threads = rayon::current_num_threads();
    let peak = {
        let m = 2048;
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let run = |c: &mut Vec<f32>| {
            let t = std::time::Instant::now();
            // SAFETY: [m, k] x [k, n] (read from [n, k] rows) into [m, n], all within the vectors.
            unsafe {
                gemm::gemm(m, n, k, c.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), 1, k as isize, b.as_ptr(), k as isize, 1, 0.0, 1.0, false, false, false, gemm::Parallelism::Rayon(threads));
            }
            t.elapsed()
        };
        run(&mut c);
        // The best of five: the peak this machine reaches, not a typical run.
        let t = (0..5).map(|_| run(&mut c)).min().expect("five runs");
        2.0 * (m * n * k) as f64 / t.as_secs_f64() / 1e9
    };
    println!("\nCPU device matmul y = x W^T, W {n}x{k}, {threads} threads, {}; f32 peak (gemm crate sgemm, 2048 x {n} x {k}): {peak:.1} GFLOP/s", cpu.info().name);
    println!("{:>6} {:>5} {:>12} {:>10} {:>10} {:>8}", "tokens", "W", "time", "GFLOP/s", "W GB/s", "of peak");
    // bf16 weights again with bf16 products (`--cpu-compute bf16`) where the CPU has AVX512-BF16,
    // the K formats again with int8 products (`--cpu-compute int8`) where it has AVX512-VNNI or AVX2.
    use moegen::cpu::bf16_products::CpuCompute;
    let mut runs = vec![(WeightDtype::Bf16, CpuCompute::F32), (WeightDtype::F32, CpuCompute::F32), (WeightDtype::Q8_0, CpuCompute::F32), (WeightDtype::Q4K, CpuCompute::F32), (WeightDtype::Q6K, CpuCompute::F32)];
    if moegen::cpu::bf16_products::supported() {
        runs.push((WeightDtype::Bf16, CpuCompute::Bf16));
    }
    if moegen::cpu::int8_products::supported() {
        runs.extend([(WeightDtype::Q4K, CpuCompute::Int8), (WeightDtype::Q6K, CpuCompute::Int8)]);
    }
    for (dtype, compute) in runs {
        moegen::cpu::bf16_products::set(compute).expect("detected above");
        let wv: Vec<f32> = (0..n * k).map(|i| ((i % 251) as f32 - 125.0) / 500.0).collect();
        // Q6_K has no quantiser here: random blocks of moderate scales.
        let w = if dtype == WeightDtype::Q6K {
            GpuWeight::upload(&cpu, "bench weight", &moegen::quant::random_blocks(dtype, n * k / dtype.block_elems(), 5, false), dtype, n, k)
        } else {
            GpuWeight::from_f32(&cpu, "bench weight", &wv, dtype, n, k)
        }
        .expect("weight");
        let tokens: &[usize] = if dtype.is_quantised() { &[1, 4, 16, 64, 256] } else { &[1, 4, 16, 64, 256, 2048] };
        for &m in tokens {
            let x = filled(&cpu, m * k, 1);
            let y = cpu.storage("bench out", (m * n * 4) as u64).expect("out");
            let reps = if quick || m >= 256 { 3 } else { 10 };
            let t = time(&cpu, reps, |b| matmul::matmul(b, &x, &w, None, &y, m).expect("matmul"));
            let gflops = 2.0 * (m * n * k) as f64 / t.as_secs_f64() / 1e9;
            let bytes = dtype.bytes_of(n * k) as f64;
            println!(
                "{m:>6} {:>5} {:>10.3}ms {:>10.1} {:>10.1} {:>7.0}%{}",
                dtype.name(),
                t.as_secs_f64() * 1e3,
                gflops,
                bytes / t.as_secs_f64() / 1e9,
                100.0 * gflops / peak,
                match compute {
                    CpuCompute::F32 => "",
                    CpuCompute::Bf16 => "  bf16 products (inputs rounded to bf16)",
                    CpuCompute::Int8 => "  int8 products (inputs quantised to 8 bits)",
                }
            );
        }
    }
    moegen::cpu::bf16_products::set(moegen::cpu::bf16_products::CpuCompute::F32).expect("f32 is always available");
    // Host experts beside a GPU with `--gpu-compute int8` compute its bits (`cpu::gpu_int8`),
    // quantising their inputs included.
    for dtype in [WeightDtype::Q4K, WeightDtype::Q8_0] {
        let bytes = moegen::quant::random_blocks(dtype, n * k / dtype.block_elems(), 5, false);
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
        let rows = moegen::cpu::matmul::WeightRows { words: &words, dtype, cols: k };
        for m in [1usize, 4, 16, 64] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 50.0).collect();
            let mut y = vec![0f32; m * n];
            let reps = if quick { 3 } else { 10 };
            let mut run = || {
                let t = std::time::Instant::now();
                let q = moegen::cpu::gpu_int8::quantise(&x, m, k);
                moegen::cpu::gpu_int8::matmul(Isa::detected(), &q, rows, n, &mut y);
                t.elapsed()
            };
            run();
            let t = median((0..reps).map(|_| run()).collect());
            let gflops = 2.0 * (m * n * k) as f64 / t.as_secs_f64() / 1e9;
            println!(
                "{m:>6} {:>5} {:>10.3}ms {:>10.1} {:>10.1} {:>7.0}%  the GPU's int8 bits (host experts beside --gpu-compute int8)",
                dtype.name(),
                t.as_secs_f64() * 1e3,
                gflops,
                dtype.bytes_of(n * k) as f64 / t.as_secs_f64() / 1e9,
                100.0 * gflops / peak
            );
        }
    }
    // What the planner's calibration measures for CPU experts, by thread count.
    for t in [1, threads] {
        let Ok(pool) = rayon::ThreadPoolBuilder::new().num_threads(t).build() else { continue };
        let m = pool.install(moegen::planner::hardware::calibrate_host_matmul);
        println!(
            "host matmul calibration, {t} thread(s), {} path: bf16 weights read at 1 row {:.1} GB/s, dot path at 64 rows {:.1} GFLOP/s, gemm at 256 rows {:.1} GFLOP/s",
            Isa::detected().name(),
            m.weight_bytes_per_s / 1e9,
            m.dot_flops / 1e9,
            m.gemm_flops / 1e9
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter on the section names.
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let quick = std::env::var("MOEGEN_BENCH_QUICK").is_ok();
    let ctx = GpuContext::new(&AdapterChoice { device: DeviceChoice::Gpu, ..AdapterChoice::from_env(None) }).expect("a GPU adapter");
    let f = ctx.features();
    println!(
        "adapter: {} ({:?}, {:?}), driver {} {}; f16 {}, subgroups {}, timestamps {}",
        ctx.info().name,
        ctx.info().backend,
        ctx.info().device_type,
        ctx.info().driver,
        ctx.info().driver_info,
        f.f16,
        f.subgroups,
        f.timestamps
    );
    println!(
        "cooperative matrices: {}; subgroup attention: {}",
        f.coop.map_or("none (or not asked for: MOEGEN_EXPERIMENTAL=coop-matrix)".into(), |c| format!("{0}x{0} {1} inputs, f32 sums, subgroups of {2}", c.size, if c.f16_inputs { "f16" } else { "f32" }, c.subgroup)),
        if f.subgroup_attention { "allowed" } else { "off" }
    );
    // The kernel variants this adapter's calibration chose (measured now if not cached), unless
    // MOEGEN_DEFAULT_KERNELS is set.
    moegen::planner::hardware::HardwareProfile::for_adapter(&ctx, 1 << 30, 1 << 30).expect("calibration");
    println!("kernel tuning: {}", serde_json::to_string(&ctx.tuning()).unwrap_or_default());

    if wants("matmul") {
        let (n, k) = (5632, 2048);
        println!("\nmatmul y = x W^T, W {n}x{k}");
        println!("{:>6} {:>5} {:>30} {:>12} {:>10} {:>10}", "tokens", "W", "path", "time", "GFLOP/s", "W GB/s");
        // Block formats: what a quantised expert or projection costs the kernels (W GB/s counts
        // the packed bytes).
        for dtype in [WeightDtype::Bf16, WeightDtype::F32, WeightDtype::Q8_0, WeightDtype::Q4K] {
            let wv: Vec<f32> = (0..n * k).map(|i| ((i % 251) as f32 - 125.0) / 500.0).collect();
            let w = GpuWeight::from_f32(&ctx, "bench weight", &wv, dtype, n, k).expect("weight");
            let counts: Vec<usize> = std::env::var("MOEGEN_BENCH_TOKENS")
                .ok()
                .map(|v| v.split(',').filter_map(|t| t.trim().parse().ok()).collect())
                .unwrap_or_else(|| vec![1, 16, 256, 2048]);
            for &m in &counts {
                let x = filled(&ctx, m * k, 1);
                let y = ctx.storage("bench out", (m * n * 4) as u64).expect("out");
                let reps = if quick || m >= 256 { 3 } else { 10 };
                // The path the tuning takes, and cooperative matrices beside it where they exist.
                let tuned = ctx.matmul_path(m);
                let coop = ctx.features().coop.map(|shape| matmul::MatmulPath::Coop { shape, emulated: false });
                // And block formats with 8-bit inputs (--gpu-compute int8), their quantising
                // included, on the same path.
                let int8 = moegen::kernels::matmul_int8::supports(dtype).then_some((tuned, true));
                for (path, on_int8) in std::iter::once((tuned, false)).chain(coop.filter(|c| *c != tuned).map(|c| (c, false))).chain(int8) {
                    let run_ctx = ctx.with_int8_products(on_int8);
                    let t = time(&run_ctx, reps, |b| matmul::matmul_rows(b, &x, &w, None, &y, matmul::Rows::all(m), Some(path)).expect("matmul"));
                    let flops = 2.0 * (m * n * k) as f64;
                    let bytes = dtype.bytes_of(n * k) as f64;
                    let name = match path {
                        matmul::MatmulPath::Coop { shape, .. } => format!("coop {0}x{0} {1}", shape.size, if shape.f16_inputs { "f16" } else { "f32" }),
                        other if on_int8 => format!("int8 {:?}", moegen::kernels::matmul_int8::Int8Path::of(other)),
                        other => format!("{other:?}"),
                    };
                    println!(
                        "{m:>6} {:>5} {:>30} {:>10.3}ms {:>10.1} {:>10.1}",
                        dtype.name(),
                        name,
                        t.as_secs_f64() * 1e3,
                        flops / t.as_secs_f64() / 1e9,
                        bytes / t.as_secs_f64() / 1e9
                    );
                }
            }
        }
    }

    if wants("cpu matmul") {
        cpu_matmul(quick);
    }

    if wants("attention") {
        println!("\ndecode attention: 32 query heads, 8 kv heads, head dim 128");
        println!("{:>9} {:>8} {:>12} {:>10} {:>10}", "sequences", "context", "time", "KV GB/s", "GFLOP/s");
        let shape = attention::AttentionShape::new(32, 8, 128);
        for (seqs, context) in [(1usize, 512usize), (16, 512), (32, 1024)] {
            let kv_rows = seqs * context;
            let q = filled(&ctx, seqs * 32 * 128, 2);
            let k = filled(&ctx, kv_rows * 8 * 128, 3);
            let v = filled(&ctx, kv_rows * 8 * 128, 4);
            let out = ctx.storage("bench out", (seqs * 32 * 128 * 4) as u64).expect("out");
            let starts: Vec<usize> = (0..seqs).map(|s| s * context).collect();
            let ranges = ctx.storage_from("ranges", &attention::decode_ranges(&starts, &vec![context; seqs])).expect("ranges");
            let reps = if quick { 3 } else { 10 };
            for kernel in attention_variants(&ctx) {
                let t = time(&ctx, reps, |b| attention::attention_with(b, kernel, &shape, &q, &k, &v, &ranges, &out, seqs, kv_rows).expect("attention"));
                let kv_bytes = 2.0 * (kv_rows * 8 * 128 * 4) as f64;
                let flops = 4.0 * (seqs * 32 * context * 128) as f64;
                println!(
                    "{seqs:>9} {context:>8} {:>10.3}ms {:>10.1} {:>10.1}  {}",
                    t.as_secs_f64() * 1e3,
                    kv_bytes / t.as_secs_f64() / 1e9,
                    flops / t.as_secs_f64() / 1e9,
                    attention_name(&ctx, kernel)
                );
            }
        }
    }

    if wants("latent") {
        // DeepSeek-V2-Lite's absorbed MLA decode: 16 heads over one 576-value latent row per
        // token (512 of them the values); the cache holds 2304 bytes a token and layer, where
        // expanded keys and values would take 16 x (192 + 128) x 4 = 20480.
        println!("\nlatent (MLA) decode attention: 16 query heads, rows of 576 (values 512), f32 cache");
        println!("{:>9} {:>8} {:>12} {:>10} {:>10}", "sequences", "context", "time", "KV GB/s", "GFLOP/s");
        let shape = attention::AttentionShape::latent(16, 576, 512, 0.1);
        for (seqs, context) in [(1usize, 512usize), (16, 512)] {
            let kv_rows = seqs * context;
            let q = filled(&ctx, seqs * 16 * 576, 2);
            let kv = filled(&ctx, kv_rows * 576, 3);
            let out = ctx.storage("bench out", (seqs * 16 * 512 * 4) as u64).expect("out");
            let starts: Vec<usize> = (0..seqs).map(|s| s * context).collect();
            let ranges = ctx.storage_from("ranges", &attention::decode_ranges(&starts, &vec![context; seqs])).expect("ranges");
            let reps = if quick { 3 } else { 10 };
            let t = time(&ctx, reps, |b| attention::attention(b, &shape, &q, &kv, &kv, &ranges, &out, seqs, kv_rows).expect("attention"));
            let kv_bytes = (kv_rows * 576 * 4) as f64;
            let flops = 2.0 * (seqs * 16 * context * (576 + 512)) as f64;
            println!(
                "{seqs:>9} {context:>8} {:>10.3}ms {:>10.1} {:>10.1}",
                t.as_secs_f64() * 1e3,
                kv_bytes / t.as_secs_f64() / 1e9,
                flops / t.as_secs_f64() / 1e9
            );
        }
    }

    if wants("host") {
        // The same decode shapes on the host, over 16-token pages in a scrambled order, on every
        // instruction-set path this CPU has, with one thread and with all of them; beside the
        // host's memory read rate measured now (the bound a memory-bound kernel approaches).
        let profile = moegen::planner::calibrate_host(false);
        println!("\nhost attention over KV pages ({} cores; memory read {:.1} GB/s)", profile.cores, profile.memory_bytes_per_s / 1e9);
        println!("{:>7} {:>8} {:>7} {:>5} {:>9} {:>8} {:>12} {:>10} {:>10}", "shape", "path", "threads", "KV", "sequences", "context", "time", "KV GB/s", "GFLOP/s");
        let shapes = [("GQA", attention::AttentionShape::new(32, 8, 128), 16usize, 512usize), ("MLA", attention::AttentionShape::latent(16, 576, 512, 0.1), 16, 512)];
        for (name, shape, seqs, context) in shapes {
            let page = 16;
            let kw = shape.n_kv_heads * shape.head_dim;
            let vw = if shape.values_in_keys { 0 } else { shape.n_kv_heads * shape.v_dim };
            let pages = seqs * context / page;
            let k: Vec<f32> = (0..pages * page * kw).map(|i| ((i % 251) as f32 - 125.0) / 250.0).collect();
            let v: Vec<f32> = (0..pages * page * vw).map(|i| ((i % 241) as f32 - 120.0) / 240.0).collect();
            let bits = |x: &[f32]| -> Vec<u16> { x.iter().map(|&f| half::bf16::from_f32(f).to_bits()).collect() };
            let (k16, v16) = (bits(&k), bits(&v));
            // Page p of sequence s is page (p * seqs + s): neighbours in a sequence lie apart.
            let tables: Vec<Vec<u32>> = (0..seqs).map(|s| (0..context / page).map(|p| (p * seqs + s) as u32).collect()).collect();
            let spans: Vec<KeySpan> = tables.iter().map(|t| KeySpan { pages: t, first: 0, len: context }).collect();
            let q: Vec<f32> = (0..seqs * shape.n_heads * shape.head_dim).map(|i| ((i % 7) as f32 - 3.0) / 10.0).collect();
            let mut out = vec![0f32; seqs * shape.n_heads * shape.v_dim];
            for isa in Isa::available() {
                for threads in [1, profile.cores] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a thread pool");
                    for bf16 in [false, true] {
                        let rows = if bf16 {
                            PagedRows { keys: Values::Bf16(&k16), values: Values::Bf16(&v16), page_tokens: page }
                        } else {
                            PagedRows { keys: Values::F32(&k), values: Values::F32(&v), page_tokens: page }
                        };
                        let reps = if quick { 3 } else { 7 };
                        let t = median(
                            (0..=reps)
                                .map(|_| {
                                    let start = std::time::Instant::now();
                                    pool.install(|| attention_with(isa, &shape, &rows, &q, &spans, &mut out)).expect("host attention");
                                    start.elapsed()
                                })
                                .collect(),
                        );
                        let kv_bytes = (seqs * context * (kw + vw) * if bf16 { 2 } else { 4 }) as f64;
                        let flops = 2.0 * (seqs * shape.n_heads * context * (shape.head_dim + shape.v_dim)) as f64;
                        println!(
                            "{name:>7} {:>8} {threads:>7} {:>5} {seqs:>9} {context:>8} {:>10.3}ms {:>10.1} {:>10.1}",
                            isa.name(),
                            if bf16 { "bf16" } else { "f32" },
                            t.as_secs_f64() * 1e3,
                            kv_bytes / t.as_secs_f64() / 1e9,
                            flops / t.as_secs_f64() / 1e9
                        );
                    }
                }
            }
        }
    }
}
