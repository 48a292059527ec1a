"""Hits across OS processes: what one vLLM process saved, another finds,
whatever PYTHONHASHSEED each runs with (vLLM salts its own block hashes per
process: 0.25 unless PYTHONHASHSEED is set, later versions when it differs).

Each process is xproc_child.py: vLLM's real Scheduler and both connector
roles, against one real pegaflow-owner that outlives them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vllm_harness import BLOCK

HERE = Path(__file__).resolve().parent


def run_child(owner, model_dir, role, seed, *args):
    env = dict(os.environ)
    env.pop("PYTHONHASHSEED", None)
    if seed is not None:
        env["PYTHONHASHSEED"] = seed
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    p = subprocess.run(
        [sys.executable, str(HERE / "xproc_child.py"), role, owner.name, owner.socket,
         model_dir, *args],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert p.returncode == 0, f"{role} process failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_second_process_hits_what_the_first_saved(tiny_model_dir, owner):
    saved = run_child(owner, tiny_model_dir, "save", "1")
    for seed in ("2", None):
        # (a salt of its own: the first load process saves what it computed)
        got = run_child(owner, tiny_model_dir, "load", seed, f"tenant-2-{seed}")
        # the processes really disagree on vLLM's own block hashes ...
        assert got["vllm_hash0"]["plain"] != saved["vllm_hash0"]["plain"]
        # ... and still share the cache: 3 full blocks loaded, byte-exact
        assert got["hit_tokens"]["plain"] == 3 * BLOCK, (seed, got)
        assert got["hit_tokens"]["salted"] == 3 * BLOCK, (seed, got)
        # another tenant's salt never sees them
        assert got["hit_tokens"]["other_salt"] == 0, (seed, got)
        assert got["byte_exact"] == {"plain": True, "salted": True}
