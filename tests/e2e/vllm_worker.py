"""One real vLLM engine (`vllm.LLM`) in its own process, driven by the tests.

usage: python vllm_worker.py REPLY_FD  (LLM keyword arguments as JSON on the first stdin line)

Each further stdin line is a JSON command; the answer is one JSON line written
to REPLY_FD (a pipe the test passed in), because vLLM and its child processes
log to stdout and stderr, which the test sends to a log file.

  {"op": "generate", "prompts": [[ids...], ...], "max_tokens": N,
   "kv_transfer_params": [{...} or null, ...] (optional, one per prompt)}
      -> {"outputs": [{"tokens": [...], "logprobs": [...], "cached": n,
                       "kv_transfer_params": {...} or null}], "seconds": s}
  {"op": "reset_prefix_cache"} -> {"ok": true|false}
  {"op": "metrics"}            -> {"metrics": {name: value summed over labels}}
  {"op": "exit"}               -> {"ok": true}, then the process exits

Greedy sampling with the logprob of each sampled token, so that two runs can be
compared bit for bit (Python's float repr round-trips exactly through JSON).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def main() -> None:
    reply = os.fdopen(int(sys.argv[1]), "w", buffering=1)

    def answer(obj: dict) -> None:
        reply.write(json.dumps(obj) + "\n")

    kwargs = json.loads(sys.stdin.readline())
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(**kwargs)
    except BaseException:  # the test needs the reason, whatever it is
        answer({"error": traceback.format_exc()})
        raise
    answer({"ready": True, "pid": os.getpid()})

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "generate":
                sp = SamplingParams(
                    max_tokens=cmd["max_tokens"],
                    temperature=0.0,
                    logprobs=1,
                    detokenize=False,
                    ignore_eos=True,
                )
                kvp = cmd.get("kv_transfer_params")
                if kvp is not None:
                    # vLLM takes a request's kv_transfer_params from its sampling params
                    sp = [sp.clone() for _ in kvp]
                    for s, params in zip(sp, kvp):
                        s.extra_args = {"kv_transfer_params": params} if params is not None else None
                t0 = time.perf_counter()
                outs = llm.generate(
                    [{"prompt_token_ids": p} for p in cmd["prompts"]], sp, use_tqdm=False
                )
                took = time.perf_counter() - t0
                res = []
                for o in outs:
                    c = o.outputs[0]
                    toks = list(c.token_ids)
                    lps = [float(lp[t].logprob) for t, lp in zip(toks, c.logprobs)]
                    res.append({"tokens": toks, "logprobs": lps, "cached": o.num_cached_tokens or 0,
                                "kv_transfer_params": o.kv_transfer_params})
                answer({"outputs": res, "seconds": took})
            elif op == "reset_prefix_cache":
                answer({"ok": bool(llm.reset_prefix_cache())})
            elif op == "metrics":
                sums: dict[str, float] = {}
                for m in llm.get_metrics():
                    v = getattr(m, "value", None)
                    if isinstance(v, (int, float)):
                        sums[m.name] = sums.get(m.name, 0) + v
                answer({"metrics": sums})
            elif op == "exit":
                answer({"ok": True})
                break
            else:
                answer({"error": f"unknown op {op!r}"})
        except Exception:  # noqa: BLE001 - reported to the test, which fails with it
            answer({"error": traceback.format_exc()})
    del llm


if __name__ == "__main__":
    main()
