#!/usr/bin/env python3
"""Trains moegen's embedded default model: a small Mixtral-architecture MoE (4 experts, top-2)
with its own byte-level BPE tokenizer, on the Python standard library's sources (docstrings,
comments and code: text every Debian machine has). Writes a Hugging Face model directory,
weights in bf16, to assets/default-model.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch==2.15.0 transformers==5.23.0 tokenizers
    /tmp/venv/bin/python scripts/train_default_model.py [--minutes 40] [--threads 2]
    /tmp/venv/bin/python scripts/train_default_model.py --init assets/default-model --lr 1e-3 --minutes 50

Seeded, but training runs for a wall-clock budget, so the step count depends on the machine. The
committed weights came from a 45-minute run and a 50-minute continuation (`--init`) on a 2-core
machine; the log's last lines (steps, loss, samples) are in BENCHMARKS.md.
"""
import argparse, glob, json, math, os, random, sys, sysconfig, time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import MixtralConfig, MixtralForCausalLM

VOCAB = 4096
SEQ = 128


def corpus():
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    texts = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            texts.append(fh.read())
    return files, texts


def train_tokenizer(texts, out_dir):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", help="continue from this model directory (same tokenizer)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "assets", "default-model"))
    args = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    files, texts = corpus()
    print(f"corpus: {len(files)} files, {sum(map(len, texts)) / 1e6:.1f} MB", flush=True)
    if args.init:
        tok = Tokenizer.from_file(os.path.join(args.init, "tokenizer.json"))
        if os.path.abspath(args.init) != os.path.abspath(args.out):
            tok.save(os.path.join(args.out, "tokenizer.json"))
    else:
        tok = train_tokenizer(texts, args.out)
    ids = []
    for t in texts:
        ids.extend(tok.encode(t, add_special_tokens=False).ids + [2])
    data = torch.tensor(ids, dtype=torch.long)
    print(f"tokens: {len(ids)}", flush=True)

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=1024, rope_theta=10000.0,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                        router_aux_loss_coef=0.02, output_router_logits=True)
    if args.init:
        model = MixtralForCausalLM.from_pretrained(args.init, dtype=torch.float32)
        model.config.output_router_logits = True
        model.config.router_aux_loss_coef = cfg.router_aux_loss_coef
    else:
        model = MixtralForCausalLM(cfg)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    batch = 16
    deadline = time.time() + args.minutes * 60
    step = 0
    model.train()
    while time.time() < deadline:
        starts = torch.randint(0, len(data) - SEQ - 1, (batch,))
        x = torch.stack([data[s:s + SEQ] for s in starts])
        frac = min(1.0, (time.time() - (deadline - args.minutes * 60)) / (args.minutes * 60))
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(input_ids=x, labels=x)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {out.loss.item():.3f} lr {lr:.2e}", flush=True)
        step += 1

    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)
    # A quick look at what it learned.
    model.eval()
    for prompt in ["def ", "import os\n", "class "]:
        enc = torch.tensor([tok.encode(prompt).ids])
        g = model.to(torch.float32).generate(enc, max_new_tokens=40, do_sample=False)
        print(repr(tok.decode(g[0].tolist(), skip_special_tokens=True)), flush=True)
    print(f"trained {step} steps of {batch}x{SEQ} tokens", flush=True)


if __name__ == "__main__":
    sys.exit(main())
