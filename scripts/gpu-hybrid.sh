#!/usr/bin/env bash
# Hybrid models (issue 11) in real vLLM on the offline H200: tests/e2e/gpu_hybrid.py
# with the vLLM 0.25.0 bundle of ../shared/gpu-vllm, in one command. It checks
# what the CPU suite (tests/e2e/test_vllm_hybrid.py) cannot: CUDA copies of
# several KV cache groups (one KvCache per group, saves fenced across groups),
# 16-token blocks with checkpoints inside long prompts, and a Mamba model
# (Jamba's shape) running with the connector.
#
# Here, once per change of the owner or pegaflow-py (the same staging as the
# TTFT benchmark: owner, pegaflow wheel, bundle and setup.sh in .vbundle/):
#   scripts/gpu-ttft.sh --stage
# There (device tool; .vbundle/ is git-ignored, so carry it):
#   run(kind="nvidia-h200", timeout_s=600, carry=[".vbundle"],
#       command="scripts/gpu-hybrid.sh")
# Arguments go to gpu_hybrid.py (--only gemma3 | --only jamba).
#
# $OUT gets hybrid.log (one PASS/FAIL line per check), hybrid.json and
# hybrid-logs.tar.gz (every vLLM's log and the owner's).
set -euo pipefail
cd "$(dirname "$0")/.."
B=.vbundle
BUNDLE=$B/vllm-0.25.0-h200-py312.tar.xz

run() {
    local t0=$SECONDS rc=0 PY=/opt/torch/.venv/bin/python3
    [[ -x $PY ]] || PY=python3
    if [[ ! -f "$BUNDLE" || ! -x "$B/pegaflow-owner" ]] || ! ls "$B"/pegaflow-*.whl >/dev/null 2>&1; then
        echo "missing $BUNDLE, $B/pegaflow-owner or the pegaflow wheel: run scripts/gpu-ttft.sh --stage here and carry .vbundle"
        return 1
    fi
    # A warm machine keeps /tmp between calls: unpack only once.
    if [[ ! -f /tmp/vllm-site/.from-$(basename "$BUNDLE") ]]; then
        bash "$B/setup.sh" "$BUNDLE" >/dev/null
        touch "/tmp/vllm-site/.from-$(basename "$BUNDLE")"
    fi
    rm -rf /tmp/pega-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/pega-site "$B"/pegaflow-*.whl
    export PYTHONPATH=/tmp/pega-site:/tmp/vllm-site
    export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
    unset PYTHONHASHSEED
    echo "setup took $((SECONDS - t0)) s"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    # Inside the 10-minute limit of one command, with time left to pack the logs.
    timeout -k 10 540 "$PY" tests/e2e/gpu_hybrid.py --owner-bin "$PWD/$B/pegaflow-owner" \
        --workdir "$WORK" --json-out "$OUT/hybrid.json" "$@" || rc=$?
    tar -czf "$OUT/hybrid-logs.tar.gz" -C "$WORK" --exclude '*.safetensors' . 2>/dev/null || true
    echo "gpu-hybrid: exit $rc after $((SECONDS - t0)) s"
    return $rc
}

OUT=${OUT:-/tmp/hybrid-out}
WORK=/tmp/hybrid-work
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK"
run "$@" 2>&1 | tee "$OUT/hybrid.log"
exit "${PIPESTATUS[0]}"
