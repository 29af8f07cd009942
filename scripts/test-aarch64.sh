#!/usr/bin/env bash
# The CPU kernels' tests on aarch64, where detection picks the NEON paths: the library's CPU
# kernel and block-format unit tests cross-compiled for aarch64-unknown-linux-gnu and run under
# qemu-aarch64 (user mode). With MOEGEN_AARCH64_JOB=1, also the default model's job on the CPU
# device under qemu against the same job run natively (another cross build: minutes).
# Installs what it needs when missing (the Rust target through rustup; Debian's qemu-user and
# aarch64 cross gcc). Run by scripts/test.sh; MOEGEN_SKIP_AARCH64=1 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${MOEGEN_SKIP_AARCH64:-0}" = 1 ] && { echo "aarch64 tests skipped (MOEGEN_SKIP_AARCH64=1)"; exit 0; }
[ "$(uname -m)" = aarch64 ] && { echo "on aarch64 already: cargo test runs the NEON paths natively"; exit 0; }
target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu
# Tools that cannot be installed (no package source, no rustup) leave the NEON paths untested,
# said loudly; a test that fails fails the run.
untested() { echo "WARNING: the NEON paths were NOT tested: $1" >&2; exit 0; }
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    sudo=""
    [ "$(id -u)" != 0 ] && sudo=sudo
    export DEBIAN_FRONTEND=noninteractive
    packages="qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
    $sudo apt-get install -y $packages >/dev/null 2>&1 \
        || { $sudo apt-get update >/dev/null && $sudo apt-get install -y $packages >/dev/null; } \
        || untested "could not install $packages"
fi
if ! rustup target list --installed 2>/dev/null | grep -x "$target" >/dev/null; then
    timeout 600 rustup target add "$target" || untested "could not add the Rust target $target (rustup)"
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $sysroot"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# Optimised as the release build is (the tests' shapes are small; qemu is slow on debug code).
cargo test --locked --release --target "$target" --lib -- cpu:: quant::
[ "${MOEGEN_AARCH64_JOB:-0}" = 1 ] || exit 0
# The default job end to end on the CPU device with the NEON kernels: the same tokens as here.
dir=$(mktemp -d)
cargo build --locked --release --target "$target" --bin moegen
cargo build --locked --release --bin moegen
for m in native aarch64; do
    bin=target/release/moegen
    [ $m = aarch64 ] && bin="qemu-aarch64 -L $sysroot target/$target/release/moegen"
    $bin --device cpu generate --input assets/prompts.jsonl --model assets/default-model --output "$dir/$m.jsonl" --quiet
done
python3 - "$dir/native.jsonl" "$dir/aarch64.jsonl" <<'PYEOF'
import json, sys
a, b = ([json.loads(l) for l in open(p)] for p in sys.argv[1:])
ids = lambda rows: {str(r["id"]): r["output_ids"] for r in rows}
assert ids(a) == ids(b), "the NEON paths' tokens differ from this machine's"
print(f"aarch64 (NEON) default job: {sum(map(len, ids(b).values()))} tokens, the same as native")
PYEOF
