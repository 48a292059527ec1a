#!/usr/bin/env bash
# Build the pegaflow wheel: the Python package (import pegaflow, the vLLM
# connector), its Rust extension, and the pegaflow-owner and
# pegaflow-inspect binaries, which pip installs on PATH (the environment's
# bin/) next to the package. One wheel per release; `pip install` of it is
# the whole install (docs/install.md).
#
#   scripts/build-wheel.sh [OUT_DIR]          # default: target/wheels
#
# Needs a Rust toolchain and maturin (pip install 'maturin>=1.9.4,<2', or
# set $MATURIN). The binaries ship inside the package (pegaflow/_bin/),
# staged here from a release build with their debug info stripped and
# removed again afterwards; the wheel's console scripts pegaflow-owner and
# pegaflow-inspect exec them (docs/install.md says why). The script checks
# that no binary needs a newer glibc than the wheel's manylinux tag
# promises.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/target/wheels}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
MATURIN="${MATURIN:-}"
if [[ -z "$MATURIN" ]]; then
    if command -v maturin >/dev/null; then
        MATURIN=maturin
    elif [[ -x "$ROOT/.venv/bin/maturin" ]]; then
        MATURIN="$ROOT/.venv/bin/maturin"
    else
        echo "build-wheel: maturin not found: pip install 'maturin>=1.9.4,<2' (or set MATURIN)" >&2
        exit 2
    fi
fi
log() { printf '[build-wheel] %s\n' "$*" >&2; }

log "building pegaflow-owner and pegaflow-inspect (release)"
cargo build --release --locked -p pegaflow-owner --bins >&2

STAGE="$ROOT/pegaflow-py/python/pegaflow/_bin"
rm -rf "$STAGE"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"
for b in pegaflow-owner pegaflow-inspect; do
    install -m 0755 "$CARGO_TARGET_DIR/release/$b" "$STAGE/$b"
    # Symbols stay (backtraces name functions); DWARF goes (5x smaller).
    strip --strip-debug "$STAGE/$b"
done

log "building the wheel (maturin)"
mkdir -p "$OUT"
before=$(ls "$OUT"/pegaflow-*.whl 2>/dev/null || true)
(cd "$ROOT/pegaflow-py" && "$MATURIN" build --release --locked -q -o "$OUT" >&2)
wheel=$(ls -t "$OUT"/pegaflow-*.whl | head -n1)
[[ -n "$wheel" ]] || { echo "build-wheel: maturin made no wheel" >&2; exit 1; }

# The wheel's tag promises a glibc; the binaries must not need a newer one.
tag_glibc=$(basename "$wheel" | sed -n 's/.*manylinux_\([0-9]*\)_\([0-9]*\)_.*/\1.\2/p')
for b in pegaflow-owner pegaflow-inspect; do
    need=$(objdump -T "$STAGE/$b" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n1)
    if [[ -n "$tag_glibc" && -n "$need" ]] && [[ "$(printf '%s\n%s\n' "$need" "$tag_glibc" | sort -V | tail -n1)" != "$tag_glibc" ]]; then
        echo "build-wheel: $b needs glibc $need but the wheel is tagged manylinux_${tag_glibc/./_}" >&2
        exit 1
    fi
    log "$b needs glibc >= ${need:-?} (wheel: manylinux ${tag_glibc:-?})"
done
python3 - "$wheel" <<'EOF' >&2
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for b in ("pegaflow-owner", "pegaflow-inspect"):
    assert f"pegaflow/_bin/{b}" in names, f"{b} missing from the wheel"
EOF
log "wheel: $wheel ($(du -h "$wheel" | cut -f1))"
printf '%s\n' "$wheel"
