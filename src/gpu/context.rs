//! Adapter selection and the device every kernel runs on.

use std::sync::{Arc, Mutex, RwLock};

use crate::error::{Error, Result};
use crate::gpu::buffers::BufferPool;
use crate::gpu::link::Link;
use crate::gpu::pipelines::PipelineCache;
use crate::gpu::trace::Tracer;
use crate::gpu::GpuBuffer;
use crate::kernels::tuning::KernelTuning;

/// Optional adapter features the kernels can use; each has a fallback path.
pub const WANTED_FEATURES: wgpu::Features = wgpu::Features::SHADER_F16
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::TIMESTAMP_QUERY);

/// What a GPU's matmuls over block-format weights multiply in (`--gpu-compute`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuCompute {
    /// Weights decoded to f32 in registers, f32 inputs (exact products).
    #[default]
    F32,
    /// Inputs quantised to 8 bits per 32, `dot4I8Packed` over the blocks' bytes
    /// (`kernels/matmul_int8.rs`).
    Int8,
}

/// Which kind of device runs the model (`--device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// A GPU adapter when the machine has one, else the CPU. A software adapter (Mesa's
    /// llvmpipe) runs on the same cores as the CPU device, slower: it is taken only when asked
    /// for (`--device gpu`, or `--adapter`).
    #[default]
    Auto,
    Gpu,
    Cpu,
}

/// How to pick an adapter. `WGPU_BACKEND`, `WGPU_ADAPTER_NAME` and `MOEGEN_DEVICE` are read by [`AdapterChoice::from_env`].
#[derive(Clone, Debug, Default)]
pub struct AdapterChoice {
    pub device: DeviceChoice,
    /// Backends to consider (`WGPU_BACKEND`, e.g. `vulkan`, `metal`, `dx12`).
    pub backends: Option<wgpu::Backends>,
    /// An index into `moegen devices`, or a case-insensitive part of the adapter name.
    pub adapter: Option<String>,
    /// Features not to use even where the adapter has them (tests of the fallback paths).
    pub disabled_features: wgpu::Features,
    /// Kernels that have not yet run on a real GPU, allowed by `MOEGEN_EXPERIMENTAL`.
    pub experimental: Experimental,
    /// Block-format matmuls on a GPU take 8-bit inputs (`--gpu-compute int8`).
    pub int8_products: bool,
}

/// Kernels that are off unless asked for, because they have not yet been checked on a real GPU
/// (issue 14's rule): `MOEGEN_EXPERIMENTAL=coop-matrix,subgroup-attention` (or `all`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Experimental {
    /// Matmul tiles through cooperative matrices (tensor cores), where the adapter has them.
    pub coop_matrix: bool,
    /// Decode attention whose subgroups read each key together (coalesced), where subgroups exist.
    pub subgroup_attention: bool,
}

impl Experimental {
    pub fn from_env() -> Self {
        let mut e = Experimental::default();
        if let Ok(list) = std::env::var("MOEGEN_EXPERIMENTAL") {
            for name in list.split(',').map(|n| n.trim().to_ascii_lowercase()) {
                match name.as_str() {
                    "all" => e = Experimental { coop_matrix: true, subgroup_attention: true },
                    "coop-matrix" | "coop_matrix" => e.coop_matrix = true,
                    "subgroup-attention" | "subgroup_attention" => e.subgroup_attention = true,
                    "" => {}
                    other => eprintln!("warning: MOEGEN_EXPERIMENTAL: unknown kernel {other:?}, ignored (known: coop-matrix, subgroup-attention, all)"),
                }
            }
        }
        e
    }
}

impl AdapterChoice {
    /// The choice the environment makes, with `flag` (the `--adapter` value) taking precedence.
    pub fn from_env(flag: Option<String>) -> Self {
        let device = match std::env::var("MOEGEN_DEVICE").as_deref().map(str::trim) {
            Ok("gpu") => DeviceChoice::Gpu,
            Ok("cpu") => DeviceChoice::Cpu,
            _ => DeviceChoice::Auto,
        };
        AdapterChoice {
            device,
            backends: wgpu::Backends::from_env(),
            adapter: flag.or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok()),
            disabled_features: disabled_from_env(),
            experimental: Experimental::from_env(),
            int8_products: false,
        }
    }
}

/// `MOEGEN_DISABLE_FEATURES=f16,subgroup,timestamp` forces the fallback paths.
fn disabled_from_env() -> wgpu::Features {
    let mut off = wgpu::Features::empty();
    if let Ok(list) = std::env::var("MOEGEN_DISABLE_FEATURES") {
        for name in list.split(',').map(str::trim) {
            off |= match name.to_ascii_lowercase().as_str() {
                "f16" | "shader_f16" => wgpu::Features::SHADER_F16,
                "subgroup" | "subgroups" => wgpu::Features::SUBGROUP,
                "timestamp" | "timestamp_query" => wgpu::Features::TIMESTAMP_QUERY,
                _ => wgpu::Features::empty(),
            };
        }
    }
    off
}

pub fn instance(backends: Option<wgpu::Backends>) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if let Some(b) = backends {
        desc.backends = b;
    }
    wgpu::Instance::new(desc)
}

/// Every adapter the instance sees, in a stable order (the index `--adapter N` refers to).
pub fn list_adapters(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
}

/// Faster kinds of device first; a software adapter is accepted, but last.
fn device_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

fn select_adapter(choice: &AdapterChoice) -> Result<wgpu::Adapter> {
    let instance = instance(choice.backends);
    let adapters = list_adapters(&instance);
    let backends_note = match choice.backends {
        Some(b) => format!(" for WGPU_BACKEND={b:?}"),
        None => String::new(),
    };
    if adapters.is_empty() {
        return Err(Error::NoAdapter(format!(
            "{backends_note}; install a GPU driver, or Mesa's software Vulkan driver \
             (Debian/Ubuntu: apt-get install mesa-vulkan-drivers)"
        )));
    }
    if let Some(want) = &choice.adapter {
        if let Ok(index) = want.parse::<usize>() {
            return adapters.into_iter().nth(index).ok_or_else(|| {
                Error::NoAdapter(format!(": --adapter {index} is out of range (see `moegen devices`)"))
            });
        }
        let needle = want.to_lowercase();
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        return adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&needle))
            .ok_or_else(|| {
                Error::NoAdapter(format!(" whose name contains {want:?}{backends_note}; adapters seen: {}", names.join(", ")))
            });
    }
    let best = adapters
        .into_iter()
        .min_by_key(|a| device_rank(a.get_info().device_type))
        .expect("list is not empty");
    Ok(best)
}

/// What kernels may rely on, after intersecting the adapter's features with what was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelFeatures {
    pub f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    /// Cooperative matrices in the one shape the matmul uses, where the adapter offers them and
    /// they were asked for ([`Experimental::coop_matrix`]).
    pub coop: Option<CoopShape>,
    /// Decode attention may read keys a subgroup at a time ([`Experimental::subgroup_attention`]).
    pub subgroup_attention: bool,
}

impl KernelFeatures {
    /// f16, subgroups and timestamps as given; nothing experimental.
    pub const fn basic(f16: bool, subgroups: bool, timestamps: bool) -> Self {
        KernelFeatures { f16, subgroups, timestamps, coop: None, subgroup_attention: false }
    }
}

/// A square cooperative matrix shape (WGSL has `coop_mat8x8` and `coop_mat16x16`) with f32
/// accumulators, and the subgroup size a workgroup of the kernel is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct CoopShape {
    /// 8 or 16.
    pub size: u32,
    /// The A and B tiles hold f16 (else f32).
    pub f16_inputs: bool,
    /// Invocations per subgroup, fixed on this adapter (its minimum and maximum agree).
    pub subgroup: u32,
}

impl CoopShape {
    /// The shape to use from what the adapter offers: f16 inputs at 16 (tensor cores on NVIDIA
    /// and AMD), else f16 at 8, else f32 at 8 (Apple's simdgroup matrices), always accumulating
    /// in f32. None when the subgroup size is not fixed: a workgroup of the kernel is one subgroup.
    pub fn choose(offered: &[wgpu::CooperativeMatrixProperties], f16: bool, subgroup_min: u32, subgroup_max: u32, max_threads: u32) -> Option<Self> {
        use wgpu::CooperativeScalarType as T;
        if subgroup_min != subgroup_max || subgroup_max == 0 || subgroup_max > max_threads {
            return None;
        }
        let has = |size: u32, ab: T| offered.iter().any(|p| p.m_size == size && p.n_size == size && p.k_size == size && p.ab_type == ab && p.cr_type == T::F32);
        let pick = [(16, true), (8, true), (16, false), (8, false)]
            .into_iter()
            .find(|&(size, half)| (!half || f16) && has(size, if half { T::F16 } else { T::F32 }))?;
        Some(CoopShape { size: pick.0, f16_inputs: pick.1, subgroup: subgroup_max })
    }
}

pub(crate) struct Shared {
    /// None on the CPU device.
    pub gpu: Option<GpuDevice>,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub pool: BufferPool,
    pub tracer: Mutex<Option<Arc<Tracer>>>,
    pub pipelines: PipelineCache,
    /// Host memory lent to the CPU device (checkpoint files): weights inside it are read in place.
    pub lent: Mutex<Vec<std::sync::Weak<dyn AsRef<[u8]> + Send + Sync>>>,
    /// Which kernel variant each op takes, as the calibration measured them on this adapter.
    pub tuning: RwLock<KernelTuning>,
}

pub(crate) struct GpuDevice {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    /// Errors no error scope caught (reported at the next sync point instead of panicking).
    pub uncaptured: Arc<Mutex<Vec<String>>>,
    pub lost: Arc<Mutex<Option<(String, String)>>>,
}

/// The device every kernel runs on, with the caches that go with it: a GPU adapter's device and
/// queue, or the host CPU ([`GpuContext::cpu`]), where each kernel runs its Rust
/// implementation over host memory. Cheap to clone.
#[derive(Clone)]
pub struct GpuContext {
    pub(crate) shared: Arc<Shared>,
    features: KernelFeatures,
    binding_limit: u64,
    /// Counts (and may hold to a rate) what crosses to and from the GPU; none while loading.
    link: Option<Arc<Link>>,
    /// Block-format matmuls take 8-bit inputs and `dot4I8Packed` (`--gpu-compute int8`).
    int8_products: bool,
}

impl GpuContext {
    /// The device `choice` names: under `auto`, a hardware GPU adapter if there is one, else
    /// the CPU, said in one line on stderr with the hint for installing a driver.
    pub fn new(choice: &AdapterChoice) -> Result<Self> {
        let ctx = Self::open(choice)?;
        if choice.int8_products && ctx.is_cpu() {
            eprintln!("note: --gpu-compute int8 does nothing on the CPU device; its 8-bit path is --cpu-compute int8");
        }
        Ok(ctx.with_int8_products(choice.int8_products))
    }

    fn open(choice: &AdapterChoice) -> Result<Self> {
        let auto = choice.device == DeviceChoice::Auto && choice.adapter.is_none();
        match choice.device {
            DeviceChoice::Cpu => return Ok(Self::cpu()),
            _ if auto => {
                let found = select_adapter(choice).ok();
                let software = found.as_ref().filter(|a| a.get_info().device_type == wgpu::DeviceType::Cpu).map(|a| a.get_info().name);
                if let Some(adapter) = found.filter(|_| software.is_none()) {
                    return Self::from_adapter(adapter, choice.disabled_features, choice.experimental);
                }
                let ctx = Self::cpu();
                let (found, hint) = match software {
                    Some(name) => ("no hardware GPU adapter found", format!("the software adapter {name} runs on these same cores, slower; --device gpu takes it")),
                    None => ("no GPU adapter found", "for a GPU, install its driver".to_string()),
                };
                eprintln!("device: {found}, running on the CPU: {} ({hint})", ctx.info().name);
                return Ok(ctx);
            }
            _ => {}
        }
        let adapter = select_adapter(choice)?;
        Self::from_adapter(adapter, choice.disabled_features, choice.experimental)
    }

    pub fn from_adapter(adapter: wgpu::Adapter, disabled: wgpu::Features, experimental: Experimental) -> Result<Self> {
        let info = adapter.get_info();
        // On adapters that share host memory, the GPU may bind buffers the host maps, which lets
        // streamed weights be written in place instead of through a staging copy.
        let mut wanted = WANTED_FEATURES;
        if matches!(info.device_type, wgpu::DeviceType::IntegratedGpu | wgpu::DeviceType::Cpu) {
            wanted |= wgpu::Features::MAPPABLE_PRIMARY_BUFFERS;
        }
        if experimental.coop_matrix {
            wanted |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let features = adapter.features() & wanted & !disabled;
        let limits = adapter.limits();
        let coop = features
            .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
            .then(|| {
                let max_threads = limits.max_compute_invocations_per_workgroup.min(limits.max_compute_workgroup_size_x);
                CoopShape::choose(&adapter.cooperative_matrix_properties(), features.contains(wgpu::Features::SHADER_F16), info.subgroup_min_size, info.subgroup_max_size, max_threads)
            })
            .flatten();
        let experimental_features = if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            // SAFETY: asked for by MOEGEN_EXPERIMENTAL; the feature is wgpu's experimental
            // cooperative matrices, used only by the matmul path that names it.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("moegen"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::RequestDevice(format!("{} ({:?}): {e}", info.name, info.backend)))?;

        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock().unwrap().push(e.to_string());
        }));
        let lost = Arc::new(Mutex::new(None));
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            *lost_sink.lock().unwrap() = Some((format!("{reason:?}"), message));
        });

        let binding_limit = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size) & !3;
        log::info!("GPU: {} ({:?}, {:?}), features {:?}", info.name, info.backend, info.device_type, features);
        Ok(GpuContext {
            shared: Arc::new(Shared {
                gpu: Some(GpuDevice { device, queue, uncaptured, lost }),
                info,
                limits,
                pool: BufferPool::default(),
                tracer: Mutex::new(None),
                pipelines: PipelineCache::default(),
                lent: Mutex::new(Vec::new()),
                tuning: RwLock::new(KernelTuning::default()),
            }),
            features: KernelFeatures {
                f16: features.contains(wgpu::Features::SHADER_F16),
                subgroups: features.contains(wgpu::Features::SUBGROUP),
                timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
                coop,
                subgroup_attention: experimental.subgroup_attention && features.contains(wgpu::Features::SUBGROUP),
            },
            binding_limit,
            link: None,
            int8_products: false,
        })
    }

    /// The host CPU as the device: buffers are host memory, each kernel runs its Rust
    /// implementation (`src/cpu/`) on rayon's threads when its batch is submitted.
    pub fn cpu() -> Self {
        let host = crate::cpu::HostInfo::detect();
        let mut info = wgpu::AdapterInfo::new(wgpu::DeviceType::Cpu, wgpu::Backend::Noop);
        info.name = format!("CPU ({})", host.describe());
        info.driver = "moegen host kernels".into();
        info.driver_info = host.isa.name().into();
        info.subgroup_min_size = 1;
        info.subgroup_max_size = 1;
        // Host memory bounds a buffer, not a binding: one part per weight.
        let limits = wgpu::Limits {
            max_buffer_size: 1 << 40,
            max_storage_buffer_binding_size: 1 << 40,
            max_compute_workgroups_per_dimension: u32::MAX,
            ..wgpu::Limits::default()
        };
        log::info!("device: {}", info.name);
        GpuContext {
            shared: Arc::new(Shared { gpu: None, info, limits, pool: BufferPool::default(), tracer: Mutex::new(None), pipelines: PipelineCache::default(), lent: Mutex::new(Vec::new()), tuning: RwLock::new(KernelTuning::default()) }),
            features: KernelFeatures::basic(false, false, false),
            binding_limit: 1 << 40,
            link: None,
            int8_products: false,
        }
    }

    /// Lends `bytes` to the CPU device: weights whose bytes lie inside them are read in place
    /// (kept alive by the buffers that read them). A GPU copies as always.
    pub fn lend_host_bytes(&self, bytes: Arc<dyn AsRef<[u8]> + Send + Sync>) {
        if self.is_cpu() {
            let mut lent = self.shared.lent.lock().unwrap();
            lent.retain(|w| w.strong_count() > 0);
            lent.push(Arc::downgrade(&bytes));
        }
    }

    /// The lent memory holding `data`, when `data` can be read in place as 4-byte words.
    pub(crate) fn lent_holding(&self, data: &[u8]) -> Option<Arc<dyn AsRef<[u8]> + Send + Sync>> {
        if !self.is_cpu() || data.is_empty() || !(data.as_ptr() as usize).is_multiple_of(4) || !data.len().is_multiple_of(4) {
            return None;
        }
        let (start, end) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
        self.shared.lent.lock().unwrap().iter().filter_map(std::sync::Weak::upgrade).find(|b| {
            let r = (**b).as_ref();
            let (s, e) = (r.as_ptr() as usize, r.as_ptr() as usize + r.len());
            s <= start && end <= e
        })
    }

    /// Whether this is the host CPU rather than a GPU adapter.
    pub fn is_cpu(&self) -> bool {
        self.shared.gpu.is_none()
    }

    pub(crate) fn gpu(&self) -> &GpuDevice {
        self.shared.gpu.as_ref().expect("GPU work recorded on the CPU device (a kernel lacks its host branch)")
    }
    pub fn device(&self) -> &wgpu::Device {
        &self.gpu().device
    }
    pub fn queue(&self) -> &wgpu::Queue {
        &self.gpu().queue
    }
    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.shared.info
    }
    pub fn limits(&self) -> &wgpu::Limits {
        &self.shared.limits
    }
    pub fn features(&self) -> KernelFeatures {
        self.features
    }

    /// The kernel variants in use (llvmpipe-measured constants until a calibration sets them).
    pub fn tuning(&self) -> KernelTuning {
        self.shared.tuning.read().unwrap().clone()
    }

    /// The matmul path the tuning gives `m` rows.
    pub fn matmul_path(&self, m: usize) -> crate::kernels::matmul::MatmulPath {
        self.shared.tuning.read().unwrap().matmul_path(m)
    }

    /// One choice of the tuning, read in place (the kernels ask per dispatch).
    pub fn tuned<T>(&self, choice: impl FnOnce(&KernelTuning) -> T) -> T {
        choice(&self.shared.tuning.read().unwrap())
    }

    /// Makes `tuning` the variants every kernel of this device takes from now on. Variants
    /// this context's features lack fall back to the defaults.
    pub fn set_tuning(&self, tuning: KernelTuning) {
        *self.shared.tuning.write().unwrap() = tuning.usable_with(self.features);
    }
    /// The largest buffer one binding may cover (bytes); larger tensors are split.
    pub fn binding_limit(&self) -> u64 {
        self.binding_limit
    }

    /// Whether storage buffers can also be mapped for writing (unified memory): streamed weights
    /// then go straight into their slot, without a staging copy.
    pub fn unified_memory(&self) -> bool {
        self.is_cpu() || self.device().features().contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS)
    }

    /// Writes `data` at the start of `buf`, a buffer created with MAP_WRITE: waits until the GPU
    /// no longer uses it (without waiting for later work), maps it and copies in place.
    pub fn write_mapped(&self, buf: &GpuBuffer, data: &[u8]) -> Result<()> {
        let padded;
        let data = if data.len().is_multiple_of(wgpu::MAP_ALIGNMENT as usize) {
            data
        } else {
            padded = [data, &vec![0u8; (wgpu::MAP_ALIGNMENT as usize) - data.len() % wgpu::MAP_ALIGNMENT as usize]].concat();
            &padded[..]
        };
        self.link_send(data.len());
        if self.is_cpu() {
            return buf.write_host_bytes(0, data);
        }
        let len = data.len() as u64;
        let state = Arc::new(Mutex::new(None));
        let sink = state.clone();
        buf.raw().map_async(wgpu::MapMode::Write, 0..len, move |r| *sink.lock().unwrap() = Some(r));
        loop {
            self.device().poll(wgpu::PollType::Poll).map_err(|e| Error::Gpu(format!("mapping a weight slot: {e}")))?;
            if let Some(r) = state.lock().unwrap().take() {
                r.map_err(|e| Error::Gpu(format!("mapping a weight slot: {e}")))?;
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        {
            let mut view = buf.raw().get_mapped_range_mut(0..len).map_err(|e| Error::Gpu(format!("mapping a weight slot: {e:?}")))?;
            view.copy_from_slice(data);
        }
        buf.raw().unmap();
        Ok(())
    }

    /// The same device with some optional features switched off, to run the fallback paths.
    pub fn with_features(&self, features: KernelFeatures) -> Self {
        let have = self.features;
        GpuContext {
            shared: self.shared.clone(),
            features: KernelFeatures {
                f16: features.f16 && have.f16,
                subgroups: features.subgroups && have.subgroups,
                timestamps: features.timestamps && have.timestamps,
                coop: features.coop.and(have.coop).filter(|c| !c.f16_inputs || (features.f16 && have.f16)),
                subgroup_attention: features.subgroup_attention && have.subgroup_attention && features.subgroups,
            },
            binding_limit: self.binding_limit,
            link: self.link.clone(),
            int8_products: self.int8_products,
        }
    }

    /// The same device with block-format matmuls on 8-bit inputs (`on`) or f32 ones. The CPU
    /// device keeps its own choice (`--cpu-compute`).
    pub fn with_int8_products(&self, on: bool) -> Self {
        GpuContext { int8_products: on && !self.is_cpu(), ..self.clone() }
    }

    /// Whether block-format matmuls multiply 8-bit inputs with `dot4I8Packed`.
    pub fn int8_products(&self) -> bool {
        self.int8_products
    }

    /// The same device with a smaller binding limit, so that tests reach the split paths.
    pub fn with_binding_limit(&self, bytes: u64) -> Self {
        GpuContext { binding_limit: bytes.min(self.binding_limit) & !3, ..self.clone() }
    }

    /// The same device with every transfer from now on going through `link`.
    pub fn with_link(&self, link: Arc<Link>) -> Self {
        GpuContext { link: Some(link), ..self.clone() }
    }

    pub fn link(&self) -> Option<&Arc<Link>> {
        self.link.as_ref()
    }

    /// Counts `bytes` going to the GPU (and waits for the link's rate, if it has one).
    pub(crate) fn link_send(&self, bytes: usize) {
        if let Some(l) = &self.link {
            l.send(bytes);
        }
    }

    /// Counts `bytes` coming back from the GPU (and waits for the link's rate).
    pub(crate) fn link_receive(&self, bytes: usize) {
        if let Some(l) = &self.link {
            l.receive(bytes);
        }
    }

    /// Records uploads and GPU work on `tracer` from now on (None: stop).
    pub fn set_tracer(&self, tracer: Option<Arc<Tracer>>) {
        *self.shared.tracer.lock().unwrap() = tracer;
    }

    pub fn tracer(&self) -> Option<Arc<Tracer>> {
        self.shared.tracer.lock().unwrap().clone()
    }

    /// Blocks until submission `index` has finished.
    pub fn wait_for(&self, index: wgpu::SubmissionIndex, what: &str) -> Result<()> {
        self.gpu()
            .device
            .poll(wgpu::PollType::Wait { submission_index: Some(index), timeout: None })
            .map_err(|e| Error::Gpu(format!("{what}: {e}")))?;
        self.check(what)
    }

    /// Turns errors reported asynchronously (uncaptured, device lost) into a Rust error.
    pub fn check(&self, what: &str) -> Result<()> {
        let Some(gpu) = &self.shared.gpu else { return Ok(()) };
        if let Some((reason, detail)) = gpu.lost.lock().unwrap().clone() {
            return Err(Error::DeviceLost { reason, detail: format!("{detail} (during {what})") });
        }
        let mut errors = gpu.uncaptured.lock().unwrap();
        if !errors.is_empty() {
            let detail = errors.join("; ");
            errors.clear();
            return Err(Error::Gpu(format!("{what}: {detail}")));
        }
        Ok(())
    }

    /// Runs `f` inside out-of-memory and validation error scopes, naming `what` in the error.
    pub fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        let Some(gpu) = &self.shared.gpu else { return Ok(f()) };
        let device = &gpu.device;
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = o {
            return Err(Error::OutOfMemory { what: what.to_string(), detail: e.to_string() });
        }
        if let Some(e) = v {
            return Err(Error::Validation { what: what.to_string(), detail: e.to_string() });
        }
        Ok(value)
    }

    /// Blocks until all submitted work has finished, then reports any error it raised.
    pub fn wait_idle(&self, what: &str) -> Result<()> {
        let Some(gpu) = &self.shared.gpu else { return Ok(()) };
        gpu.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("{what}: {e}")))?;
        self.check(what)
    }
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuContext({}, {:?})", self.shared.info.name, self.features)
    }
}
