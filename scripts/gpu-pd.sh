#!/usr/bin/env bash
# Prefill/decode disaggregation on two GPUs of one host (benches/pd/pd_bench.py)
# with the vLLM 0.25.0 bundle of ../shared/gpu-vllm, in one command:
# pegaflow-owner, vLLM kv_producer on GPU0, kv_consumer on GPU1 and
# pegaflow-router; tokens checked against a single instance; then 1P+1D
# against DP2 at a steady rate. Before the bench, tests/e2e/gpu_pd_direct.py
# checks the direct GPU-to-GPU hand-over byte for byte between two processes
# (PD_SKIP_BYTES=1 skips it). docs/pd.md and docs/benchmarks.md say more.
#
# Here (PyPI reachable), once per change of the owner or pegaflow-py:
#   bash ../shared/gpu-vllm/build_bundle.sh .vbundle/vllm-0.25.0-h200-py312.tar.xz   # ~2 min, once
#   scripts/gpu-pd.sh --stage     # owner (release, stripped), pegaflow wheel, setup.sh,
#                                 # aiohttp wheels (in case the machine lacks them)
# There (device tool, a machine with 2 GPUs; .vbundle/ is git-ignored, so carry it):
#   run(kind="nvidia-h200-x2", timeout_s=600, carry=[".vbundle"], command="scripts/gpu-pd.sh")
# Arguments after the script name go to pd_bench.py (e.g. --rate 3 --requests 120).
# PD_BUNDLE_DIR: where the staged files are (default .vbundle, relative to the
# checkout that holds this script).
#
# $OUT gets pd.log (the table), pd.json and pd-logs.tar.gz (every server's log).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${PD_BUNDLE_DIR:-.vbundle}
BUNDLE=$B/vllm-0.25.0-h200-py312.tar.xz

if [[ "${1:-}" == "--stage" ]]; then
    shift
    VENV="${PEGAFLOW_VENV:-$PWD/.venv}"
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
    mkdir -p "$B" "$B/extra-wheels"
    [[ -f "$BUNDLE" ]] || echo "note: $BUNDLE missing: bash ../shared/gpu-vllm/build_bundle.sh $BUNDLE" >&2
    cp ../shared/gpu-vllm/setup.sh "$B/setup.sh" 2>/dev/null ||
        [[ -f "$B/setup.sh" ]] || { echo "copy ../shared/gpu-vllm/setup.sh to $B/" >&2; exit 1; }
    cargo build --release -p pegaflow-owner --bin pegaflow-owner
    cp "$CARGO_TARGET_DIR/release/pegaflow-owner" "$B/pegaflow-owner"
    strip "$B/pegaflow-owner" 2>/dev/null || true
    rm -f "$B"/pegaflow-*.whl
    (cd pegaflow-py && "$VENV/bin/maturin" build --release -q -i "$VENV/bin/python" -o "../$B" >&2)
    # the router's HTTP library: a vLLM dependency, carried in case the
    # machine's Python lacks it (installed there only if `import aiohttp` fails)
    ls "$B"/extra-wheels/aiohttp-*.whl >/dev/null 2>&1 ||
        for pkg in aiohttp==3.14.5 multidict==7.2.1 yarl==1.25.1 propcache==0.5.4 frozenlist==1.8.0 \
                   aiosignal==1.4.0 aiohappyeyeballs==2.7.1 attrs==26.1.0; do
            "$VENV/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 \
                --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
                --platform manylinux2014_x86_64 -d "$B/extra-wheels" "$pkg"
        done
    ls -l "$B" >&2
    du -sh "$B" >&2
    exit 0
fi

run() {
    local t0=$SECONDS rc=0 PY=/opt/torch/.venv/bin/python3
    [[ -x $PY ]] || PY=python3
    if [[ ! -f "$BUNDLE" || ! -x "$B/pegaflow-owner" ]]; then
        echo "missing $BUNDLE or $B/pegaflow-owner: run scripts/gpu-pd.sh --stage here and carry $B"
        return 1
    fi
    if [[ ! -f /tmp/vllm-site/.from-$(basename "$BUNDLE") ]]; then
        bash "$B/setup.sh" "$BUNDLE" >/dev/null
        touch "/tmp/vllm-site/.from-$(basename "$BUNDLE")"
    fi
    rm -rf /tmp/pega-site /tmp/pd-extra-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/pega-site "$B"/pegaflow-*.whl
    export PYTHONPATH=/tmp/pega-site:/tmp/vllm-site
    if ! "$PY" -c "import aiohttp" 2>/dev/null; then
        echo "aiohttp missing: installing the carried wheels"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/pd-extra-site "$B"/extra-wheels/*.whl
        export PYTHONPATH=$PYTHONPATH:/tmp/pd-extra-site
    fi
    export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
    # NVLink multicast stays off (the machine's rule; vLLM's NCCL would not use it with TP 1 anyway)
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    unset PYTHONHASHSEED
    echo "setup took $((SECONDS - t0)) s"
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || true
    nvidia-smi topo -m 2>/dev/null | head -4 || true
    echo "cores: $(nproc), memory: $(free -g | awk '/Mem:/{print $2}') GiB;" \
        "/dev/shm: $(df -h /dev/shm | awk 'NR==2{print $4}') free"
    "$PY" -c "import torch; assert torch.cuda.device_count() >= 2, 'needs 2 GPUs'"

    if [[ "${PD_SKIP_BYTES:-0}" != 1 ]]; then
        # the direct hand-over byte for byte between two processes (tests/e2e/gpu_pd_direct.py)
        timeout -k 10 300 "$PY" tests/e2e/gpu_pd_direct.py --owner-bin "$PWD/$B/pegaflow-owner" || rc=$?
        [[ $rc == 0 ]] || { echo "gpu-pd: the direct hand-over test failed (exit $rc)"; return $rc; }
    fi

    timeout -k 10 "${PD_TIMEOUT:-540}" "$PY" benches/pd/pd_bench.py --attention-backend TRITON_ATTN \
        --owner-bin "$PWD/$B/pegaflow-owner" --workdir "$WORK" --json-out "$OUT/pd.json" "$@" || rc=$?
    tar -czf "$OUT/pd-logs.tar.gz" -C "$WORK" --exclude '*.sock' . 2>/dev/null || true
    echo "gpu-pd: exit $rc after $((SECONDS - t0)) s"
    return $rc
}

OUT=${OUT:-/tmp/pd-out}
WORK=/tmp/pd-work
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK"
run "$@" 2>&1 | tee "$OUT/pd.log"
exit "${PIPESTATUS[0]}"
