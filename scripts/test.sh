#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: the GPU tests need a Vulkan adapter, so when no
# Vulkan driver is installed this installs Mesa's software one (llvmpipe) first, then runs
# `cargo test` (the CPU-device tests need nothing), then the CPU kernels' tests on aarch64 under
# qemu (scripts/test-aarch64.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

have_vulkan() {
    # Each place on its own: `ls` of both fails when either holds no driver file (Debian's
    # Mesa installs into /usr/share only), which made an installed driver look absent. grep
    # reads all of ldconfig's output (-q stops early; under pipefail a broken pipe would fail).
    { ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 || ls /etc/vulkan/icd.d/*.json >/dev/null 2>&1; } \
        && ldconfig -p | grep 'libvulkan\.so\.1' >/dev/null
}
if [ "$(uname -s)" = Linux ] && ! have_vulkan; then
    echo "No Vulkan driver found: installing Mesa's software Vulkan driver (mesa-vulkan-drivers)"
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "run as root, or install mesa-vulkan-drivers and libvulkan1 yourself" >&2; exit 1; }
        sudo=sudo
    fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update
    $sudo apt-get install -y mesa-vulkan-drivers libvulkan1
fi
# Mesa's window-system code complains without it; nothing here draws to a screen.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

# The OpenAI batch output is checked with the openai package's own types (pinned), in a venv
# under target/ made once.
venv=target/openai-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
    python3 -m venv "$venv" && "$venv/bin/pip" install --quiet openai==3.57.0 \
        || echo "warning: could not install the openai package; the OpenAI output check will be skipped" >&2
fi
if "$venv/bin/python" -c 'import openai' 2>/dev/null; then
    export MOEGEN_OPENAI_PYTHON="$PWD/$venv/bin/python"
fi

# Fails (non-zero) when no GPU adapter is found, instead of passing with the GPU untested.
cargo run --locked --quiet -- --device gpu devices
cargo test --locked "$@"
# Subgroups of other sizes than llvmpipe's default 8 (real GPUs have 32 or 64, and kernels must
# not assume one): the GPU kernels' tests again with llvmpipe's 128- and 512-bit vectors, which
# give subgroups of 4 and 16 (the variable means nothing to other drivers).
for width in 128 512; do
    LP_NATIVE_VECTOR_WIDTH=$width cargo test --locked --test kernels "$@"
done
# The whole-model int8 checks on the AVX2 path too (where Q8_0 and Q4_0 take 8-bit products);
# elsewhere than x86-64 the variable warns and the detected path runs again.
MOEGEN_CPU_ISA=avx2 cargo test --locked --test cpu_bf16_products "$@"
# The NEON paths, which this machine's CPU cannot run: cross-built and run under qemu-aarch64.
scripts/test-aarch64.sh
