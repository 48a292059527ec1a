"""The hybrid-model rules of pegaflow.connector.groups, checked against
vLLM's own: which sliding-window blocks a hit needs (vLLM's
SlidingWindowManager.get_num_skipped_tokens), the longest hit every group
can serve (against a brute force over every boundary), what each group
keeps, and that groups and model shapes never share a namespace."""

from __future__ import annotations

import random

import pytest
import torch

from pegaflow.connector import groups as hma
from pegaflow.connector.namespace import KvShape


def group(index: int, kind: str, window: int = 0, bs: int = 16, layers: int = 1) -> hma.Group:
    shape = KvShape(
        block_size=bs, num_layers=layers, layer_block_bytes=4096, dtype="bfloat16", dtype_size=2, is_mla=False
    )
    names = tuple(f"model.layers.{index * 10 + i}.attn" for i in range(layers))
    return hma.Group(index=index, kind=kind, shape=shape, layer_names=names, window=window)


@pytest.mark.parametrize("window,bs", [(128, 16), (256, 128), (100, 16), (16, 16), (17, 16), (4096, 16)])
def test_first_needed_is_vllms_skipped_blocks(window, bs):
    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager

    g = group(0, hma.SLIDING, window, bs)
    for n in range(0, 400):
        tokens = n * bs
        # vLLM's formula (SlidingWindowManager.get_num_skipped_tokens, no
        # extra retained tokens), evaluated on an object that has only it
        probe = type("P", (), {"sliding_window": window, "extra_retained_tokens": 0})()
        skipped = SlidingWindowManager.get_num_skipped_tokens(probe, tokens)
        assert g.first_needed(n) == skipped // bs, (n, window, bs)


def brute_force(groups, max_blocks, present):
    best = 0
    for n in range(0, max_blocks + 1):
        ok = True
        for g in groups:
            need = range(g.first_needed(n), n)
            if not all(present[g.index][i] for i in need):
                ok = False
        if ok:
            best = n
    return best


@pytest.mark.parametrize("seed", range(40))
def test_longest_hit_is_the_longest_boundary_every_group_serves(seed):
    rng = random.Random(seed)
    groups = [group(0, hma.FULL)] + [
        group(i, hma.SLIDING, rng.choice([16, 40, 64, 128])) for i in range(1, rng.randrange(2, 5))
    ]
    if rng.random() < 0.3:
        groups.append(group(len(groups), hma.FULL))
    if rng.random() < 0.5:
        groups.append(group(len(groups), hma.MAMBA))  # needs the state at the boundary only
    max_blocks = rng.randrange(0, 80)
    density = rng.random()
    present = {
        g.index: [g.kind == hma.FULL and i < max_blocks * 0.8 or rng.random() < density for i in range(max_blocks)]
        for g in groups
    }
    probes = []

    def held(g, lo, hi):
        probes.append((g.index, lo, hi))
        c = 0
        while lo + c < hi and present[g.index][lo + c]:
            c += 1
        return c

    assert hma.longest_hit(groups, max_blocks, held) == brute_force(groups, max_blocks, present)
    # every round of probes but the last moves the boundary down
    assert len(probes) <= (max_blocks + 1) * len(groups)


def test_sliding_group_keeps_only_checkpoint_windows():
    g = group(1, hma.SLIDING, window=128, bs=16)  # 8 blocks of window
    every = hma.checkpoint_every([group(0, hma.FULL), g])
    assert every == hma.CHECKPOINT_WINDOWS * g.window_blocks == 32
    prompt = 1000  # tokens: blocks 0..61 full
    ends = hma.prompt_checkpoints(prompt, 16)
    assert ends == (62,)
    kept = [b for b in range(62) if hma.sliding_keeps(g, b, every, ends)]
    # the window before block 32 and before the prompt's end
    assert kept == list(range(24, 32)) + list(range(54, 62))
    # every checkpoint boundary then finds its whole window
    for n in (32, 62):
        assert set(range(g.first_needed(n), n)) <= set(kept)


def test_group_namespaces_never_collide():
    from vllm.config import DeviceConfig, ParallelConfig, VllmConfig

    from pegaflow.connector.namespace import namespaces_for

    vc = VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=2), device_config=DeviceConfig("cpu"))
    gs = [group(0, hma.FULL), group(1, hma.SLIDING, 128), group(2, hma.SLIDING, 128)]
    other = [group(0, hma.FULL), group(1, hma.SLIDING, 256), group(2, hma.SLIDING, 128)]
    seen = {}
    for model in (gs, other):
        for g in model:
            for ns in namespaces_for(vc, g.shape, "m", None, group_tag=hma.group_tag(model, g)):
                assert ns not in seen, f"namespace of {g} also {seen[ns]}"
                seen[ns] = g
    dense = namespaces_for(vc, gs[0].shape, "m", None)
    assert not set(dense) & set(seen)
