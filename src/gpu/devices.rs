//! `moegen devices`: what each adapter offers that matters to the engine.

use std::fmt::Write;

use crate::gpu::context::{instance, list_adapters};

fn mib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// A report of every adapter the backends in `backends` expose, numbered as `--adapter N` takes them.
pub fn describe_adapters(backends: Option<wgpu::Backends>) -> (String, usize) {
    let adapters = list_adapters(&instance(backends));
    let mut out = String::new();
    for (i, a) in adapters.iter().enumerate() {
        let info = a.get_info();
        let limits = a.limits();
        let features = a.features();
        let have = |f: wgpu::Features, name: &str| if features.contains(f) { name.to_string() } else { format!("no {name}") };
        let _ = writeln!(out, "[{i}] {}", info.name);
        let _ = writeln!(out, "    backend: {:?}   type: {:?}", info.backend, info.device_type);
        let _ = writeln!(out, "    driver: {} {}", info.driver, info.driver_info);
        let _ = writeln!(
            out,
            "    features: {}, {}, {}{}",
            have(wgpu::Features::SHADER_F16, "shader-f16"),
            have(wgpu::Features::SUBGROUP, "subgroup"),
            have(wgpu::Features::TIMESTAMP_QUERY, "timestamp-query"),
            if features.contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS) { ", mappable-primary-buffers" } else { "" }
        );
        let _ = writeln!(
            out,
            "    max storage binding: {}   max buffer: {}   workgroup memory: {} KiB   invocations/workgroup: {}",
            mib(limits.max_storage_buffer_binding_size),
            mib(limits.max_buffer_size),
            limits.max_compute_workgroup_storage_size / 1024,
            limits.max_compute_invocations_per_workgroup
        );
        let _ = writeln!(
            out,
            "    subgroup sizes: {}..{}   storage buffers/stage: {}   workgroups/dimension: {}",
            info.subgroup_min_size,
            info.subgroup_max_size,
            limits.max_storage_buffers_per_shader_stage,
            limits.max_compute_workgroups_per_dimension
        );
        let coop = a.cooperative_matrix_properties();
        if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) && !coop.is_empty() {
            let shapes: Vec<String> = coop.iter().map(|p| format!("{}x{}x{} {:?}->{:?}", p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type)).collect();
            let _ = writeln!(out, "    cooperative matrices (MOEGEN_EXPERIMENTAL=coop-matrix): {}", shapes.join(", "));
        } else {
            let _ = writeln!(out, "    cooperative matrices: none");
        }
    }
    (out, adapters.len())
}
