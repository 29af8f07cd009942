# Sourced by the scripts that need llama.cpp: the pinned Python environment (torch, transformers)
# and llama.cpp built from the sources vendored in llama-cpp-python's source distribution on PyPI
# (its address from the simple index, its hash checked). Everything goes under $WORK.
#
#   source scripts/llama_cpp.sh; llama_cpp_build llama-quantize ...   # then $PY, $LLAMA, $BUILD
LLAMA_CPP_PYTHON=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
TORCH=2.15.0
TRANSFORMERS=5.23.0
WORK=${WORK:-/tmp/moegen-peer}
mkdir -p "$WORK"

# Python: the pinned torch and transformers (torch from PyPI is the CUDA build; it runs on the CPU).
if [ ! -x "$WORK/venv/bin/python" ]; then
    python3 -m venv "$WORK/venv"
fi
"$WORK/venv/bin/pip" install -q "torch==$TORCH" "transformers==$TRANSFORMERS" numpy sentencepiece safetensors protobuf cmake
PY="$WORK/venv/bin/python"

SRC="$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    url=$(curl -fsSL https://pypi.org/simple/llama-cpp-python/ | grep -o "https://[^\"#]*llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" | head -1)
    curl -fsSL -o "$WORK/sdist.tar.gz" "$url"
    echo "$LLAMA_CPP_PYTHON_SHA256  $WORK/sdist.tar.gz" | sha256sum -c -
    tar xzf "$WORK/sdist.tar.gz" -C "$WORK"
fi
LLAMA="$SRC/vendor/llama.cpp"
# CPU_ISA=avx2 builds (and the peer scripts run) both engines as on a CPU without AVX-512: llama.cpp
# with its AVX-512 flags off (in a build directory of its own), moegen with MOEGEN_CPU_ISA=avx2,
# torch with ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2.
CPU_ISA=${CPU_ISA:-}
BUILD="$WORK/llama-build${CPU_ISA:+-$CPU_ISA}"
if [ -n "$CPU_ISA" ]; then
    export MOEGEN_CPU_ISA="$CPU_ISA"
    # torch too: its own kernels and oneDNN's (bf16 matmuls) kept to the same instructions.
    export ATEN_CPU_CAPABILITY="$CPU_ISA" ONEDNN_MAX_CPU_ISA="${CPU_ISA^^}"
fi
# Whether this CPU has instruction-set feature $1 (as /proc/cpuinfo names it), for both engines:
# none of AVX-512's under CPU_ISA=avx2.
cpu_has() {
    if [ "$CPU_ISA" = avx2 ] && [[ $1 == avx512* ]]; then
        return 1
    fi
    grep -qw "$1" /proc/cpuinfo
}

# The CPU backend only, for the instructions this CPU has. Not -march=native: some machines
# advertise AMX that traps when used (llama.cpp's Q8_0 path dies with Illegal instruction).
llama_cpp_build() {
    local flags
    has() { cpu_has "$1" && echo ON || echo OFF; }
    PATH="$WORK/venv/bin:$PATH" cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
        -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) \
        -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AVX512_VNNI=$(has avx512_vnni) \
        -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
        -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF >"$WORK/cmake.log"
    PATH="$WORK/venv/bin:$PATH" cmake --build "$BUILD" --target "$@" -j "$(nproc)" >"$WORK/build.log"
}
