#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU (sized for one H100 80GB, under 8 minutes in all):
#   1. `bench gpu --scale real`: one training step of Heima (11B mllama + LoRA), LaViT (Qwen2.5-VL-3B, K=4, gate +
#      recorder) and LaRe (CLIP-L + Qwen2.5-1.5B, T=4), and LaViT's teacher pass (Qwen2.5-VL-7B), random weights
#      at real size in bf16: one JSON line per case (peak memory, step time, tokens/s);
#   2. every other bench on CUDA (`bench <name> --device cuda --json`).
# Each command has its own time limit; a failure is reported and the check goes on. At the end the commands that
# failed are listed, and the exit status is 1 if any did.
#
#   bash apps/gpu_check.sh                                  # from anywhere; runs in the repository root
#   GPU_CHECK_GPU_TIMEOUT=300 GPU_CHECK_BENCH_TIMEOUT=60 UV_RUN="uv run --offline" bash apps/gpu_check.sh
#
# A bench registered under `bench_app` in apps/src/latent_apps/cli.py must be listed in BENCHES (a test checks it).
set -u
cd "$(dirname "$0")/.." || exit 2

UV_RUN=${UV_RUN:-uv run}
GPU_TIMEOUT=${GPU_CHECK_GPU_TIMEOUT:-230}  # seconds for `bench gpu` (four real-size models, built one at a time)
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-35}  # seconds for each other bench
BENCHES=(latent-loop latent-train lare-loop lavit-teacher attention-capture gating)

failed=()

check() {  # check LIMIT ARGS...: run `apps/cli ARGS...` for at most LIMIT seconds; record a failure
    local limit=$1
    shift
    local start=$SECONDS
    echo "== apps/cli $* (limit ${limit} s)"
    # shellcheck disable=SC2086  # UV_RUN is a command line: split it into words
    timeout --kill-after=5 "$limit" $UV_RUN apps/cli "$@"
    local status=$?
    local took=$((SECONDS - start))
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        failed+=("$* (timed out after ${limit} s)")
    elif [ "$status" -ne 0 ]; then
        failed+=("$* (exit status $status)")
    fi
    echo "== apps/cli $*: exit status $status after ${took} s"
}

check "$GPU_TIMEOUT" bench gpu --scale real --device cuda --json
for name in "${BENCHES[@]}"; do
    check "$BENCH_TIMEOUT" bench "$name" --device cuda --json
done

echo "== gpu check: $((1 + ${#BENCHES[@]})) commands in ${SECONDS} s"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "== FAILED (${#failed[@]}):"
    printf '   %s\n' "${failed[@]}"
    exit 1
fi
echo "== all passed"
