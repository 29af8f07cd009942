//! Reading a Hugging Face model directory: config, safetensors weights, tokenizer.

pub mod checkpoint;
pub mod config;
pub mod synthetic;
pub mod tokenizer;
