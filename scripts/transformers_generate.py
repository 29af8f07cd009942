#!/usr/bin/env python3
"""transformers' CPU `generate` on the benchmark job: SEQUENCES random prompts of PROMPT tokens
(seeded), greedy, exactly NEW new tokens each, one batch, bf16 weights as saved. Prints the job's
tokens/s counted as moegen and llama-batched-bench count them: (prompt + generated) / wall time.

Pinned: torch==2.15.0 transformers==5.23.0
    python scripts/transformers_generate.py MODEL_DIR SEQUENCES PROMPT NEW THREADS
"""
import sys, time

import torch
import transformers
from transformers import AutoModelForCausalLM

assert torch.__version__.startswith("2.15.0"), torch.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__

model_dir, seqs, prompt, new, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16)
model.eval()
g = torch.Generator().manual_seed(1)
ids = torch.randint(3, model.config.vocab_size, (seqs, prompt), generator=g)
mask = torch.ones_like(ids)
with torch.inference_mode():
    start = time.time()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    wall = time.time() - start
generated = (out.shape[1] - prompt) * seqs
print(f"transformers {transformers.__version__} torch {torch.__version__}, {threads} threads: {seqs} x ({prompt} + {new}) tokens in {wall:.2f} s: {(seqs * prompt + generated) / wall:.1f} tokens/s over the job")
