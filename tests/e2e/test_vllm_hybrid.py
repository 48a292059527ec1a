"""A hybrid model (sliding-window + full attention, Gemma 3's shape) in real
vLLM engines on CPU with PegaKVConnector and a real owner (issue 11).

The model: a random-weight Gemma 3 text model, three sliding-window layers
(window 256 tokens: two of vLLM's 128-token CPU blocks) and one full
attention layer. vLLM's hybrid KV cache manager gives it four KV cache
groups of one layer each; it stays on with the connector (PegaKVConnector
implements SupportsHMA), which the first check proves from vLLM's log.

  (1) the same tokens with and without the connector (bit for bit), cold
      and on a hit, where the connector's hit must equal vLLM's own
      prefix-cache hit bit for bit (same KV, same tokens left to compute);
  (2) a hit in a new vLLM process (another PYTHONHASHSEED);
  (3) the pool bytes per hit token against the same model with vLLM's
      hybrid manager off (every layer treated as full attention, the cost
      of a dense model of that size): the sliding groups keep only their
      window, so the hybrid cost must be well under it.

Then a linear-attention model (Qwen3-Next's shape: three Gated DeltaNet
layers to one full attention layer, bf16, which vLLM's CPU backend requires
for it), which needs the hybrid manager: the same tokens with and without
the connector, and in a restarted vLLM hits (recurrent states at the hit
boundary, attention blocks before it) equal to vLLM's own prefix-cache hit.
"""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

import pytest

from harness import Owner, Vllm, find_owner_bin

BLOCK = 128
VOCAB = 2048
WINDOW = 256
LAYERS = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
MAX_TOKENS = 8


def make_gemma3(path: Path, seed: int = 0) -> None:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=len(LAYERS),
        layer_types=LAYERS,
        sliding_window=WINDOW,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.1,
        tie_word_embeddings=True,
    )
    Gemma3ForCausalLM(cfg).to(torch.float32).save_pretrained(str(path), safe_serialization=True)


def make_qwen3_next(path: Path, seed: int = 0) -> None:
    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3NextConfig(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=128,
        decoder_sparse_step=1,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,
    )
    Qwen3NextForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(path), safe_serialization=True)


def prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(700, 1100))] for _ in range(n)]


P = prompts(11, 3)


def full_blocks(prompt: list[int]) -> int:
    return (len(prompt) - 1) // BLOCK * BLOCK


def llm_kwargs(model: Path, **kw) -> dict:
    base = dict(
        model=str(model),
        skip_tokenizer_init=True,
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,
        kv_cache_memory_bytes=96 << 20,
        max_model_len=2048,
        seed=0,
        disable_log_stats=False,
    )
    base.update(kw)
    return base


def connector(owner: Owner) -> dict:
    return {
        "kv_connector": "PegaKVConnector",
        "kv_role": "kv_both",
        "kv_connector_module_path": "pegaflow.connector",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "pegaflow.name": owner.name,
            "pegaflow.socket": owner.socket,
            "pegaflow.reconnect_interval": 0.1,
        },
    }


def same(got: list[dict], want: list[dict], what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g["tokens"] == w["tokens"], f"{what}: prompt {i}: tokens differ"
        assert g["logprobs"] == w["logprobs"], f"{what}: prompt {i}: logprobs differ"


class Run:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.engines: list[Vllm] = []

    def launch(self, name: str, kwargs: dict, cores: str, hashseed: str) -> Vllm:
        v = Vllm(name, self.tmp, kwargs, {"VLLM_CPU_OMP_THREADS_BIND": cores, "PYTHONHASHSEED": hashseed})
        self.engines.append(v)
        return v


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gemma3")
    make_gemma3(d)
    return d


@pytest.fixture(scope="module")
def hy_owner(tmp_path_factory):
    binary = find_owner_bin()
    assert binary is not None
    o = Owner(binary, tmp_path_factory.mktemp("owner")).start()
    try:
        yield o
    finally:
        o.cleanup()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = Run(tmp_path_factory.mktemp("vllm"))
    try:
        yield r
    finally:
        for v in r.engines:
            v.kill()


def pool_bytes(owner: Owner) -> float:
    return owner.scrape().get("pegaflow_namespace_bytes", 0.0)


def wait_settled(owner: Owner, timeout: float = 40.0, quiet: float = 3.0) -> float:
    """The pool's bytes once the owner stopped publishing saves (nothing new
    for ``quiet`` seconds: with another engine loading its model on the
    other core, a request's last saves once came more than a second after
    the others, and its blocks then missed)."""
    deadline = time.monotonic() + timeout
    last, since = pool_bytes(owner), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        cur = pool_bytes(owner)
        if cur != last:
            last, since = cur, time.monotonic()
        elif time.monotonic() - since > quiet:
            return cur
    return last


def test_hybrid_model_hits_with_vllm_hybrid_manager_on(gemma3, hy_owner, run):
    # vLLM's own answers (no connector, its own prefix caching on), beside
    # the first connector engine on the other core.
    a = run.launch("A", llm_kwargs(gemma3, kv_transfer_config=connector(hy_owner)), "0", "0")
    ref = run.launch("ref", llm_kwargs(gemma3, enable_prefix_caching=True), "1", "0")
    ref.wait_ready()
    cold = ref.generate(P, MAX_TOKENS)
    own_hit = ref.generate(P, MAX_TOKENS)
    assert [o["cached"] for o in own_hit] == [full_blocks(p) for p in P], "vLLM's own prefix cache"
    ref.kill()  # (a clean shutdown of vLLM takes ~15 s here)
    # (3) the same model with vLLM's hybrid manager off: every layer saved
    # as full attention. It starts while A runs; it generates once A's
    # saves are counted.
    d = run.launch(
        "dense",
        llm_kwargs(gemma3, kv_transfer_config=connector(hy_owner), disable_hybrid_kv_cache_manager=True),
        "1",
        "2",
    )

    a.wait_ready()
    log = a.log.read_text(errors="replace")
    assert "Turning off hybrid kv cache manager" not in log, "vLLM turned its hybrid manager off"
    assert "PegaFlow caches a hybrid model" in log, log[-3000:]

    # (1) cold with the connector == cold without; the pool's cost of it
    b0 = pool_bytes(hy_owner)
    got = a.generate(P, MAX_TOKENS)
    same(got, cold, "cold, with the connector")
    assert [o["cached"] for o in got] == [0] * len(P)
    hybrid_bytes = wait_settled(hy_owner) - b0
    assert hybrid_bytes > 0

    # ... and a hit from the pool (vLLM's own prefix caching is off in A)
    got = a.generate(P, MAX_TOKENS)
    assert [o["cached"] for o in got] == [full_blocks(p) for p in P], "hits from PegaFlow"
    same(got, own_hit, "a PegaFlow hit vs vLLM's own prefix-cache hit")
    a.kill()

    # (2) a new vLLM process, another hash seed, starting while the dense one runs
    b = run.launch("B", llm_kwargs(gemma3, kv_transfer_config=connector(hy_owner)), "0", "1")
    d.wait_ready()
    b0 = wait_settled(hy_owner)
    got = d.generate(P, MAX_TOKENS)
    assert [o["cached"] for o in got] == [0] * len(P), "the dense layout must not share the hybrid's blocks"
    dense_bytes = wait_settled(hy_owner) - b0
    d.kill()

    b.wait_ready()
    got = b.generate(P, MAX_TOKENS)
    assert [o["cached"] for o in got] == [full_blocks(p) for p in P], "hits after a vLLM restart"
    same(got, own_hit, "a hit in a new vLLM process")
    b.kill()

    hit_tokens = sum(full_blocks(p) for p in P)
    per_hybrid, per_dense = hybrid_bytes / hit_tokens, dense_bytes / hit_tokens
    print(f"\npool bytes per hit token: hybrid {per_hybrid:.0f}, dense {per_dense:.0f} "
          f"({hybrid_bytes / dense_bytes:.0%})")
    # The full layer keeps every block (1/4 of the dense cost); each sliding
    # layer keeps the window around the prompt's end (2-3 of 6-8 blocks).
    assert hybrid_bytes < 0.7 * dense_bytes, (hybrid_bytes, dense_bytes)


def test_linear_attention_model_hits(tmp_path_factory, hy_owner, run):
    """Qwen3-Next's shape with vLLM's prefix caching on (its 'align' mamba
    cache mode, where a block holds the state at its end) and 256-token
    steps, so that every block boundary of a prompt has its state; vLLM's
    CPU backend makes the blocks 256 tokens for this model."""
    model = tmp_path_factory.mktemp("qwen3next")
    make_qwen3_next(model)
    kw = dict(dtype="bfloat16", enable_prefix_caching=True, max_num_batched_tokens=256)
    block = 256
    hit = [(len(p) - 1) // block * block for p in P]
    a = run.launch("Q", llm_kwargs(model, kv_transfer_config=connector(hy_owner), **kw), "0", "0")
    ref = run.launch("Q-ref", llm_kwargs(model, **kw), "1", "0")
    ref.wait_ready()
    cold = ref.generate(P, MAX_TOKENS)
    own = ref.generate(P, MAX_TOKENS)
    assert [o["cached"] for o in own] == hit, "vLLM's own prefix cache"
    ref.kill()
    # a new vLLM, started while A saves: its own prefix cache is empty, so
    # every hit it gets is PegaFlow's
    b = run.launch("Q-B", llm_kwargs(model, kv_transfer_config=connector(hy_owner), **kw), "1", "1")
    a.wait_ready()
    log = a.log.read_text(errors="replace")
    assert "Turning off hybrid kv cache manager" not in log
    assert "PegaFlow caches a hybrid model" in log and " mamba " in log, log[-3000:]
    b0 = pool_bytes(hy_owner)
    got = a.generate(P, MAX_TOKENS)
    same(got, cold, "cold, with the connector")
    assert wait_settled(hy_owner) > b0
    a.kill()
    got = b.wait_ready().generate(P, MAX_TOKENS)
    assert [o["cached"] for o in got] == hit, "hits after a vLLM restart"
    same(got, own, "a PegaFlow hit (states and attention blocks) vs vLLM's own prefix-cache hit")
    b.kill()
