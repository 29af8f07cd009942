//! Streams experts from host memory into a pool of N GPU slots while the GPU computes.
//!
//! A host thread uploads the experts of a layer in the order they will run; the GPU work of an
//! expert is recorded once its upload is queued, and a slot is written again only after the
//! work reading its previous expert was submitted (the queue orders the write after that work).
//! So with N slots the uploads run up to N experts ahead of the compute. Experts still held in a
//! slot from earlier (least recently used out) are not uploaded again.

use std::sync::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::gpu::{GpuBuffer, GpuContext, GpuWeight, Track, WeightDtype, WeightPart};
use crate::model::weights::HostExperts;

/// Room on the GPU for one streamed expert's three matrices.
pub struct ExpertSlot {
    pub gate: GpuBuffer,
    pub up: GpuBuffer,
    pub down: GpuBuffer,
    /// Written by mapping (unified memory) rather than through the queue's staging copy.
    pub mapped: bool,
    /// FP8 experts: where the pack lands before the GPU dequantises it into the matrices.
    pub fp8_staging: Option<GpuBuffer>,
}

impl ExpertSlot {
    /// A slot whose gate, up and down matrices take `bytes` each (the most any streamed layer's
    /// need); FP8 packs of `fp8_pack_bytes` also get a staging buffer.
    pub fn new(ctx: &GpuContext, bytes: [usize; 3], fp8_pack_bytes: Option<usize>) -> Result<Self> {
        let sizes = bytes.map(|b| (b as u64).next_multiple_of(8));
        // FP8 slots are written by the GPU's dequantisation, not by the host.
        let mapped = ctx.unified_memory() && fp8_pack_bytes.is_none() && std::env::var_os("MOEGEN_NO_MAPPED_SLOTS").is_none();
        log::debug!("expert slot of {sizes:?} bytes, {}", if mapped { "written in place (unified memory)" } else { "written through staging" });
        let make = |what: &str, bytes: u64| -> Result<GpuBuffer> {
            if bytes > ctx.binding_limit() {
                return Err(crate::error::Error::BindingTooLarge { what: what.to_string(), needed: bytes, limit: ctx.binding_limit() });
            }
            if mapped {
                ctx.buffer(what, bytes, wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::MAP_WRITE)
            } else {
                ctx.storage(what, bytes)
            }
        };
        let fp8_staging = fp8_pack_bytes.map(|b| ctx.storage("expert slot (FP8 pack)", (b as u64).next_multiple_of(4))).transpose()?;
        Ok(ExpertSlot {
            gate: make("expert slot (gate)", sizes[0])?,
            up: make("expert slot (up)", sizes[1])?,
            down: make("expert slot (down)", sizes[2])?,
            mapped,
            fp8_staging,
        })
    }

    /// Writes an expert's pack into the slot: its three matrices, or for FP8 the pack into the
    /// staging buffer and the GPU dequantising it into the matrices (submitted before the
    /// upload counts as done, so the expert's work, submitted after, reads bf16).
    fn fill(&self, ctx: &GpuContext, host: &HostExperts, pack: &[u8]) -> Result<()> {
        if let (Some(staging), Some(block), Some(scales)) = (&self.fp8_staging, host.fp8_block, host.scale_offsets()) {
            ctx.upload(staging, 0, pack)?;
            let mut b = crate::gpu::Batch::named(ctx, "dequantising a streamed expert");
            let shapes = [(host.inter, host.hidden), (host.inter, host.hidden), (host.hidden, host.inter)];
            for (((buf, range), scale0), (rows, cols)) in [&self.gate, &self.up, &self.down].into_iter().zip(host.sections()).zip(scales).zip(shapes) {
                let run = crate::kernels::dequant::DequantRun { rows, row0: 0, src_byte0: range.start, scale0, dst_byte0: 0 };
                crate::kernels::dequant::dequant_fp8(&mut b, staging, staging, buf, run, cols, block)?;
            }
            return b.submit().map(|_| ());
        }
        let parts = host.sections().map(|r| &pack[r]);
        for (buf, data) in [&self.gate, &self.up, &self.down].into_iter().zip(parts) {
            if self.mapped {
                ctx.write_mapped(buf, data)?;
            } else {
                ctx.upload(buf, 0, data)?;
            }
        }
        Ok(())
    }

    /// The slot's matrices as one-part weights of `inter x hidden` (gate, up) and `hidden x inter` (down).
    pub fn weights(&self, inter: usize, hidden: usize, dtypes: [WeightDtype; 3]) -> [GpuWeight; 3] {
        let view = |buffer: &GpuBuffer, rows: usize, cols: usize, dtype: WeightDtype| GpuWeight {
            parts: vec![WeightPart { buffer: buffer.clone(), first_row: 0, rows }],
            rows,
            cols,
            dtype,
        };
        [view(&self.gate, inter, hidden, dtypes[0]), view(&self.up, inter, hidden, dtypes[1]), view(&self.down, hidden, inter, dtypes[2])]
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Experts uploaded, and their bytes.
    pub uploads: u64,
    pub bytes: u64,
    /// Experts found already in a slot.
    pub hits: u64,
    /// Experts computed on the host from host memory instead (`--cpu-experts`).
    pub on_host: u64,
}

impl StreamStats {
    pub fn add(&mut self, o: StreamStats) {
        self.uploads += o.uploads;
        self.bytes += o.bytes;
        self.hits += o.hits;
        self.on_host += o.on_host;
    }
}

/// Which (layer, expert) each slot holds, when it was last used, and how often each expert has
/// been wanted: with four slots or more, half of the free ones keep the most used experts and the
/// rest rotate, so the experts the router favours stay on the GPU between steps (plain LRU keeps
/// nothing under the cyclic order of layers).
#[derive(Debug, Default)]
pub struct SlotCache {
    held: Vec<Option<(usize, usize)>>,
    last_used: Vec<u64>,
    uses: std::collections::HashMap<(usize, usize), u64>,
    clock: u64,
    pub stats: StreamStats,
}

/// Where one expert of a streamed run goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotUse {
    pub expert: usize,
    pub slot: usize,
    pub upload: bool,
    /// Experts of this run (in run order) whose work must be submitted before the upload may
    /// overwrite the slot.
    pub after: usize,
}

impl SlotCache {
    pub fn new(slots: usize) -> Self {
        SlotCache { held: vec![None; slots], last_used: vec![0; slots], ..Default::default() }
    }

    /// Whether a slot holds expert `expert` of `layer` now.
    pub fn holds(&self, layer: usize, expert: usize) -> bool {
        self.held.contains(&Some((layer, expert)))
    }

    /// The run order for `experts` of `layer` and the slot of each: experts still held run
    /// first without an upload (as long as two slots stay free to rotate through), the others
    /// rotate through the free slots, least recently used first.
    pub fn plan(&mut self, layer: usize, experts: &[usize]) -> Vec<SlotUse> {
        self.clock += 1;
        let n = self.held.len();
        let mut pinned = vec![false; n];
        let mut hits = Vec::new();
        let mut misses = Vec::new();
        for &e in experts {
            match self.held.iter().position(|h| *h == Some((layer, e))) {
                Some(s) if n - hits.len() > 2 => {
                    pinned[s] = true;
                    hits.push(SlotUse { expert: e, slot: s, upload: false, after: 0 });
                }
                _ => misses.push(e),
            }
        }
        for &e in experts {
            *self.uses.entry((layer, e)).or_default() += 1;
        }
        let uses_of = |l: usize, e: usize| self.uses.get(&(l, e)).copied().unwrap_or(0);
        // The most used experts upload last, so that they are the ones the slots keep.
        misses.sort_by_key(|&e| uses_of(layer, e));
        let value = |s: usize| self.held[s].map_or(0, |(l, e)| uses_of(l, e));
        let mut free: Vec<usize> = (0..n).filter(|&s| !pinned[s]).collect();
        // Among equally used experts the most recent go first: under the cyclic order of layers
        // that keeps a fixed set resident instead of evicting each one just before its turn.
        free.sort_by_key(|&s| (value(s), std::cmp::Reverse(self.last_used[s])));
        // With four free slots or more, only the less valuable half rotates.
        let rotate = if free.len() >= 4 { free.len().div_ceil(2) } else { free.len() };
        free.truncate(rotate.min(misses.len()).max(2).min(free.len()));
        let mut out = hits;
        let mut last_user: Vec<Option<usize>> = vec![None; n];
        for (j, e) in misses.into_iter().enumerate() {
            let s = free[j % free.len()];
            let after = last_user[s].map_or(0, |i| i + 1);
            last_user[s] = Some(out.len());
            self.held[s] = Some((layer, e));
            out.push(SlotUse { expert: e, slot: s, upload: true, after });
        }
        for u in &out {
            self.last_used[u.slot] = self.clock;
        }
        out
    }
}

/// Progress shared by the upload thread and the compute loop.
#[derive(Default)]
struct Progress {
    uploaded: usize,
    submitted: usize,
    failed: Option<Error>,
    stop: bool,
}

/// Runs `compute(state, use, slot)` for each expert of `experts` (in the order
/// [`SlotCache::plan`] chooses), its weights in `slot` by then; `compute` records and submits the
/// expert's work. Uploads run on a host thread (held to the link's rate by the context), recorded on the trace, and
/// start at once: `before` runs on this thread meanwhile and makes the state `compute` works on
/// (so a layer's experts can upload while its attention computes).
#[allow(clippy::too_many_arguments)]
pub fn stream_layer<T>(
    ctx: &GpuContext,
    slots: &[ExpertSlot],
    cache: &Mutex<SlotCache>,
    layer: usize,
    host: &HostExperts,
    experts: &[usize],
    before: impl FnOnce() -> Result<T>,
    mut compute: impl FnMut(&mut T, &SlotUse, &ExpertSlot) -> Result<()>,
) -> Result<(StreamStats, T)> {
    if slots.len() < 2 {
        return Err(Error::invalid("streamed experts", format!("{} expert slots; at least two are needed", slots.len())));
    }
    let uses = cache.lock().unwrap().plan(layer, experts);
    let progress = Mutex::new(Progress::default());
    let changed = Condvar::new();
    let mut stats = StreamStats::default();
    for s in &uses {
        if s.upload {
            stats.uploads += 1;
            stats.bytes += host.packs[s.expert].len() as u64;
        } else {
            stats.hits += 1;
        }
    }
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            for (i, s) in uses.iter().enumerate() {
                if s.upload {
                    let mut p = progress.lock().unwrap();
                    while p.submitted < s.after && !p.stop {
                        p = changed.wait(p).unwrap();
                    }
                    if p.stop {
                        return;
                    }
                    drop(p);
                    let tracer = ctx.tracer();
                    let start = tracer.as_ref().map(|t| t.now_ns());
                    let pack = &host.packs[s.expert];
                    let sent = slots[s.slot].fill(ctx, host, pack);
                    if let (Some(t), Some(start)) = (tracer, start) {
                        t.finish(Track::Upload, format!("layer {layer} expert {} ({} KiB)", s.expert, pack.len() >> 10), start);
                    }
                    if let Err(e) = sent {
                        let mut p = progress.lock().unwrap();
                        p.failed = Some(e);
                        p.stop = true;
                        changed.notify_all();
                        return;
                    }
                }
                progress.lock().unwrap().uploaded = i + 1;
                changed.notify_all();
            }
        });
        let run = (|| {
            let mut state = before()?;
            for (i, s) in uses.iter().enumerate() {
                let mut p = progress.lock().unwrap();
                while p.uploaded <= i && !p.stop {
                    p = changed.wait(p).unwrap();
                }
                if let Some(e) = p.failed.take() {
                    return Err(e);
                }
                drop(p);
                compute(&mut state, s, &slots[s.slot])?;
                progress.lock().unwrap().submitted = i + 1;
                changed.notify_all();
            }
            Ok(state)
        })();
        if run.is_err() {
            progress.lock().unwrap().stop = true;
            changed.notify_all();
        }
        run
    });
    let state = result?;
    cache.lock().unwrap().stats.add(stats);
    Ok((stats, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_experts_run_first_and_the_rest_rotate_after_their_slot_is_released() {
        let mut c = SlotCache::new(3);
        let first = c.plan(0, &[1, 2, 3, 4]);
        let slots: Vec<usize> = first.iter().map(|u| u.slot).collect();
        assert_eq!(slots, vec![0, 1, 2, 0]);
        assert!(first.iter().all(|u| u.upload));
        // Expert 4 reuses slot 0 once expert 1's work (run position 0) is submitted.
        assert_eq!(first.iter().map(|u| u.after).collect::<Vec<_>>(), vec![0, 0, 0, 1]);
        // Layer 0 again: 4 (slot 0) and 3 (slot 2) are still held; with 3 slots only one hit may
        // be pinned so that two slots rotate.
        let again = c.plan(0, &[3, 4, 5]);
        assert_eq!(again[0], SlotUse { expert: 3, slot: 2, upload: false, after: 0 });
        assert!(again[1..].iter().all(|u| u.upload && u.slot != 2));
        let mut big = SlotCache::new(6);
        big.plan(1, &[0, 1]);
        let hits = big.plan(1, &[1, 0, 7]);
        assert_eq!(hits.iter().filter(|u| !u.upload).count(), 2);
        assert_eq!(hits[2].expert, 7);
    }

    #[test]
    fn the_most_used_experts_stay_while_the_others_rotate() {
        // Six slots, three layers visited in turn, four experts each; expert 3 of layer 0 is
        // wanted every time, the others change from step to step.
        let mut c = SlotCache::new(6);
        let mut hot_hits = 0;
        for step in 0..5usize {
            for layer in 0..3 {
                let mut wanted: Vec<usize> = (0..4).map(|i| 4 + (step * 4 + i) % 12).collect();
                if layer == 0 {
                    wanted[0] = 3;
                }
                let uses = c.plan(layer, &wanted);
                hot_hits += uses.iter().filter(|u| !u.upload && layer == 0 && u.expert == 3).count();
            }
        }
        // Least recently used alone would keep nothing: the two layers between two visits of
        // layer 0 evict every slot.
        assert!(hot_hits >= 3, "expert 3 was found in a slot {hot_hits} times of 4");
    }
}
