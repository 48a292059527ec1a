#!/usr/bin/env bash
# The whole test suite: Rust (workspace tests, loom models) and Python (the
# vLLM connector against the real vLLM package, then real vLLM engines on CPU
# end to end: tests/e2e), installing what it needs.
#
#   scripts/test-all.sh              # everything
#   PEGAFLOW_SKIP_PYTHON=1 scripts/test-all.sh   # Rust only
#   PEGAFLOW_SKIP_E2E=1 scripts/test-all.sh      # without the end-to-end suite
#
# GPU tests skip with a message on machines without a CUDA driver; run them
# on a GPU with scripts/gpu-test.sh (docs/gpu.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '\n==> %s\n' "$*"; }
t0=$SECONDS

# systemd-analyze checks the shipped unit file (skipped with a message if absent).
if ! command -v systemd-analyze >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    log "installing systemd (for systemd-analyze)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null || true
fi

log "building binaries (owner, inspect, test engine)"
cargo build --workspace --bins

log "Rust tests"
cargo test --workspace --no-fail-fast

if [[ -f pegaflow-shm/tests/loom.rs ]]; then
    log "loom model checks (ring, pins, index, doorbell)"
    RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="$ROOT/target/loom" \
        cargo test -p pegaflow-shm --test loom --release
fi

if [[ "${PEGAFLOW_SKIP_PYTHON:-0}" != 1 ]]; then
    log "Python: venv with the pinned vLLM versions, pegaflow-py, tests per version, end to end"
    scripts/py-test.sh -ra
    log "wheel: build it, pip install it into a fresh venv, run the installed owner and package"
    t=$SECONDS
    scripts/wheel-test.sh
    echo "wheel test: $((SECONDS - t)) s"
fi

log "all tests passed in $((SECONDS - t0)) s"
