"""Logging of the pegaflow Python package.

Inside vLLM (``vllm`` importable) a logger is vLLM's: made by
``vllm.logger.init_logger`` under the ``vllm.`` name space, so every line
gets vLLM's format, level (``VLLM_LOGGING_LEVEL``) and stream, exactly once.
Elsewhere it is a plain ``logging`` logger of the same name without the
prefix (``pegaflow.*``), configured by whoever hosts the package.

:func:`watch_connection` turns an owner connection's ups and downs into one
line each: connected, lost, reconnected, or not reachable (with the socket
and what to do). The Rust engine client keeps its own lines about them out
of the process's stderr (see ``init_logging`` in ``src/lib.rs``).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

#: What to do when an engine cannot reach its owner.
FIX = (
    "start pegaflow-owner on this node (systemctl start pegaflow-owner, or run "
    "pegaflow-owner) with the same --name, or point pegaflow.socket / pegaflow.name "
    "in kv_connector_extra_config at the socket it listens on"
)


#: owner versions already warned about in this process
_versions_warned: set[str] = set()
_versions_lock = threading.Lock()


def check_owner_version(engine: Any, logger: logging.Logger) -> None:
    """Warn once per process and owner version when the owner ``engine`` is
    connected to is not this package's version (they are released together:
    the owner binary ships in the same wheel)."""
    from pegaflow import __version__ as ours

    theirs = engine.owner_version
    if theirs is None or theirs == ours:
        return
    with _versions_lock:
        if theirs in _versions_warned:
            return
        _versions_warned.add(theirs)
    logger.warning(
        "PegaFlow: pegaflow-owner at %s is version %s but this pegaflow package is %s; "
        "run the owner from the same release (pip install pegaflow==%s puts its "
        "pegaflow-owner on PATH next to the package), then restart it",
        engine.socket, theirs, ours, ours,
    )


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` (``pegaflow.connector`` ...), vLLM's when it is installed."""
    try:
        from vllm.logger import init_logger
    except ImportError:
        return logging.getLogger(name)
    return init_logger(f"vllm.{name}")


def watch_connection(
    engine: Any,
    role: str,
    logger: logging.Logger,
    *,
    grace: float = 1.0,
    period: float = 0.2,
) -> threading.Thread:
    """Log, from a daemon thread, when ``engine`` (an ``Engine``) connects,
    loses its owner, reconnects, or has not reached it ``grace`` seconds
    after start. Ends when the engine is collected."""
    ref = weakref.ref(engine)
    socket = str(engine.socket)

    def run() -> None:
        connected: bool | None = None  # unknown yet
        ever = False  # connected at least once
        since = time.monotonic()
        warned = False
        while True:
            e = ref()
            if e is None:
                return
            st = e.stats()
            if st["connected"] and connected is not True:
                check_owner_version(e, logger)
            del e
            now = time.monotonic()
            if st["connected"]:
                if not ever:
                    logger.info(
                        "PegaFlow %s connected to pegaflow-owner at %s (owner epoch %d)",
                        role, socket, st["epoch"],
                    )
                elif connected is False:
                    logger.info(
                        "PegaFlow %s reconnected to pegaflow-owner at %s after %.1f s "
                        "(owner epoch %d); lookups and saves use the cache again",
                        role, socket, now - since, st["epoch"],
                    )
                connected, warned, ever = True, False, True
            elif connected is True:
                logger.warning(
                    "PegaFlow %s lost pegaflow-owner at %s: lookups miss and saves are "
                    "skipped until it is back (reconnecting by itself); if it does not "
                    "come back, %s",
                    role, socket, FIX,
                )
                connected, since, warned = False, now, True
            elif not warned and now - since >= grace:
                logger.warning(
                    "PegaFlow %s cannot reach pegaflow-owner at %s (%s): running without "
                    "the cache (lookups miss, saves are skipped) until it can. To fix: %s",
                    role, socket, st.get("last_error") or "not connected", FIX,
                )
                connected, warned = False, True
            time.sleep(period)

    t = threading.Thread(target=run, name=f"pegaflow-watch-{role}", daemon=True)
    t.start()
    return t
