#!/usr/bin/env bash
# The SSD tier on the GPU machine, in one command: the pip wheel installed
# there (scripts/wheel-test.sh), the tier's benchmark against the machine's
# raw disk (benches/src/bin/ssd_bench.rs), and hit rate / TTFT of a real
# vLLM 0.25 (the offline bundle of ../shared/gpu-vllm) with a working set
# three times the pool, with and without the tier
# (benches/ttft/ssd_workingset.py). docs/benchmarks.md records the results.
#
# Here (PyPI reachable), after each change of the owner or pegaflow-py:
#   scripts/gpu-ssd.sh --stage     # .carry-ssd/: ssd_bench (release) and the pip wheel
# There (device tool; both folders are git-ignored, so carry them):
#   run(kind="nvidia-h200", timeout_s=600, command="scripts/gpu-ssd.sh",
#       carry=[".carry-ssd", ".vbundle/vllm-0.25.0-h200-py312.tar.xz", ".vbundle/setup.sh"])
# GPU_SSD_PARTS=wheel,bench,workingset (default all) picks parts; extra
# arguments go to ssd_workingset.py. $OUT gets ssd.log and the JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
C=.carry-ssd
BUNDLE=.vbundle/vllm-0.25.0-h200-py312.tar.xz

if [[ "${1:-}" == "--stage" ]]; then
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
    mkdir -p "$C"
    rm -f "$C"/*.whl "$C"/pegaflow-owner
    cargo build --release -p pegaflow-benches --bin ssd_bench
    cp "$CARGO_TARGET_DIR/release/ssd_bench" "$C/ssd_bench"
    strip "$C/ssd_bench" 2>/dev/null || true
    scripts/build-wheel.sh "$PWD/$C" >/dev/null
    [[ -f $BUNDLE ]] || echo "note: $BUNDLE missing: bash ../shared/gpu-vllm/build_bundle.sh $BUNDLE" >&2
    ls -l "$C" >&2
    du -sh "$C" >&2
    exit 0
fi

OUT=${OUT:-/tmp/gpu-ssd-out}
mkdir -p "$OUT"
PARTS=",${GPU_SSD_PARTS:-wheel,bench,workingset},"
PY=/opt/torch/.venv/bin/python3
[[ -x $PY ]] || PY=python3
WHEEL=$(ls "$C"/pegaflow-*.whl 2>/dev/null | head -n1)
[[ -n "$WHEEL" && -x "$C/ssd_bench" ]] || { echo "missing $C: run scripts/gpu-ssd.sh --stage here and carry it"; exit 1; }
DISK=/var/tmp/pegaflow-ssd
mkdir -p "$DISK"

main() {
    local t0=$SECONDS rc=0
    echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)"
    echo "disk of $DISK: $(df -h "$DISK" | awk 'NR==2{print $1, $2, "free", $4}');" \
        "lsblk: $(lsblk -d -o NAME,ROTA,SIZE,MODEL 2>/dev/null | tr '\n' ';')"
    # The owner of every part is the one the wheel installs.
    rm -rf /tmp/pega-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/pega-site "$WHEEL"
    local owner=/tmp/pega-site/pegaflow/_bin/pegaflow-owner
    if [[ $PARTS == *,wheel,* ]]; then
        echo "== wheel: pip install into a fresh venv with $PY"
        PYTHON=$PY timeout 120 scripts/wheel-test.sh "$WHEEL" || { rc=1; echo "wheel-test FAILED"; }
    fi
    if [[ $PARTS == *,bench,* ]]; then
        echo "== ssd_bench on $DISK"
        timeout 200 "$C/ssd_bench" --dir "$DISK" --raw-gib 4 --reps 5 --owner-bin "$owner" || { rc=1; echo "ssd_bench FAILED"; }
    fi
    if [[ $PARTS == *,workingset,* ]]; then
        echo "== a working set 3x the pool in a real vLLM"
        if [[ ! -f /tmp/vllm-site/.from-$(basename "$BUNDLE") ]]; then
            bash .vbundle/setup.sh "$BUNDLE" >/dev/null
            touch "/tmp/vllm-site/.from-$(basename "$BUNDLE")"
        fi
        PYTHONPATH=/tmp/pega-site:/tmp/vllm-site VLLM_USE_FLASHINFER_SAMPLER=0 \
            timeout -k 10 420 "$PY" benches/ttft/ssd_workingset.py --attention-backend TRITON_ATTN \
            --ssd-dir "$DISK" --owner-bin "$owner" --workdir /tmp/ssd-ws --json-out "$OUT/workingset.json" "$@" ||
            { rc=1; echo "ssd_workingset FAILED"; }
        tar -czf "$OUT/workingset-logs.tar.gz" -C /tmp/ssd-ws --exclude prompts.json . 2>/dev/null || true
    fi
    echo "gpu-ssd: exit $rc after $((SECONDS - t0)) s"
    return $rc
}
main "$@" 2>&1 | tee "$OUT/ssd.log"
exit "${PIPESTATUS[0]}"
