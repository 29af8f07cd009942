#!/usr/bin/env python3
"""GGUF fixtures, written by llama.cpp's own converter (convert_hf_to_gguf.py, imported from the
llama.cpp tree on PYTHONPATH): run by scripts/make_llama_fixtures.sh, which pins the versions.

    make_gguf_fixtures.py convert SRC_DIR OUT.gguf OUTTYPE   # f32 | f16 | bf16
    make_gguf_fixtures.py model256 DIR                       # the K-quant fixture's checkpoint
    make_gguf_fixtures.py qwen2moe DIR                       # Qwen2-MoE without dense layers
    make_gguf_fixtures.py deepseek2 DIR                      # DeepSeek-V2 and V3 as GGUF holds them

The tiny fixtures have a 256-token vocabulary and no tokenizer files; the converter needs a
vocabulary, so it is given a byte-level one of 256 tokens (GPT-2 style, one merge), the weights
and hyperparameters being converted exactly as for any checkpoint.
"""
import json, os, sys

import torch


def byte_tokens():
    """GPT-2's printable stand-ins for the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def convert(src, out, outtype):
    import gguf
    import convert_hf_to_gguf as c
    config = json.load(open(os.path.join(src, "config.json")))
    assert config["vocab_size"] == 256, "the fixture vocabulary is 256 byte tokens"
    original = c.get_model_class

    def with_byte_vocab(name, mmproj=False):
        base = original(name, mmproj)

        class Fixture(base):
            model_arch = base.model_arch

            def set_vocab(self):
                w = self.gguf_writer
                w.add_tokenizer_model("gpt2")
                w.add_tokenizer_pre("default")
                w.add_token_list(byte_tokens())
                w.add_token_types([gguf.TokenType.NORMAL] * 256)
                # llama.cpp refuses a BPE vocabulary without merges: one, unused by ids.
                w.add_token_merges(["! !"])
                w.add_bos_token_id(config.get("bos_token_id") or 1)
                w.add_eos_token_id(config.get("eos_token_id") or 2)

        Fixture.__name__ = base.__name__
        return Fixture

    c.get_model_class = with_byte_vocab
    sys.argv = ["convert_hf_to_gguf.py", src, "--outtype", outtype, "--outfile", out]
    c.main()


def model256(out_dir):
    """A Mixtral checkpoint whose inner dimensions are whole K-quant super-blocks (256), in bf16,
    with transformers' prompts from the same generator as the other fixtures."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import make_fixtures as mf
    from transformers import MixtralConfig, MixtralForCausalLM
    mf.OUT = out_dir
    _, gen, out = mf.saved_model("mixtral-256", MixtralConfig, MixtralForCausalLM,
                                 dict(hidden_size=256, intermediate_size=256, num_local_experts=4, head_dim=64,
                                      rope_theta=10000.0, initializer_range=0.05), torch.bfloat16)
    prompts = [torch.randint(3, mf.VOCAB, (n,), generator=gen).tolist() for n in mf.PROMPT_LENS]
    json.dump({"prompts": prompts, "max_new_tokens": mf.NEW_TOKENS}, open(os.path.join(out, "prompts.json"), "w"))
    print(out)


def qwen2moe(out_dir):
    """A Qwen2-MoE checkpoint as llama.cpp can hold it (every layer with experts: its qwen2moe
    graph has no dense layers), with a gated shared expert and q/k/v biases, in bf16, and
    transformers' expected.json beside it."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import make_fixtures as mf
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    mf.OUT = out_dir
    model, gen, out = mf.saved_model("qwen2-moe-all-sparse", Qwen2MoeConfig, Qwen2MoeForCausalLM,
                                     dict(intermediate_size=72, moe_intermediate_size=40, shared_expert_intermediate_size=56,
                                          num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[]),
                                     torch.bfloat16)
    ref = Qwen2MoeForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    mf.expected(out, ref, gen)
    print(out)


def deepseek2(out_dir):
    """DeepSeek checkpoints as llama.cpp's deepseek2 metadata can describe them.

    V2: the deepseek-v2-bf16 fixture's model but with equal YaRN mscales (GGUF carries only
    mscale_all_dim, and llama.cpp's graph takes mscale to equal it, as DeepSeek's published
    configs have it; 0.6, so the softmax scale still differs from one), with transformers'
    expected.json beside it. V3: the deepseek-v3-f32 fixture as it is, its config naming the
    sigmoid scoring that DeepSeek-V3's published config names (the converter writes the gating
    function from that key; transformers' V3 class assumes it)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import shutil
    import make_fixtures as mf
    from transformers import DeepseekV2ForCausalLM
    mf.OUT = out_dir
    name, config_cls, model_cls, extra, dtype, _ = next(f for f in mf.FIXTURES if f[0] == "deepseek-v2-bf16")
    rope = dict(extra["rope_parameters"], mscale=0.6, mscale_all_dim=0.6)
    model, gen, out = mf.saved_model("deepseek-v2-gguf", config_cls, model_cls, dict(extra, rope_parameters=rope), dtype)
    ref = DeepseekV2ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    mf.expected(out, ref, gen)
    v3 = os.path.join(out_dir, "deepseek-v3-f32")
    shutil.rmtree(v3, ignore_errors=True)
    shutil.copytree(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "deepseek-v3-f32"), v3)
    config = json.load(open(os.path.join(v3, "config.json")))
    config["scoring_func"] = "sigmoid"
    json.dump(config, open(os.path.join(v3, "config.json"), "w"), indent=2)
    print(out, v3)


if __name__ == "__main__":
    if sys.argv[1] == "convert":
        convert(*sys.argv[2:5])
    elif sys.argv[1] == "model256":
        model256(sys.argv[2])
    elif sys.argv[1] == "qwen2moe":
        qwen2moe(sys.argv[2])
    elif sys.argv[1] == "deepseek2":
        deepseek2(sys.argv[2])
    else:
        sys.exit(__doc__)
