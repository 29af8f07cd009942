//! A timeline of uploads and GPU work: Chrome trace events (Perfetto opens them), and the
//! figures taken from it (how busy the GPU was, and how busy while uploads were pending).
//!
//! GPU intervals come from timestamp queries where the device has them (ticks mapped onto the
//! host clock by one calibration at start), else from submit to the completion callback.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::Result;
use crate::gpu::{GpuBuffer, GpuContext};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Track {
    Upload,
    Compute,
    /// Attention computed on the host over the KV pages.
    HostAttention,
    /// Streamed experts computed on the host from host memory instead of being sent.
    HostExperts,
    Host,
}

impl Track {
    /// On the CPU device the "uploads" are copies within host memory and the compute is the host's.
    fn name(self, cpu_device: bool) -> &'static str {
        match self {
            Track::Upload if cpu_device => "copies to the CPU device",
            Track::Upload => "host-to-GPU uploads",
            Track::Compute if cpu_device => "CPU device compute",
            Track::Compute => "GPU compute",
            Track::HostAttention => "host attention",
            Track::HostExperts => "host experts",
            Track::Host => "host",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Event {
    pub name: String,
    pub track: Track,
    pub start_ns: u64,
    pub dur_ns: u64,
}

/// GPU timestamps of one submission, waiting for their readback buffer to map.
struct PendingTimes {
    name: String,
    staging: GpuBuffer,
    passes: u32,
    mapped: Arc<AtomicBool>,
}

pub struct Tracer {
    origin: Instant,
    events: Mutex<Vec<Event>>,
    pending: Mutex<Vec<PendingTimes>>,
    /// Host nanoseconds (since `origin`) minus GPU nanoseconds, from the calibration.
    gpu_offset_ns: Mutex<f64>,
    period_ns: f32,
    /// Where the last callback-timed submission ended (without timestamps, submissions queue).
    last_done_ns: Mutex<u64>,
    cpu_device: bool,
}

/// What the timeline says about overlap.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TraceSummary {
    pub wall_s: f64,
    /// Fraction of the wall time with GPU work running.
    pub gpu_busy: f64,
    /// Fraction of the time uploads were in flight during which the GPU was also busy.
    pub gpu_busy_while_uploading: f64,
    pub upload_s: f64,
    /// Time the host spent on attention, and the fraction of it during which the GPU was busy.
    pub host_attention_s: f64,
    pub gpu_busy_while_host_attention: f64,
}

impl Tracer {
    /// A tracer for `ctx`, calibrated against its clock when it has timestamp queries.
    pub fn new(ctx: &GpuContext) -> Result<Arc<Self>> {
        let t = Arc::new(Tracer {
            origin: Instant::now(),
            events: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
            gpu_offset_ns: Mutex::new(0.0),
            period_ns: if ctx.is_cpu() { 1.0 } else { ctx.queue().get_timestamp_period() },
            last_done_ns: Mutex::new(0),
            cpu_device: ctx.is_cpu(),
        });
        if ctx.features().timestamps {
            // One empty pass with timestamps: its end is close to the host time when the wait returns.
            let queries = ctx.device().create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("trace calibration"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let resolved = ctx.buffer(
                "trace calibration",
                16,
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::STORAGE,
            )?;
            let mut enc = ctx.device().create_command_encoder(&Default::default());
            {
                let _pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &queries,
                        beginning_of_pass_write_index: Some(0),
                        end_of_pass_write_index: Some(1),
                    }),
                });
            }
            enc.resolve_query_set(&queries, 0..2, resolved.raw(), 0);
            ctx.queue().submit([enc.finish()]);
            ctx.wait_idle("calibrating the trace clock")?;
            let host = t.now_ns() as f64;
            let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&ctx.read_bytes(&resolved, 0, 16)?);
            *t.gpu_offset_ns.lock().unwrap() = host - ticks[1] as f64 * t.period_ns as f64;
        }
        Ok(t)
    }

    pub fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Records an interval that started at `start_ns` and ends now.
    pub fn finish(&self, track: Track, name: impl Into<String>, start_ns: u64) {
        let end = self.now_ns();
        self.push(Event { name: name.into(), track, start_ns, dur_ns: end.saturating_sub(start_ns) });
    }

    pub fn push(&self, e: Event) {
        self.events.lock().unwrap().push(e);
    }

    /// Takes the timestamps of a submission whose `passes` pairs were resolved into `staging`
    /// (mapped once the GPU is done).
    pub(crate) fn add_timestamps(&self, name: &str, staging: GpuBuffer, passes: u32) {
        let mapped = Arc::new(AtomicBool::new(false));
        let flag = mapped.clone();
        let bytes = passes as u64 * 16;
        staging.raw().map_async(wgpu::MapMode::Read, 0..bytes, move |r| flag.store(r.is_ok(), Ordering::Release));
        self.pending.lock().unwrap().push(PendingTimes { name: name.to_string(), staging, passes, mapped });
    }

    /// Without timestamps: the submission runs from when the previous one ended (or now) to
    /// when the queue reports it done.
    pub(crate) fn add_callback_timed(self: &Arc<Self>, ctx: &GpuContext, name: &str) {
        let submitted = self.now_ns();
        let me = self.clone();
        let name = name.to_string();
        ctx.queue().on_submitted_work_done(move || {
            let end = me.now_ns();
            let mut last = me.last_done_ns.lock().unwrap();
            let start = submitted.max(*last).min(end);
            *last = end;
            drop(last);
            me.push(Event { name, track: Track::Compute, start_ns: start, dur_ns: end - start });
        });
    }

    /// Moves the timestamps whose buffers have mapped into events.
    pub fn collect(&self) {
        let offset = *self.gpu_offset_ns.lock().unwrap();
        let mut pending = self.pending.lock().unwrap();
        let mut events = self.events.lock().unwrap();
        pending.retain(|p| {
            if !p.mapped.load(Ordering::Acquire) {
                return true;
            }
            let bytes = p.passes as u64 * 16;
            if let Ok(view) = p.staging.raw().get_mapped_range(0..bytes) {
                let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&view);
                for pair in ticks.chunks(2) {
                    let start = pair[0] as f64 * self.period_ns as f64 + offset;
                    let dur = pair[1].saturating_sub(pair[0]) as f64 * self.period_ns as f64;
                    events.push(Event { name: p.name.clone(), track: Track::Compute, start_ns: start.max(0.0) as u64, dur_ns: dur as u64 });
                }
            }
            p.staging.raw().unmap();
            false
        });
    }

    pub fn events(&self) -> Vec<Event> {
        self.collect();
        let mut e = self.events.lock().unwrap().clone();
        e.sort_by_key(|e| (e.start_ns, e.track));
        e
    }

    pub fn summary(&self) -> TraceSummary {
        let events = self.events();
        let merged = |track: Track| {
            let mut spans: Vec<(u64, u64)> =
                events.iter().filter(|e| e.track == track).map(|e| (e.start_ns, e.start_ns + e.dur_ns)).collect();
            spans.sort_unstable();
            let mut out: Vec<(u64, u64)> = Vec::new();
            for (s, e) in spans {
                match out.last_mut() {
                    Some(last) if s <= last.1 => last.1 = last.1.max(e),
                    _ => out.push((s, e)),
                }
            }
            out
        };
        let gpu = merged(Track::Compute);
        let up = merged(Track::Upload);
        let host_attention = merged(Track::HostAttention);
        let total = |v: &[(u64, u64)]| v.iter().map(|(s, e)| e - s).sum::<u64>();
        // Time of `spans` during which the GPU was busy too (both lists sorted and disjoint).
        let with_gpu = |spans: &[(u64, u64)]| {
            let (mut overlap, mut j) = (0u64, 0);
            for &(s, e) in spans {
                while j < gpu.len() && gpu[j].1 <= s {
                    j += 1;
                }
                let mut k = j;
                while k < gpu.len() && gpu[k].0 < e {
                    overlap += gpu[k].1.min(e) - gpu[k].0.max(s);
                    k += 1;
                }
            }
            overlap
        };
        let share = |spans: &[(u64, u64)]| if spans.is_empty() { 0.0 } else { with_gpu(spans) as f64 / total(spans).max(1) as f64 };
        let wall = self.now_ns().max(1);
        TraceSummary {
            wall_s: wall as f64 * 1e-9,
            gpu_busy: total(&gpu) as f64 / wall as f64,
            gpu_busy_while_uploading: share(&up),
            upload_s: total(&up) as f64 * 1e-9,
            host_attention_s: total(&host_attention) as f64 * 1e-9,
            gpu_busy_while_host_attention: share(&host_attention),
        }
    }

    /// The Chrome trace JSON (`{"traceEvents": [...]}`), microseconds.
    pub fn chrome_json(&self) -> String {
        let mut out = Vec::new();
        for t in [Track::Upload, Track::Compute, Track::HostAttention, Track::HostExperts, Track::Host] {
            out.push(serde_json::json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": t as u32, "args": {"name": t.name(self.cpu_device)}}));
        }
        for e in self.events() {
            out.push(serde_json::json!({
                "name": e.name, "ph": "X", "pid": 1, "tid": e.track as u32,
                "ts": e.start_ns as f64 / 1000.0, "dur": e.dur_ns as f64 / 1000.0,
            }));
        }
        serde_json::json!({ "traceEvents": out, "displayTimeUnit": "ms" }).to_string()
    }
}
