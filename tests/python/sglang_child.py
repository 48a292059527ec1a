"""Another SGLang process for test_sglang.py: a fresh host pool and a fresh
backend (SGLang's factory, SGLang's host pool classes) against the owner the
test runs; prints one JSON line with what it found.

usage: sglang_child.py OWNER_NAME OWNER_SOCKET KIND LAYOUT SEED PAGES TP_RANK TP_SIZE
"""

from __future__ import annotations

import json
import sys
import warnings
from types import SimpleNamespace

warnings.simplefilter("ignore")

import sglang_harness as h  # noqa: E402


def main() -> None:
    name, socket, kind, layout, seed, pages, tp_rank, tp_size = sys.argv[1:9]
    seed, pages, tp_rank, tp_size = int(seed), int(pages), int(tp_rank), int(tp_size)
    owner = SimpleNamespace(name=name, socket=socket)
    pool = h.make_host_pool(kind, layout)
    backend = h.attach(
        h.storage_config(owner, tp_rank=tp_rank, tp_size=tp_size, is_mla=kind == "mla"), pool
    )
    engine = backend._loader.engine
    assert engine.wait_connected(10.0), "child could not reach the owner"
    keys = h.page_hashes(h.prompt(seed, pages))
    hit = backend.batch_exists(keys)
    # a host region of its own, left as SGLang allocates it (zeros)
    idx = pool.alloc(pages * h.PAGE)
    got = backend.batch_get_v1(keys, idx)
    print(json.dumps({
        "namespace": backend.namespace,
        "exists": hit,
        "got": got,
        "byte_exact": h.pages_equal(pool, idx, seed, pages),
        "stats": backend.stats(),
    }))
    backend.close()


if __name__ == "__main__":
    main()
