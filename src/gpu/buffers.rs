//! GPU buffers: a pool that reuses allocations, chunked uploads, readback, and weights split
//! into parts that each fit one storage binding.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{ensure, Error, Result};
use crate::gpu::GpuContext;

/// Usage of every storage buffer: kernels bind it, uploads and copies reach it both ways.
pub const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);
pub const UNIFORM: wgpu::BufferUsages = wgpu::BufferUsages::UNIFORM.union(wgpu::BufferUsages::COPY_DST);

/// One `write_buffer` call carries at most this much, so the driver's staging stays bounded.
const UPLOAD_CHUNK: usize = 8 << 20;
/// Uploads are flushed with a submit after this many bytes or calls (some backends misbehave
/// with hundreds of writes queued and nothing submitted).
const FLUSH_BYTES: usize = 64 << 20;
const FLUSH_CALLS: usize = 64;
/// Idle buffers kept for reuse, in bytes, before the pool frees instead.
const DEFAULT_IDLE_CAP: u64 = 1 << 30;

type Key = (u64, u32);

#[derive(Default)]
struct PoolState {
    free: HashMap<Key, Vec<wgpu::Buffer>>,
    idle_bytes: u64,
    /// The CPU device's idle host allocations by size class in bytes: a fresh allocation of
    /// megabytes is mapped pages the kernel must fault in and zero on first touch, which cost a
    /// fifth of a CPU-device run when every step's activations took new ones.
    host_free: HashMap<u64, Vec<Vec<u32>>>,
    host_idle_bytes: u64,
    allocated_bytes: u64,
    reused: u64,
    created: u64,
}

/// Reuses GPU allocations by size class, so steady-state steps allocate nothing.
#[derive(Clone, Default)]
pub struct BufferPool {
    state: Arc<Mutex<PoolState>>,
    pub(crate) upload: Arc<Mutex<(usize, usize)>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub allocated_bytes: u64,
    pub idle_bytes: u64,
    pub created: u64,
    pub reused: u64,
}

impl BufferPool {
    pub fn stats(&self) -> PoolStats {
        let s = self.state.lock().unwrap();
        PoolStats { allocated_bytes: s.allocated_bytes, idle_bytes: s.idle_bytes, created: s.created, reused: s.reused }
    }

}

/// Rounds a request up to its size class (at most 12.5% larger), so nearby sizes share buffers.
fn size_class(bytes: u64, max: u64) -> u64 {
    let b = bytes.max(256).next_multiple_of(4);
    let step = (b.next_power_of_two() / 8).max(256);
    let class = b.next_multiple_of(step);
    if class > max {
        b
    } else {
        class
    }
}

/// A pooled GPU buffer, shared by handle; the allocation goes back to the pool when the last
/// handle is dropped (a recorded batch holds one until it is submitted). `size` is what was asked for.
#[derive(Clone)]
pub struct GpuBuffer(Arc<Pooled>);

struct Pooled {
    memory: Memory,
    size: u64,
    key: Key,
    pool: BufferPool,
}

/// A GPU allocation, or on the CPU device host memory in 4-byte words (what every kernel
/// indexes).
enum Memory {
    Gpu(wgpu::Buffer),
    Host(RwLock<Vec<u32>>),
    /// Read-only words inside memory lent to the CPU device (a checkpoint file), kept alive here.
    Lent { bytes: Arc<dyn AsRef<[u8]> + Send + Sync>, offset: usize, words: usize },
}

/// A CPU-device buffer's words, for reading.
pub enum HostRead<'a> {
    Owned(RwLockReadGuard<'a, Vec<u32>>),
    Lent(&'a [u32]),
}

impl std::ops::Deref for HostRead<'_> {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        match self {
            HostRead::Owned(g) => g,
            HostRead::Lent(w) => w,
        }
    }
}

impl GpuBuffer {
    pub fn raw(&self) -> &wgpu::Buffer {
        match &self.0.memory {
            Memory::Gpu(b) => b,
            _ => panic!("a host buffer used as a GPU buffer"),
        }
    }
    /// Bytes asked for (the allocation may be larger).
    pub fn size(&self) -> u64 {
        self.0.size
    }
    /// Bytes allocated (at least `size`).
    pub fn capacity(&self) -> u64 {
        match &self.0.memory {
            Memory::Gpu(b) => b.size(),
            Memory::Host(words) => words.read().unwrap().len() as u64 * 4,
            Memory::Lent { words, .. } => *words as u64 * 4,
        }
    }
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        self.raw().as_entire_binding()
    }

    /// Whether both handles are the same allocation.
    pub fn same(&self, other: &GpuBuffer) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    fn host(&self) -> &RwLock<Vec<u32>> {
        match &self.0.memory {
            Memory::Host(words) => words,
            Memory::Lent { .. } => panic!("a checkpoint's weights written on the CPU device (they are read in place)"),
            Memory::Gpu(_) => panic!("a GPU buffer read as host memory"),
        }
    }

    /// The words of a CPU-device buffer, for reading.
    pub fn read_host(&self) -> HostRead<'_> {
        match &self.0.memory {
            Memory::Lent { bytes, offset, words } => {
                let b = &(**bytes).as_ref()[*offset..*offset + *words * 4];
                HostRead::Lent(bytemuck::cast_slice(b))
            }
            _ => HostRead::Owned(self.host().read().unwrap()),
        }
    }

    /// Whether the buffer reads lent memory in place (a checkpoint's weights on the CPU device).
    pub fn is_lent(&self) -> bool {
        matches!(self.0.memory, Memory::Lent { .. })
    }

    /// The words of a CPU-device buffer, for writing.
    pub fn write_host(&self) -> RwLockWriteGuard<'_, Vec<u32>> {
        self.host().write().unwrap()
    }

    /// Writes bytes into a CPU-device buffer at `offset`.
    pub(crate) fn write_host_bytes(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut words = self.write_host();
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words[..]);
        let at = offset as usize;
        ensure!(at + data.len() <= bytes.len(), "upload", "{} bytes at offset {offset} overrun a buffer of {}", data.len(), bytes.len());
        bytes[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read_host_bytes(&self, offset: u64, len: u64) -> Vec<u8> {
        let words = self.read_host();
        let bytes: &[u8] = bytemuck::cast_slice(&words[..]);
        bytes[offset as usize..(offset + len) as usize].to_vec()
    }
}

/// Maps a lent weight's pages now, while the model loads, instead of one minor fault per few
/// pages the first time a kernel reads them (as llama.cpp maps its checkpoint with
/// `MAP_POPULATE`): the first step of a job then runs at the speed of the others. Linux 5.14 and
/// later; elsewhere, or where refused, the pages are mapped on first use as before.
fn map_now(bytes: &[u8]) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let page = 4096;
        let start = (bytes.as_ptr() as usize) / page * page;
        let len = bytes.as_ptr() as usize + bytes.len() - start;
        // SAFETY: the range covers pages of the lent mapping, which outlives this call; the advice
        // only maps them (reads), never changes their contents.
        unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_POPULATE_READ) };
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = bytes;
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Memory::Host(words) = &mut self.memory {
            let v = std::mem::take(words.get_mut().unwrap_or_else(|e| e.into_inner()));
            let class = self.key.0;
            if v.capacity() as u64 * 4 >= class && class > 0 {
                let mut s = self.pool.state.lock().unwrap();
                if s.host_idle_bytes + class <= DEFAULT_IDLE_CAP {
                    s.host_idle_bytes += class;
                    s.host_free.entry(class).or_default().push(v);
                }
            }
            return;
        }
        let Memory::Gpu(buffer) = &self.memory else { return };
        let mut s = self.pool.state.lock().unwrap();
        if s.idle_bytes + self.key.0 <= DEFAULT_IDLE_CAP {
            s.idle_bytes += self.key.0;
            s.free.entry(self.key).or_default().push(buffer.clone());
        } else {
            s.allocated_bytes -= self.key.0;
            buffer.destroy();
        }
    }
}

impl std::fmt::Debug for GpuBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuffer({} bytes)", self.size())
    }
}

impl GpuContext {
    /// A buffer of at least `bytes` bytes, from the pool when one is free. Contents are undefined.
    pub fn buffer(&self, what: &str, bytes: u64, usage: wgpu::BufferUsages) -> Result<GpuBuffer> {
        let limit = self.limits().max_buffer_size;
        if bytes > limit {
            return Err(Error::BindingTooLarge { what: what.to_string(), needed: bytes, limit });
        }
        let pool = &self.shared.pool;
        if self.is_cpu() {
            let class = size_class(bytes, u64::MAX);
            let words = (bytes.max(4) as usize).div_ceil(4);
            let reused = {
                let mut s = pool.state.lock().unwrap();
                let found = s.host_free.get_mut(&class).and_then(Vec::pop);
                if found.is_some() {
                    s.host_idle_bytes -= class;
                }
                found
            };
            let v = match reused {
                Some(mut v) => {
                    // Contents are undefined, as on the GPU; debug builds poison them (NaN) so
                    // that a test catches a kernel that counts on zeros.
                    v.truncate(words);
                    if cfg!(debug_assertions) {
                        v.fill(u32::MAX);
                    }
                    v.resize(words, 0);
                    v
                }
                None => {
                    // Zeroed by the allocator (fresh pages, zeroed by the kernel when a kernel's
                    // threads first touch them: a memset here ran on one thread and cost more),
                    // at the class's size so that it can be reused. Not transparent huge pages:
                    // asked for with madvise, they made runs here slower.
                    let mut v = vec![0u32; (class / 4) as usize];
                    v.truncate(words);
                    v
                }
            };
            return Ok(GpuBuffer(Arc::new(Pooled { memory: Memory::Host(RwLock::new(v)), size: bytes, key: (class, 0), pool: pool.clone() })));
        }
        let key = (size_class(bytes, limit), usage.bits());
        let reused = {
            let mut s = pool.state.lock().unwrap();
            let found = s.free.get_mut(&key).and_then(Vec::pop);
            if found.is_some() {
                s.idle_bytes -= key.0;
                s.reused += 1;
            }
            found
        };
        let buffer = match reused {
            Some(b) => b,
            None => {
                let b = self.scoped(&format!("allocating {} bytes for {what}", key.0), || {
                    self.device().create_buffer(&wgpu::BufferDescriptor {
                        label: Some(what),
                        size: key.0,
                        usage,
                        mapped_at_creation: false,
                    })
                })?;
                let mut s = pool.state.lock().unwrap();
                s.allocated_bytes += key.0;
                s.created += 1;
                b
            }
        };
        Ok(GpuBuffer(Arc::new(Pooled { memory: Memory::Gpu(buffer), size: bytes, key, pool: pool.clone() })))
    }

    /// A storage buffer of `bytes`, which must fit one binding.
    pub fn storage(&self, what: &str, bytes: u64) -> Result<GpuBuffer> {
        if bytes > self.binding_limit() {
            return Err(Error::BindingTooLarge { what: what.to_string(), needed: bytes, limit: self.binding_limit() });
        }
        self.buffer(what, bytes, STORAGE)
    }

    /// A storage buffer holding `data`.
    pub fn storage_from<T: bytemuck::Pod>(&self, what: &str, data: &[T]) -> Result<GpuBuffer> {
        let bytes = bytemuck::cast_slice::<T, u8>(data);
        let buf = self.storage(what, bytes.len().max(4) as u64)?;
        self.upload(&buf, 0, bytes)?;
        Ok(buf)
    }

    /// Writes `data` at `offset`, in bounded chunks with periodic submits.
    pub fn upload(&self, buf: &GpuBuffer, offset: u64, data: &[u8]) -> Result<()> {
        ensure!(offset.is_multiple_of(4), "upload", "offset {offset} is not a multiple of 4");
        ensure!(
            offset + data.len() as u64 <= buf.capacity(),
            "upload",
            "{} bytes at offset {offset} overrun a buffer of {}",
            data.len(),
            buf.capacity()
        );
        self.link_send(data.len());
        if self.is_cpu() {
            return buf.write_host_bytes(offset, data);
        }
        let queue = self.queue();
        let mut at = 0usize;
        while at < data.len() {
            let end = (at + UPLOAD_CHUNK).min(data.len());
            let chunk = &data[at..end];
            if chunk.len().is_multiple_of(4) {
                queue.write_buffer(buf.raw(), offset + at as u64, chunk);
            } else {
                let mut padded = chunk.to_vec();
                padded.resize(chunk.len().next_multiple_of(4), 0);
                queue.write_buffer(buf.raw(), offset + at as u64, &padded);
            }
            let mut pending = self.shared.pool.upload.lock().unwrap();
            pending.0 += chunk.len();
            pending.1 += 1;
            if pending.0 >= FLUSH_BYTES || pending.1 >= FLUSH_CALLS {
                *pending = (0, 0);
                drop(pending);
                queue.submit([]);
            }
            at = end;
        }
        Ok(())
    }

    /// Copies `len` bytes from `offset` of `buf` back to the host, waiting for the GPU.
    pub fn read_bytes(&self, buf: &GpuBuffer, offset: u64, len: u64) -> Result<Vec<u8>> {
        let padded = len.next_multiple_of(4);
        ensure!(
            offset.is_multiple_of(4) && offset + padded <= buf.capacity(),
            "readback",
            "{len} bytes at offset {offset} of a {}-byte buffer",
            buf.capacity()
        );
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.is_cpu() {
            self.link_receive(len as usize);
            return Ok(buf.read_host_bytes(offset, len));
        }
        let staging = self.buffer(
            "readback staging",
            padded,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        let mut enc = self.device().create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf.raw(), offset, staging.raw(), 0, padded);
        self.queue().submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.raw().map_async(wgpu::MapMode::Read, 0..padded, move |r| {
            let _ = tx.send(r);
        });
        self.wait_idle("reading back a buffer")?;
        rx.recv()
            .map_err(|_| Error::Gpu("readback: map callback never ran".into()))?
            .map_err(|e| Error::Gpu(format!("readback: {e}")))?;
        let out = {
            let view = staging
                .raw()
                .get_mapped_range(0..padded)
                .map_err(|e| Error::Gpu(format!("readback: {e:?}")))?;
            view[..len as usize].to_vec()
        };
        staging.raw().unmap();
        self.link_receive(len as usize);
        Ok(out)
    }

    /// Starts copying `(buffer, bytes)` pieces back to the host in one submission, without
    /// waiting: the GPU goes on with later work while the host does something else.
    pub fn read_later(&self, pieces: &[(&GpuBuffer, u64)]) -> Result<PendingRead> {
        let mut lens = Vec::new();
        let mut total = 0u64;
        for (buf, len) in pieces {
            ensure!(*len <= buf.capacity(), "readback", "{len} bytes of a {}-byte buffer", buf.capacity());
        }
        if self.is_cpu() {
            // Submitted work has run already: the bytes are there.
            let ready = pieces.iter().map(|(buf, len)| buf.read_host_bytes(0, *len)).collect();
            return Ok(PendingRead(Pending::Ready(ready)));
        }
        for (_, len) in pieces {
            let padded = len.next_multiple_of(4);
            lens.push((total, *len));
            total += padded;
        }
        let staging = self.buffer("readback staging", total.max(4), wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST)?;
        let mut enc = self.device().create_command_encoder(&Default::default());
        for ((buf, len), (at, _)) in pieces.iter().zip(&lens) {
            if *len > 0 {
                enc.copy_buffer_to_buffer(buf.raw(), 0, staging.raw(), *at, len.next_multiple_of(4));
            }
        }
        let index = self.queue().submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.raw().map_async(wgpu::MapMode::Read, 0..total.max(4), move |r| {
            let _ = tx.send(r);
        });
        Ok(PendingRead(Pending::Gpu { staging, lens, total: total.max(4), index, rx }))
    }

    pub fn read_f32(&self, buf: &GpuBuffer, count: usize) -> Result<Vec<f32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(buf, 0, count as u64 * 4)?))
    }

    pub fn read_u32(&self, buf: &GpuBuffer, count: usize) -> Result<Vec<u32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(buf, 0, count as u64 * 4)?))
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.shared.pool.stats()
    }
}

/// Buffers on their way back to the host: [`GpuContext::read_later`].
pub struct PendingRead(Pending);

enum Pending {
    Gpu {
        staging: GpuBuffer,
        lens: Vec<(u64, u64)>,
        total: u64,
        index: wgpu::SubmissionIndex,
        rx: std::sync::mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
    },
    /// On the CPU device, copied when asked for.
    Ready(Vec<Vec<u8>>),
}

impl PendingRead {
    /// Waits for the copies (not for later submissions) and returns each piece's bytes.
    pub fn wait(self, ctx: &GpuContext) -> Result<Vec<Vec<u8>>> {
        let (staging, lens, total, index, rx) = match self.0 {
            Pending::Ready(out) => {
                ctx.link_receive(out.iter().map(Vec::len).sum());
                return Ok(out);
            }
            Pending::Gpu { staging, lens, total, index, rx } => (staging, lens, total, index, rx),
        };
        ctx.wait_for(index, "reading back results")?;
        rx.recv()
            .map_err(|_| Error::Gpu("readback: map callback never ran".into()))?
            .map_err(|e| Error::Gpu(format!("readback: {e}")))?;
        let out = {
            let view = staging.raw().get_mapped_range(0..total).map_err(|e| Error::Gpu(format!("readback: {e:?}")))?;
            lens.iter().map(|&(at, len)| view[at as usize..(at + len) as usize].to_vec()).collect::<Vec<_>>()
        };
        staging.raw().unmap();
        ctx.link_receive(lens.iter().map(|&(_, len)| len as usize).sum());
        Ok(out)
    }
}

/// How weight elements are stored, on the GPU and in host memory. Activations are always f32.
/// The block formats are llama.cpp's (see [`crate::quant`]): a matrix's rows are each a whole
/// number of blocks, read by the kernels as stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    F32,
    F16,
    /// The default: what the planner prices a weight as when it knows no better.
    #[default]
    Bf16,
    Q8_0,
    Q4_0,
    Q4K,
    Q5K,
    Q6K,
    /// FP8 e4m3 checkpoints (DeepSeek-V3's) as the kernels read them: each row in runs of
    /// `block` values (the scale block's width), each run led by its f32 scale (the 2-D block's
    /// scale, repeated on each of its rows); values decode to `bf16(e4m3 * scale)`, as
    /// DeepSeek's dequantisation rounds them.
    Fp8 { block: u32 },
}

impl WeightDtype {
    pub const QUANTISED: [WeightDtype; 5] = [WeightDtype::Q8_0, WeightDtype::Q4_0, WeightDtype::Q4K, WeightDtype::Q5K, WeightDtype::Q6K];
    pub const ALL: [WeightDtype; 8] = [
        WeightDtype::F32,
        WeightDtype::F16,
        WeightDtype::Bf16,
        WeightDtype::Q8_0,
        WeightDtype::Q4_0,
        WeightDtype::Q4K,
        WeightDtype::Q5K,
        WeightDtype::Q6K,
    ];

    /// Elements per block (1 for the float types).
    pub fn block_elems(self) -> usize {
        match self {
            WeightDtype::F32 | WeightDtype::F16 | WeightDtype::Bf16 => 1,
            WeightDtype::Q8_0 | WeightDtype::Q4_0 => 32,
            WeightDtype::Q4K | WeightDtype::Q5K | WeightDtype::Q6K => crate::quant::QK_K,
            WeightDtype::Fp8 { block } => block as usize,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::F16 | WeightDtype::Bf16 => 2,
            WeightDtype::Q8_0 => 34,
            WeightDtype::Q4_0 => 18,
            WeightDtype::Q4K => 144,
            WeightDtype::Q5K => 176,
            WeightDtype::Q6K => 210,
            WeightDtype::Fp8 { block } => block as usize + 4,
        }
    }

    pub fn is_quantised(self) -> bool {
        self.block_elems() > 1
    }

    /// Bytes of `elements` stored elements (a whole number of blocks; rounded up otherwise).
    pub fn bytes_of(self, elements: usize) -> usize {
        elements.div_ceil(self.block_elems()) * self.block_bytes()
    }

    /// Bytes of one row of `cols` elements.
    pub fn row_bytes(self, cols: usize) -> usize {
        self.bytes_of(cols)
    }

    /// Whether rows of `cols` elements are whole blocks.
    pub fn fits_cols(self, cols: usize) -> bool {
        cols.is_multiple_of(self.block_elems())
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::Q8_0 => "q8_0",
            WeightDtype::Q4_0 => "q4_0",
            WeightDtype::Q4K => "q4_k",
            WeightDtype::Q5K => "q5_k",
            WeightDtype::Q6K => "q6_k",
            WeightDtype::Fp8 { .. } => "fp8",
        }
    }
}

/// A contiguous run of rows of a weight matrix, in its own buffer.
#[derive(Clone, Debug)]
pub struct WeightPart {
    pub buffer: GpuBuffer,
    pub first_row: usize,
    pub rows: usize,
}

/// A `[rows, cols]` row-major matrix (Hugging Face `[out, in]`), split by rows into parts that
/// each fit one storage binding.
#[derive(Clone, Debug)]
pub struct GpuWeight {
    pub parts: Vec<WeightPart>,
    pub rows: usize,
    pub cols: usize,
    pub dtype: WeightDtype,
}

impl GpuWeight {
    /// Uploads `data` (little-endian elements of `dtype`, `rows * cols` of them).
    pub fn upload(ctx: &GpuContext, what: &str, data: &[u8], dtype: WeightDtype, rows: usize, cols: usize) -> Result<Self> {
        Self::stack(ctx, what, &[data], dtype, rows, cols)
    }

    /// Uploads matrices of `rows_each x cols` stacked into one `[pieces * rows_each, cols]` weight
    /// (the experts of a layer), straight from each piece's bytes. Parts split only between pieces.
    /// On the CPU device, pieces inside memory lent to it (the checkpoint) are read in place,
    /// a part each.
    pub fn stack(ctx: &GpuContext, what: &str, pieces: &[&[u8]], dtype: WeightDtype, rows_each: usize, cols: usize) -> Result<Self> {
        let lent: Vec<_> = pieces.iter().map_while(|p| ctx.lent_holding(p)).collect();
        if !pieces.is_empty() && lent.len() == pieces.len() && pieces.iter().all(|p| p.len() == rows_each * dtype.row_bytes(cols)) {
            let parts = pieces
                .iter()
                .zip(lent)
                .enumerate()
                .map(|(i, (p, bytes))| {
                    let offset = p.as_ptr() as usize - (*bytes).as_ref().as_ptr() as usize;
                    map_now(p);
                    let buffer = GpuBuffer(Arc::new(Pooled { memory: Memory::Lent { bytes, offset, words: p.len() / 4 }, size: p.len() as u64, key: (0, 0), pool: ctx.shared.pool.clone() }));
                    WeightPart { buffer, first_row: i * rows_each, rows: rows_each }
                })
                .collect();
            log::debug!("{what}: read in place from the checkpoint");
            return Ok(GpuWeight { parts, rows: rows_each * pieces.len(), cols, dtype });
        }
        let row_bytes = dtype.row_bytes(cols);
        ensure!(rows_each > 0 && cols > 0 && !pieces.is_empty(), what, "empty weight {rows_each}x{cols}");
        ensure!(dtype.fits_cols(cols), what, "{} rows need a multiple of {} columns, this matrix has {cols}", dtype.name(), dtype.block_elems());
        for (i, piece) in pieces.iter().enumerate() {
            ensure!(
                piece.len() == rows_each * row_bytes,
                what,
                "expected {rows_each}x{cols} {} = {} bytes{}, got {}",
                dtype.name(),
                rows_each * row_bytes,
                if pieces.len() > 1 { format!(" in piece {i}") } else { String::new() },
                piece.len()
            );
        }
        let mut parts = Vec::new();
        for layout in stacked_parts(ctx, what, pieces.len(), rows_each, row_bytes)? {
            let buffer = ctx.storage(what, ((layout.rows * row_bytes) as u64).next_multiple_of(4))?;
            // The pieces' rows that fall in this part, each with its byte offset in the part.
            let slices: Vec<(usize, &[u8])> =
                layout.runs.iter().map(|run| (run.part_row * row_bytes, &pieces[run.piece][run.piece_row * row_bytes..(run.piece_row + run.rows) * row_bytes])).collect();
            if slices.iter().all(|(offset, _)| offset % 4 == 0) {
                for (offset, bytes) in slices {
                    ctx.upload(&buffer, offset as u64, bytes)?;
                }
            } else {
                let joined: Vec<u8> = slices.iter().flat_map(|(_, b)| b.iter().copied()).collect();
                ctx.upload(&buffer, 0, &joined)?;
            }
            parts.push(WeightPart { buffer, first_row: layout.first_row, rows: layout.rows });
        }
        let rows = rows_each * pieces.len();
        Ok(GpuWeight { parts, rows, cols, dtype })
    }

    /// Uploads f32 values converted to `dtype` (round to nearest even).
    pub fn from_f32(ctx: &GpuContext, what: &str, values: &[f32], dtype: WeightDtype, rows: usize, cols: usize) -> Result<Self> {
        let bytes = encode_weights(values, dtype);
        Self::upload(ctx, what, &bytes, dtype, rows, cols)
    }
}

/// One part of a stacked weight: its rows, and the runs of each piece's rows it holds.
pub(crate) struct PartLayout {
    pub first_row: usize,
    pub rows: usize,
    pub runs: Vec<PieceRun>,
}

/// Rows `piece_row..piece_row + rows` of piece `piece`, at row `part_row` of their part.
pub(crate) struct PieceRun {
    pub piece: usize,
    pub piece_row: usize,
    pub rows: usize,
    pub part_row: usize,
}

/// How `pieces` matrices of `rows_each` rows (`row_bytes` each, as stored on the GPU) stack into
/// parts that each fit one storage binding; parts split only between pieces when there are
/// several.
pub(crate) fn stacked_parts(ctx: &GpuContext, what: &str, pieces: usize, rows_each: usize, row_bytes: usize) -> Result<Vec<PartLayout>> {
    let rows = rows_each * pieces;
    let group = if pieces > 1 { rows_each } else { 1 };
    // Leave room for the padding of a part whose byte length is not a multiple of 4.
    let fit = (ctx.binding_limit().saturating_sub(4) / row_bytes as u64) as usize;
    let rows_per_part = fit / group * group;
    if rows_per_part == 0 {
        return Err(Error::BindingTooLarge {
            what: format!("{} of {what}", if group > 1 { "one stacked matrix" } else { "one row" }),
            needed: (group * row_bytes) as u64,
            limit: ctx.binding_limit(),
        });
    }
    let mut parts = Vec::new();
    let mut first_row = 0;
    while first_row < rows {
        let n = rows_per_part.min(rows - first_row);
        let mut runs = Vec::new();
        let mut row = first_row;
        while row < first_row + n {
            let (piece, piece_row) = (row / rows_each, row % rows_each);
            let take = (rows_each - piece_row).min(first_row + n - row);
            runs.push(PieceRun { piece, piece_row, rows: take, part_row: row - first_row });
            row += take;
        }
        parts.push(PartLayout { first_row, rows: n, runs });
        first_row += n;
    }
    Ok(parts)
}

/// Encodes f32 values as `dtype` bytes (little-endian; the block formats through llama.cpp's
/// reference quantisers, which exist for q8_0, q4_0 and q4_k).
pub fn encode_weights(values: &[f32], dtype: WeightDtype) -> Vec<u8> {
    match dtype {
        WeightDtype::F32 => bytemuck::cast_slice(values).to_vec(),
        WeightDtype::F16 => {
            let v: Vec<half::f16> = values.iter().map(|&x| half::f16::from_f32(x)).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        WeightDtype::Bf16 => {
            let v: Vec<half::bf16> = values.iter().map(|&x| half::bf16::from_f32(x)).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        q => crate::quant::quantize(q, values, q.block_elems()).expect("values of whole blocks, a format with a quantiser"),
    }
}

/// The values a GPU kernel sees after `dtype` rounding: what CPU references must use.
pub fn round_weights(values: &[f32], dtype: WeightDtype) -> Vec<f32> {
    match dtype {
        WeightDtype::F32 => values.to_vec(),
        WeightDtype::F16 => values.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
        WeightDtype::Bf16 => values.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
        q => {
            let mut out = vec![0f32; values.len()];
            crate::quant::dequantize(q, &encode_weights(values, q), &mut out);
            out
        }
    }
}
