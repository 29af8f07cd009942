//! Reading a model: a Hugging Face directory (config, safetensors weights, tokenizer) or a GGUF
//! file, presented the same way (a [`ModelConfig`], a [`Checkpoint`] under Hugging Face tensor
//! names, a tokenizer).

pub mod checkpoint;
pub mod config;
pub mod gguf;
pub mod synthetic;
pub mod tokenizer;

use std::path::Path;

use crate::error::{Error, Result};
use checkpoint::Checkpoint;
use config::ModelConfig;
use tokenizer::TextCodec;

/// A model on disk, opened.
pub struct ModelFiles {
    pub config: ModelConfig,
    pub checkpoint: Checkpoint,
    /// None when the model has no tokenizer (token-id prompts only).
    pub codec: Option<TextCodec>,
    pub chat: crate::input::chat::ModelTemplates,
}

impl ModelFiles {
    /// The config of the model at `path` (either kind), without reading its tensors.
    pub fn config(path: &Path) -> Result<ModelConfig> {
        if gguf::is_gguf(path) {
            let (config, file) = gguf::open_config(path)?;
            return ModelConfig::parse(&config, &file);
        }
        ModelConfig::load(path)
    }

    /// The checkpoint of the model at `path` (either kind), without its tokenizer.
    pub fn checkpoint(path: &Path) -> Result<Checkpoint> {
        if gguf::is_gguf(path) {
            return Ok(gguf::open(path)?.checkpoint);
        }
        Checkpoint::open(path)
    }

    /// Opens `path`: a Hugging Face model directory, a `.gguf` file (or a part of a split one), or a
    /// directory holding a GGUF model.
    pub fn open(path: &Path) -> Result<Self> {
        if gguf::is_gguf(path) {
            let g = gguf::open(path)?;
            let config = ModelConfig::parse(&g.config, &g.path)?;
            let file = g.path.display().to_string();
            let codec = TextCodec::from_gguf(&g.metadata, &file)?;
            let chat = crate::input::chat::ModelTemplates::from_gguf(&g.metadata, &file);
            return Ok(ModelFiles { config, checkpoint: g.checkpoint, codec, chat });
        }
        if !path.join("config.json").exists() {
            return Err(Error::invalid(path.display().to_string(), "not a model: no config.json (a Hugging Face directory) and no .gguf file"));
        }
        let tokenizer = path.join("tokenizer.json");
        Ok(ModelFiles {
            config: ModelConfig::load(path)?,
            checkpoint: Checkpoint::open(path)?,
            codec: if tokenizer.exists() { Some(TextCodec::load(&tokenizer)?) } else { None },
            chat: crate::input::chat::ModelTemplates::from_hf_dir(path)?,
        })
    }
}
