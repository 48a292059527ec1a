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


def start_child(owner, model_dir, role, seed, *args) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("PYTHONHASHSEED", None)
    if seed is not None:
        env["PYTHONHASHSEED"] = seed
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return subprocess.Popen(
        [sys.executable, str(HERE / "xproc_child.py"), role, owner.name, owner.socket,
         model_dir, *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def result(p: subprocess.Popen, what: str) -> dict:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, f"{what} process failed:\n{out[-2000:]}\n{err[-4000:]}"
    return json.loads(out.strip().splitlines()[-1])


def test_second_process_hits_what_the_first_saved(tiny_model_dir, owner):
    saved = result(start_child(owner, tiny_model_dir, "save", "1"), "save")
    # two more vLLM processes at once, one with another seed, one with none;
    # each asks for the salted prompt under a salt of its own too
    seeds = ("2", None)
    loads = [start_child(owner, tiny_model_dir, "load", s, f"tenant-2-{s}") for s in seeds]
    for seed, p in zip(seeds, loads):
        got = result(p, f"load (PYTHONHASHSEED={seed})")
        # the processes really disagree on vLLM's own block hashes ...
        assert got["vllm_hash0"]["plain"] != saved["vllm_hash0"]["plain"]
        # ... and still share the cache: 3 full blocks loaded, byte-exact
        assert got["hit_tokens"]["plain"] == 3 * BLOCK, (seed, got)
        assert got["hit_tokens"]["salted"] == 3 * BLOCK, (seed, got)
        # another tenant's salt never sees them
        assert got["hit_tokens"]["other_salt"] == 0, (seed, got)
        assert got["byte_exact"] == {"plain": True, "salted": True}
