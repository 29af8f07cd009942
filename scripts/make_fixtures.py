#!/usr/bin/env python3
"""Builds the correctness fixtures under tests/fixtures/: tiny random-weight checkpoints of every
supported architecture, with the logits transformers computes for every position of several
prompts and its greedy continuations. The Rust tests compare against these; they never run Python.

Pinned:  torch==2.15.0  transformers==5.23.0  safetensors  numpy
    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch==2.15.0 transformers==5.23.0
    /tmp/venv/bin/python scripts/make_fixtures.py [NAME ...]   (all fixtures, or the ones named)

Weights are non-flat (initializer_range 0.1, random norm weights and biases), saved in f32, f16 or
bf16, one checkpoint sharded into several files. The reference runs in float32 on the saved
(rounded) weights, eager attention, one prompt at a time.
"""
import json, os, shutil

import torch
import transformers
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                          MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM,
                          Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

assert torch.__version__.startswith("2.15.0"), torch.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
VOCAB = 256
PROMPT_LENS = [1, 5, 17, 9]
NEW_TOKENS = 8

COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, initializer_range=0.1,
              rms_norm_eps=1e-5, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)

FIXTURES = [
    # name, config class, model class, extra config, save dtype, max shard size
    ("mixtral-f32", MixtralConfig, MixtralForCausalLM,
     dict(intermediate_size=96, num_local_experts=4, rope_theta=10000.0), torch.float32, None),
    ("mixtral-bf16-sharded", MixtralConfig, MixtralForCausalLM,
     dict(intermediate_size=80, num_local_experts=5, rope_theta=1e6, num_hidden_layers=3), torch.bfloat16, "100KB"),
    ("qwen2-moe-bf16", Qwen2MoeConfig, Qwen2MoeForCausalLM,
     dict(intermediate_size=72, moe_intermediate_size=40, shared_expert_intermediate_size=56, num_experts=6,
          num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[0], num_hidden_layers=3), torch.bfloat16, None),
    ("qwen3-moe-f16", Qwen3MoeConfig, Qwen3MoeForCausalLM,
     dict(intermediate_size=72, moe_intermediate_size=48, num_experts=8, head_dim=24, norm_topk_prob=True,
          rope_theta=1e6), torch.float16, None),
    ("qwen3-moe-yarn-f32", Qwen3MoeConfig, Qwen3MoeForCausalLM,
     dict(intermediate_size=64, moe_intermediate_size=40, num_experts=6, head_dim=16, norm_topk_prob=True,
          rope_parameters=dict(rope_type="yarn", rope_theta=1e5, factor=4.0, original_max_position_embeddings=128,
                               beta_fast=16.0, beta_slow=1.0)), torch.float32, None),
    ("olmoe-bf16", OlmoeConfig, OlmoeForCausalLM,
     dict(intermediate_size=56, num_experts=8, norm_topk_prob=False, eos_token_id=2, pad_token_id=0), torch.bfloat16, None),
    # DeepSeek-V2 as V2-Lite is built: full-rank queries, a dense first layer, shared experts,
    # softmax routing limited to the best groups, YaRN with both mscales (here unequal, so the
    # rope's attention factor and the softmax scale both differ from one).
    ("deepseek-v2-bf16", DeepseekV2Config, DeepseekV2ForCausalLM,
     dict(intermediate_size=96, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3,
          n_shared_experts=2, first_k_dense_replace=1, num_hidden_layers=3, q_lora_rank=None, kv_lora_rank=32,
          qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, num_key_value_heads=4,
          topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.7,
          norm_topk_prob=False,
          rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                               beta_fast=32.0, beta_slow=1.0, mscale=0.8, mscale_all_dim=0.6)), torch.bfloat16, None),
    # DeepSeek-V3: low-rank queries, sigmoid scores with a correction bias choosing among groups
    # ranked by their two best, renormalised and scaled, interleaved rope, YaRN.
    ("deepseek-v3-f32", DeepseekV3Config, DeepseekV3ForCausalLM,
     dict(intermediate_size=80, moe_intermediate_size=20, n_routed_experts=12, num_experts_per_tok=4,
          n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, q_lora_rank=24, kv_lora_rank=40,
          qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4,
          n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
          rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32,
                               beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)), torch.float32, None),
]


def roughen(model, gen):
    """Non-flat norms and biases: transformers initialises norms to one and biases to zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        # DeepSeek-V3's correction bias is a buffer, zero at init: large enough to change choices.
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))


def saved_model(name, config_cls, model_cls, extra, dtype, shard=None):
    """A fresh roughened model seeded by its name, saved in `dtype` under tests/fixtures/NAME;
    returns the model, its config, the prompt generator and the directory."""
    torch.manual_seed(sum(map(ord, name)))
    gen = torch.Generator().manual_seed(len(name))
    cfg = config_cls(**{**COMMON, **extra})
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    roughen(model, gen)
    out = os.path.join(OUT, name)
    shutil.rmtree(out, ignore_errors=True)
    model.to(dtype).save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    return model, gen, out


def build(name, config_cls, model_cls, extra, dtype, shard):
    model, gen, out = saved_model(name, config_cls, model_cls, extra, dtype, shard)
    # The reference: the saved weights, rounded as stored, computed in float32.
    ref = model_cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    expected(out, ref, gen)
    files = sorted(os.listdir(out))
    print(f"{name}: {files}")


def expected(out, ref, gen):
    """Writes expected.json: transformers' logits for every position of a few prompts and its
    greedy continuations."""
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    logits, greedy = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            logits.append([round(float(v), 6) for v in ref(input_ids=ids).logits[0].reshape(-1)])
            g = ref.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=NEW_TOKENS)
            greedy.append(g[0, len(p):].tolist())
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"vocab_size": VOCAB, "prompts": prompts, "logits": logits, "greedy": greedy,
                   "max_new_tokens": NEW_TOKENS, "torch": torch.__version__,
                   "transformers": transformers.__version__}, f)


FP8_BLOCK = [16, 16]


def quantize_fp8(w, block):
    """DeepSeek-V3's format: e4m3 values and one f32 scale per block (weight = fp8 * scale)."""
    rows, cols = w.shape
    br, bc = block
    sr, sc = -(-rows // br), -(-cols // bc)
    scales = torch.empty(sr, sc)
    q = torch.empty(rows, cols)
    for i in range(sr):
        for j in range(sc):
            blk = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float()
            s = max(float(blk.abs().max()), 1e-12) / 448.0
            scales[i, j] = s
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = blk / s
    return q.to(torch.float8_e4m3fn), scales


def dequantize_fp8(q, scales, block):
    """The reference dequantisation: fp8 times its block's scale, rounded to bf16."""
    br, bc = block
    s = scales.repeat_interleave(br, 0)[:q.shape[0]].repeat_interleave(bc, 1)[:, :q.shape[1]]
    return (q.float() * s).to(torch.bfloat16)


def build_fp8(name, extra):
    """A DeepSeek-V3 checkpoint as released: linear weights FP8 e4m3 with block scales
    (`weight_scale_inv`), embeddings, LM head, router and norms bf16. The reference is the same
    model with the weights dequantised to bf16, computed in float32."""
    from safetensors.torch import load_file, save_file
    model, gen, out = saved_model(name, DeepseekV3Config, DeepseekV3ForCausalLM, extra, torch.bfloat16)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    stored, reference = {}, {}
    for key, t in tensors.items():
        quantized = t.dim() == 2 and not any(n in key for n in ("embed_tokens", "lm_head", "mlp.gate.weight"))
        if quantized:
            q, s = quantize_fp8(t, FP8_BLOCK)
            stored[key], stored[key + "_scale_inv"] = q, s
            reference[key] = dequantize_fp8(q, s, FP8_BLOCK)
        else:
            stored[key] = t
            reference[key] = t
    save_file(stored, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(out, "config.json")))
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": FP8_BLOCK}
    json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=2)
    # transformers reads the dequantised weights from a bf16 checkpoint of the same model.
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        save_file(reference, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        ref = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager").eval()
    expected(out, ref, gen)
    print(f"{name}: {sorted(os.listdir(out))}, {sum(1 for k in stored if k.endswith('_scale_inv'))} FP8 tensors")


def old_style_config(name):
    """Rewrites a fixture's config in the pre-transformers-5 form (rope_theta at the top level)."""
    path = os.path.join(OUT, name, "config.json")
    cfg = json.load(open(path))
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    json.dump(cfg, open(path, "w"), indent=2)


if __name__ == "__main__":
    import sys
    # With names given, only those fixtures are rebuilt.
    wanted = set(sys.argv[1:])
    os.makedirs(OUT, exist_ok=True)
    for fixture in FIXTURES:
        if not wanted or fixture[0] in wanted:
            build(*fixture)
    if not wanted or "qwen2-moe-bf16" in wanted:
        old_style_config("qwen2-moe-bf16")
    if not wanted or "deepseek-v3-fp8" in wanted:
        build_fp8("deepseek-v3-fp8",
                  dict(intermediate_size=96, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3,
                       n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, q_lora_rank=24,
                       kv_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                       num_key_value_heads=4, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                       norm_topk_prob=True, rope_theta=10000.0))
