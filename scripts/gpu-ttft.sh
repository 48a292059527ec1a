#!/usr/bin/env bash
# The TTFT benchmark (benches/ttft/ttft_bench.py) on the offline H200 with the
# vLLM 0.25.0 bundle of ../shared/gpu-vllm, in one command. docs/benchmarks.md
# ("TTFT inside vLLM") says what it measures.
#
# Here (PyPI reachable), once per change of the owner or pegaflow-py:
#   bash ../shared/gpu-vllm/build_bundle.sh .vbundle/vllm-0.25.0-h200-py312.tar.xz   # ~2 min, once
#   scripts/gpu-ttft.sh --stage      # owner (release, stripped), pegaflow wheel, setup.sh,
#                                    # and the original PegaFlow's wheel for the peer phase
# There (device tool; .vbundle/ is git-ignored, so carry it):
#   run(kind="nvidia-h200", timeout_s=600, carry=[".vbundle"],
#       command="scripts/gpu-ttft.sh")
#   run(kind="nvidia-h200-x2", ..., command="scripts/gpu-ttft.sh --tp 2")     # tensor parallelism 2
# Arguments after the script name go to ttft_bench.py (e.g. --phases base,pega
# --copy-backend dma). TTFT_DECODE=0 leaves out the decode phases.
#
# $OUT gets ttft.log (the table), ttft.json (the JSON line) and
# ttft-logs.tar.gz (every phase's vLLM log, the owner's log, the specs).
set -euo pipefail
cd "$(dirname "$0")/.."
B=.vbundle
BUNDLE=$B/vllm-0.25.0-h200-py312.tar.xz

if [[ "${1:-}" == "--stage" ]]; then
    shift
    VENV="${PEGAFLOW_VENV:-$PWD/.venv}"
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
    mkdir -p "$B"
    [[ -f "$BUNDLE" ]] || echo "note: $BUNDLE missing: bash ../shared/gpu-vllm/build_bundle.sh $BUNDLE" >&2
    cp ../shared/gpu-vllm/setup.sh "$B/setup.sh" 2>/dev/null ||
        [[ -f "$B/setup.sh" ]] || { echo "copy ../shared/gpu-vllm/setup.sh to $B/" >&2; exit 1; }
    cargo build --release -p pegaflow-owner --bin pegaflow-owner
    cp "$CARGO_TARGET_DIR/release/pegaflow-owner" "$B/pegaflow-owner"
    strip "$B/pegaflow-owner" 2>/dev/null || true
    "$PWD/scripts/py-env.sh" --env-only  # invoked as scripts/py-test.sh does: its stamp hashes the path
    rm -f "$B"/pegaflow-*.whl
    (cd pegaflow-py && "$VENV/bin/maturin" build --release -q -i "$VENV/bin/python" -o "../$B" >&2)
    # The original PegaFlow for the peer phase: its CUDA 13 build, for the
    # machine's Python 3.12 (its `pegaflow` package shadows ours in that phase only).
    ls "$B"/pegaflow_llm_cu13-0.25.1-*.whl >/dev/null 2>&1 ||
        "$VENV/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_34_x86_64 -d "$B" pegaflow-llm-cu13==0.25.1 ||
        echo "note: could not download pegaflow-llm-cu13==0.25.1; the peer phase will be skipped" >&2
    ls -l "$B" >&2
    du -sh "$B" >&2
    exit 0
fi

run() {
    local t0=$SECONDS rc=0 PY=/opt/torch/.venv/bin/python3
    [[ -x $PY ]] || PY=python3
    if [[ ! -f "$BUNDLE" || ! -x "$B/pegaflow-owner" ]]; then
        echo "missing $BUNDLE or $B/pegaflow-owner: run scripts/gpu-ttft.sh --stage here and carry .vbundle"
        return 1
    fi
    # A warm machine keeps /tmp between calls: unpack only once.
    if [[ ! -f /tmp/vllm-site/.from-$(basename "$BUNDLE") ]]; then
        bash "$B/setup.sh" "$BUNDLE" >/dev/null
        touch "/tmp/vllm-site/.from-$(basename "$BUNDLE")"
    fi
    rm -rf /tmp/pega-site /tmp/peer-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/pega-site "$B"/pegaflow-*.whl
    local peer=()
    if ls "$B"/pegaflow_llm_cu13-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/peer-site \
            "$B"/pegaflow_llm_cu13-*.whl
        peer=(--peer-site /tmp/peer-site)
    fi
    export PYTHONPATH=/tmp/pega-site:/tmp/vllm-site
    export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
    unset PYTHONHASHSEED
    echo "setup took $((SECONDS - t0)) s"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    echo "cores: $(nproc), memory: $(free -g | awk '/Mem:/{print $2}') GiB;" \
        "/dev/shm: $(df -h /dev/shm | awk 'NR==2{print $4}') free"

    local decode=(--decode)
    [[ "${TTFT_DECODE:-1}" == 0 ]] && decode=()
    # Inside the 10-minute limit of one command, with time left to pack the logs.
    timeout -k 10 530 "$PY" benches/ttft/ttft_bench.py --attention-backend TRITON_ATTN \
        --owner-bin "$PWD/$B/pegaflow-owner" "${peer[@]}" "${decode[@]}" \
        --workdir "$WORK" --json-out "$OUT/ttft.json" "$@" || rc=$?
    tar -czf "$OUT/ttft-logs.tar.gz" -C "$WORK" --exclude prompts.json . 2>/dev/null || true
    echo "gpu-ttft: exit $rc after $((SECONDS - t0)) s"
    return $rc
}

OUT=${OUT:-/tmp/ttft-out}
WORK=/tmp/ttft-work
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK"
run "$@" 2>&1 | tee "$OUT/ttft.log"
exit "${PIPESTATUS[0]}"
