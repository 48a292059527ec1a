"""SGLang's own classes, on CPU, for the SGLang storage-backend tests.

Host pools are built the way SGLang builds them (its device KV pool class,
``get_device_pool_infos()``, then its host pool class), and the backend is
created and registered the way ``HiCacheController.attach_storage_backend``
does it (``StorageBackendFactory.create_backend`` with the documented
``dynamic`` extra config, ``register_mem_pool_host``,
``on_host_pools_registered``). Nothing is mocked.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
from sglang.srt.mem_cache.pool_host.mha import get_mha_host_pool_cls
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

PAGE = 16
LAYERS = 3
MODEL = "test/tiny-sglang"
DTYPE = torch.bfloat16
MHA_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
MLA_LAYOUTS = ("layer_first", "page_first", "page_first_direct")

#: The documented extra config (docs/sglang.md), less the owner's address.
BACKEND = {
    "backend_name": "pegaflow",
    "module_path": "pegaflow.sglang",
    "class_name": "PegaHiCacheStorage",
    "interface_v1": 1,
}


def make_host_pool(kind: str, layout: str, device_tokens: int = 256, ratio: float = 2.0) -> Any:
    """An SGLang host pool over a CPU device pool of ``device_tokens``."""
    if kind == "mha":
        dev = MHATokenToKVPool(
            size=device_tokens, page_size=PAGE, dtype=DTYPE, head_num=2, head_dim=64,
            layer_num=LAYERS, device="cpu", enable_memory_saver=False,
        )
        info = dev.get_device_pool_infos()[0].buffer_info
        cls = get_mha_host_pool_cls(info)
        return cls(
            info, ratio, 0, PAGE, layout, pin_memory=False, device="cpu",
            device_capacity_tokens=dev.size, start_layer=dev.start_layer,
            end_layer=dev.end_layer,
        )
    dev = MLATokenToKVPool(
        size=device_tokens, page_size=PAGE, dtype=DTYPE, kv_lora_rank=64,
        qk_rope_head_dim=16, layer_num=LAYERS, device="cpu", enable_memory_saver=False,
    )
    return MLATokenToKVPoolHost(
        dev.get_device_pool_infos()[0].buffer_info, ratio, 0, PAGE, layout,
        pin_memory=False, device="cpu", device_capacity_tokens=dev.size,
        start_layer=dev.start_layer, end_layer=dev.end_layer, target_layer_num=dev.layer_num,
        override_kv_cache_dim=dev.kv_cache_dim,
    )


def storage_config(
    owner: Any, *, tp_rank: int = 0, tp_size: int = 1, is_mla: bool = False,
    model: str = MODEL, **extra: Any,
) -> HiCacheStorageConfig:
    """What SGLang's controller hands its storage backend (``_generate_storage_config``)."""
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
        attn_cp_size=1, is_mla_model=is_mla, enable_storage_metrics=False,
        is_page_first_layout=False, model_name=model,
        extra_config={
            **BACKEND, "pegaflow.name": owner.name, "pegaflow.socket": owner.socket, **extra,
        },
    )


def attach(config: HiCacheStorageConfig, host_pool: Any) -> Any:
    """``HiCacheController.attach_storage_backend``'s steps for ``dynamic``."""
    backend = StorageBackendFactory.create_backend("dynamic", config, host_pool)
    backend.register_mem_pool_host(host_pool)
    hook = getattr(backend, "on_host_pools_registered", None)
    if hook is not None:
        hook()
    return backend


def page_hashes(tokens: list[int], prior: str | None = None) -> list[str]:
    """SGLang's storage page hashes: sha256(prior || u32 tokens), hex, chained."""
    out = []
    for i in range(0, len(tokens) - len(tokens) % PAGE, PAGE):
        h = hashlib.sha256()
        if prior:
            h.update(bytes.fromhex(prior))
        h.update(struct.pack(f"<{PAGE}I", *tokens[i : i + PAGE]))
        prior = h.hexdigest()
        out.append(prior)
    return out


def prompt(seed: int, pages: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (pages * PAGE,), generator=g).tolist()


def page_data(pool: Any, seed: int, i: int) -> torch.Tensor:
    """Deterministic contents of page ``i`` of prompt ``seed`` (a flat page)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    n = pool.get_dummy_flat_data_page().numel()
    return torch.randn(n, generator=g).to(DTYPE)


def fill(pool: Any, seed: int, pages: int) -> torch.Tensor:
    """Allocates ``pages`` host pages and writes their contents; returns the
    host indices (SGLang's token indices)."""
    idx = pool.alloc(pages * PAGE)
    assert idx is not None, "host pool full"
    for i in range(pages):
        pool.set_from_flat_data_page(int(idx[i * PAGE]), page_data(pool, seed, i))
    return idx


def pages_equal(pool: Any, idx: torch.Tensor, seed: int, pages: int) -> list[bool]:
    """Whether each page at ``idx`` holds prompt ``seed``'s contents, bit for bit."""
    out = []
    for i in range(pages):
        got = pool.get_data_page(int(idx[i * PAGE]), flat=True)
        want = page_data(pool, seed, i)
        out.append(torch.equal(got.view(torch.int16), want.view(torch.int16)))
    return out
