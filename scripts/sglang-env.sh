#!/usr/bin/env bash
# SGLang's Python side, for the SGLang storage-backend tests
# (tests/python/test_sglang*.py). Idempotent.
#
#   scripts/sglang-env.sh        # installs if needed; prints the overlay directory
#   PYTHONPATH=$(scripts/sglang-env.sh) .venv/bin/python -m pytest tests/python/test_sglang.py
#
# What it makes: $PEGAFLOW_VENV/sglang (default .venv/sglang), a directory to
# put first on PYTHONPATH, holding sglang $SGLANG_VERSION from PyPI (--no-deps)
# and the few small packages its storage and host-pool modules import
# beyond the test venv (scripts/py-env.sh), pinned.
#
# Why an overlay of the test venv rather than `pip install sglang`: sglang's
# wheel requires ~60 packages (flashinfer, sgl-kernel, deep-gemm, CUDA 13
# libraries, ...; several GB) for model execution; the modules the tests drive
# (mem_cache.hicache_storage, mem_cache.storage.backend_factory, the MHA and
# MLA host pools on CPU tensors) import none of their native parts. The overlay
# reuses the venv's torch (2.13, vLLM's pin; sglang 0.5.23 pins 2.14.1 for its
# GPU kernels, which the CPU pool classes do not touch) and its transformers,
# msgspec, numpy, ... (already at sglang's pins or compatible). It is ~150 MB
# and installs in seconds from pip's cache. It cannot go into the venv itself:
# pip would pull every requirement.
#
# Exit status 3: sglang or an extra could not be fetched or installed by pip
# (PyPI unreachable, a release pulled): scripts/py-test.sh skips the SGLang
# tests with that message. Anything else non-zero is a failure.
#
# The extras are what `import sglang.srt.mem_cache.pool_host.mha` needs at
# import time (sglang/__init__ and the model-config registry import them):
# orjson, IPython (+traitlets), dill, gguf, loguru, compressed-tensors (at
# sglang's pin) and torchvision at the venv torch's pairing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEGAFLOW_VENV:-$ROOT/.venv}"
WHEELS="${PEGAFLOW_WHEEL_CACHE:-$HOME/.cache/pegaflow/wheels}"
OVERLAY="$VENV/sglang"

SGLANG_VERSION="${SGLANG_VERSION:-0.5.23}"
EXTRAS="orjson==3.13.0 ipython==9.18.1 traitlets==5.16.1 dill==0.4.1 gguf==0.19.0 loguru==0.7.3 compressed-tensors==0.18.0 torchvision==0.28.0"

log() { printf '[sglang-env] %s\n' "$*" >&2; }

"$ROOT/scripts/py-env.sh" --env-only

STAMP="$OVERLAY/.pegaflow-sglang-stamp"
want_stamp="sglang=$SGLANG_VERSION extras=$EXTRAS venv=$(cat "$VENV/.pegaflow-env-stamp") script=$(sha256sum "$0" | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]]; then
    log "up to date ($OVERLAY)"
    printf '%s\n' "$OVERLAY"
    exit 0
fi

t0=$SECONDS
mkdir -p "$WHEELS"
whl=$(ls "$WHEELS"/sglang-"$SGLANG_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [[ -z "$whl" ]]; then
    log "downloading sglang==$SGLANG_VERSION (wheel only)"
    if ! "$VENV/bin/pip" download -q --no-deps "sglang==$SGLANG_VERSION" -d "$WHEELS" >&2; then
        log "error: pip could not download sglang==$SGLANG_VERSION"
        exit 3
    fi
    whl=$(ls "$WHEELS"/sglang-"$SGLANG_VERSION"-*.whl | head -n1)
fi

log "installing sglang==$SGLANG_VERSION into $OVERLAY (--no-deps), with $EXTRAS"
rm -rf "$OVERLAY"
# shellcheck disable=SC2086
if ! "$VENV/bin/pip" install -q --no-deps --no-compile --target "$OVERLAY" "$whl" $EXTRAS >&2; then
    log "error: pip could not install sglang==$SGLANG_VERSION with $EXTRAS"
    rm -rf "$OVERLAY"
    exit 3
fi
# torchvision's wheel pins its torch; --no-deps must not have put another one here.
if [[ -e "$OVERLAY/torch" ]]; then
    log "error: a torch was installed into the overlay; it must come from the venv"
    exit 1
fi

PYTHONPATH="$OVERLAY" "$VENV/bin/python" - <<'EOF' >&2
import importlib.metadata as md
import warnings
warnings.simplefilter("ignore")
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: F401
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: F401
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost  # noqa: F401
print(f"[sglang-env] sglang {md.version('sglang')} (torch {md.version('torch')})")
EOF
printf '%s' "$want_stamp" > "$STAMP"
log "ready in $((SECONDS - t0)) s ($(du -sh "$OVERLAY" | cut -f1))"
printf '%s\n' "$OVERLAY"
