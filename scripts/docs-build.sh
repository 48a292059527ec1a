#!/usr/bin/env bash
# Build the documentation site (mdBook over docs/, into docs/book) and fail
# on a broken link or a stale generated page.
#
#   scripts/docs-build.sh            # check (what CI runs)
#   scripts/docs-build.sh --update   # regenerate docs/configuration.md first
#
# Needs mdbook: installed once with `cargo install mdbook --locked` into
# ~/.cargo/bin (a few minutes on 2 cores; kept there like cargo's other
# tools), and the owner binary (cargo build --bins) for its --help.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MDBOOK_VERSION=0.4.52
log() { printf '[docs] %s\n' "$*" >&2; }
export PATH="$HOME/.cargo/bin:$PATH"

if ! mdbook --version 2>/dev/null | grep -q "v$MDBOOK_VERSION"; then
    log "installing mdbook $MDBOOK_VERSION (cargo install, once; cached in ~/.cargo/bin)"
    t=$SECONDS
    cargo install mdbook --locked --version "$MDBOOK_VERSION" --quiet
    log "mdbook installed in $((SECONDS - t)) s"
fi

owner="${CARGO_TARGET_DIR:-$ROOT/target}/debug/pegaflow-owner"
[[ -x "$owner" ]] || cargo build -q -p pegaflow-owner --bin pegaflow-owner
if [[ "${1:-}" == "--update" ]]; then
    python3 scripts/gen-reference.py "$owner"
else
    python3 scripts/gen-reference.py "$owner" --check
fi

rm -rf docs/book
mdbook build docs 2>&1 | grep -v '^\s*$' >&2
python3 scripts/check-links.py docs/book
log "site: docs/book/index.html"
