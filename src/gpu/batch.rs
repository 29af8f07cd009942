//! Records many dispatches and copies into one submission.
//!
//! Each dispatch's small parameter block goes into a shared uniform buffer at an aligned offset,
//! written once at submit. The batch holds a handle on every buffer it binds, so a buffer that a
//! caller drops before the submit cannot be handed out again and overwritten too early.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::gpu::{GpuBuffer, GpuContext, UNIFORM};

/// Dispatches per parameter buffer before another is taken.
const PARAMS_PER_BUFFER: u64 = 256;

/// A kernel's Rust implementation over host memory, run at submit (the CPU device).
type HostOp = Box<dyn FnOnce() -> Result<()> + Send>;

enum Op {
    Dispatch { pipeline: Arc<wgpu::ComputePipeline>, bind_group: wgpu::BindGroup, groups: [u32; 3], label: String },
    Copy { src: GpuBuffer, src_offset: u64, dst: GpuBuffer, dst_offset: u64, bytes: u64 },
    Host { run: HostOp, label: &'static str },
}

pub struct Batch {
    ctx: GpuContext,
    ops: Vec<Op>,
    /// Parameter buffers and the bytes to write into each at submit.
    params: Vec<(GpuBuffer, Vec<u8>)>,
    keep: Vec<GpuBuffer>,
    stride: u64,
    /// What the trace calls this submission.
    name: String,
}

impl Batch {
    pub fn new(ctx: &GpuContext) -> Self {
        let stride = (ctx.limits().min_uniform_buffer_offset_alignment as u64).max(16);
        Batch { ctx: ctx.clone(), ops: Vec::new(), params: Vec::new(), keep: Vec::new(), stride, name: "GPU work".into() }
    }

    /// A batch the trace shows as `name`.
    pub fn named(ctx: &GpuContext, name: impl Into<String>) -> Self {
        Batch { name: name.into(), ..Batch::new(ctx) }
    }

    pub fn ctx(&self) -> &GpuContext {
        &self.ctx
    }

    /// Whether the batch runs on the CPU device: kernels then record [`Batch::host`] ops.
    pub fn on_host(&self) -> bool {
        self.ctx.is_cpu()
    }

    /// Records a kernel's host implementation, run in order with the rest at submit, as the
    /// GPU would run its dispatch: writes made before the submit are seen by it.
    pub fn host(&mut self, label: &'static str, run: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
        self.ops.push(Op::Host { run: Box::new(run), label });
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn params_slot(&mut self, bytes: &[u8]) -> Result<(GpuBuffer, u64)> {
        // A slot is the parameters rounded up to the offset alignment (parameters wider than
        // the alignment take several strides).
        let slot = (bytes.len() as u64).next_multiple_of(self.stride);
        let full = self.params.last().is_none_or(|(_, data)| data.len() as u64 + slot > PARAMS_PER_BUFFER * self.stride);
        if full {
            let buf = self.ctx.buffer("kernel parameters", PARAMS_PER_BUFFER * self.stride, UNIFORM)?;
            self.params.push((buf, Vec::new()));
        }
        let (buf, data) = self.params.last_mut().expect("pushed above");
        let offset = data.len() as u64;
        data.extend_from_slice(bytes);
        data.resize((offset + slot) as usize, 0);
        Ok((buf.clone(), offset))
    }

    /// Records `pipeline` over `groups` workgroups with `params` at binding 0 and `buffers` at
    /// bindings 1, 2, ... in order.
    pub fn dispatch<P: bytemuck::Pod>(
        &mut self,
        label: &str,
        pipeline: &Arc<wgpu::ComputePipeline>,
        params: &P,
        buffers: &[&GpuBuffer],
        groups: [u32; 3],
    ) -> Result<()> {
        if self.on_host() {
            return Err(Error::invalid(label, "this kernel has no host implementation for the CPU device"));
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let max = self.ctx.limits().max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(Error::invalid(label, format!("grid {groups:?} exceeds {max} workgroups per dimension")));
        }
        let (pbuf, poffset) = self.params_slot(bytemuck::bytes_of(params))?;
        let psize = std::mem::size_of::<P>().next_multiple_of(16) as u64;
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: pbuf.raw(),
                offset: poffset,
                size: wgpu::BufferSize::new(psize),
            }),
        }];
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource: b.binding() });
        }
        let layout = pipeline.get_bind_group_layout(0);
        let bind_group = self.ctx.scoped(label, || {
            self.ctx.device().create_bind_group(&wgpu::BindGroupDescriptor { label: Some(label), layout: &layout, entries: &entries })
        })?;
        self.keep.extend(buffers.iter().map(|b| (*b).clone()));
        self.ops.push(Op::Dispatch { pipeline: pipeline.clone(), bind_group, groups, label: label.to_string() });
        Ok(())
    }

    /// Records a copy of `bytes` (a multiple of 4) between buffers.
    pub fn copy(&mut self, src: &GpuBuffer, src_offset: u64, dst: &GpuBuffer, dst_offset: u64, bytes: u64) -> Result<()> {
        if src_offset + bytes > src.capacity() || dst_offset + bytes > dst.capacity() || !bytes.is_multiple_of(4) {
            return Err(Error::invalid("buffer copy", format!("{bytes} bytes from offset {src_offset} to {dst_offset}")));
        }
        if self.on_host() {
            let (src, dst) = (src.clone(), dst.clone());
            let (s0, d0, n) = ((src_offset / 4) as usize, (dst_offset / 4) as usize, (bytes / 4) as usize);
            return self.host("copy", move || {
                if src.same(&dst) {
                    dst.write_host().copy_within(s0..s0 + n, d0);
                } else {
                    dst.write_host()[d0..d0 + n].copy_from_slice(&src.read_host()[s0..s0 + n]);
                }
                Ok(())
            });
        }
        self.ops.push(Op::Copy { src: src.clone(), src_offset, dst: dst.clone(), dst_offset, bytes });
        Ok(())
    }

    fn encode(&mut self, timestamps: Option<&wgpu::QuerySet>) -> wgpu::CommandEncoder {
        let mut enc = self.ctx.device().create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("moegen batch") });
        let mut pass_index = 0u32;
        let mut i = 0;
        while i < self.ops.len() {
            match &self.ops[i] {
                Op::Copy { src, src_offset, dst, dst_offset, bytes } => {
                    enc.copy_buffer_to_buffer(src.raw(), *src_offset, dst.raw(), *dst_offset, *bytes);
                    i += 1;
                }
                Op::Host { label, .. } => unreachable!("host op {label} in a GPU batch"),
                Op::Dispatch { .. } => {
                    // One compute pass for a run of dispatches; wgpu orders them by their bindings.
                    let timestamp_writes = timestamps.map(|q| wgpu::ComputePassTimestampWrites {
                        query_set: q,
                        beginning_of_pass_write_index: Some(2 * pass_index),
                        end_of_pass_write_index: Some(2 * pass_index + 1),
                    });
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes });
                    while let Some(Op::Dispatch { pipeline, bind_group, groups, label }) = self.ops.get(i) {
                        pass.push_debug_group(label);
                        pass.set_pipeline(pipeline);
                        pass.set_bind_group(0, bind_group, &[]);
                        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
                        pass.pop_debug_group();
                        i += 1;
                    }
                    pass_index += 1;
                }
            }
        }
        enc
    }

    fn passes(&self) -> u32 {
        let mut n = 0;
        let mut prev_dispatch = false;
        for op in &self.ops {
            let d = matches!(op, Op::Dispatch { .. });
            if d && !prev_dispatch {
                n += 1;
            }
            prev_dispatch = d;
        }
        n
    }

    fn write_params(&self) {
        for (buf, data) in &self.params {
            self.ctx.link_send(data.len());
            self.ctx.queue().write_buffer(buf.raw(), 0, data);
        }
    }

    /// On the CPU device: runs the recorded ops in order, now.
    fn run_host(&mut self) -> Result<()> {
        let tracer = self.ctx.tracer();
        let start = tracer.as_ref().map(|t| t.now_ns());
        let ops = std::mem::take(&mut self.ops);
        // The whole batch on one of rayon's threads: each op's parallel loop then splits there
        // instead of being handed to the pool and back (a wake-up and a wait per op), and this
        // thread does not compete with the pool's for the cores while it waits.
        rayon::scope(|_| -> Result<()> {
            for op in ops {
                match op {
                    Op::Host { run, .. } => run()?,
                    _ => unreachable!("GPU ops are not recorded on the CPU device"),
                }
            }
            Ok(())
        })?;
        if let (Some(t), Some(start)) = (tracer, start) {
            t.finish(crate::gpu::Track::Compute, self.name.clone(), start);
        }
        Ok(())
    }

    /// Submits the recorded work without waiting for it (on the CPU device: runs it).
    pub fn submit(mut self) -> Result<()> {
        if self.on_host() {
            return self.run_host();
        }
        self.write_params();
        let tracer = self.ctx.tracer();
        let passes = self.passes();
        // The submission index is not needed: readbacks wait on their own copies.
        match tracer {
            Some(t) if passes > 0 && self.ctx.features().timestamps => {
                let count = 2 * passes;
                let queries = self.ctx.device().create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("trace timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count,
                });
                let bytes = count as u64 * 8;
                let resolved = self.ctx.buffer("trace timestamps", bytes, wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC)?;
                let staging = self.ctx.buffer("trace timestamps readback", bytes, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST)?;
                let mut enc = self.encode(Some(&queries));
                enc.resolve_query_set(&queries, 0..count, resolved.raw(), 0);
                enc.copy_buffer_to_buffer(resolved.raw(), 0, staging.raw(), 0, bytes);
                let index = self.ctx.queue().submit([enc.finish()]);
                t.add_timestamps(&self.name, staging, passes);
                index
            }
            Some(t) if passes > 0 => {
                let enc = self.encode(None);
                let index = self.ctx.queue().submit([enc.finish()]);
                t.add_callback_timed(&self.ctx, &self.name);
                index
            }
            _ => {
                let enc = self.encode(None);
                self.ctx.queue().submit([enc.finish()])
            }
        };
        self.ctx.check("submitting GPU work")?;
        Ok(())
    }

    /// Submits and waits. Returns the GPU time from timestamp queries where the device has them,
    /// else the wall time from submit to completion.
    pub fn submit_timed(mut self) -> Result<Duration> {
        if self.on_host() {
            let start = Instant::now();
            self.run_host()?;
            return Ok(start.elapsed());
        }
        self.write_params();
        let passes = self.passes();
        if !self.ctx.features().timestamps || passes == 0 {
            let start = Instant::now();
            let enc = self.encode(None);
            self.ctx.queue().submit([enc.finish()]);
            self.ctx.wait_idle("timed GPU work")?;
            return Ok(start.elapsed());
        }
        let count = 2 * passes;
        let queries = self.ctx.device().create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("batch timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let resolved = self.ctx.buffer(
            "timestamps",
            count as u64 * 8,
            wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::STORAGE,
        )?;
        let mut enc = self.encode(Some(&queries));
        enc.resolve_query_set(&queries, 0..count, resolved.raw(), 0);
        self.ctx.queue().submit([enc.finish()]);
        let bytes = self.ctx.read_bytes(&resolved, 0, count as u64 * 8)?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&bytes);
        let period = self.ctx.queue().get_timestamp_period() as f64;
        let total: u64 = ticks.chunks(2).map(|p| p[1].saturating_sub(p[0])).sum();
        Ok(Duration::from_nanos((total as f64 * period) as u64))
    }
}

/// A grid for `n` workgroups within the per-dimension limit; kernels recover the index with
/// `flat_workgroup`, and skip indices past `n`.
pub fn grid(ctx: &GpuContext, n: u32) -> [u32; 3] {
    let max = ctx.limits().max_compute_workgroups_per_dimension.max(1);
    if n <= max {
        [n, 1, 1]
    } else {
        let y = n.div_ceil(max);
        [n.div_ceil(y), y, 1]
    }
}
