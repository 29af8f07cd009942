#!/usr/bin/env bash
# The fixtures that come from llama.cpp (pinned in scripts/llama_cpp.sh: llama.cpp from
# llama-cpp-python 0.3.36, torch 2.15.0, transformers 5.23.0):
#   tests/fixtures/quant/  f32 rows and the bytes llama.cpp's quantiser writes for them
#                          (Q8_0, Q4_0, Q4_K; ggml_quantize_chunk without an importance matrix,
#                          the call llama-quantize makes), for moegen's bit-exact quantisers;
#   tests/fixtures/gguf/   transformers fixtures converted by convert_hf_to_gguf.py (f32, f16,
#                          bf16; Qwen2-MoE without the fixture's dense layer, which llama.cpp
#                          cannot hold, and DeepSeek-V2 with equal YaRN mscales, which is all
#                          GGUF describes, each with transformers' expected figures); a Mixtral
#                          of 256-wide dimensions quantised by llama-quantize (Q8_0, Q4_0,
#                          Q4_K_M, Q5_K_M) and DeepSeek-V3 in Q8_0, with llama.cpp's greedy
#                          tokens for their prompts; the real Mixtral and Qwen2 vocabularies
#                          as the converter embeds them.
#   WORK=/tmp/moegen-peer scripts/make_llama_fixtures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/llama_cpp.sh
llama_cpp_build llama-quantize llama-gguf-split llama ggml-base
LIB="$BUILD/bin"
gcc -O2 -o "$WORK/quantize_ref" scripts/llama/quantize_ref.c -I"$LLAMA/ggml/include" -L"$LIB" -lggml-base -Wl,-rpath,"$LIB"
g++ -O2 -o "$WORK/greedy" scripts/llama/greedy.cpp -I"$LLAMA/include" -I"$LLAMA/ggml/include" -L"$LIB" -lllama -lggml -lggml-base -Wl,-rpath,"$LIB"

# Quantiser fixtures: 24 rows of 512, each 256-block a different kind of data.
Q=tests/fixtures/quant
mkdir -p "$Q"
"$PY" - "$Q/input.f32" <<'PYEOF'
import sys, numpy as np
rng = np.random.default_rng(12)
blocks = []
for i in range(48):
    kind = i % 12
    x = rng.standard_normal(256).astype(np.float32)
    x = {0: x, 1: x * 1e-3, 2: x * 1e3, 3: np.full(256, 0.37, np.float32), 4: np.zeros(256, np.float32),
         5: np.where(np.arange(256) == 77, 40.0, x * 0.01), 6: -np.abs(x), 7: np.abs(x) + 0.5,
         8: x * 1e-6, 9: rng.uniform(-1, 1, 256), 10: np.round(x * 4) / 4, 11: x ** 3}[kind]
    blocks.append(np.asarray(x, np.float32))
np.concatenate(blocks).tofile(sys.argv[1])
PYEOF
for t in q8_0 q4_0 q4_k; do
    "$WORK/quantize_ref" $t 512 "$Q/input.f32" "$Q/$t.bin"
done

G=tests/fixtures/gguf
mkdir -p "$G"
convert() { PYTHONPATH="$LLAMA:$LLAMA/gguf-py" "$PY" scripts/make_gguf_fixtures.py convert "$@" >"$WORK/convert.log" 2>&1 || { tail -20 "$WORK/convert.log"; exit 1; }; }
convert tests/fixtures/mixtral-f32 "$G/mixtral-f32.gguf" f32
convert tests/fixtures/qwen3-moe-f16 "$G/qwen3-moe-f16.gguf" f16
convert tests/fixtures/olmoe-bf16 "$G/olmoe-bf16.gguf" bf16
convert tests/fixtures/qwen3-moe-yarn-f32 "$G/qwen3-moe-yarn-f32.gguf" f32
# DeepSeek: V3 as it is (its config naming the sigmoid scoring), V2 with equal YaRN mscales (the
# only kind GGUF describes), with transformers' figures.
"$PY" scripts/make_gguf_fixtures.py deepseek2 "$WORK/fixtures"
convert "$WORK/fixtures/deepseek-v3-f32" "$G/deepseek-v3-f32.gguf" f32
convert "$WORK/fixtures/deepseek-v2-gguf" "$G/deepseek-v2-bf16.gguf" bf16
cp "$WORK/fixtures/deepseek-v2-gguf/expected.json" "$G/deepseek-v2-bf16.expected.json"
# The OLMoE file split in three parts.
rm -rf "$G/olmoe-split" && mkdir -p "$G/olmoe-split"
"$LIB/llama-gguf-split" --split --split-max-tensors 10 "$G/olmoe-bf16.gguf" "$G/olmoe-split/olmoe-bf16" >"$WORK/split.log"
# Qwen2-MoE without the dense layer (llama.cpp's qwen2moe has none), with transformers' figures.
"$PY" scripts/make_gguf_fixtures.py qwen2moe "$WORK/fixtures"
convert "$WORK/fixtures/qwen2-moe-all-sparse" "$G/qwen2-moe-bf16.gguf" bf16
cp "$WORK/fixtures/qwen2-moe-all-sparse/expected.json" "$G/qwen2-moe-bf16.expected.json"

# The real Mixtral and Qwen2 vocabularies, as the converter embeds them (--vocab-only).
for v in mixtral qwen2; do
    d="$WORK/vocab/$v"
    mkdir -p "$d"
    "$PY" - "$v" "$d" <<'PYEOF'
import json, shutil, sys
name, d = sys.argv[1:]
if name == "mixtral":
    shutil.copy("tests/fixtures/tokenizers/mixtral-v1.tokenizer.json", f"{d}/tokenizer.json")
    c = json.load(open("tests/fixtures/mixtral-f32/config.json")); c["vocab_size"] = 32000
    t = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
         "tokenizer_class": "LlamaTokenizer"}
else:
    shutil.copy("tests/fixtures/tokenizers/qwen2.tokenizer.json", f"{d}/tokenizer.json")
    c = json.load(open("tests/fixtures/qwen3-moe-f16/config.json")); c["vocab_size"] = 151936
    t = {"bos_token": None, "eos_token": "<|endoftext|>", "add_bos_token": False, "tokenizer_class": "Qwen2Tokenizer"}
json.dump(c, open(f"{d}/config.json", "w"))
json.dump(t, open(f"{d}/tokenizer_config.json", "w"))
PYEOF
    PYTHONPATH="$LLAMA/gguf-py" "$PY" "$LLAMA/convert_hf_to_gguf.py" "$d" --vocab-only --outfile "$G/$v-vocab.gguf" >"$WORK/convert.log" 2>&1
done

M="$WORK/fixtures/mixtral-256"
"$PY" scripts/make_gguf_fixtures.py model256 "$WORK/fixtures"
convert "$M" "$WORK/mixtral-256-bf16.gguf" bf16
for t in Q8_0 Q4_0 Q4_K_M Q5_K_M; do
    lower=$(echo $t | tr A-Z a-z)
    "$LIB/llama-quantize" "$WORK/mixtral-256-bf16.gguf" "$G/mixtral-256-$lower.gguf" $t >"$WORK/quantize-$t.log" 2>&1
done
# llama.cpp's greedy tokens on each, beside the prompts.
"$PY" - "$M/prompts.json" "$G" "$WORK/greedy" <<'PYEOF'
import json, subprocess, sys
prompts_file, g, greedy = sys.argv[1:]
p = json.load(open(prompts_file))
lines = "".join(json.dumps(x) + "\n" for x in p["prompts"])
out = {"prompts": p["prompts"], "max_new_tokens": p["max_new_tokens"], "llama_cpp": {}}
for t in ["q8_0", "q4_0", "q4_k_m", "q5_k_m"]:
    r = subprocess.run([greedy, f"{g}/mixtral-256-{t}.gguf", str(p["max_new_tokens"])], input=lines,
                       capture_output=True, text=True, check=True)
    out["llama_cpp"][t] = [json.loads(l) for l in r.stdout.splitlines()]
json.dump(out, open(f"{g}/mixtral-256.json", "w"), indent=1)
print(json.dumps(out["llama_cpp"]))
PYEOF
# DeepSeek-V3 in Q8_0 (where rows allow), and llama.cpp's greedy tokens on it and on the V3
# conversion for the prompts above. (llama.cpp does not load the V2 file: its loader requires
# q_lora_rank but for 26- or 27-layer models, which it takes to be V2-Lite.)
"$LIB/llama-quantize" "$G/deepseek-v3-f32.gguf" "$G/deepseek-v3-q8_0.gguf" Q8_0 >"$WORK/quantize-deepseek.log" 2>&1
"$PY" - "$G" "$WORK/greedy" <<'PYEOF'
import json, subprocess, sys
g, greedy = sys.argv[1:]
p = json.load(open(f"{g}/mixtral-256.json"))
lines = "".join(json.dumps(x) + "\n" for x in p["prompts"])
out = {"prompts": p["prompts"], "max_new_tokens": p["max_new_tokens"], "llama_cpp": {}}
for f in ["deepseek-v3-q8_0", "deepseek-v3-f32"]:
    r = subprocess.run([greedy, f"{g}/{f}.gguf", str(p["max_new_tokens"])], input=lines, capture_output=True, text=True, check=True)
    out["llama_cpp"][f] = [json.loads(l) for l in r.stdout.splitlines()]
json.dump(out, open(f"{g}/deepseek.json", "w"), indent=1)
print(json.dumps(out["llama_cpp"]))
PYEOF
# DeepSeek's pre-tokenizers (`deepseek-llm`, `deepseek-v3`): the Qwen2 vocabulary with each
# name written in place of its own, and llama.cpp's token ids (llama-tokenize) for texts that
# reach every split: the test renames the pre-tokenizer of the same file in memory.
llama_cpp_build llama-tokenize
"$PY" - "$G" "$LIB/llama-tokenize" "$WORK" "$LLAMA" <<'PYEOF'
import json, subprocess, sys
g, tokenize, work, llama = sys.argv[1:]
texts = [
    "Hello, World! 12345 and 3.14159; x=[1,2,3].",
    "  leading spaces, trailing  ",
    "lines\n\nand\r\nbreaks\n",
    "中文字符和日本語のかなカタカナ、한국어 텍스트",
    "Ελληνικά και кириллица, µ and Ａｂｃ full width",
    "code: fn main() { println!(\"{}\", a_b + 42); } // done",
    "mixed123abc 1234567890 ٣٤٥ ①②",
    "quotes 'single' \"double\" ‘curly’ — dash… end",
    # Runs of newlines (one piece each in V2, together in V3), a decomposed accent (no NFC).
    "end\n\n\n\nnext\n\n  \n",
    "cafe\u0301 and caf\u00e9",
]
out = {"texts": texts, "llama_cpp": {}}
for pre in ["deepseek-llm", "deepseek-v3"]:
    path = f"{work}/qwen2-vocab-{pre}.gguf"
    subprocess.run([sys.executable, f"{llama}/gguf-py/gguf/scripts/gguf_new_metadata.py", "--pre-tokenizer", pre, "--force",
                    f"{g}/qwen2-vocab.gguf", path], check=True, capture_output=True, env={"PYTHONPATH": f"{llama}/gguf-py"})
    ids = []
    for i, t in enumerate(texts):
        with open(f"{work}/text-{i}.txt", "w", encoding="utf-8", newline="") as f:
            f.write(t)
        r = subprocess.run([tokenize, "-m", path, "-f", f"{work}/text-{i}.txt", "--ids", "--no-bos", "--no-escape", "--log-disable"],
                           capture_output=True, text=True, check=True)
        ids.append(json.loads(r.stdout.strip().splitlines()[-1]))
    out["llama_cpp"][pre] = ids
json.dump(out, open(f"{g}/deepseek-pre-tokens.json", "w"), indent=1, ensure_ascii=False)
print(json.dumps(out["llama_cpp"])[:400])
PYEOF
ls -la "$Q" "$G"
