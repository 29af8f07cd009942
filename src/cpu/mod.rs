//! Kernels that run on the host CPU: each beside its CPU reference and tests, as the GPU
//! kernels are. Vector primitives come from [`simd`], chosen at run time for the CPU at hand;
//! work is spread over rayon's threads.

pub mod amx;
pub mod attention;
pub mod bf16_products;
pub mod experts;
pub mod gpu_int8;
pub mod int8_products;
pub mod matmul;
pub mod simd;
pub(crate) mod unpack;
pub mod ops;

use crate::cpu::simd::Isa;

/// What the host offers the engine as a device: its cores, the vector instructions the host
/// kernels use, and its memory.
#[derive(Clone, Debug)]
pub struct HostInfo {
    pub model: String,
    pub cores: usize,
    pub isa: Isa,
    /// Every instruction-set path this CPU can run (the widest is used).
    pub paths: Vec<Isa>,
    pub memory_bytes: Option<u64>,
}

impl HostInfo {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name") || l.starts_with("Model"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        let memory_bytes = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).map(|kib| kib * 1024)
        });
        HostInfo {
            model,
            cores: rayon::current_num_threads(),
            isa: Isa::detected(),
            paths: Isa::available(),
            memory_bytes,
        }
    }

    /// One line: model, cores, vector path, memory.
    pub fn describe(&self) -> String {
        let mem = self.memory_bytes.map_or(String::new(), |b| format!(", {:.1} GiB", b as f64 / (1u64 << 30) as f64));
        let products = match (crate::cpu::int8_products::enabled(), crate::cpu::bf16_products::enabled()) {
            (true, true) => " with int8 products (K formats) and bf16 products",
            (true, false) => " with int8 products (K formats)",
            (false, true) => " with bf16 products",
            (false, false) => "",
        };
        format!("{}, {} threads, {}{products}{mem}", self.model, self.cores, self.isa.name())
    }
}
