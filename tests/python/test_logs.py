"""What a person running vLLM with the connector reads in its log: one line,
in vLLM's format, when the connector cannot reach its owner (with the socket
and the fix), connects, loses it and reconnects; no colour codes in a file;
a mistyped ``pegaflow.*`` key reported while vLLM builds its config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.utils import get_kv_connector_cache_layout

from pegaflow.connector import PegaKVConnector
from pegaflow.exceptions import ConfigError
from vllm_harness import make_vllm_config

HERE = Path(__file__).resolve().parent


def test_connection_changes_are_one_vllm_log_line_each(tiny_model_dir, make_owner):
    o = make_owner(start=False)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # INFO lines too (vLLM's default level); the Rust client's own log at
    # its default filter (must not repeat the Python lines).
    env["VLLM_LOGGING_LEVEL"] = "INFO"
    env.pop("PEGAFLOW_LOG", None)
    env.pop("RUST_LOG", None)
    child = subprocess.Popen(
        [sys.executable, str(HERE / "log_child.py"), tiny_model_dir, o.name, o.socket],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )

    out: list[str] = []  # vLLM logs to stdout by default

    def expect(word: str) -> None:
        while True:
            line = child.stdout.readline()
            if not line:
                child.wait(timeout=30)
                pytest.fail(f"child ended before {word!r}: {''.join(out)}{child.stderr.read()[-3000:]}")
            if line.startswith("STAGE "):
                assert line.split()[1] == word, f"{line!r} before {word!r}"
                return
            out.append(line)

    def go() -> None:
        child.stdin.write("go\n")
        child.stdin.flush()

    try:
        expect("built")
        o.start()
        go()
        expect("connected")
        o.kill()
        go()
        expect("lost")
        o.restart()
        go()
        expect("reconnected")
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    err = "".join(out) + child.stdout.read() + child.stderr.read()
    assert "\x1b[" not in err, f"colour codes in a log that is not a terminal:\n{err}"
    ours = [l for l in err.splitlines() if "pegaflow-owner" in l or "PegaFlow" in l]
    # vLLM's format: "[(ProcessName pid=N) ]LEVEL MM-DD HH:MM:SS [file.py:line] message"
    # (the process part since vLLM 0.3x)
    vllm_format = re.compile(r"^\S*(\(\S+ pid=\d+\) )?(INFO|WARNING) \d\d-\d\d [\d:]+ \[[\w.]+:\d+\] ")
    for l in ours:
        assert vllm_format.match(l), f"not in vLLM's log format: {l!r}\n{err}"

    def lines(pattern: str) -> list[str]:
        return [l for l in ours if re.search(pattern, l)]

    unreachable = lines("cannot reach pegaflow-owner")
    assert len(unreachable) == 1, err
    assert o.socket in unreachable[0] and "WARNING" in unreachable[0]
    assert "start pegaflow-owner" in unreachable[0] and "pegaflow.socket" in unreachable[0]
    assert "No such file" in unreachable[0] or "not connected" in unreachable[0], unreachable[0]
    assert len(lines(r"scheduler connected to pegaflow-owner at " + re.escape(o.socket))) == 1, err
    lost = lines("lost pegaflow-owner")
    assert len(lost) == 1 and o.socket in lost[0] and "WARNING" in lost[0], err
    assert len(lines(r"reconnected to pegaflow-owner at .* after [\d.]+ s \(owner epoch 2\)")) == 1, err
    # nothing from the Rust client about the same events
    assert not re.search(r"went away|not reachable yet|connected to pegaflow-owner$", err, re.M), err


def cache_layout(vc):
    """vLLM's own call of the connector's KV layout hook (0.3x pass the
    config; 0.2x read the current one)."""
    import inspect

    if inspect.signature(get_kv_connector_cache_layout).parameters:
        return get_kv_connector_cache_layout(vc)
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(vc):
        return get_kv_connector_cache_layout()


@pytest.mark.parametrize("key", ["pegaflow.sockett", "pegaflow.load_mode"])
def test_config_errors_surface_while_vllm_builds_its_config(tiny_model_dir, tmp_path, key):
    # vLLM constructs the connector only after loading the model and
    # profiling memory (a minute on a large model); it asks the connector
    # class about CUDA graphs while building its config and about the KV
    # layout while setting up each worker's attention: both must refuse.
    owner = type("O", (), {"name": "typo", "socket": str(tmp_path / "none.sock")})
    extra = {key: "bogus"}
    vc = make_vllm_config(tiny_model_dir, owner, extra=extra)
    ktc = vc.kv_transfer_config
    cls = KVConnectorFactory.get_connector_class(ktc)
    assert cls is PegaKVConnector
    with pytest.raises(ConfigError, match=re.escape(key)):
        cls.requires_piecewise_for_cudagraph(ktc.kv_connector_extra_config)
    with pytest.raises(ConfigError, match=re.escape(key)):
        cache_layout(vc)
    # a correct config passes both, and changes nothing vLLM decides
    good = make_vllm_config(tiny_model_dir, owner)
    assert cls.requires_piecewise_for_cudagraph(good.kv_transfer_config.kv_connector_extra_config) is False
    cache_layout(good)  # no error (and no layout imposed: vLLM picks its own)


def test_rust_log_lines_have_no_colour_codes_in_a_file(tmp_path):
    # The engine client's own tracing lines (here at info: the owner is
    # missing) go to stderr, a pipe: plain text.
    code = (
        "import pegaflow, sys; "
        f"e = pegaflow.Engine(name='nocolour', socket={str(tmp_path / 'none.sock')!r}); "
        "sys.exit(0 if not e.is_connected() else 1)"
    )
    env = dict(os.environ, PEGAFLOW_LOG="info")
    env.pop("NO_COLOR", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "owner not reachable" in r.stderr, r.stderr
    assert "\x1b[" not in r.stderr, repr(r.stderr)


def test_owner_of_another_version_is_warned_about_once(owner):
    import logging

    import pegaflow
    from pegaflow._log import check_owner_version

    e = pegaflow.Engine(name=owner.name, socket=owner.socket)
    assert e.wait_connected(10)
    # the owner and the package come from one release: same version
    assert e.owner_version == pegaflow.__version__
    records: list[logging.LogRecord] = []
    log = logging.getLogger("test-owner-version")
    log.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r)})())
    check_owner_version(e, log)
    assert records == []
    # An owner of another release: its version as it records it in the
    # control segment header (docs/abi.md: owner_version at byte 400).
    ctl = Path(os.environ.get("PEGAFLOW_SHM_DIR", "/dev/shm")) / f"pegaflow-{owner.name}.ctl"
    with open(ctl, "r+b") as f:
        f.seek(400)
        f.write(b"9.9.9-other".ljust(32, b"\0"))
    assert e.owner_version == "9.9.9-other"
    for _ in range(3):
        check_owner_version(e, log)
    assert len(records) == 1, [r.getMessage() for r in records]
    msg = records[0].getMessage()
    assert records[0].levelno == logging.WARNING
    assert "9.9.9-other" in msg and pegaflow.__version__ in msg and owner.socket in msg, msg
