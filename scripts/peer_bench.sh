#!/usr/bin/env bash
# The CPU peers on moegen's CPU benchmark job, side by side in one run: llama.cpp's CPU backend
# built from source (the sources vendored in llama-cpp-python's source distribution on PyPI,
# pinned below with its hash), transformers' `generate`, and `moegen bench --device cpu`, all on
# the same checkpoint (scripts/make_bench_model.py: Mixtral architecture, ~800 M parameters,
# random weights, the real Mixtral tokenizer, bf16; llama.cpp reads it converted to a bf16 GGUF
# by its own convert_hf_to_gguf.py).
#
#   scripts/peer_bench.sh            # WORK=/tmp/moegen-peer, THREADS=$(nproc), 64 x (32 + 32)
#   CPU_ISA=avx2 scripts/peer_bench.sh   # both engines as on a CPU without AVX-512
#
# Everything it builds and downloads goes under $WORK; the figures go to $WORK/results.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

THREADS=${THREADS:-$(nproc)}
SEQS=${SEQS:-64}
PROMPT=${PROMPT:-32}
NEW=${NEW:-32}
source scripts/llama_cpp.sh
RESULTS="$WORK/results.txt"
PY="$WORK/venv/bin/python"

# The checkpoint.
if [ ! -f "$WORK/model/config.json" ]; then
    "$PY" scripts/make_bench_model.py "$WORK/model"
fi
llama_cpp_build llama-batched-bench llama-quantize

GGUF="$WORK/model-bf16.gguf"
if [ ! -f "$GGUF" ]; then
    PYTHONPATH="$LLAMA/gguf-py" "$PY" "$LLAMA/convert_hf_to_gguf.py" "$WORK/model" --outtype bf16 --outfile "$GGUF" >"$WORK/convert.log" 2>&1
fi

# Quantised: the same GGUF files read by both (llama-quantize from the bf16 GGUF), Q8_0 and
# Q4_K_M (what most users hold: Q4_K, with Q6_K for some tensors).
QUANTS=${QUANTS:-Q8_0 Q4_K_M}
for q in $QUANTS; do
    [ -f "$WORK/model-$q.gguf" ] || "$BUILD/bin/llama-quantize" "$GGUF" "$WORK/model-$q.gguf" "$q" >"$WORK/quantize-$q.log" 2>&1
done

cargo build --release --locked

{
    echo "# $(date -u +%F) $(uname -m), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $THREADS threads${CPU_ISA:+, both engines limited to $CPU_ISA}"
    echo "# moegen $(git rev-parse --short HEAD), llama.cpp from llama-cpp-python $LLAMA_CPP_PYTHON, torch $TORCH, transformers $TRANSFORMERS"
    echo "# job: $SEQS sequences x ($PROMPT prompt + $NEW new) tokens, greedy"
    echo
    echo "## llama.cpp CPU: llama-batched-bench -npp $PROMPT -ntg $NEW -npl $SEQS -t $THREADS"
    "$BUILD/bin/llama-batched-bench" -m "$GGUF" -c $((SEQS * (PROMPT + NEW) + 64)) -b 2048 -ub 512 \
        -npp "$PROMPT" -ntg "$NEW" -npl "$SEQS" -t "$THREADS" -tb "$THREADS" 2>/dev/null
    echo
    echo "## transformers CPU generate"
    "$PY" scripts/transformers_generate.py "$WORK/model" "$SEQS" "$PROMPT" "$NEW" "$THREADS" 2>/dev/null
    echo
    echo "## moegen --device cpu bench"
    RAYON_NUM_THREADS=$THREADS target/release/moegen --device cpu bench --model "$WORK/model" --sequences "$SEQS" \
        --prompt-len "$PROMPT" --new-tokens "$NEW" --batching all 2>&1 | grep -v "^\s*$"
    # With bf16 products where the CPU has AVX512-BF16 (what torch and llama.cpp multiply in there).
    if cpu_has avx512_bf16; then
        echo
        echo "## moegen --device cpu --cpu-compute bf16 bench"
        RAYON_NUM_THREADS=$THREADS target/release/moegen --device cpu --cpu-compute bf16 bench --model "$WORK/model" --sequences "$SEQS" \
            --prompt-len "$PROMPT" --new-tokens "$NEW" --batching all 2>&1 | grep -v "^\s*$"
    fi
    for q in $QUANTS; do
        echo
        echo "## llama.cpp CPU, $q GGUF"
        "$BUILD/bin/llama-batched-bench" -m "$WORK/model-$q.gguf" -c $((SEQS * (PROMPT + NEW) + 64)) -b 2048 -ub 512 \
            -npp "$PROMPT" -ntg "$NEW" -npl "$SEQS" -t "$THREADS" -tb "$THREADS" 2>/dev/null || echo "llama.cpp failed on $q"
        echo
        echo "## moegen --device cpu bench, the same $q GGUF"
        RAYON_NUM_THREADS=$THREADS target/release/moegen --device cpu bench --model "$WORK/model-$q.gguf" --sequences "$SEQS" \
            --prompt-len "$PROMPT" --new-tokens "$NEW" --batching all 2>&1 | grep -v "^\s*$"
        # With int8 products over the K formats (AVX512-VNNI, else AVX2; llama.cpp's numerics: it
        # quantises the inputs of these matmuls to 8 bits per 256 too).
        if [[ $q == *K* ]] && { cpu_has avx512_vnni || cpu_has avx2; }; then
            echo
            echo "## moegen --device cpu --cpu-compute int8 bench, the same $q GGUF"
            RAYON_NUM_THREADS=$THREADS target/release/moegen --device cpu --cpu-compute int8 bench --model "$WORK/model-$q.gguf" --sequences "$SEQS" \
                --prompt-len "$PROMPT" --new-tokens "$NEW" --batching all 2>&1 | grep -v "^\s*$"
        fi
    done
} | tee "$RESULTS"
echo "figures in $RESULTS (commit them to BENCHMARKS.md with the machine and date)" >&2
