"""Fixtures of the Python suite: a real pegaflow-owner per test and a tiny
local model for vLLM's config classes (no download: HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parents[2]


def find_owner_bin() -> Path | None:
    """$PEGAFLOW_OWNER_BIN, else the most recently built of
    target/{release,debug}/pegaflow-owner (a stale build of another ABI
    version would refuse every engine)."""
    env = os.environ.get("PEGAFLOW_OWNER_BIN")
    if env:
        return Path(env)
    return newest_binary("pegaflow-owner")


def newest_binary(name: str) -> Path | None:
    """target/{release,debug}/NAME (or under $CARGO_TARGET_DIR), the most
    recently built: a stale build of the other profile must not win."""
    dirs = []
    if os.environ.get("CARGO_TARGET_DIR"):
        dirs.append(Path(os.environ["CARGO_TARGET_DIR"]))
    dirs.append(ROOT / "target")
    found = [
        d / profile / name
        for d in dirs
        for profile in ("release", "debug")
        if (d / profile / name).is_file() and os.access(d / profile / name, os.X_OK)
    ]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


class Owner:
    """A pegaflow-owner process on a private name and socket."""

    def __init__(self, binary: Path, tmp: Path, pool_size: str = "64mb"):
        self.binary = binary
        self.name = f"pytest-{uuid.uuid4().hex[:12]}"
        self.socket = str(tmp / f"{self.name}.sock")
        self.pool_size = pool_size
        self.log = tmp / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        #: --metrics-addr ("" disables the endpoint)
        self.metrics_addr = ""

    def start(self, timeout: float = 30.0, extra: tuple[str, ...] = ()) -> "Owner":
        args = [
            str(self.binary),
            "--name", self.name,
            "--socket", self.socket,
            "--pool-size", self.pool_size,
            "--metrics-addr", self.metrics_addr,
            "--log-level", "info",
            *extra,
        ]
        self.proc = subprocess.Popen(
            args, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pegaflow-owner exited: {self.log.read_text()[-3000:]}")
            if os.path.exists(self.socket):
                return self
            time.sleep(0.02)
        raise RuntimeError(f"pegaflow-owner did not create {self.socket}: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, *extra: str) -> None:
        self.kill()
        if os.path.exists(self.socket):
            os.unlink(self.socket)  # start() waits for the new one
        self.start(extra=extra)

    def cleanup(self) -> None:
        self.kill()
        for p in Path("/dev/shm").glob(f"pegaflow-{self.name}*"):
            p.unlink(missing_ok=True)
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass


@pytest.fixture
def owner_bin() -> Path:
    b = find_owner_bin()
    if b is None:
        pytest.skip(
            "pegaflow-owner binary not found (build it: cargo build --release -p pegaflow-owner, "
            "or set PEGAFLOW_OWNER_BIN)"
        )
    return b


@pytest.fixture
def owner(owner_bin: Path, tmp_path: Path):
    o = Owner(owner_bin, tmp_path).start()
    try:
        yield o
    finally:
        o.cleanup()


@pytest.fixture
def make_owner(owner_bin: Path, tmp_path: Path):
    made: list[Owner] = []

    def _make(pool_size: str = "64mb", start: bool = True) -> Owner:
        o = Owner(owner_bin, tmp_path, pool_size)
        made.append(o)
        return o.start() if start else o

    yield _make
    for o in made:
        o.cleanup()


TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_hidden_layers": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tiny-llama")
    (d / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(d)
