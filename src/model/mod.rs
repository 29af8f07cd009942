//! The supported architectures as one forward pass over the kernels.

pub mod forward;
pub mod streamer;
pub mod weights;

use std::path::Path;

use crate::error::Result;
use crate::gpu::GpuContext;
use crate::kernels::rope::RopeTable;
use crate::loader::checkpoint::Checkpoint;
use crate::loader::config::ModelConfig;
use crate::planner::Placement;
pub use forward::{KvCache, Model, StepInput};
pub use streamer::{ExpertSlot, SlotCache, StreamStats};
use weights::{Experts, Ffn, Projections, Weights};

impl Model {
    /// Loads the model in `dir` onto `ctx`, every weight resident, with rope positions for
    /// sequences up to `max_positions` tokens (capped at the model's `max_position_embeddings`).
    pub fn load(ctx: &GpuContext, dir: &Path, max_positions: usize) -> Result<Self> {
        let cfg = crate::loader::ModelFiles::config(dir)?;
        let placement = Placement::all_resident(&cfg);
        Self::load_placed(ctx, cfg, &crate::loader::ModelFiles::checkpoint(dir)?, max_positions, &placement)
    }

    /// [`Model::load`] from a config and checkpoint already read, the experts placed as
    /// `placement` says.
    pub fn load_placed(
        ctx: &GpuContext,
        cfg: ModelConfig,
        checkpoint: &Checkpoint,
        max_positions: usize,
        placement: &Placement,
    ) -> Result<Self> {
        // The CPU device reads the checkpoint's weights in place where it can.
        checkpoint.lend_to(ctx);
        let weights = Weights::load(ctx, checkpoint, &cfg, placement)?;
        let positions = max_positions.clamp(1, cfg.max_position_embeddings.max(1));
        let rope = RopeTable::new(ctx, &cfg.inv_freq, cfg.rope_attention_scaling, positions)?;
        // Slots as large as the largest streamed layer's matrices (layers may differ in format).
        let streamed: Vec<&weights::HostExperts> = weights
            .layers
            .iter()
            .filter_map(|l| match &l.ffn {
                Ffn::Moe { experts: Experts::Streamed(h), .. } => Some(h),
                _ => None,
            })
            .collect();
        let slots = match streamed.first() {
            Some(first) => {
                let bytes = streamed.iter().fold([0usize; 3], |m, h| {
                    let b = h.slot_bytes();
                    [m[0].max(b[0]), m[1].max(b[1]), m[2].max(b[2])]
                });
                let fp8_pack = first.fp8_block.map(|_| first.packs[0].len());
                (0..placement.slots.max(2)).map(|_| ExpertSlot::new(ctx, bytes, fp8_pack)).collect::<Result<_>>()?
            }
            None => Vec::new(),
        };
        let slot_cache = std::sync::Mutex::new(SlotCache::new(slots.len()));
        // One slot as large as the largest streamed layer's projections, each matrix its own buffer.
        // FP8 matrices land in one staging buffer first, then the GPU dequantises them.
        let mut widest = vec![0u64; cfg.attention_matrices().len()];
        let mut staging = 0u64;
        for l in &weights.layers {
            if let Projections::Streamed(h) = &l.attn {
                for (i, w) in widest.iter_mut().enumerate() {
                    *w = (*w).max((h.gpu_bytes(i) as u64).next_multiple_of(4));
                    if h.fp8[i].is_some() {
                        staging = staging.max(h.data[i].len() as u64);
                    }
                }
            }
        }
        let attn_slot = if widest[0] > 0 {
            Some(widest.iter().map(|&b| ctx.storage("attention slot", b)).collect::<Result<Vec<_>>>()?)
        } else {
            None
        };
        let attn_staging = if staging > 0 { Some(ctx.storage("attention slot (FP8 staging)", staging)?) } else { None };
        Ok(Model {
            cfg,
            weights,
            rope,
            ctx: ctx.clone(),
            slots,
            slot_cache,
            attn_slot,
            attn_staging,
            attn_held: Default::default(),
        })
    }
}
