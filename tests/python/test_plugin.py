"""The `vllm.general_plugins` entry point, loaded the way vLLM loads it."""

import pytest

pytest.importorskip("vllm")


def test_general_plugin_registers_the_connector_by_name():
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.plugins import load_plugins_by_group

    plugins = load_plugins_by_group(group="vllm.general_plugins")
    assert "pegaflow" in plugins, f"entry point missing; vLLM found {sorted(plugins)}"
    KVConnectorFactory._registry.pop("PegaKVConnector", None)
    plugins["pegaflow"]()
    assert "PegaKVConnector" in KVConnectorFactory._registry
    from pegaflow.connector import PegaKVConnector

    assert KVConnectorFactory._registry["PegaKVConnector"]() is PegaKVConnector
    # vLLM may load plugins more than once per process.
    plugins["pegaflow"]()
