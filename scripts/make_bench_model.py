#!/usr/bin/env python3
"""Makes the CPU benchmark's model: a Mixtral-architecture checkpoint of about 800 M parameters
with random weights (seeded), the real Mixtral tokenizer, saved in bf16 by transformers, so that
moegen, llama.cpp (through its converter) and transformers run the same weights.

Pinned: torch==2.15.0 transformers==5.23.0 (scripts/peer_bench.sh makes the venv)
    python scripts/make_bench_model.py OUT_DIR [TOKENIZER_JSON]
The tokenizer defaults to the shared real Mixtral one (../shared/tokenizers/mixtral-v1.tokenizer.json).
"""
import os, shutil, sys

import torch
import transformers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

assert torch.__version__.startswith("2.15.0"), torch.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__

out = sys.argv[1]
here = os.path.dirname(os.path.abspath(__file__))
tokenizer_json = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "..", "..", "shared", "tokenizers", "mixtral-v1.tokenizer.json")

torch.manual_seed(0)
cfg = MixtralConfig(
    vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
    max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, initializer_range=0.02, torch_dtype="bfloat16",
)
model = MixtralForCausalLM(cfg).to(torch.bfloat16)
params = sum(p.numel() for p in model.parameters())
print(f"{params / 1e6:.0f} M parameters")
os.makedirs(out, exist_ok=True)
model.save_pretrained(out, safe_serialization=True)
tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
tok.save_pretrained(out)
shutil.copy(tokenizer_json, os.path.join(out, "tokenizer.json"))
