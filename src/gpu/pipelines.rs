//! WGSL assembly and the pipeline cache: each (kernel, specialisation) is compiled once.
//!
//! WGSL has no preprocessor, so a specialisation is a module built from pieces: `enable`
//! directives, `const` values, helper snippets (how weights are loaded, how a workgroup reduces)
//! and the kernel body. The pieces are all in `shaders/`, embedded in the binary.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::gpu::{GpuContext, KernelFeatures, WeightDtype};

/// A complete WGSL module and the key it is cached under.
#[derive(Clone, Debug)]
pub struct ShaderSource {
    pub key: String,
    pub code: String,
}

/// Builds one specialisation of a kernel.
pub struct ShaderBuilder {
    key: String,
    enables: Vec<&'static str>,
    consts: String,
    snippets: Vec<&'static str>,
}

impl ShaderBuilder {
    pub fn new(kernel: &str) -> Self {
        ShaderBuilder { key: kernel.to_string(), enables: Vec::new(), consts: String::new(), snippets: vec![COMMON] }
    }

    pub fn constant(mut self, name: &str, value: u32) -> Self {
        let _ = write!(self.key, ",{name}={value}");
        let _ = writeln!(self.consts, "const {name}: u32 = {value}u;");
        self
    }

    /// `fn load_w(i: u32) -> f32` and the element type `WStore` of the weight binding `w`.
    pub fn weights(mut self, dtype: WeightDtype, features: KernelFeatures) -> Self {
        let (name, snippets): (&str, &[&'static str]) = match dtype {
            WeightDtype::F32 => ("f32", &[WEIGHTS_F32]),
            WeightDtype::Bf16 => ("bf16", &[WEIGHTS_BF16]),
            WeightDtype::F16 if features.f16 => ("f16", &[WEIGHTS_F16]),
            WeightDtype::F16 => ("f16packed", &[HALF_BITS, WEIGHTS_F16_PACKED]),
            WeightDtype::Q8_0 => ("q8_0", &[HALF_BITS, WEIGHTS_BLOCKS, WEIGHTS_Q8_0]),
            WeightDtype::Q4_0 => ("q4_0", &[HALF_BITS, WEIGHTS_BLOCKS, WEIGHTS_Q4_0]),
            WeightDtype::Q4K => ("q4_k", &[HALF_BITS, WEIGHTS_BLOCKS, WEIGHTS_Q4_K]),
            WeightDtype::Q5K => ("q5_k", &[HALF_BITS, WEIGHTS_BLOCKS, WEIGHTS_Q5_K]),
            WeightDtype::Q6K => ("q6_k", &[HALF_BITS, WEIGHTS_BLOCKS, WEIGHTS_Q6_K]),
            WeightDtype::Fp8 { block } => {
                self = self.constant("FP8_BLOCK", block);
                ("fp8", &[HALF_BITS, WEIGHTS_BLOCKS, FP8, WEIGHTS_FP8])
            }
        };
        if name == "f16" {
            self.enable("f16");
        }
        let _ = write!(self.key, ",w={name}");
        self.snippets.extend_from_slice(snippets);
        self
    }

    /// `fn load_w4(i: u32) -> vec4<f32>`: four consecutive weights from element `i`, each equal to
    /// `load_w`'s. Block formats read a block's scales once for the four (for them `i` must be a
    /// multiple of 4, as it is where rows are whole blocks); the others call `load_w` four times.
    pub fn weights4(mut self, dtype: WeightDtype) -> Self {
        self.snippets.push(match dtype {
            WeightDtype::Q8_0 => WEIGHTS4_Q8_0,
            WeightDtype::Q4_0 => WEIGHTS4_Q4_0,
            WeightDtype::Q4K => WEIGHTS4_Q4_K,
            WeightDtype::Q5K => WEIGHTS4_Q5_K,
            WeightDtype::Q6K => WEIGHTS4_Q6_K,
            _ => WEIGHTS4_EACH,
        });
        self
    }

    /// `fn load_wsub(s: u32) -> WSub` for the int8 matmul: sub-block `s` of a block format as
    /// signed bytes with its affine map back to the weights (`shaders/lib/wsub_*.wgsl`). Only for
    /// the formats of [`crate::kernels::matmul_int8::supports`].
    pub fn weights_int8(mut self, dtype: WeightDtype) -> Self {
        let (name, format) = match dtype {
            WeightDtype::Q8_0 => ("q8_0", WSUB_Q8_0),
            WeightDtype::Q4_0 => ("q4_0", WSUB_Q4_0),
            WeightDtype::Q4K => ("q4_k", WSUB_Q4_K),
            WeightDtype::Q5K => ("q5_k", WSUB_Q5_K),
            WeightDtype::Q6K => ("q6_k", WSUB_Q6_K),
            other => unreachable!("no int8 sub-blocks for {other:?} (callers check matmul_int8::supports)"),
        };
        let _ = write!(self.key, ",wsub={name}");
        self.snippets.extend_from_slice(&[HALF_BITS, WEIGHTS_BLOCKS, WSUB_COMMON, format]);
        self
    }

    /// `wg_sum`, `wg_max` across the workgroup, through subgroups where the device has them.
    /// The kernel's entry point takes a `lane: Lane` argument that carries the builtins.
    pub fn reductions(mut self, features: KernelFeatures) -> Self {
        if features.subgroups {
            // naga takes subgroup builtins without `enable subgroups;` (and rejects the directive).
            self.key.push_str(",reduce=subgroup");
            self.snippets.push(REDUCE_SUBGROUP);
        } else {
            self.key.push_str(",reduce=shared");
            self.snippets.push(REDUCE_SHARED);
        }
        self
    }

    /// A WGSL `enable` directive the kernel needs.
    pub fn require(mut self, ext: &'static str) -> Self {
        self.enable(ext);
        self
    }

    /// Declarations written out as text (type aliases, generated helpers), part of the key as `name`.
    pub fn declare(mut self, name: &str, code: &str) -> Self {
        let _ = write!(self.key, ",{name}");
        self.consts.push_str(code);
        self
    }

    fn enable(&mut self, ext: &'static str) {
        if !self.enables.contains(&ext) {
            self.enables.push(ext);
        }
    }

    pub fn body(self, body: &'static str) -> ShaderSource {
        let mut code = String::new();
        for e in &self.enables {
            let _ = writeln!(code, "enable {e};");
        }
        code.push_str(&self.consts);
        for s in &self.snippets {
            code.push_str(s);
            code.push('\n');
        }
        code.push_str(body);
        ShaderSource { key: self.key, code }
    }
}

const COMMON: &str = include_str!("../../shaders/lib/common.wgsl");
const WEIGHTS_F32: &str = include_str!("../../shaders/lib/weights_f32.wgsl");
const WEIGHTS_F16: &str = include_str!("../../shaders/lib/weights_f16.wgsl");
const WEIGHTS_F16_PACKED: &str = include_str!("../../shaders/lib/weights_f16_packed.wgsl");
const WEIGHTS_BF16: &str = include_str!("../../shaders/lib/weights_bf16.wgsl");
const HALF_BITS: &str = include_str!("../../shaders/lib/half_bits.wgsl");
const WEIGHTS_BLOCKS: &str = include_str!("../../shaders/lib/weights_blocks.wgsl");
const WEIGHTS_Q8_0: &str = include_str!("../../shaders/lib/weights_q8_0.wgsl");
const WEIGHTS_Q4_0: &str = include_str!("../../shaders/lib/weights_q4_0.wgsl");
const WEIGHTS_Q4_K: &str = include_str!("../../shaders/lib/weights_q4_k.wgsl");
const WEIGHTS_Q5_K: &str = include_str!("../../shaders/lib/weights_q5_k.wgsl");
const WEIGHTS_Q6_K: &str = include_str!("../../shaders/lib/weights_q6_k.wgsl");
const WEIGHTS4_EACH: &str = include_str!("../../shaders/lib/weights4_each.wgsl");
const WEIGHTS4_Q8_0: &str = include_str!("../../shaders/lib/weights4_q8_0.wgsl");
const WEIGHTS4_Q4_0: &str = include_str!("../../shaders/lib/weights4_q4_0.wgsl");
const WEIGHTS4_Q4_K: &str = include_str!("../../shaders/lib/weights4_q4_k.wgsl");
const WEIGHTS4_Q5_K: &str = include_str!("../../shaders/lib/weights4_q5_k.wgsl");
const WEIGHTS4_Q6_K: &str = include_str!("../../shaders/lib/weights4_q6_k.wgsl");
const WSUB_COMMON: &str = include_str!("../../shaders/lib/wsub_common.wgsl");
const WSUB_Q8_0: &str = include_str!("../../shaders/lib/wsub_q8_0.wgsl");
const WSUB_Q4_0: &str = include_str!("../../shaders/lib/wsub_q4_0.wgsl");
const WSUB_Q4_K: &str = include_str!("../../shaders/lib/wsub_q4_k.wgsl");
const WSUB_Q5_K: &str = include_str!("../../shaders/lib/wsub_q5_k.wgsl");
const WSUB_Q6_K: &str = include_str!("../../shaders/lib/wsub_q6_k.wgsl");
const FP8: &str = include_str!("../../shaders/lib/fp8.wgsl");
const WEIGHTS_FP8: &str = include_str!("../../shaders/lib/weights_fp8.wgsl");
const REDUCE_SUBGROUP: &str = include_str!("../../shaders/lib/reduce_subgroup.wgsl");
const REDUCE_SHARED: &str = include_str!("../../shaders/lib/reduce_shared.wgsl");

#[derive(Default)]
pub struct PipelineCache {
    compiled: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
}

impl GpuContext {
    /// The compute pipeline for `src`, compiled on first use.
    pub fn pipeline(&self, src: &ShaderSource) -> Result<Arc<wgpu::ComputePipeline>> {
        if self.is_cpu() {
            return Err(crate::error::Error::invalid(&src.key, "no shaders on the CPU device (the kernel lacks its host branch)"));
        }
        let cache = &self.shared.pipelines;
        if let Some(p) = cache.compiled.lock().unwrap().get(&src.key) {
            return Ok(p.clone());
        }
        let what = format!("compiling kernel {}", src.key);
        let pipeline = self.scoped(&what, || {
            let module = self.device().create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&src.key),
                source: wgpu::ShaderSource::Wgsl(src.code.as_str().into()),
            });
            self.device().create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&src.key),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            })
        })?;
        let pipeline = Arc::new(pipeline);
        cache.compiled.lock().unwrap().insert(src.key.clone(), pipeline.clone());
        Ok(pipeline)
    }
}
