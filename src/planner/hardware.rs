//! What the planner knows of the machine: host-to-GPU bandwidth, matmul throughput as a function
//! of the rows it gets, attention throughput, per-dispatch cost, memories. Measured by a short
//! calibration (cached per adapter and driver), or read from a file for hardware we do not have.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gpu::{Batch, GpuContext, GpuWeight, WeightDtype};
use crate::kernels::attention::{attention_with, AttentionKernel, AttentionShape};
use crate::kernels::matmul::{matmul, matmul_rows, MatmulPath, Rows};
use crate::kernels::moe::GroupTile;
use crate::kernels::tuning::KernelTuning;

/// Bumped when the calibration changes, or the kernels it times change speed (20: the CPU
/// device's block formats decoded in registers; 21: bf16 products on AMX tiles; 22: the CPU
/// device's few-row matmuls timed past the last-level cache; 23: the AMX tiles' loads and
/// prefetches, and the AVX-512 tile's loop; 24: the AMX path's inputs rounded and packed in
/// registers), so that old cached profiles are measured again.
const CALIBRATION_VERSION: u32 = 24;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HardwareProfile {
    pub name: String,
    /// Where the figures come from (measured on this machine, or the assumptions of a file).
    pub source: String,
    /// Host-to-GPU and GPU-to-host bytes per second.
    pub upload_bytes_per_s: f64,
    pub readback_bytes_per_s: f64,
    /// A matmul with 16-bit weights over `rows` rows takes `fixed_s + FLOPs / flops`; rows
    /// ascending, interpolated between.
    pub matmul: Vec<MatmulPoint>,
    /// KV bytes per second that decode attention reads.
    pub attention_bytes_per_s: f64,
    /// Fixed cost of one small elementwise dispatch (norms, rope, copies), seconds.
    pub dispatch_s: f64,
    /// Host time to record and submit one dispatch, seconds.
    #[serde(default)]
    pub record_s: f64,
    /// GPU time a submission costs beyond its kernels (pass setup, first use of each pipeline).
    #[serde(default)]
    pub pass_s: f64,
    /// Host cost of one submission whose results come back while the next one runs, seconds.
    #[serde(default)]
    pub submit_s: f64,
    /// A full round trip: submit, wait for the GPU to finish, read a result back, seconds.
    #[serde(default)]
    pub sync_s: f64,
    /// Host memory copies, bytes per second (gathering KV pages and token rows).
    pub host_copy_bytes_per_s: f64,
    pub gpu_memory: u64,
    pub host_memory: u64,
    /// The "GPU" runs on the host's cores (a software adapter): host work and kernels do not
    /// overlap, they take turns.
    #[serde(default)]
    pub shares_cpu: bool,
    /// Largest storage binding, bytes (planning without the adapter at hand).
    #[serde(default = "default_binding")]
    pub binding_limit: u64,
    /// Transfers are held to a rate (`--upload-bandwidth`): each blocks the thread that makes
    /// it, so the scheduler's readbacks wait behind its uploads instead of overlapping them.
    #[serde(skip)]
    pub held_link: bool,
    /// The profile is the CPU device's (`--device cpu`): its memory is host memory and its
    /// "uploads" are copies, which the plan's messages say.
    #[serde(skip)]
    pub cpu_device: bool,
    /// The host as a compute device (none in old files: host attention is then not planned).
    #[serde(default)]
    pub host: Option<HostProfile>,
    /// The kernel variants the calibration found fastest on this adapter (none in files for
    /// hardware we do not have, and on the CPU device).
    #[serde(default)]
    pub kernels: Option<KernelTuning>,
    /// A matmul's time with each block format's weights (and FP8 rows) over its time with bf16
    /// ones, by rows: their decoding costs arithmetic that bf16's does not. None measured (files
    /// for hardware we do not have) prices them as bf16.
    #[serde(default)]
    pub block_matmul: Vec<BlockMatmul>,
    /// Bytes a second that the ops between the matmuls read and write (a SwiGLU over 16 MiB of
    /// activations, timed on the device). None (files for hardware we do not have) leaves them
    /// unpriced: on a GPU they are a percent of a step; on the CPU device about a tenth.
    #[serde(default)]
    pub elementwise_bytes_per_s: Option<f64>,
    #[serde(default)]
    pub calibration_version: u32,
}

/// What the planner knows of the host CPU.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HostProfile {
    pub cores: usize,
    /// Bytes per second the cores together read from memory (a streaming sum).
    pub memory_bytes_per_s: f64,
    /// Decode attention over KV pages by thread count, ascending.
    pub attention: Vec<HostAttentionPoint>,
    /// The host matmul on bf16 weights, every thread (none in files that predate it).
    #[serde(default)]
    pub matmul: Option<HostMatmul>,
    /// Measured, or the assumptions of a file.
    pub source: String,
}

/// The host matmul (`src/cpu/matmul.rs`) on bf16 weights with every thread.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct HostMatmul {
    /// Weight bytes read per second for one input row (decode: bound by reading the weights).
    pub weight_bytes_per_s: f64,
    /// FLOP/s of the dot path at 64 rows, and of the gemm path at 256.
    pub dot_flops: f64,
    pub gemm_flops: f64,
    /// What one host expert costs beyond its arithmetic (its matrices found, buffers, the
    /// activation), measured on a tiny expert.
    #[serde(default)]
    pub expert_fixed_s: f64,
}

impl HostMatmul {
    /// Seconds for `rows` rows through a `[n, k]` bf16 matrix.
    pub fn matmul_s(&self, rows: f64, n: f64, k: f64) -> f64 {
        let flops = 2.0 * rows * n * k;
        let rate = if rows >= crate::cpu::matmul::gemm_min_rows(crate::cpu::simd::Isa::detected()) as f64 { self.gemm_flops } else { self.dot_flops };
        (n * k * 2.0 / self.weight_bytes_per_s.max(1.0)).max(flops / rate.max(1.0))
    }

    /// Seconds for one expert (gate, up, down of `inter x hidden`) over `rows` rows.
    pub fn expert_s(&self, rows: f64, hidden: f64, inter: f64) -> f64 {
        self.expert_fixed_s + 2.0 * self.matmul_s(rows, inter, hidden) + self.matmul_s(rows, hidden, inter)
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct HostAttentionPoint {
    pub threads: usize,
    /// KV bytes read per second where the memory bounds it (grouped-query heads).
    pub bytes_per_s: f64,
    /// FLOP/s where the arithmetic bounds it (MLA: every head scores the full latent row).
    pub flops: f64,
}

impl HostProfile {
    /// Seconds for attention that reads `bytes` of KV and does `flops` arithmetic, on every
    /// thread (the job runs host attention on all of them).
    pub fn attention_s(&self, bytes: f64, flops: f64) -> f64 {
        match self.attention.last() {
            Some(p) => (bytes / p.bytes_per_s.max(1.0)).max(flops / p.flops.max(1.0)),
            None => bytes / self.memory_bytes_per_s.max(1.0),
        }
    }
}

/// One weight format's matmul time relative to bf16's on the same shape, at rows ascending.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BlockMatmul {
    /// `WeightDtype::name` (`q4_k`, `fp8`, ...).
    pub dtype: String,
    /// `[rows, time over bf16's time]`.
    pub slowdown: Vec<[f64; 2]>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct MatmulPoint {
    pub rows: f64,
    pub fixed_s: f64,
    pub flops: f64,
}

impl HardwareProfile {
    /// The matmul cost at `rows` rows: log-linear between measured points, flat outside.
    fn matmul_point(&self, rows: f64) -> (f64, f64) {
        let pts = &self.matmul;
        let Some(first) = pts.first() else { return (self.dispatch_s, 1e9) };
        if rows <= first.rows {
            return (first.fixed_s, first.flops);
        }
        for w in pts.windows(2) {
            let (a, b) = (w[0], w[1]);
            if rows <= b.rows {
                let t = (rows.ln() - a.rows.ln()) / (b.rows.ln() - a.rows.ln());
                let lerp = |x: f64, y: f64| (x.max(1e-12).ln() + t * (y.max(1e-12).ln() - x.max(1e-12).ln())).exp();
                return (lerp(a.fixed_s, b.fixed_s), lerp(a.flops, b.flops));
            }
        }
        let last = pts.last().unwrap();
        (last.fixed_s, last.flops)
    }

    /// The profile with uploads held to `up` bytes per second and readbacks to `down` (which
    /// defaults to `up`), where given: the link caps a run applies to every byte.
    pub fn with_link_caps(&self, up: Option<u64>, down: Option<u64>) -> Self {
        let mut p = self.clone();
        p.held_link = up.is_some() || down.is_some();
        if let Some(c) = up {
            p.upload_bytes_per_s = p.upload_bytes_per_s.min(c as f64);
        }
        if let Some(c) = down.or(up) {
            p.readback_bytes_per_s = p.readback_bytes_per_s.min(c as f64);
        }
        p
    }

    /// The largest measured matmul rate, FLOP/s.
    pub fn peak_flops(&self) -> f64 {
        self.matmul.iter().map(|p| p.flops).fold(0.0, f64::max)
    }

    /// Seconds for a `[rows, k] x [k, n]` matmul with 16-bit weights.
    pub fn matmul_s(&self, rows: f64, n: f64, k: f64) -> f64 {
        if rows <= 0.0 {
            return 0.0;
        }
        let (fixed, flops) = self.matmul_point(rows);
        fixed + 2.0 * rows * n * k / flops
    }

    /// [`Self::matmul_s`] with weights of `dtype`: a block format's (or FP8's) measured
    /// slowdown at these rows, log-linear between the measured rows and flat outside.
    pub fn matmul_s_as(&self, dtype: WeightDtype, rows: f64, n: f64, k: f64) -> f64 {
        self.matmul_s(rows, n, k) * self.slowdown(dtype, rows)
    }

    fn slowdown(&self, dtype: WeightDtype, rows: f64) -> f64 {
        let Some(b) = self.block_matmul.iter().find(|b| b.dtype == dtype.name()) else { return 1.0 };
        let pts = &b.slowdown;
        let (Some(first), Some(last)) = (pts.first(), pts.last()) else { return 1.0 };
        if rows <= first[0] {
            return first[1];
        }
        for w in pts.windows(2) {
            if rows <= w[1][0] {
                let t = (rows.ln() - w[0][0].ln()) / (w[1][0].ln() - w[0][0].ln());
                return w[0][1] + t * (w[1][1] - w[0][1]);
            }
        }
        last[1]
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| Error::Io { path: path.to_path_buf(), error })?;
        serde_json::from_str(&text).map_err(|e| Error::invalid(path.display().to_string(), format!("not a hardware profile: {e}")))
    }

    /// The profile of `ctx`'s adapter: from the cache when this adapter, driver and set of
    /// kernel features were measured before, else measured now (seconds) and cached. Its kernel
    /// tuning becomes `ctx`'s.
    pub fn for_adapter(ctx: &GpuContext, gpu_memory: u64, host_memory: u64) -> Result<Self> {
        let path = cache_path(ctx);
        let cached = |path: &Option<PathBuf>| path.as_ref().and_then(|p| Self::load(p).ok()).filter(|p| p.calibration_version == CALIBRATION_VERSION);
        let p = match cached(&path) {
            Some(p) => p,
            None => {
                // Processes that start together calibrate once: the others wait on the lock,
                // then read what the first one wrote (so that they also take the same kernels).
                let lock = path.as_ref().and_then(|p| {
                    std::fs::create_dir_all(p.parent()?).ok()?;
                    std::fs::File::options().create(true).truncate(false).write(true).open(p.with_extension("lock")).ok()
                });
                if let Some(file) = &lock {
                    let _ = file.lock();
                }
                match cached(&path) {
                    Some(p) => p,
                    None => {
                        eprintln!("calibrating {} (once per adapter and driver)...", ctx.info().name);
                        let p = calibrate(ctx, gpu_memory, host_memory)?;
                        if let Some(path) = &path {
                            // Written aside and renamed, so that readers never see half a file.
                            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                            let written = std::fs::write(&tmp, serde_json::to_string_pretty(&p).unwrap_or_default()).and_then(|_| std::fs::rename(&tmp, path));
                            if let Err(e) = written {
                                log::warn!("could not cache the hardware profile at {}: {e}", path.display());
                            }
                        }
                        p
                    }
                }
            }
        };
        // MOEGEN_DEFAULT_KERNELS=1 keeps the defaults (to compare, or to rule the tuning out).
        if std::env::var_os("MOEGEN_DEFAULT_KERNELS").is_some() {
            ctx.set_tuning(KernelTuning::default());
        } else if let Some(tuning) = &p.kernels {
            ctx.set_tuning(tuning.clone());
        }
        Ok(HardwareProfile { gpu_memory, host_memory, cpu_device: ctx.is_cpu(), ..p })
    }
}

fn default_binding() -> u64 {
    128 << 20
}

fn cache_path(ctx: &GpuContext) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .or_else(|| std::env::var_os("LOCALAPPDATA").map(PathBuf::from))?;
    let i = ctx.info();
    // The kernels a profile's tuning may choose depend on the features in use.
    let f = ctx.features();
    let mut features = format!("{}{}", if f.f16 { "f16" } else { "" }, if f.subgroups { "sg" } else { "" });
    if let Some(c) = f.coop {
        features.push_str(&format!("coop{}{}", c.size, if c.f16_inputs { "h" } else { "f" }));
    }
    if f.subgroup_attention {
        features.push_str("sgattn");
    }
    // The host's matmul rate (CPU experts) depends on what it multiplies in.
    if crate::cpu::bf16_products::enabled() {
        features.push_str("cpubf16");
    }
    if crate::cpu::int8_products::enabled() {
        features.push_str("cpuint8");
    }
    // So do the GPU's matmul rates over block formats.
    if ctx.int8_products() {
        features.push_str("gpuint8");
    }
    // A debug build (the tests' binary) runs the host's kernels several times slower: its rates
    // must not become a release build's plan.
    if cfg!(debug_assertions) {
        features.push_str("debug");
    }
    let key = format!("{}-{:?}-{}-{}-{features}", i.name, i.backend, i.driver, i.driver_info);
    let clean: String = key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
    Some(base.join("moegen").join("hardware").join(format!("{clean}.json")))
}

/// A thread copying memory until dropped.
struct HostLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HostLoad {
    fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let src = vec![1u8; 1 << 20];
            let mut dst = vec![0u8; 1 << 20];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                dst.copy_from_slice(&src);
                std::hint::black_box(&dst);
            }
        });
        HostLoad { stop, thread: Some(thread) }
    }
}

impl Drop for HostLoad {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn best_of(reps: usize, mut f: impl FnMut() -> Result<Duration>) -> Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..reps {
        best = best.min(f()?);
    }
    Ok(best.max(Duration::from_nanos(1)))
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0) - 0.5).collect()
}

/// A bf16 weight of twice the CPU's last-level cache (at least 64 MiB, at most 1 GiB and a
/// sixteenth of the host budget), so that timing it reads memory; None where that is no larger
/// than the 64 MiB weight already timed.
fn memory_bound_weight(ctx: &GpuContext, host_memory: u64) -> Result<Option<GpuWeight>> {
    let llc = last_level_cache_bytes().unwrap_or(32 << 20);
    let bytes = (2 * llc).min(1 << 30).min(host_memory / 16);
    let cols = 1024usize;
    let rows = (bytes / (2 * cols as u64)) as usize;
    if rows <= 32768 {
        return Ok(None);
    }
    // A 1 MiB pattern repeated: past the caches, repeated values are read from memory like any.
    let pattern: Vec<u8> = values(1 << 19, 3).iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect();
    let mut data = Vec::with_capacity(rows * cols * 2);
    while data.len() < rows * cols * 2 {
        let take = pattern.len().min(rows * cols * 2 - data.len());
        data.extend_from_slice(&pattern[..take]);
    }
    Ok(Some(GpuWeight::upload(ctx, "calibration weights from memory", &data, WeightDtype::Bf16, rows, cols)?))
}

/// The largest cache's size, from Linux's sysfs (None elsewhere, or where it says nothing).
fn last_level_cache_bytes() -> Option<u64> {
    let mut best: Option<(u32, u64)> = None;
    for i in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
        let (Ok(level), Ok(size)) = (std::fs::read_to_string(format!("{dir}/level")), std::fs::read_to_string(format!("{dir}/size"))) else {
            continue;
        };
        let Ok(level) = level.trim().parse::<u32>() else { continue };
        if let Some(bytes) = cache_size(&size) {
            if best.is_none_or(|(l, _)| level > l) {
                best = Some((level, bytes));
            }
        }
    }
    best.map(|(_, b)| b)
}

/// A sysfs cache size ("491520K", "32M", or bytes) in bytes.
fn cache_size(text: &str) -> Option<u64> {
    let t = text.trim();
    match t.strip_suffix('K') {
        Some(k) => k.parse::<u64>().ok().map(|k| k << 10),
        None => match t.strip_suffix('M') {
            Some(m) => m.parse::<u64>().ok().map(|m| m << 20),
            None => t.parse::<u64>().ok(),
        },
    }
}

/// Measures the profile on `ctx` (a few seconds even on a software adapter).
pub fn calibrate(ctx: &GpuContext, gpu_memory: u64, host_memory: u64) -> Result<HardwareProfile> {
    let bulk = (32u64 << 20).min(ctx.binding_limit());
    let data = vec![7u8; bulk as usize];
    let buf = ctx.storage("calibration", bulk)?;
    ctx.upload(&buf, 0, &data)?;
    ctx.wait_idle("calibration")?;
    let upload = best_of(3, || {
        let t = Instant::now();
        ctx.upload(&buf, 0, &data)?;
        ctx.wait_idle("calibration upload")?;
        Ok(t.elapsed())
    })?;
    let readback = best_of(3, || {
        let t = Instant::now();
        ctx.read_bytes(&buf, 0, bulk)?;
        Ok(t.elapsed())
    })?;
    let mut copy_to = vec![0u8; bulk as usize];
    let copy = best_of(3, || {
        let t = Instant::now();
        copy_to.copy_from_slice(&data);
        std::hint::black_box(&copy_to);
        Ok(t.elapsed())
    })?;

    // On a software adapter the kernels share the cores with the engine's own threads (the
    // upload thread, the host's gathers and readbacks), so they are timed with one such thread
    // busy beside them, as they run in a job.
    // (Not on the CPU device itself: there the kernels are the engine's work.)
    let load = (ctx.info().device_type == wgpu::DeviceType::Cpu && !ctx.is_cpu()).then(HostLoad::start);

    // Which kernel variants this adapter runs fastest, before the rates below are measured
    // through them (the CPU device has none to choose).
    let tuning = if ctx.is_cpu() { None } else { Some(tune(ctx)?) };
    if let Some(t) = &tuning {
        ctx.set_tuning(t.clone());
    }

    // Matmul with bf16 weights at rows from 1 to 512: a large weight (1024 x 1024) gives the
    // rate, a small one (128 x 64) the fixed cost of a dispatch on each path.
    // On the CPU device the big weight is larger than a CPU's caches (64 MiB of bf16), as a
    // model's are: few rows are bound by reading it from memory, which a cached one hides.
    let big = (if ctx.is_cpu() { 32768usize } else { 1024usize }, 1024usize);
    let small = (128usize, 64usize);
    let wb = GpuWeight::from_f32(ctx, "calibration weights", &values(big.0 * big.1, 1), WeightDtype::Bf16, big.0, big.1)?;
    // Up to 64 rows, where reading the weight bounds the matmul, the CPU device's weight is twice
    // the last-level cache besides (a CPU with a 480 MiB L3 held the 64 MiB one and was rated
    // twice what a model's weights, from memory, gave).
    let from_memory = if ctx.is_cpu() { memory_bound_weight(ctx, host_memory)? } else { None };
    let ws = GpuWeight::from_f32(ctx, "calibration small weights", &values(small.0 * small.1, 9), WeightDtype::Bf16, small.0, small.1)?;
    // The block formats are compared with bf16 on a 1024 x 1024 weight (the big one elsewhere).
    let compared = (1024usize, 1024usize);
    let wc = if big == compared { None } else { Some(GpuWeight::from_f32(ctx, "calibration compared weights", &values(compared.0 * compared.1, 1), WeightDtype::Bf16, compared.0, compared.1)?) };
    let mut matmul_points = Vec::new();
    // The compared weight's bf16 time at the rows the block formats are compared at.
    let mut bf16_at = Vec::new();
    for rows in [1usize, 4, 16, 64, 256, 512] {
        // A run of the big weight at many rows on the CPU device is a tenth of a second already.
        let reps = if ctx.is_cpu() && rows >= 256 { 1 } else { 3 };
        // Up to 64 rows the rate comes from the weight past the cache, where there is one.
        let (timed, big, reps) = match &from_memory {
            Some(w) if rows <= 64 => (w, (w.rows, w.cols), 2),
            _ => (&wb, big, reps),
        };
        let (tb, ts) = (time_matmul(ctx, timed, rows, reps)?, time_matmul(ctx, &ws, rows, 16)?);
        if BLOCK_ROWS.contains(&rows) {
            // (Without a compared weight, the GPU's, the big one is it: never the one past the cache.)
            bf16_at.push((rows, wc.as_ref().map_or(Ok(tb), |wc| time_matmul(ctx, wc, rows, 3))?));
        }
        let work = |(n, k): (usize, usize)| (2 * rows * n * k) as f64;
        let flops = (work(big) - work(small)) / (tb - ts).max(1e-9);
        let fixed_s = (ts - work(small) / flops).max(0.0);
        matmul_points.push(MatmulPoint { rows: rows as f64, fixed_s, flops });
    }
    // Up to a gigabyte: not held through the rest of the calibration.
    drop(from_memory);
    // Each block format (and FP8 rows) on the compared weight's shape: its decoding is
    // arithmetic that bf16's is not, most of all at few rows where nothing amortises it.
    let mut block_matmul = Vec::new();
    for dtype in WeightDtype::QUANTISED.into_iter().chain([WeightDtype::Fp8 { block: 128 }]) {
        let bytes = crate::quant::random_blocks(dtype, compared.0 * compared.1 / dtype.block_elems(), 11, false);
        let w = GpuWeight::upload(ctx, "calibration block weights", &bytes, dtype, compared.0, compared.1)?;
        let slowdown = bf16_at
            .iter()
            .map(|&(rows, tb)| Ok([rows as f64, time_matmul(ctx, &w, rows, if rows >= 256 { 1 } else { 3 })? / tb.max(1e-9)]))
            .collect::<Result<Vec<_>>>()?;
        block_matmul.push(BlockMatmul { dtype: dtype.name().to_string(), slowdown });
    }

    // The ops between the matmuls, by the bytes they touch: a SwiGLU (exp and two reads per
    // written float) stands for them.
    let elements = 1usize << 22;
    let gate = ctx.storage_from("calibration gate", &values(elements, 3))?;
    let up = ctx.storage_from("calibration up", &values(elements, 4))?;
    let act = ctx.storage("calibration activations", (elements * 4) as u64)?;
    let swiglu = || {
        let mut b = Batch::new(ctx);
        crate::kernels::elementwise::swiglu(&mut b, &gate, &up, &act, elements)?;
        b.submit_timed()
    };
    swiglu()?;
    let elementwise = best_of(3, swiglu)?;

    // Decode attention through the kernel the tuning chose.
    let probe = AttentionProbe::new(ctx)?;
    let kernel = ctx.tuning().attention;
    probe.time(ctx, kernel)?;
    let attn = best_of(3, || probe.time(ctx, kernel))?;

    // Dispatch cost: small kernels of the kinds around the matmuls (a row norm and a residual
    // add over 32 rows of 128), alternating, in one submission.
    let tiny = ctx.storage_from("calibration tiny", &values(4096, 6))?;
    let tiny2 = ctx.storage_from("calibration tiny", &values(4096, 7))?;
    let gamma = ctx.storage_from("calibration norm", &values(128, 8))?;
    let count = 64;
    let run = || {
        let mut b = Batch::new(ctx);
        for i in 0..count {
            if i % 2 == 0 {
                crate::kernels::norm::rms_norm(&mut b, &tiny, &gamma, &tiny2, 32, 128, 1e-5)?;
            } else {
                crate::kernels::elementwise::add_assign(&mut b, &tiny, &tiny2, 4096)?;
            }
        }
        let t = Instant::now();
        b.submit()?;
        ctx.wait_idle("calibration dispatches")?;
        Ok(t.elapsed())
    };
    run()?;
    let dispatch = best_of(3, run)?;
    // Host time to record and submit a dispatch (bind groups, parameters, encoding).
    let recording = best_of(3, || {
        let t = Instant::now();
        let mut b = Batch::new(ctx);
        for _ in 0..count {
            crate::kernels::elementwise::add_assign(&mut b, &tiny, &tiny2, 4096)?;
        }
        b.submit()?;
        let spent = t.elapsed();
        ctx.wait_idle("calibration recording")?;
        Ok(spent)
    })?;

    // A submission shaped like one small expert (three one-row matmuls and an activation), GPU
    // time, less its kernels' modelled cost: what a submission adds.
    let (inter, hidden) = small;
    let xs = ctx.storage_from("calibration rows", &values(hidden, 10))?;
    let ws_down = GpuWeight::from_f32(ctx, "calibration small weights", &values(hidden * inter, 11), WeightDtype::Bf16, hidden, inter)?;
    let g = ctx.storage("calibration gate", (inter * 4) as u64)?;
    let u = ctx.storage("calibration up", (inter * 4) as u64)?;
    let a = ctx.storage("calibration act", (inter * 4) as u64)?;
    let yd = ctx.storage("calibration down", (hidden * 4) as u64)?;
    let expert_like = || {
        let mut b = Batch::new(ctx);
        matmul(&mut b, &xs, &ws, None, &g, 1)?;
        matmul(&mut b, &xs, &ws, None, &u, 1)?;
        crate::kernels::elementwise::swiglu(&mut b, &g, &u, &a, inter)?;
        matmul(&mut b, &a, &ws_down, None, &yd, 1)?;
        b.submit_timed()
    };
    expert_like()?;
    let mut times: Vec<f64> = (0..9).map(|_| expert_like().map(|d| d.as_secs_f64())).collect::<Result<_>>()?;
    times.sort_by(f64::total_cmp);
    let first = matmul_points[0];
    let kernels = 3.0 * (first.fixed_s + (2 * inter * hidden) as f64 / first.flops) + dispatch.as_secs_f64() / count as f64;
    let pass = (times[times.len() / 2] - kernels).max(0.0);

    // Submissions: pipelined (each result taken back while the next runs), and full round trips.
    let rounds = 32;
    let pipelined = || {
        let t = Instant::now();
        let mut pending = None;
        for _ in 0..rounds {
            let mut b = Batch::new(ctx);
            crate::kernels::elementwise::add_assign(&mut b, &tiny, &tiny2, 64)?;
            b.submit()?;
            let read = ctx.read_later(&[(&tiny, 256)])?;
            if let Some(p) = pending.replace(read) {
                crate::gpu::PendingRead::wait(p, ctx)?;
            }
        }
        if let Some(p) = pending {
            p.wait(ctx)?;
        }
        Ok(t.elapsed())
    };
    pipelined()?;
    let submit = best_of(3, pipelined)?;
    let round_trip = || {
        let t = Instant::now();
        for _ in 0..rounds {
            let mut b = Batch::new(ctx);
            crate::kernels::elementwise::add_assign(&mut b, &tiny, &tiny2, 64)?;
            b.submit()?;
            ctx.read_bytes(&tiny, 0, 256)?;
        }
        Ok(t.elapsed())
    };
    let sync = best_of(3, round_trip)?;

    // The host's own kernels are timed alone: in a job they take every core while they run.
    drop(load);
    let host = calibrate_host(!ctx.is_cpu() && ctx.int8_products());
    let i = ctx.info();
    Ok(HardwareProfile {
        name: format!("{} ({:?}, {} {})", i.name, i.backend, i.driver, i.driver_info),
        source: format!("measured by moegen's calibration, {}", crate::planner::today()),
        upload_bytes_per_s: bulk as f64 / upload.as_secs_f64(),
        readback_bytes_per_s: bulk as f64 / readback.as_secs_f64(),
        matmul: matmul_points,
        attention_bytes_per_s: probe.kv_bytes() as f64 / attn.as_secs_f64(),
        dispatch_s: dispatch.as_secs_f64() / count as f64,
        pass_s: pass,
        record_s: recording.as_secs_f64() / count as f64,
        submit_s: submit.as_secs_f64() / rounds as f64,
        sync_s: sync.as_secs_f64() / rounds as f64,
        host_copy_bytes_per_s: bulk as f64 / copy.as_secs_f64(),
        gpu_memory,
        host_memory,
        shares_cpu: i.device_type == wgpu::DeviceType::Cpu,
        binding_limit: ctx.binding_limit(),
        host: Some(host),
        held_link: false,
        cpu_device: ctx.is_cpu(),
        kernels: tuning,
        block_matmul,
        elementwise_bytes_per_s: Some((elements * 12) as f64 / elementwise.as_secs_f64()),
        calibration_version: CALIBRATION_VERSION,
    })
}

/// Rows at which the calibration compares the block formats' matmul with bf16's.
const BLOCK_ROWS: [usize; 3] = [1, 16, 256];

/// Seconds one matmul of `rows` rows through `w` takes (GPU time where the adapter has
/// timestamps), best of two after a first run, over `reps` in one submission.
fn time_matmul(ctx: &GpuContext, w: &GpuWeight, rows: usize, reps: usize) -> Result<f64> {
    let x = ctx.storage_from("calibration rows", &values(rows * w.cols, 2))?;
    let y = ctx.storage("calibration output", (rows * w.rows * 4) as u64)?;
    let run = |reps: usize| {
        let mut b = Batch::new(ctx);
        for _ in 0..reps {
            matmul(&mut b, &x, w, None, &y, rows)?;
        }
        b.submit_timed()
    };
    // Short runs (the CPU device, fast GPUs) repeated to at least 10 ms and timed more often: a
    // millisecond's run on a shared machine gave rates 1.7x apart from one calibration to the next.
    let first = run(reps)?.as_secs_f64();
    let reps = reps.max(((0.01 * reps as f64 / first.max(1e-9)).ceil() as usize).min(256));
    let tries = if first > 0.1 { 2 } else { 4 };
    Ok(best_of(tries, || run(reps))?.as_secs_f64() / reps as f64)
}

/// Decode attention as the calibration times it: 16 sequences of 256 keys, 8 kv heads of 64, f32.
struct AttentionProbe {
    shape: AttentionShape,
    q: crate::gpu::GpuBuffer,
    k: crate::gpu::GpuBuffer,
    v: crate::gpu::GpuBuffer,
    ranges: crate::gpu::GpuBuffer,
    out: crate::gpu::GpuBuffer,
    seqs: usize,
    rows: usize,
}

impl AttentionProbe {
    fn new(ctx: &GpuContext) -> Result<Self> {
        let (seqs, keys, heads, hd) = (16usize, 256usize, 8usize, 64usize);
        let rows = seqs * keys;
        let kv_dim = heads * hd;
        let ranges: Vec<u32> = (0..seqs).flat_map(|s| [(s * keys) as u32, keys as u32]).collect();
        Ok(AttentionProbe {
            shape: AttentionShape::new(heads, heads, hd),
            k: ctx.storage_from("calibration keys", &values(rows * kv_dim, 3))?,
            v: ctx.storage_from("calibration values", &values(rows * kv_dim, 4))?,
            q: ctx.storage_from("calibration queries", &values(seqs * kv_dim, 5))?,
            out: ctx.storage("calibration attention", (seqs * kv_dim * 4) as u64)?,
            ranges: ctx.storage_from("calibration ranges", &ranges)?,
            seqs,
            rows,
        })
    }

    /// Keys and values read by one run.
    fn kv_bytes(&self) -> usize {
        2 * self.rows * self.shape.n_kv_heads * self.shape.head_dim * 4
    }

    fn time(&self, ctx: &GpuContext, kernel: AttentionKernel) -> Result<Duration> {
        let mut b = Batch::new(ctx);
        attention_with(&mut b, kernel, &self.shape, &self.q, &self.k, &self.v, &self.ranges, &self.out, self.seqs, self.rows)?;
        b.submit_timed()
    }
}

/// Row counts the matmul paths are timed at; a count between two takes the choice of the next.
const TUNING_ROWS: [u32; 6] = [1, 2, 4, 16, 64, 256];

/// Times the matmul paths the device can run at each of [`TUNING_ROWS`] on a 1024 x 1024 bf16
/// weight, and every decode attention variant on 16 sequences of 256 keys, and keeps the
/// fastest. Every matmul path adds along k in the same order, so the choice changes speed only;
/// the attention variants differ in the last bits of their softmax sums. A variant replaces the
/// default only when it is at least 5% faster. To stay within seconds
/// on a software adapter (where compiling each variant dominates), the vector path's workgroup
/// size is chosen once, at one row, and vector paths are timed up to 16 rows, tiles from 4.
pub fn tune(ctx: &GpuContext) -> Result<KernelTuning> {
    let (n, k) = (1024usize, 1024usize);
    let w = GpuWeight::from_f32(ctx, "tuning weights", &values(n * k, 21), WeightDtype::Bf16, n, k)?;
    let most = *TUNING_ROWS.last().unwrap() as usize;
    let x = ctx.storage_from("tuning rows", &values(most * k, 22))?;
    let y = ctx.storage("tuning output", (most * n * 4) as u64)?;
    let time = |path: MatmulPath, rows: u32| -> Result<Duration> {
        // Enough work per submission that fixed costs do not decide: about 16 M multiply-adds.
        let reps = (16 / rows).max(1) as usize;
        let run = |reps: usize| {
            let mut b = Batch::new(ctx);
            for _ in 0..reps {
                matmul_rows(&mut b, &x, &w, None, &y, Rows::all(rows as usize), Some(path))?;
            }
            b.submit_timed()
        };
        let started = Instant::now();
        run(1)?;
        let t = best_of(3, || run(reps))?;
        log::debug!("tuning: {rows} rows on {path:?}: {:.3} ms for {reps} ({:.2} s with compiling)", t.as_secs_f64() * 1e3, started.elapsed().as_secs_f64());
        Ok(t)
    };
    // The default for these rows stays unless another path is at least 5% faster: timings on a
    // busy or noisy machine must not trade a good choice for a near-equal one.
    let fastest_of = |paths: &[MatmulPath], rows: u32, default: MatmulPath| -> Result<Option<MatmulPath>> {
        let mut best: Option<(f64, MatmulPath)> = None;
        for &path in paths {
            let t = time(path, rows)?.as_secs_f64();
            let t = if path == default { t } else { t / 0.95 };
            if best.is_none_or(|(bt, _)| t < bt) {
                best = Some((t, path));
            }
        }
        Ok(best.map(|(_, p)| p))
    };
    let defaults = KernelTuning::default();
    let candidates = MatmulPath::candidates(ctx.features(), ctx.limits());
    let one_row: Vec<MatmulPath> = candidates.iter().copied().filter(|p| matches!(p, MatmulPath::Vector { tok: 1, .. })).collect();
    let vector_wg = match fastest_of(&one_row, 1, defaults.matmul_path(1))? {
        Some(MatmulPath::Vector { wg, .. }) => wg,
        _ => crate::kernels::matmul::VEC_WG,
    };
    let plausible = |path: &MatmulPath, rows: u32| match *path {
        // A vector path reads every weight once per `tok` rows: past a few rows it cannot win.
        MatmulPath::Vector { tok, wg } => wg == vector_wg && rows <= 16 && tok <= rows.next_power_of_two(),
        // Tiles waste most of their rows below four.
        MatmulPath::Tiled { bm } => rows >= 4 && bm <= (rows * 4).max(16),
        MatmulPath::Coop { .. } => rows >= 16,
    };
    let mut fastest = Vec::new();
    for rows in TUNING_ROWS {
        let paths: Vec<MatmulPath> = candidates.iter().copied().filter(|p| plausible(p, rows)).collect();
        if let Some(path) = fastest_of(&paths, rows, defaults.matmul_path(rows as usize))? {
            fastest.push((rows, path));
        }
    }

    let probe = AttentionProbe::new(ctx)?;
    let threads = ctx.limits().max_compute_invocations_per_workgroup.min(ctx.limits().max_compute_workgroup_size_x);
    let mut attention_best: Option<(f64, AttentionKernel)> = None;
    for kernel in AttentionKernel::candidates(ctx.features(), threads) {
        probe.time(ctx, kernel)?;
        let t = best_of(3, || probe.time(ctx, kernel))?.as_secs_f64();
        let t = if kernel == defaults.attention { t } else { t / 0.95 };
        if attention_best.is_none_or(|(bt, _)| t < bt) {
            attention_best = Some((t, kernel));
        }
    }
    let attention = attention_best.map_or_else(AttentionKernel::default, |(_, k)| k);

    // The grouped expert matmul (resident experts): from which mean rows per expert its large
    // tiles beat the small ones, over 8 experts of 512 x 1024 (gate-sized) in bf16.
    let (n_experts, inter, dim) = (8usize, 512usize, 1024usize);
    let stacked = GpuWeight::from_f32(ctx, "tuning experts", &values(n_experts * inter * dim, 26), WeightDtype::Bf16, n_experts * inter, dim)?;
    let mut large_from = defaults.grouped_large_from;
    for per_expert in [8usize, 16, 32, 64, 128] {
        let n_assign = per_expert * n_experts;
        let ids: Vec<u32> = (0..n_assign as u32).map(|i| i % n_experts as u32).collect();
        let ids = ctx.storage_from("tuning expert ids", &ids)?;
        let xg = ctx.storage_from("tuning expert rows", &values(n_assign * dim, 27))?;
        let time_tile = |tile: GroupTile| -> Result<f64> {
            let run = || {
                let mut b = Batch::new(ctx);
                let plan = crate::kernels::moe::plan(&mut b, &ids, n_assign, n_experts, tile)?;
                crate::kernels::moe::grouped_matmul(&mut b, &xg, &stacked, &plan)?;
                b.submit_timed()
            };
            run()?;
            Ok(best_of(3, run)?.as_secs_f64())
        };
        let (small, large) = (time_tile(GroupTile::Small)?, time_tile(GroupTile::Large)?);
        log::debug!("tuning: grouped matmul, {per_expert} rows an expert: small tiles {:.3} ms, large {:.3} ms", small * 1e3, large * 1e3);
        // Large tiles from the first load at which they are 5% faster, small below it.
        if large < 0.95 * small {
            large_from = (per_expert / 2) as u32;
            break;
        }
        large_from = per_expert as u32;
    }
    Ok(KernelTuning::from_fastest(&fastest, attention, large_from, format!("measured on {} by moegen's calibration, {}", ctx.info().name, crate::planner::today())))
}

/// Measures the host: its memory read rate, and the host attention kernel over KV pages with one
/// thread and with every core, on a memory-bound shape (grouped-query decode) and an
/// arithmetic-bound one (MLA's latent rows).
/// `gpu_int8`: the host experts compute the GPU's int8 bits (`--gpu-compute int8`), so their
/// matmul is measured on that path.
pub fn calibrate_host(gpu_int8: bool) -> HostProfile {
    use crate::cpu::attention::{attention, KeySpan, PagedRows};
    use crate::cpu::simd::Values;
    use rayon::prelude::*;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let big: Vec<u64> = (0..8u64 << 20).collect();
    // Eight independent sums a chunk, so the read rate and not the adds' latency is measured.
    let sum = || {
        big.par_chunks(1 << 15)
            .map(|c| {
                let mut acc = [0u64; 8];
                for w in c.chunks_exact(8) {
                    for l in 0..8 {
                        acc[l] = acc[l].wrapping_add(w[l]);
                    }
                }
                acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
            })
            .reduce(|| 0, u64::wrapping_add)
    };
    std::hint::black_box(sum());
    let read = best_of(3, || {
        let t = Instant::now();
        std::hint::black_box(sum());
        Ok(t.elapsed())
    })
    .unwrap_or(Duration::from_secs(1));
    // 32 sequences of 256 keys over pages of 16; 8 query heads on 2 kv heads of 64.
    let (seqs, keys, page) = (32usize, 256usize, 16usize);
    let gqa = AttentionShape::new(8, 2, 64);
    let latent = AttentionShape::latent(16, 576, 512, 0.04);
    let time = |shape: &AttentionShape, seqs: usize| -> (Duration, usize) {
        let kw = shape.n_kv_heads * shape.head_dim;
        let vw = if shape.values_in_keys { 0 } else { shape.n_kv_heads * shape.v_dim };
        let (k, v) = (values(seqs * keys * kw, 13), values(seqs * keys * vw, 14));
        let q = values(seqs * shape.n_heads * shape.head_dim, 15);
        let rows = PagedRows { keys: Values::F32(&k), values: Values::F32(&v), page_tokens: page };
        let tables: Vec<Vec<u32>> = (0..seqs).map(|s| ((s * keys / page) as u32..((s + 1) * keys / page) as u32).collect()).collect();
        let spans: Vec<KeySpan> = tables.iter().map(|t| KeySpan { pages: t, first: 0, len: keys }).collect();
        let mut out = vec![0f32; seqs * shape.n_heads * shape.v_dim];
        let mut run = || {
            let t = Instant::now();
            attention(shape, &rows, &q, &spans, &mut out)?;
            Ok(t.elapsed())
        };
        let _ = run();
        (best_of(3, run).unwrap_or(Duration::from_secs(1)), seqs * keys * (kw + vw) * 4)
    };
    let mut points = Vec::new();
    for threads in [1, cores] {
        if points.iter().any(|p: &HostAttentionPoint| p.threads == threads) {
            continue;
        }
        let Ok(pool) = rayon::ThreadPoolBuilder::new().num_threads(threads).build() else { continue };
        let (gqa_t, gqa_bytes) = pool.install(|| time(&gqa, seqs));
        let (mla_t, _) = pool.install(|| time(&latent, 4));
        let mla_flops = (4 * keys * latent.n_heads * 2 * (latent.head_dim + latent.v_dim)) as f64;
        points.push(HostAttentionPoint { threads, bytes_per_s: gqa_bytes as f64 / gqa_t.as_secs_f64(), flops: mla_flops / mla_t.as_secs_f64() });
    }
    HostProfile {
        cores,
        memory_bytes_per_s: (big.len() * 8) as f64 / read.as_secs_f64(),
        attention: points,
        matmul: Some(if gpu_int8 { calibrate_host_gpu_int8() } else { calibrate_host_matmul() }),
        source: format!("measured by moegen's calibration ({} path), {}", crate::cpu::simd::Isa::detected().name(), crate::planner::today()),
    }
}

/// The host experts' matmul beside a GPU with `--gpu-compute int8` (`cpu::gpu_int8`, on a Q4_K
/// matrix), as the rates of [`HostMatmul`] express it: each time stated against the bf16
/// matrix of the same shape, so that [`HostMatmul::matmul_s`] predicts this path's seconds.
pub fn calibrate_host_gpu_int8() -> HostMatmul {
    use crate::cpu::matmul::WeightRows;
    let (n, k) = (4096usize, 2048usize);
    let dtype = crate::gpu::WeightDtype::Q4K;
    let bytes = crate::quant::quantize(dtype, &values(n * k, 23), k).unwrap_or_default();
    let mut words = vec![0u32; bytes.len().div_ceil(4)];
    bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
    let w = WeightRows { words: &words, dtype, cols: k };
    let isa = crate::cpu::simd::Isa::detected();
    let time = |m: usize| -> f64 {
        let x = values(m * k, 21);
        let mut y = vec![0f32; m * n];
        let mut run = || {
            let t = Instant::now();
            let xq = crate::cpu::gpu_int8::quantise(&x, m, k);
            crate::cpu::gpu_int8::matmul(isa, &xq, w, n, &mut y);
            Ok(t.elapsed())
        };
        let _ = run();
        best_of(3, run).unwrap_or(Duration::from_secs(1)).as_secs_f64()
    };
    let (one, dot) = (time(1), time(64));
    let f32_path = calibrate_host_matmul();
    HostMatmul {
        weight_bytes_per_s: (n * k * 2) as f64 / one,
        dot_flops: 2.0 * (64 * n * k) as f64 / dot,
        // No gemm path: many rows keep the dot path's rate.
        gemm_flops: 2.0 * (64 * n * k) as f64 / dot,
        expert_fixed_s: f32_path.expert_fixed_s,
    }
}

/// The host matmul on a bf16 matrix larger than the caches: one row (the weight read rate), 64
/// rows (the dot path) and 256 (gemm).
pub fn calibrate_host_matmul() -> HostMatmul {
    use crate::cpu::matmul::{matmul, WeightRows};
    let (n, k) = (4096usize, 2048usize);
    let words: Vec<u32> = (0..n * k / 2).map(|i| 0x3c00_3c00u32 ^ (i as u32 & 0x00ff_00ff)).collect();
    let w = WeightRows { words: &words, dtype: crate::gpu::WeightDtype::Bf16, cols: k };
    let isa = crate::cpu::simd::Isa::detected();
    let time = |m: usize| -> f64 {
        let x = values(m * k, 21);
        let mut y = vec![0f32; m * n];
        let mut run = || {
            let t = Instant::now();
            matmul(isa, &x, m, w, 0, n, None, &mut y, n);
            Ok(t.elapsed())
        };
        let _ = run();
        best_of(3, run).unwrap_or(Duration::from_secs(1)).as_secs_f64()
    };
    let one = time(1);
    let (dot, gemm) = (time(64), time(256));
    let mut m = HostMatmul {
        weight_bytes_per_s: (n * k * 2) as f64 / one,
        dot_flops: 2.0 * (64 * n * k) as f64 / dot,
        gemm_flops: 2.0 * (256 * n * k) as f64 / gemm,
        expert_fixed_s: 0.0,
    };
    // A tiny bf16 expert over one row: what its arithmetic does not explain is fixed cost.
    let (h, inter) = (64usize, 32usize);
    let pack: Vec<u8> = crate::gpu::encode_weights(&values(3 * h * inter, 5), crate::gpu::WeightDtype::Bf16);
    let host = crate::model::weights::HostExperts { packs: vec![pack], dtypes: [crate::gpu::WeightDtype::Bf16; 3], fp8_block: None, inter, hidden: h };
    let x = values(h, 6);
    let run = || {
        let t = Instant::now();
        for _ in 0..16 {
            std::hint::black_box(crate::cpu::experts::expert_ffn(&host, 0, &x, 1, crate::cpu::experts::Numbers::Host)?);
        }
        Ok(t.elapsed() / 16)
    };
    let _ = run();
    let tiny = best_of(3, run).unwrap_or(Duration::from_millis(1)).as_secs_f64();
    m.expert_fixed_s = (tiny - m.expert_s(1.0, h as f64, inter as f64)).max(0.0);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_read_as_sysfs_writes_them() {
        assert_eq!(cache_size("491520K\n"), Some(480 << 20));
        assert_eq!(cache_size("32M"), Some(32 << 20));
        assert_eq!(cache_size("1048576"), Some(1 << 20));
        assert_eq!(cache_size("lots"), None);
        assert_eq!(cache_size(""), None);
    }
}
