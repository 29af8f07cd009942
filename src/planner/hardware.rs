//! What the planner knows of the machine: host-to-GPU bandwidth, matmul throughput as a function
//! of the rows it gets, attention throughput, per-dispatch cost, memories. Measured by a short
//! calibration (cached per adapter and driver), or read from a file for hardware we do not have.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gpu::{Batch, GpuContext, GpuWeight, WeightDtype};
use crate::kernels::attention::{attention, AttentionShape};
use crate::kernels::matmul::matmul;

/// Bumped when the calibration changes, so that old cached profiles are measured again.
const CALIBRATION_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HardwareProfile {
    pub name: String,
    /// Where the figures come from (measured on this machine, or the assumptions of a file).
    pub source: String,
    /// Host-to-GPU and GPU-to-host bytes per second.
    pub upload_bytes_per_s: f64,
    pub readback_bytes_per_s: f64,
    /// (rows, FLOP/s) of a matmul with 16-bit weights, rows ascending; interpolated between.
    pub matmul_flops: Vec<(f64, f64)>,
    /// KV bytes per second that decode attention reads.
    pub attention_bytes_per_s: f64,
    /// Fixed cost of one kernel dispatch, seconds.
    pub dispatch_s: f64,
    /// Host memory copies, bytes per second (gathering KV pages and token rows).
    pub host_copy_bytes_per_s: f64,
    pub gpu_memory: u64,
    pub host_memory: u64,
    /// Largest storage binding, bytes (planning without the adapter at hand).
    #[serde(default = "default_binding")]
    pub binding_limit: u64,
    #[serde(default)]
    pub calibration_version: u32,
}

impl HardwareProfile {
    /// FLOP/s of a matmul over `rows` rows (log-linear between measured points, flat outside).
    pub fn matmul_rate(&self, rows: f64) -> f64 {
        let pts = &self.matmul_flops;
        let Some(first) = pts.first() else { return 1e9 };
        if rows <= first.0 {
            // Below the smallest measurement the weights' bytes bound the time: rate grows with rows.
            return first.1 * (rows / first.0).max(1e-9);
        }
        for w in pts.windows(2) {
            let ((r0, f0), (r1, f1)) = (w[0], w[1]);
            if rows <= r1 {
                let t = (rows.ln() - r0.ln()) / (r1.ln() - r0.ln());
                return (f0.ln() + t * (f1.ln() - f0.ln())).exp();
            }
        }
        pts.last().unwrap().1
    }

    /// Seconds for a `[rows, k] x [k, n]` matmul.
    pub fn matmul_s(&self, rows: f64, n: f64, k: f64) -> f64 {
        if rows <= 0.0 {
            return 0.0;
        }
        2.0 * rows * n * k / self.matmul_rate(rows) + self.dispatch_s
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| Error::Io { path: path.to_path_buf(), error })?;
        serde_json::from_str(&text).map_err(|e| Error::invalid(path.display().to_string(), format!("not a hardware profile: {e}")))
    }

    /// The profile of `ctx`'s adapter: from the cache when this adapter and driver were measured
    /// before, else measured now (a few seconds) and cached.
    pub fn for_adapter(ctx: &GpuContext, gpu_memory: u64, host_memory: u64) -> Result<Self> {
        let path = cache_path(ctx);
        if let Some(p) = path.as_ref().and_then(|p| Self::load(p).ok()) {
            if p.calibration_version == CALIBRATION_VERSION {
                return Ok(HardwareProfile { gpu_memory, host_memory, ..p });
            }
        }
        eprintln!("calibrating {} (once per adapter and driver)...", ctx.info().name);
        let p = calibrate(ctx, gpu_memory, host_memory)?;
        if let Some(path) = path {
            let _ = std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")));
            if let Err(e) = std::fs::write(&path, serde_json::to_string_pretty(&p).unwrap_or_default()) {
                log::warn!("could not cache the hardware profile at {}: {e}", path.display());
            }
        }
        Ok(p)
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
    let key = format!("{}-{:?}-{}-{}", i.name, i.backend, i.driver, i.driver_info);
    let clean: String = key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
    Some(base.join("moegen").join("hardware").join(format!("{clean}.json")))
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

/// Measures the profile on `ctx` (a few seconds even on a software adapter).
pub fn calibrate(ctx: &GpuContext, gpu_memory: u64, host_memory: u64) -> Result<HardwareProfile> {
    let big = (32u64 << 20).min(ctx.binding_limit());
    let data = vec![7u8; big as usize];
    let buf = ctx.storage("calibration", big)?;
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
        ctx.read_bytes(&buf, 0, big)?;
        Ok(t.elapsed())
    })?;
    let mut copy_to = vec![0u8; big as usize];
    let copy = best_of(3, || {
        let t = Instant::now();
        copy_to.copy_from_slice(&data);
        std::hint::black_box(&copy_to);
        Ok(t.elapsed())
    })?;

    // Matmul with bf16 weights, 1024 x 1024, at rows from 1 to 512.
    let (n, k) = (1024usize, 1024usize);
    let w = GpuWeight::from_f32(ctx, "calibration weights", &values(n * k, 1), WeightDtype::Bf16, n, k)?;
    let mut matmul_flops = Vec::new();
    for rows in [1usize, 4, 16, 64, 256, 512] {
        let x = ctx.storage_from("calibration rows", &values(rows * k, 2))?;
        let y = ctx.storage("calibration output", (rows * n * 4) as u64)?;
        let reps = 3;
        let run = || {
            let mut b = Batch::new(ctx);
            for _ in 0..reps {
                matmul(&mut b, &x, &w, None, &y, rows)?;
            }
            b.submit_timed()
        };
        run()?;
        let t = best_of(2, run)?;
        matmul_flops.push((rows as f64, (2 * rows * n * k * reps) as f64 / t.as_secs_f64()));
    }

    // Decode attention: 16 sequences of 256 keys, 8 kv heads of 64.
    let (seqs, keys, heads, hd) = (16usize, 256usize, 8usize, 64usize);
    let shape = AttentionShape::new(heads, heads, hd);
    let rows = seqs * keys;
    let kv_dim = heads * hd;
    let kb = ctx.storage_from("calibration keys", &values(rows * kv_dim, 3))?;
    let vb = ctx.storage_from("calibration values", &values(rows * kv_dim, 4))?;
    let q = ctx.storage_from("calibration queries", &values(seqs * kv_dim, 5))?;
    let out = ctx.storage("calibration attention", (seqs * kv_dim * 4) as u64)?;
    let ranges: Vec<u32> = (0..seqs).flat_map(|s| [(s * keys) as u32, keys as u32]).collect();
    let rb = ctx.storage_from("calibration ranges", &ranges)?;
    let run = || {
        let mut b = Batch::new(ctx);
        attention(&mut b, &shape, &q, &kb, &vb, &rb, &out, seqs, rows)?;
        b.submit_timed()
    };
    run()?;
    let attn = best_of(3, run)?;

    // Dispatch cost: many tiny kernels in one submission.
    let tiny = ctx.storage_from("calibration tiny", &values(64, 6))?;
    let tiny2 = ctx.storage_from("calibration tiny", &values(64, 7))?;
    let count = 64;
    let run = || {
        let mut b = Batch::new(ctx);
        for _ in 0..count {
            crate::kernels::elementwise::add_assign(&mut b, &tiny, &tiny2, 64)?;
        }
        let t = Instant::now();
        b.submit()?;
        ctx.wait_idle("calibration dispatches")?;
        Ok(t.elapsed())
    };
    run()?;
    let dispatch = best_of(3, run)?;

    let i = ctx.info();
    Ok(HardwareProfile {
        name: format!("{} ({:?}, {} {})", i.name, i.backend, i.driver, i.driver_info),
        source: format!("measured by moegen's calibration, {}", crate::planner::today()),
        upload_bytes_per_s: big as f64 / upload.as_secs_f64(),
        readback_bytes_per_s: big as f64 / readback.as_secs_f64(),
        matmul_flops,
        attention_bytes_per_s: (2 * rows * kv_dim * 4) as f64 / attn.as_secs_f64(),
        dispatch_s: dispatch.as_secs_f64() / count as f64,
        host_copy_bytes_per_s: big as f64 / copy.as_secs_f64(),
        gpu_memory,
        host_memory,
        binding_limit: ctx.binding_limit(),
        calibration_version: CALIBRATION_VERSION,
    })
}
