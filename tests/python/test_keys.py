"""Block keys (pegaflow.connector.keys and _native.chain_keys): what goes
into a key, and that nothing process-specific does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pegaflow import _native
from pegaflow.connector.keys import KeyChain, encode_extra, request_keys
from vllm.lora.request import LoRARequest
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm_harness import BLOCK, make_request

HERE = Path(__file__).resolve().parent
PROMPT = list(range(100, 100 + 4 * BLOCK + 5))  # 4 full blocks + 5 tokens


def image(identifier: str, offset: int, length: int) -> MultiModalFeatureSpec:
    return MultiModalFeatureSpec(
        data=None,
        modality="image",
        identifier=identifier,
        mm_position=PlaceholderRange(offset=offset, length=length),
    )


def test_known_answer():
    # The same vectors as pegaflow-core/src/keys.rs (computed independently
    # from the documented byte format): the Python path adds nothing.
    k = _native.chain_keys(None, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    assert [x.hex() for x in k] == [
        "d88fdde6aac4c345a9aa86eb405f825dc547288c4efdfec946ac1fc15208718a",
        "04acd77084ac6e1cc955843e85cbd503ffda8acc4259cd2ae4f57dc47918da98",
    ]
    s = _native.chain_keys(None, [1, 2, 3, 4], 4, [b"salt"])
    assert s[0].hex() == "feb288395d8027c657b8f362dafda57dd55bfc7cb6e3735eb4a9a880f1cc67df"
    # a plain request's keys are exactly chain_keys of its tokens
    r = make_request("r", PROMPT)
    assert request_keys(r, BLOCK) == _native.chain_keys(None, PROMPT, BLOCK)


def test_chain_keys_arguments():
    assert _native.chain_keys(None, list(range(20)), 16) == _native.chain_keys(
        None, list(range(16)), 16
    )
    with pytest.raises(ValueError, match="32"):
        _native.chain_keys(b"short", [1, 2], 2)
    with pytest.raises(ValueError, match="block_size"):
        _native.chain_keys(None, [1, 2], 0)
    with pytest.raises(ValueError, match="extra"):
        _native.chain_keys(None, [1, 2, 3, 4], 2, [None])
    with pytest.raises(OverflowError):
        _native.chain_keys(None, [-1, 2], 2)


def test_prefix_chained_and_incremental():
    r = make_request("r", PROMPT)
    full = request_keys(r, BLOCK)
    assert len(full) == 4 and len(set(full)) == 4
    # grown block by block (as the scheduler does) == computed at once
    chain = KeyChain(r, BLOCK)
    for n in range(5):
        assert chain.upto(n) == full[:n]
    assert chain.upto(100) == full  # never past the full blocks
    # a different first token changes every key after it
    other = request_keys(make_request("o", [7] + PROMPT[1:]), BLOCK)
    assert all(a != b for a, b in zip(full, other))
    # a different token in block 2 keeps blocks 0-1 and changes 2-3
    p2 = list(PROMPT)
    p2[2 * BLOCK + 3] += 1
    k2 = request_keys(make_request("p2", p2), BLOCK)
    assert k2[:2] == full[:2] and k2[2] != full[2] and k2[3] != full[3]


def test_decode_blocks_are_keyed_as_they_fill():
    r = make_request("r", PROMPT, max_tokens=64)
    chain = KeyChain(r, BLOCK)
    assert len(chain.upto(10)) == 4
    r.append_output_token_ids(list(range(500, 500 + BLOCK - 5)))  # fills block 4
    assert chain.upto(10) == request_keys(r, BLOCK) and len(chain.keys) == 5


def test_cache_salt_changes_every_key():
    plain = request_keys(make_request("a", PROMPT), BLOCK)
    s1 = request_keys(make_request("b", PROMPT, cache_salt="tenant-1"), BLOCK)
    s1b = request_keys(make_request("c", PROMPT, cache_salt="tenant-1"), BLOCK)
    s2 = request_keys(make_request("d", PROMPT, cache_salt="tenant-2"), BLOCK)
    assert s1 == s1b
    for i in range(4):  # the salt is in block 0; the chain carries it on
        assert len({plain[i], s1[i], s2[i]}) == 3


def test_lora_changes_every_key():
    plain = request_keys(make_request("a", PROMPT), BLOCK)
    l1 = request_keys(make_request("b", PROMPT, lora_request=LoRARequest("sql", 1, "/a")), BLOCK)
    l1b = request_keys(make_request("c", PROMPT, lora_request=LoRARequest("sql", 7, "/a")), BLOCK)
    l2 = request_keys(make_request("d", PROMPT, lora_request=LoRARequest("chat", 2, "/b")), BLOCK)
    assert l1 == l1b, "the adapter's int id is per process; vLLM does not hash it"
    for i in range(4):
        assert len({plain[i], l1[i], l2[i]}) == 3


def test_multimodal_items_change_the_blocks_they_touch():
    plain = request_keys(make_request("a", PROMPT), BLOCK)
    # an image over tokens 20..35 (blocks 1 and 2)
    a = request_keys(make_request("b", PROMPT, mm_features=[image("img-a", 20, 16)]), BLOCK)
    b = request_keys(make_request("c", PROMPT, mm_features=[image("img-b", 20, 16)]), BLOCK)
    moved = request_keys(make_request("d", PROMPT, mm_features=[image("img-a", 22, 14)]), BLOCK)
    assert a[0] == plain[0] == b[0], "block 0 holds no image"
    for i in (1, 2, 3):
        assert len({plain[i], a[i], b[i], moved[i]}) == 4
    # the same image again: the same keys (content-derived, not per request)
    assert a == request_keys(make_request("e", PROMPT, mm_features=[image("img-a", 20, 16)]), BLOCK)


def test_two_images_and_growth_match_one_shot():
    feats = [image("x", 4, 8), image("y", 30, 40)]
    r = make_request("r", list(range(1, 1 + 6 * BLOCK)), mm_features=feats)
    full = request_keys(r, BLOCK)
    chain = KeyChain(r, BLOCK)
    got = []
    for n in range(1, 7):
        got = chain.upto(n)
    assert got == full


def test_encode_extra_is_tagged():
    assert encode_extra(None) == b"N"
    distinct = [("a",), "a", b"a", 1, True, ("a", 1), (("a",), 1), ["a", 1, None]]
    enc = [encode_extra(x) for x in distinct]
    assert len(set(enc)) == len(enc)  # str vs bytes vs tuple vs int vs bool ...
    assert encode_extra(("a", 1)) == encode_extra(["a", 1])
    with pytest.raises(Exception, match="float"):
        encode_extra(1.5)


def test_unkeyable_extras_give_no_keys():
    r = make_request("r", PROMPT, cache_salt="s")
    r.cache_salt = 1.5  # not something vLLM sends; must not key it wrong
    assert KeyChain(r, BLOCK).upto(4) == []


_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from vllm.lora.request import LoRARequest
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from pegaflow.connector.keys import request_keys
from vllm_harness import BLOCK, make_request
prompt = list(range(100, 100 + 4 * BLOCK))
img = MultiModalFeatureSpec(data=None, modality="image", identifier="img",
                            mm_position=PlaceholderRange(offset=20, length=16))
r = make_request("r", prompt, cache_salt="salt", lora_request=LoRARequest("sql", 3, "/a"),
                 mm_features=[img])
print(json.dumps({"keys": [k.hex() for k in request_keys(r, BLOCK)],
                  "vllm": [bytes(h).hex() for h in r.block_hashes]}))
"""


def test_keys_do_not_depend_on_pythonhashseed():
    procs = []
    for seed in ("1", "2", None):
        env = dict(os.environ)
        env.pop("PYTHONHASHSEED", None)
        if seed is not None:
            env["PYTHONHASHSEED"] = seed
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(HERE)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert len(outs[0]["keys"]) == 4
    assert outs[0]["keys"] == outs[1]["keys"] == outs[2]["keys"]
    # what the test guards against: vLLM's own hashes differ per seed
    assert len({o["vllm"][0] for o in outs}) == 3
