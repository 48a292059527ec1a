#!/usr/bin/env bash
# The one-install promise, end to end: build the wheel (scripts/build-wheel.sh),
# install it into a fresh virtual environment with nothing else, and use
# what it installed: pegaflow-owner --version agrees with the package's
# version, the installed owner starts, the installed package connects to it
# and sees that version, pegaflow-inspect reads its segments.
#
#   scripts/wheel-test.sh [WHEEL]      # default: build one
#
# Needs python3 (or $PYTHON) with the venv module (Debian: python3-venv). No network:
# the wheel has no dependencies.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '[wheel-test] %s\n' "$*" >&2; }
TMP="$(mktemp -d)"
OWNER_PID=""
cleanup() {
    [[ -n "$OWNER_PID" ]] && kill -9 "$OWNER_PID" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

WHEEL="${1:-}"
if [[ -z "$WHEEL" ]]; then
    WHEEL="$("$ROOT/scripts/build-wheel.sh" "$TMP/wheels")"
fi
log "fresh venv; pip install $(basename "$WHEEL") (no index, no dependencies to fetch)"
"${PYTHON:-python3}" -m venv "$TMP/venv"
"$TMP/venv/bin/pip" install -q --no-index "$WHEEL"
BIN="$TMP/venv/bin"

got="$("$BIN/pegaflow-owner" --version)"
pkg="$("$BIN/python" -c 'import pegaflow; print(pegaflow.__version__)')"
whl="$(basename "$WHEEL" | cut -d- -f2)"
log "pegaflow-owner --version: '$got'; pegaflow.__version__: $pkg; wheel: $whl"
[[ "$got" == "pegaflow-owner $pkg" && "$pkg" == "$whl" ]] || {
    echo "wheel-test: versions disagree" >&2
    exit 1
}
"$BIN/pegaflow-inspect" --help >/dev/null
# The router needs aiohttp (vLLM brings it); a bare venv has none: a clear
# message, not a traceback.
if router_out="$("$BIN/pegaflow-router" --help 2>&1)"; then
    "$BIN/python" -c 'import aiohttp' 2>/dev/null || { echo "wheel-test: pegaflow-router ran without aiohttp?" >&2; exit 1; }
else
    grep -q "needs aiohttp" <<<"$router_out" || { echo "wheel-test: pegaflow-router without aiohttp: $router_out" >&2; exit 1; }
fi

name="wheel-test-$$"
export PEGAFLOW_SHM_DIR="$TMP/shm"
mkdir -p "$PEGAFLOW_SHM_DIR"
# from PATH, as a user of the venv would run it
PATH="$BIN:$PATH" pegaflow-owner --name "$name" --socket "$TMP/owner.sock" --pool-size 64mb \
    --no-prefault --metrics-addr '' >"$TMP/owner.log" 2>&1 &
OWNER_PID=$!
for _ in $(seq 200); do
    [[ -S "$TMP/owner.sock" ]] && break
    kill -0 "$OWNER_PID" 2>/dev/null || { cat "$TMP/owner.log" >&2; exit 1; }
    sleep 0.05
done
[[ -S "$TMP/owner.sock" ]] || { echo "wheel-test: the installed owner did not start" >&2; cat "$TMP/owner.log" >&2; exit 1; }
# the running process is the binary itself (the console script exec'd it)
[[ "$(readlink "/proc/$OWNER_PID/exe")" == *"/pegaflow/_bin/pegaflow-owner" ]] || {
    echo "wheel-test: pid $OWNER_PID is $(readlink "/proc/$OWNER_PID/exe"), not the packaged binary" >&2
    exit 1
}

"$BIN/python" - "$name" "$TMP/owner.sock" <<'EOF'
import sys
import pegaflow

e = pegaflow.Engine(name=sys.argv[1], socket=sys.argv[2])
assert e.wait_connected(10), "the installed package did not connect to the installed owner"
assert e.owner_version == pegaflow.__version__, (e.owner_version, pegaflow.__version__)
print(f"[wheel-test] connected: owner {e.owner_version}, package {pegaflow.__version__}", file=sys.stderr)
EOF
out="$("$BIN/pegaflow-inspect" --name "$name" status)"
grep -q "version $pkg" <<<"$out" || { echo "wheel-test: inspect status: $out" >&2; exit 1; }
kill "$OWNER_PID"
wait "$OWNER_PID" 2>/dev/null || true
OWNER_PID=""
log "ok: pip install put pegaflow-owner and pegaflow-inspect on PATH and they serve the package"
