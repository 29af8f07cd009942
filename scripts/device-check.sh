#!/usr/bin/env bash
# Issue 14's device check: the whole test suite, the kernel benchmarks and a fixed set of
# `moegen bench` / `moegen plan` jobs on a real GPU's Vulkan driver, every figure in one file,
# within 10 minutes (each step is skipped once too little of the budget is left, and says so).
#
#   scripts/device-check.sh pack        here, with Rust: release binaries of moegen, every test
#                                       and the kernel benchmarks, stripped, into
#                                       target/device-pack.tar.xz (carry it; tests/fixtures and
#                                       assets travel with the working tree)
#   scripts/device-check.sh run OUTDIR  there: unpack (or build, where cargo exists), run it all,
#                                       write OUTDIR/device-check.txt and OUTDIR/hardware.json
#
# On the lent H200 (see /work/.library/device/README.md): fetch the Vulkan loader into .gl once
# as that README says, run `pack`, then one device `run` call with
#   carry: [".gl", "target/device-pack.tar.xz"], timeout_s: 600, command:
#   for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig; scripts/device-check.sh run "$OUT"
# and record OUT/device-check.txt's figures in BENCHMARKS.md, OUT/hardware.json as
# assets/hardware/h200.json.
# BUDGET_S (default 570) is the wall-clock budget in seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

pack() {
    set -e
    cargo build --release --locked --bin moegen
    local list=target/device-pack/list
    rm -rf target/device-pack && mkdir -p target/device-pack/bin
    # Every test and bench executable cargo builds, named by its target (lib, cli, kernels, ...).
    { cargo test --release --locked --no-run --message-format=json; cargo bench --locked --no-run --message-format=json; } 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] or (m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]):
        kind = "bench" if "bench" in m["target"]["kind"] else "test"
        name = "lib" if "lib" in m["target"]["kind"] else m["target"]["name"]
        print(kind, name, m["executable"])
' | sort -u >"$list"
    while read -r kind name exe; do
        cp "$exe" "target/device-pack/bin/$kind-$name"
    done <"$list"
    cp target/release/moegen target/device-pack/bin/moegen
    strip target/device-pack/bin/* 2>/dev/null || true
    # The tests find the binary and the fixtures where they were built.
    echo "$root" >target/device-pack/built_at
    git rev-parse --short HEAD >target/device-pack/commit
    tar -C target -cJf target/device-pack.tar.xz device-pack
    ls -l target/device-pack.tar.xz
}

run() {
    local out=${1:?usage: scripts/device-check.sh run OUTDIR}
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
    local report=$out/device-check.txt
    local budget=${BUDGET_S:-570}
    local start=$SECONDS
    : >"$report"
    say() { echo "$*" | tee -a "$report"; }
    left() { echo $((budget - (SECONDS - start))); }
    # step NAME SECONDS_NEEDED TIMEOUT CMD...: runs CMD with its output in the report, unless
    # fewer than SECONDS_NEEDED of the budget are left.
    step() {
        local name=$1 need=$2 limit=$3
        shift 3
        if [ "$(left)" -lt "$need" ]; then
            say "=== $name: SKIPPED ($(left) s of the budget left, needs about $need)"
            return
        fi
        [ "$limit" -gt "$(left)" ] && limit=$(left)
        say "=== $name ($*)"
        local t0=$SECONDS
        timeout -k 5 "$limit" "$@" >>"$report" 2>&1
        local rc=$?
        say "=== $name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
    }

    # The binaries: built here where cargo exists, else the pack.
    local bin
    if command -v cargo >/dev/null; then
        cargo build --release --locked --bin moegen || exit 1
        bin=$root/target/release
        say "built here: $(git rev-parse --short HEAD 2>/dev/null)"
    else
        [ -f target/device-pack.tar.xz ] || { echo "no cargo here and no target/device-pack.tar.xz (run 'pack' first and carry it)" >&2; exit 1; }
        tar -C target -xJf target/device-pack.tar.xz
        bin=$root/target/device-pack/bin
        local built_at
        built_at=$(cat target/device-pack/built_at)
        # The test binaries look for the repository (fixtures, the moegen binary) where they were
        # built: make that path lead here.
        if [ "$built_at" != "$root" ]; then
            mkdir -p "$(dirname "$built_at")" "$root/target/release"
            [ -e "$built_at" ] || ln -s "$root" "$built_at"
        fi
        mkdir -p "$root/target/release"
        cp "$bin/moegen" "$root/target/release/moegen"
        say "pack of commit $(cat target/device-pack/commit)"
    fi
    export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} XDG_CACHE_HOME=$out/cache MOEGEN_DEVICE=gpu
    # The lent machine's NVIDIA driver registers its Vulkan ICD where the loader does not look:
    # point the loader at it whenever it is there (the test of both system folders that stood
    # here was true whenever either held no file, which is what it relied on).
    if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
        export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    fi
    say "date: $(date -u +%F\ %T) UTC; host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | sed 's/^/gpu: /' | tee -a "$report"

    step "adapters" 30 30 "$bin/moegen" devices
    # Calibration (kernel tuning included), once with the default kernels and once with the
    # experimental ones allowed, so the tuning may pick cooperative matrices and subgroup
    # attention; the second profile is the hardware file.
    step "calibrate, default kernels" 60 120 "$bin/moegen" plan --synthetic ci-small
    step "calibrate, experimental kernels allowed" 60 120 env MOEGEN_EXPERIMENTAL=all "$bin/moegen" plan --synthetic ci-small
    local profile
    profile=$(ls -t "$XDG_CACHE_HOME"/moegen/hardware/*coop*.json 2>/dev/null | head -1)
    [ -n "$profile" ] || profile=$(ls -t "$XDG_CACHE_HOME"/moegen/hardware/*.json 2>/dev/null | head -1)
    if [ -n "$profile" ]; then
        cp "$profile" "$out/hardware.json"
        say "hardware profile: $out/hardware.json (from $profile)"
        python3 -c 'import json,sys; p=json.load(open(sys.argv[1])); print("kernel tuning:", json.dumps(p.get("kernels")))' "$profile" | tee -a "$report"
    fi

    # The kernel figures: matmul at 1/16/256/2048 tokens with and without cooperative matrices,
    # decode attention (both variants where subgroups exist).
    if [ -x "$bin/bench-kernels" ]; then
        step "kernel benchmarks" 120 240 env MOEGEN_EXPERIMENTAL=all MOEGEN_BENCH_QUICK=1 "$bin/bench-kernels" matmul attention latent
    else
        step "kernel benchmarks" 120 300 env MOEGEN_EXPERIMENTAL=all MOEGEN_BENCH_QUICK=1 cargo bench --locked --bench kernels -- matmul attention latent
    fi

    # The test suite on the device's adapter: the kernel tests allow the experimental kernels
    # themselves (they are checked against the CPU reference there); the rest run the defaults.
    for t in lib moegen shaders kernels tokenizers chat quality models cli; do
        if [ -x "$bin/test-$t" ]; then
            step "tests: $t" 20 300 "$bin/test-$t" --test-threads 4
        fi
    done
    command -v cargo >/dev/null && step "tests: cargo test" 120 400 cargo test --release --locked

    # moegen bench: the default model; a streamed Mixtral-shaped preset under every policy with
    # the real link; then the planner's figures from the measured profile.
    step "bench: default model" 30 90 "$bin/moegen" bench --model assets/default-model --sequences 64 --prompt-len 16 --new-tokens 64 --batching all --json
    step "bench: mixtral-small streamed, every policy" 60 150 "$bin/moegen" bench --synthetic mixtral-small --gpu-memory 1536KiB --sequences 512 --prompt-len 32 --new-tokens 16 --batching all --attention gpu,host --json
    step "bench: mixtral-small streamed, experimental kernels" 60 120 env MOEGEN_EXPERIMENTAL=all "$bin/moegen" bench --synthetic mixtral-small --gpu-memory 1536KiB --sequences 512 --prompt-len 32 --new-tokens 16 --batching module --attention host --json
    # Q4_K experts with f32 compute, then with 8-bit inputs on dot4I8Packed (--gpu-compute int8),
    # the same job: where the packed dot product pays on this GPU.
    for compute in f32 int8; do
        step "bench: mixtral-256 Q4_K experts, --gpu-compute $compute" 30 90 "$bin/moegen" --gpu-compute "$compute" bench --synthetic mixtral-256 --sequences 512 --prompt-len 32 --new-tokens 16 --batching module --quantize q4_k --json
    done
    if [ -n "${profile:-}" ]; then
        step "plan: Mixtral-8x7B on the measured profile" 10 30 "$bin/moegen" plan --synthetic mixtral-8x7b --hardware "$out/hardware.json" --host-memory 120GiB --sequences 4096 --prompt-len 512 --new-tokens 256
        step "plan: DeepSeek-V3 on the measured profile" 10 30 "$bin/moegen" plan --synthetic deepseek-v3 --hardware "$out/hardware.json" --host-memory 1TiB --sequences 4096 --prompt-len 512 --new-tokens 256
    fi
    # Mixtral-8x7B's real shapes streamed from host memory, if the host can hold its 87 GiB.
    local avail
    avail=$(awk '/MemAvailable/ {printf "%d", $2/1048576}' /proc/meminfo)
    if [ "$avail" -ge 100 ]; then
        step "bench: mixtral-8x7b, 24 GiB budget" 240 "$(left)" "$bin/moegen" bench --synthetic mixtral-8x7b --gpu-memory 24GiB --sequences 256 --prompt-len 64 --new-tokens 16 --batching module --json
    else
        say "=== bench: mixtral-8x7b: SKIPPED (${avail} GiB of host memory available, needs about 100)"
    fi
    say "=== done in $((SECONDS - start)) s"
}

case "${1:-}" in
pack) pack ;;
run) shift; run "$@" ;;
*) echo "usage: scripts/device-check.sh pack | run OUTDIR" >&2; exit 2 ;;
esac
