//! The supported architectures as one forward pass over the kernels.

pub mod forward;
pub mod weights;

use std::path::Path;

use crate::error::Result;
use crate::gpu::GpuContext;
use crate::kernels::rope::RopeTable;
use crate::loader::checkpoint::Checkpoint;
use crate::loader::config::ModelConfig;
pub use forward::{KvCache, Model, StepInput};
use weights::Weights;

impl Model {
    /// Loads the model in `dir` onto `ctx`, with rope positions for sequences up to `max_positions`
    /// tokens (capped at the model's `max_position_embeddings`).
    pub fn load(ctx: &GpuContext, dir: &Path, max_positions: usize) -> Result<Self> {
        let cfg = ModelConfig::load(dir)?;
        let checkpoint = Checkpoint::open(dir)?;
        let weights = Weights::load(ctx, &checkpoint, &cfg)?;
        let positions = max_positions.clamp(1, cfg.max_position_embeddings.max(1));
        let rope = RopeTable::new(ctx, &cfg.inv_freq, cfg.rope_attention_scaling, positions)?;
        Ok(Model { cfg, weights, rope, ctx: ctx.clone() })
    }
}
