"""Processes of the end-to-end suite: a real pegaflow-owner with its metrics
endpoint, real vLLM engines (vllm_worker.py), and a random-weight Llama."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("vllm_worker.py")


def find_owner_bin() -> Path | None:
    """$PEGAFLOW_OWNER_BIN, else the most recently built of
    target/{release,debug}/pegaflow-owner (as tests/python)."""
    env = os.environ.get("PEGAFLOW_OWNER_BIN")
    if env:
        return Path(env)
    dirs = [Path(os.environ["CARGO_TARGET_DIR"])] if os.environ.get("CARGO_TARGET_DIR") else []
    dirs.append(ROOT / "target")
    found = [
        d / profile / "pegaflow-owner"
        for d in dirs
        for profile in ("release", "debug")
        if (d / profile / "pegaflow-owner").is_file() and os.access(d / profile / "pegaflow-owner", os.X_OK)
    ]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Owner:
    """A pegaflow-owner on a private name and socket, serving /metrics."""

    def __init__(self, binary: Path, tmp: Path, pool_size: str = "256mb"):
        self.binary = binary
        self.name = f"e2e-{uuid.uuid4().hex[:12]}"
        self.socket = str(tmp / f"{self.name}.sock")
        self.pool_size = pool_size
        self.metrics_addr = f"127.0.0.1:{free_port()}"
        self.log = tmp / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> Owner:
        args = [
            str(self.binary),
            "--name", self.name,
            "--socket", self.socket,
            "--pool-size", self.pool_size,
            "--metrics-addr", self.metrics_addr,
            "--log-level", "info",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pegaflow-owner exited: {self.log.read_text()[-3000:]}")
            if os.path.exists(self.socket):
                try:
                    self.scrape()
                    return self
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"pegaflow-owner did not come up: {self.log.read_text()[-3000:]}")

    def sigkill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        self.sigkill()
        for p in Path("/dev/shm").glob(f"pegaflow-{self.name}*"):
            p.unlink(missing_ok=True)
        Path(self.socket).unlink(missing_ok=True)

    def scrape(self) -> dict[str, float]:
        """One Prometheus scrape of /metrics: node-wide samples (no labels) and
        label-summed totals, parsed with prometheus_client's own parser."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(f"http://{self.metrics_addr}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError as e:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"pegaflow-owner exited unexpectedly (code {self.proc.returncode}); its log "
                    f"{self.log}:\n{self.log.read_text()[-3000:]}"
                ) from e
            raise
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    def wait_clients(self, n: int, timeout: float = 60.0) -> None:
        """Wait until n engines are connected (a vLLM with TP=k is k+1 engines:
        its scheduler and each worker)."""
        deadline = time.monotonic() + timeout
        got = -1.0
        while time.monotonic() < deadline:
            got = self.scrape().get("pegaflow_connected_clients", 0.0)
            if got >= n:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{got:.0f} engines connected to the owner after {timeout} s, want {n}")


class VllmError(RuntimeError):
    pass


class Vllm:
    """A real vLLM engine (vllm.LLM) in its own process, see vllm_worker.py."""

    def __init__(self, name: str, tmp: Path, llm_kwargs: dict, env: dict[str, str]):
        self.name = name
        self.log = tmp / f"vllm-{name}.log"
        r, w = os.pipe()
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), str(w)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=[w],
                env=full_env,
                start_new_session=True,
            )
        os.close(w)
        self._reply = os.fdopen(r, "r")
        self._exit_sent = False
        self.ready = False
        self._send(llm_kwargs)
        self.started = time.monotonic()

    def _send(self, obj: dict) -> None:
        assert self.proc.stdin is not None
        self._exit_sent = self._exit_sent or obj.get("op") == "exit"
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def _recv(self, timeout: float) -> dict:
        ready, _, _ = select.select([self._reply], [], [], timeout)
        line = self._reply.readline() if ready else ""
        if not line:
            self.kill()
            raise VllmError(
                f"vLLM {self.name}: no answer within {timeout:.0f} s (exit code {self.proc.poll()});"
                f" its log {self.log}:\n{self.log_tail()}"
            )
        msg = json.loads(line)
        if "error" in msg:
            raise VllmError(f"vLLM {self.name}: {msg['error']}\nits log {self.log}:\n{self.log_tail()}")
        return msg

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 300.0) -> Vllm:
        if not self.ready:
            self._recv(timeout)
            self.ready = True
        return self

    def call(self, op: str, timeout: float = 300.0, **args) -> dict:
        self._send({"op": op, **args})
        return self._recv(timeout)

    def send(self, op: str, **args) -> None:
        """Issue a command without waiting; collect the answer with receive()."""
        self._send({"op": op, **args})

    def receive(self, timeout: float = 300.0) -> dict:
        return self._recv(timeout)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[dict]:
        return self.call("generate", prompts=prompts, max_tokens=max_tokens)["outputs"]

    def metrics(self) -> dict[str, float]:
        return self.call("metrics")["metrics"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        """Ask vLLM to exit (if not asked yet with send("exit")) and wait for it."""
        try:
            if self.alive() and not self._exit_sent:
                self._send({"op": "exit"})
            self.proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
            pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (vLLM's engine core and workers too)."""
        # The group outlives its leader when vLLM's children are still up.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def make_llama(path: Path, seed: int = 0) -> None:
    """A random-weight Llama small enough to run on two cores, saved with
    transformers (safetensors + config.json). No tokenizer: prompts are token ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=2,
        vocab_size=2048,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        # wider than the default 0.02, so that greedy choices are rarely near ties
        initializer_range=0.1,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(str(path), safe_serialization=True)
