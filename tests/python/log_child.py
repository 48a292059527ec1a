"""The scheduler-role PegaKVConnector in a process of its own, for
test_logs.py: ``python log_child.py MODEL_DIR NAME SOCKET``.

Prints ``STAGE word`` on stdout (where vLLM logs too) at each stage and waits for a line on stdin before
the next one, so the test can start, kill and restart the owner in between:
``built`` (connector made, owner absent), ``connected``, ``lost``,
``reconnected``. Its stderr is what vLLM's log would show.
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm_harness import make_kv_cache_config, make_vllm_config

from pegaflow.connector import PegaKVConnector


def wait(cond, what: str) -> None:
    deadline = time.monotonic() + 20
    while not cond():
        if time.monotonic() > deadline:
            sys.exit(f"timed out: {what}")
        time.sleep(0.02)
    time.sleep(0.6)  # the connection watcher polls every 0.2 s


def stage(word: str) -> None:
    print(f"STAGE {word}", flush=True)
    sys.stdin.readline()


def main() -> None:
    model_dir, name, sock = sys.argv[1:4]
    owner = SimpleNamespace(name=name, socket=sock)
    vc = make_vllm_config(model_dir, owner, extra={"pegaflow.reconnect_interval": 0.05})
    try:  # what vLLM's processes do first (>= 0.3x; older ones on import)
        from vllm.logger import configure_logging
    except ImportError:
        configure_logging = None
    if configure_logging is not None and getattr(vc, "logging_config", None) is not None:
        configure_logging(vc.logging_config)
    c = PegaKVConnector(vc, KVConnectorRole.SCHEDULER, make_kv_cache_config(16))
    time.sleep(1.5)  # the unreachable owner is reported after 1 s
    stage("built")
    wait(lambda: c.engine.is_connected(), "connect")
    stage("connected")
    wait(lambda: not c.engine.is_connected(), "owner gone")
    stage("lost")
    wait(lambda: c.engine.is_connected(), "reconnect")
    print("STAGE reconnected", flush=True)


if __name__ == "__main__":
    main()
