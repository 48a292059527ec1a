"""kv_connector_extra_config parsing (docs/vllm.md lists every key)."""

import logging

import pytest

from pegaflow.config import PegaflowConfig
from pegaflow.exceptions import ConfigError


def test_defaults():
    c = PegaflowConfig.from_extra_config(None)
    assert (c.name, c.socket, c.copy_backend, c.save, c.load) == (None, None, "auto", True, True)


def test_all_keys():
    c = PegaflowConfig.from_extra_config(
        {
            "pegaflow.name": "n1",
            "pegaflow.socket": "/tmp/x.sock",
            "pegaflow.copy_backend": "DMA",
            "pegaflow.save": "false",
            "pegaflow.load": 1,
            "pegaflow.model_id": "llama-8b",
            "pegaflow.reconnect_interval": "0.5",
            "other.connector.key": 3,
        }
    )
    assert c == PegaflowConfig("n1", "/tmp/x.sock", "dma", False, True, "llama-8b", 0.5)


def test_legacy_host_port_warn(caplog):
    from pegaflow.config import logger

    # vLLM's loggers do not propagate to the root, where caplog listens
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            c = PegaflowConfig.from_extra_config({"pegaflow.host": "http://127.0.0.1", "pegaflow.port": 50055})
    finally:
        logger.removeHandler(caplog.handler)
    assert c == PegaflowConfig()
    # (one record reaches caplog's handler twice when vLLM's logger propagates)
    assert len({id(r) for r in caplog.records if "ignored" in r.message and "Unix socket" in r.message}) == 2


@pytest.mark.parametrize(
    "extra",
    [
        {"pegaflow.sokcet": "/x"},
        {"pegaflow.copy_backend": "nvlink"},
        {"pegaflow.save": "maybe"},
        {"pegaflow.reconnect_interval": 0},
    ],
)
def test_bad_values(extra):
    with pytest.raises(ConfigError):
        PegaflowConfig.from_extra_config(extra)


def test_ssd_staging_keys():
    c = PegaflowConfig.from_extra_config({"pegaflow.ssd_stage": "false", "pegaflow.ssd_stage_timeout": "0.5"})
    assert (c.ssd_stage, c.ssd_stage_timeout) == (False, 0.5)
    with pytest.raises(ConfigError, match="ssd_stage_timeout"):
        PegaflowConfig.from_extra_config({"pegaflow.ssd_stage_timeout": "soon"})
    c = PegaflowConfig.from_extra_config({"pegaflow.load_mode": "LayerWise"})
    assert c.load_mode == "layerwise"
    with pytest.raises(ConfigError, match="load_mode"):
        PegaflowConfig.from_extra_config({"pegaflow.load_mode": "eager"})
