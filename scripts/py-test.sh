#!/usr/bin/env bash
# The Python part of the test command: pegaflow-py against the real vLLM
# scheduler on CPU, once per pinned vLLM version.
#
#   scripts/py-test.sh [pytest args]
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
