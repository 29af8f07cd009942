#!/usr/bin/env bash
# The CPU peers on moegen's CPU benchmark job, side by side in one run: llama.cpp's CPU backend
# built from source (the sources vendored in llama-cpp-python's source distribution on PyPI,
# pinned below with its hash), transformers' `generate`, and `moegen bench --device cpu`, all on
# the same checkpoint (scripts/make_bench_model.py: Mixtral architecture, ~800 M parameters,
# random weights, the real Mixtral tokenizer, bf16; llama.cpp reads it converted to a bf16 GGUF
# by its own convert_hf_to_gguf.py).
#
#   scripts/peer_bench.sh            # WORK=/tmp/moegen-peer, THREADS=$(nproc), 64 x (32 + 32)
#
# Everything it builds and downloads goes under $WORK; the figures go to $WORK/results.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

WORK=${WORK:-/tmp/moegen-peer}
THREADS=${THREADS:-$(nproc)}
SEQS=${SEQS:-64}
PROMPT=${PROMPT:-32}
NEW=${NEW:-32}
LLAMA_CPP_PYTHON=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
TORCH=2.15.0
TRANSFORMERS=5.23.0
mkdir -p "$WORK"
RESULTS="$WORK/results.txt"

# Python: the pinned torch and transformers (torch from PyPI is the CUDA build; it runs on the CPU).
if [ ! -x "$WORK/venv/bin/python" ]; then
    python3 -m venv "$WORK/venv"
fi
"$WORK/venv/bin/pip" install -q "torch==$TORCH" "transformers==$TRANSFORMERS" numpy sentencepiece safetensors protobuf cmake
PY="$WORK/venv/bin/python"

# The checkpoint.
if [ ! -f "$WORK/model/config.json" ]; then
    "$PY" scripts/make_bench_model.py "$WORK/model"
fi

# llama.cpp's sources, from the sdist on PyPI (the simple index gives its address), checked.
SRC="$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    url=$(curl -fsSL https://pypi.org/simple/llama-cpp-python/ | grep -o "https://[^\"#]*llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" | head -1)
    curl -fsSL -o "$WORK/sdist.tar.gz" "$url"
    echo "$LLAMA_CPP_PYTHON_SHA256  $WORK/sdist.tar.gz" | sha256sum -c -
    tar xzf "$WORK/sdist.tar.gz" -C "$WORK"
fi
LLAMA="$SRC/vendor/llama.cpp"

# The CPU backend only, for the instructions this CPU has. Not -march=native: some machines
# advertise AMX that traps when used (llama.cpp's Q8_0 path dies with Illegal instruction).
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
BUILD="$WORK/llama-build"
PATH="$WORK/venv/bin:$PATH" cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) \
    -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AVX512_VNNI=$(has avx512_vnni) \
    -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF >"$WORK/cmake.log"
PATH="$WORK/venv/bin:$PATH" cmake --build "$BUILD" --target llama-batched-bench -j "$(nproc)" >"$WORK/build.log"

GGUF="$WORK/model-bf16.gguf"
if [ ! -f "$GGUF" ]; then
    PYTHONPATH="$LLAMA/gguf-py" "$PY" "$LLAMA/convert_hf_to_gguf.py" "$WORK/model" --outtype bf16 --outfile "$GGUF" >"$WORK/convert.log" 2>&1
fi

cargo build --release --locked

{
    echo "# $(date -u +%F) $(uname -m), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $THREADS threads"
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
} | tee "$RESULTS"
echo "figures in $RESULTS (commit them to BENCHMARKS.md with the machine and date)" >&2
