"""The ``pegaflow-owner`` and ``pegaflow-inspect`` commands of the wheel.

The binaries are files of this package (``pegaflow/_bin/``, put there by
scripts/build-wheel.sh); these console scripts replace themselves with them
(``execv``: same pid, signals and exit status as the binary, for systemd
too). A build without them (a plain ``maturin build`` of a checkout) says
how to get them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def binary(name: str) -> Path:
    """Where this package's ``name`` binary is (it may be missing)."""
    return Path(__file__).resolve().with_name("_bin") / name


def _exec(name: str) -> None:
    path = binary(name)
    if not os.access(path, os.X_OK):
        sys.exit(
            f"{name}: this build of the pegaflow package does not contain {name} "
            f"(looked for {path}). Install a wheel built by scripts/build-wheel.sh, "
            "or build it from source: cargo install --path pegaflow-owner"
        )
    os.execv(path, [name, *sys.argv[1:]])


def owner() -> None:
    _exec("pegaflow-owner")


def inspect() -> None:
    _exec("pegaflow-inspect")
