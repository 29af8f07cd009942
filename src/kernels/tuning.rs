//! Which variant of each kernel a device takes: the matmul path by row count (vector or tiled,
//! their workgroup and tile sizes, or cooperative matrices) and the decode attention kernel. The
//! defaults are what llvmpipe measured when the kernels were written; the calibration
//! (`planner::hardware`) times every candidate on the adapter at hand and caches its choice with
//! the hardware profile, and [`GpuContext::set_tuning`](crate::gpu::GpuContext::set_tuning)
//! applies it.

use serde::{Deserialize, Serialize};

use crate::gpu::KernelFeatures;
use crate::kernels::attention::AttentionKernel;
use crate::kernels::matmul::{MatmulPath, VEC_WG};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelTuning {
    /// The matmul path for up to `up_to_rows` rows, ascending; past the last entry, its path.
    pub matmul: Vec<MatmulChoice>,
    pub attention: AttentionKernel,
    /// The grouped expert matmul takes its large tiles once the mean rows per expert pass this.
    #[serde(default = "default_grouped_large_from")]
    pub grouped_large_from: u32,
    /// Where the choices come from.
    pub source: String,
}

fn default_grouped_large_from() -> u32 {
    32
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MatmulChoice {
    pub up_to_rows: u32,
    pub path: MatmulPath,
}

impl Default for KernelTuning {
    fn default() -> Self {
        let choice = |up_to_rows, path| MatmulChoice { up_to_rows, path };
        KernelTuning {
            matmul: vec![
                choice(1, MatmulPath::Vector { tok: 1, wg: VEC_WG }),
                choice(2, MatmulPath::Vector { tok: 2, wg: VEC_WG }),
                choice(4, MatmulPath::Vector { tok: 4, wg: VEC_WG }),
                choice(8, MatmulPath::Tiled { bm: 64 }),
                choice(32, MatmulPath::Tiled { bm: 16 }),
                choice(u32::MAX, MatmulPath::Tiled { bm: 64 }),
            ],
            attention: AttentionKernel::default(),
            grouped_large_from: default_grouped_large_from(),
            source: "defaults (llvmpipe's measurements)".into(),
        }
    }
}

impl KernelTuning {
    pub fn matmul_path(&self, m: usize) -> MatmulPath {
        let m = u32::try_from(m).unwrap_or(u32::MAX);
        match self.matmul.iter().find(|c| c.up_to_rows >= m).or(self.matmul.last()) {
            Some(c) => c.path,
            None => KernelTuning::default().matmul_path(m as usize),
        }
    }

    /// One line: which path each run of row counts takes, the attention variant, the grouped tiles.
    pub fn describe(&self) -> String {
        let mut from = 1u32;
        let mut parts = Vec::new();
        for c in &self.matmul {
            let rows = if c.up_to_rows == u32::MAX { format!("{from}+ rows") } else if c.up_to_rows == from { format!("{from} row{}", if from == 1 { "" } else { "s" }) } else { format!("{from}-{} rows", c.up_to_rows) };
            let path = match c.path {
                MatmulPath::Vector { tok, wg } => format!("vector x{tok} ({wg} threads)"),
                MatmulPath::Tiled { bm } => format!("tiles of {bm}"),
                MatmulPath::Coop { shape, emulated } => format!("cooperative {0}x{0}{1}", shape.size, if emulated { " (emulated)" } else { "" }),
            };
            parts.push(format!("{rows}: {path}"));
            from = c.up_to_rows.saturating_add(1);
        }
        let a = self.attention;
        format!(
            "matmul {}; attention {} threads, {}; grouped expert tiles large past {} rows an expert",
            parts.join(", "),
            a.wg,
            if a.subgroup_keys { "a subgroup per key" } else { "a thread per key" },
            self.grouped_large_from
        )
    }

    /// The tuning with each variant that a device with `features` cannot run replaced by the
    /// default for its rows (a profile cached before a feature was switched off, say).
    pub fn usable_with(mut self, features: KernelFeatures) -> Self {
        let default = KernelTuning::default();
        for c in &mut self.matmul {
            if !c.path.runs_with(features) {
                c.path = default.matmul_path(c.up_to_rows as usize);
            }
        }
        if !self.attention.runs_with(features) {
            self.attention = default.attention;
        }
        self
    }

    /// From the fastest path measured at each row count (ascending): one entry per run of
    /// counts that chose the same path, reaching to the last count of the run.
    pub fn from_fastest(fastest: &[(u32, MatmulPath)], attention: AttentionKernel, grouped_large_from: u32, source: String) -> Self {
        let mut matmul: Vec<MatmulChoice> = Vec::new();
        for &(rows, path) in fastest {
            match matmul.last_mut() {
                Some(last) if last.path == path => last.up_to_rows = rows,
                _ => matmul.push(MatmulChoice { up_to_rows: rows, path }),
            }
        }
        if let Some(last) = matmul.last_mut() {
            last.up_to_rows = u32::MAX;
        }
        KernelTuning { matmul, attention, grouped_large_from, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::CoopShape;

    #[test]
    fn defaults_are_the_old_constants() {
        let t = KernelTuning::default();
        let v = |tok| MatmulPath::Vector { tok, wg: VEC_WG };
        assert_eq!(t.matmul_path(0), v(1));
        assert_eq!(t.matmul_path(1), v(1));
        assert_eq!(t.matmul_path(3), v(4));
        assert_eq!(t.matmul_path(5), MatmulPath::Tiled { bm: 64 });
        assert_eq!(t.matmul_path(9), MatmulPath::Tiled { bm: 16 });
        assert_eq!(t.matmul_path(33), MatmulPath::Tiled { bm: 64 });
        assert_eq!(t.matmul_path(usize::MAX), MatmulPath::Tiled { bm: 64 });
    }

    #[test]
    fn the_description_names_every_run_of_rows() {
        let d = KernelTuning::default().describe();
        assert_eq!(
            d,
            "matmul 1 row: vector x1 (64 threads), 2 rows: vector x2 (64 threads), 3-4 rows: vector x4 (64 threads), 5-8 rows: tiles of 64, 9-32 rows: tiles of 16, 33+ rows: tiles of 64; attention 64 threads, a thread per key; grouped expert tiles large past 32 rows an expert"
        );
    }

    #[test]
    fn measured_choices_merge_runs_and_cover_every_count() {
        let v = |tok, wg| MatmulPath::Vector { tok, wg };
        let t = KernelTuning::from_fastest(
            &[(1, v(1, 128)), (2, v(2, 128)), (4, MatmulPath::Tiled { bm: 16 }), (8, MatmulPath::Tiled { bm: 16 }), (64, MatmulPath::Tiled { bm: 32 })],
            AttentionKernel::default(),
            32,
            "test".into(),
        );
        assert_eq!(t.matmul.len(), 4);
        assert_eq!(t.matmul_path(3), MatmulPath::Tiled { bm: 16 });
        assert_eq!(t.matmul_path(8), MatmulPath::Tiled { bm: 16 });
        assert_eq!(t.matmul_path(9), MatmulPath::Tiled { bm: 32 });
        assert_eq!(t.matmul_path(1 << 20), MatmulPath::Tiled { bm: 32 });
    }

    #[test]
    fn variants_a_device_lacks_fall_back_to_the_defaults() {
        let shape = CoopShape { size: 16, f16_inputs: true, subgroup: 32 };
        let coop = MatmulPath::Coop { shape, emulated: false };
        let t = KernelTuning::from_fastest(&[(1, MatmulPath::Vector { tok: 1, wg: 32 }), (512, coop)], AttentionKernel { wg: 128, subgroup_keys: true }, 16, "test".into());
        let mut with = KernelFeatures::basic(true, true, false);
        with.coop = Some(shape);
        with.subgroup_attention = true;
        assert_eq!(t.clone().usable_with(with), t);
        let without = t.usable_with(KernelFeatures::basic(true, true, false));
        assert_eq!(without.matmul_path(512), MatmulPath::Tiled { bm: 64 });
        assert_eq!(without.matmul_path(1), MatmulPath::Vector { tok: 1, wg: 32 });
        assert_eq!(without.attention, AttentionKernel::default());
    }
}
