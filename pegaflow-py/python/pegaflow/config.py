"""Connector configuration from vLLM's ``kv_connector_extra_config``.

Every key is documented in docs/vllm.md. Unknown ``pegaflow.*`` keys are an
error (a typo must not silently disable the cache); the original PegaFlow's
``pegaflow.host`` / ``pegaflow.port`` are accepted with a warning, since the
owner is reached through a Unix socket now.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from pegaflow._log import get_logger
from pegaflow.exceptions import ConfigError

logger = get_logger("pegaflow")

_BACKENDS = ("auto", "host", "dma", "kernel")
_LOAD_MODES = ("auto", "layerwise", "async")
_LEGACY = ("pegaflow.host", "pegaflow.port")


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int,)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key} must be a boolean (true/false), got {v!r}")


def _number(key: str, v: Any, what: str) -> float:
    if isinstance(v, bool):
        raise ConfigError(f"{key} must be {what}, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {what}, got {v!r}") from None


@dataclass(frozen=True)
class PegaflowConfig:
    #: Owner instance name (``pegaflow-owner --name``); default "default" or $PEGAFLOW_NAME.
    name: Optional[str] = None
    #: Owner socket path; default derived from the name (as the owner does) or $PEGAFLOW_SOCKET.
    socket: Optional[str] = None
    #: Copy backend for CUDA caches: auto | dma | kernel | host (CPU tensors always use host).
    #: ``auto`` times batched DMA against the copy kernel for loads at the
    #: first save and loads with the faster (docs/vllm.md).
    copy_backend: str = "auto"
    #: Save computed blocks into the pool.
    save: bool = True
    #: Load hits from the pool.
    load: bool = True
    #: Model identity in the namespace; default: vLLM's model name/path.
    model_id: Optional[str] = None
    #: Seconds between reconnect attempts while the owner is away.
    reconnect_interval: float = 0.2
    #: How hits are loaded: ``layerwise`` (in the step that computes the rest
    #: of the prompt, each layer's attention waiting on the GPU for that
    #: layer's copy: the fastest first token), ``async`` (the request waits in
    #: WAITING_FOR_REMOTE_KVS until the whole copy is done, then runs: other
    #: requests' steps never wait for it), or ``auto``: layer-wise when no
    #: other request is running, async otherwise.
    load_mode: str = "auto"
    #: Longest a step's saves wait for the owner to refill a short stash
    #: (seconds); blocks beyond what could be reserved are not saved.
    reserve_wait: float = 0.002
    #: Stage blocks the owner's SSD tier holds back into the pool (the
    #: request waits for the disk, no step does).
    ssd_stage: bool = True
    #: Longest one request waits for blocks being staged from SSD (seconds).
    ssd_stage_timeout: float = 5.0
    #: Fraction of requests whose load from PegaFlow is written as a JSON
    #: trace line (lookup, pin, copy issue, copy done, release), 0 to 1.
    trace_sample_rate: float = 0.01
    #: A load that takes this long or longer (milliseconds, from its lookup
    #: to its copy done) is always traced.
    slow_load_ms: float = 1000.0
    #: Seed of the trace sampling (reproducible choices); default: random.
    trace_seed: Optional[int] = None
    #: P/D decode (``kv_consumer``): longest a request waits for the blocks
    #: its prefill announced to be in the pool (seconds); then it loads what
    #: is there and computes the rest.
    pd_wait: float = 5.0
    #: P/D prefill (``kv_producer``): how long the blocks a finished prefill
    #: announced stay pinned for its decode (seconds); with ``pd_direct``,
    #: how long its GPU blocks stay lent (a decode copying then still
    #: finishes its copy).
    pd_hold: float = 10.0
    #: P/D on one node: a prefill lends its finished prompts' GPU blocks and
    #: the decode copies them GPU to GPU (CUDA IPC, over NVLink where the
    #: GPUs have it); the pool stays the fallback. False: always the pool.
    pd_direct: bool = True

    @classmethod
    def from_extra_config(cls, extra: Optional[Mapping[str, Any]]) -> "PegaflowConfig":
        extra = dict(extra or {})
        known = {
            "pegaflow.name": "name",
            "pegaflow.socket": "socket",
            "pegaflow.copy_backend": "copy_backend",
            "pegaflow.save": "save",
            "pegaflow.load": "load",
            "pegaflow.model_id": "model_id",
            "pegaflow.reconnect_interval": "reconnect_interval",
            "pegaflow.load_mode": "load_mode",
            "pegaflow.reserve_wait": "reserve_wait",
            "pegaflow.ssd_stage": "ssd_stage",
            "pegaflow.ssd_stage_timeout": "ssd_stage_timeout",
            "pegaflow.trace_sample_rate": "trace_sample_rate",
            "pegaflow.slow_load_ms": "slow_load_ms",
            "pegaflow.trace_seed": "trace_seed",
            "pegaflow.pd_wait": "pd_wait",
            "pegaflow.pd_hold": "pd_hold",
            "pegaflow.pd_direct": "pd_direct",
        }
        kw: dict[str, Any] = {}
        for key, value in extra.items():
            if not str(key).startswith("pegaflow."):
                continue  # other connectors' keys (MultiConnector) are not ours
            if key in _LEGACY:
                logger.warning(
                    "kv_connector_extra_config[%r] is ignored: PegaFlow now talks to "
                    "pegaflow-owner over a Unix socket on this node; use pegaflow.socket "
                    "or pegaflow.name instead (see docs/vllm.md)",
                    key,
                )
                continue
            if key not in known:
                raise ConfigError(
                    f"unknown PegaFlow config key {key!r}; known keys: "
                    + ", ".join(sorted(known) + list(_LEGACY))
                )
            kw[known[key]] = value
        if "copy_backend" in kw:
            b = str(kw["copy_backend"]).strip().lower()
            if b not in _BACKENDS:
                raise ConfigError(
                    f"pegaflow.copy_backend must be one of {', '.join(_BACKENDS)}, got {kw['copy_backend']!r}"
                )
            kw["copy_backend"] = b
        if "load_mode" in kw:
            m = str(kw["load_mode"]).strip().lower()
            if m not in _LOAD_MODES:
                raise ConfigError(
                    f"pegaflow.load_mode must be one of {', '.join(_LOAD_MODES)}, got {kw['load_mode']!r}"
                )
            kw["load_mode"] = m
        if "reserve_wait" in kw:
            try:
                kw["reserve_wait"] = float(kw["reserve_wait"])
            except (TypeError, ValueError):
                raise ConfigError(
                    f"pegaflow.reserve_wait must be seconds, got {kw['reserve_wait']!r}"
                ) from None
            if not 0 <= kw["reserve_wait"] <= 1:
                raise ConfigError("pegaflow.reserve_wait must be between 0 and 1 second")
        if "ssd_stage_timeout" in kw:
            try:
                kw["ssd_stage_timeout"] = float(kw["ssd_stage_timeout"])
            except (TypeError, ValueError):
                raise ConfigError(
                    f"pegaflow.ssd_stage_timeout must be seconds, got {kw['ssd_stage_timeout']!r}"
                ) from None
            if not kw["ssd_stage_timeout"] >= 0:
                raise ConfigError("pegaflow.ssd_stage_timeout must be >= 0")
        if "trace_sample_rate" in kw:
            kw["trace_sample_rate"] = _number("pegaflow.trace_sample_rate", kw["trace_sample_rate"], "a fraction")
            if not 0 <= kw["trace_sample_rate"] <= 1:
                raise ConfigError(
                    "pegaflow.trace_sample_rate must be between 0 (trace only slow loads) and 1 "
                    f"(trace every load), got {kw['trace_sample_rate']!r}"
                )
        if "slow_load_ms" in kw:
            kw["slow_load_ms"] = _number("pegaflow.slow_load_ms", kw["slow_load_ms"], "milliseconds")
            if not kw["slow_load_ms"] >= 0:
                raise ConfigError(
                    "pegaflow.slow_load_ms must be >= 0 milliseconds (0 traces every load; "
                    f"a huge value only the sampled ones), got {kw['slow_load_ms']!r}"
                )
        if kw.get("trace_seed") is not None:
            seed = kw["trace_seed"]
            if isinstance(seed, str) and seed.strip().lstrip("-").isdigit():
                seed = int(seed)
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ConfigError(f"pegaflow.trace_seed must be an integer, got {kw['trace_seed']!r}")
            kw["trace_seed"] = seed
        for k in ("pd_wait", "pd_hold"):
            if k in kw:
                try:
                    kw[k] = float(kw[k])
                except (TypeError, ValueError):
                    raise ConfigError(f"pegaflow.{k} must be seconds, got {kw[k]!r}") from None
                if not 0 <= kw[k] <= 3600:
                    raise ConfigError(f"pegaflow.{k} must be between 0 and 3600 seconds")
        for b in ("save", "load", "ssd_stage", "pd_direct"):
            if b in kw:
                kw[b] = _bool(f"pegaflow.{b}", kw[b])
        if "reconnect_interval" in kw:
            try:
                kw["reconnect_interval"] = float(kw["reconnect_interval"])
            except (TypeError, ValueError):
                raise ConfigError(
                    f"pegaflow.reconnect_interval must be seconds, got {kw['reconnect_interval']!r}"
                ) from None
            if not kw["reconnect_interval"] > 0:
                raise ConfigError("pegaflow.reconnect_interval must be > 0")
        for s in ("name", "socket", "model_id"):
            if s in kw and kw[s] is not None:
                kw[s] = os.fspath(kw[s]) if s == "socket" else str(kw[s])
        return cls(**kw)
