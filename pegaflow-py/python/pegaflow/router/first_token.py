"""The prefill's first token goes to the client; the decode continues from it.

A prefill instance computes the whole prompt and samples one token: that
token is the model's first output for the request, exactly what a single
instance would have sent first. Dropping it and letting the decode compute
it again costs the client the decode's whole first step (waiting for its
running batch's step to end, then the step with the prompt's tail): on an
H200 with a busy decode, 100-130 ms of TTFT. So for ``/v1/completions``
requests the router

1. asks the prefill for the token ids too (``return_token_ids``);
2. opens the decode hop with the prompt's token ids plus that token as the
   prompt, ``max_tokens - 1`` (and ``min_tokens - 1``), and the prefill's
   ``kv_transfer_params`` (the decode loads the prompt's KV and computes only
   its tail and the new token's);
3. once the decode answered (its headers: it took the request), sends the
   client the first token as its first stream event, then the decode's
   events, rewritten to read as one completion: the prefill's id, the
   client's prompt (``prompt_token_ids`` and ``usage.prompt_tokens`` without
   the carried token, ``completion_tokens`` with it). A JSON answer is the
   two merged the same way.

Requests this cannot reproduce exactly keep the plain path (the decode
computes the first token; the prefill's is dropped): chat completions (the
token cannot be appended to messages without re-tokenizing text), several
prompts or choices (``n``, ``best_of``), ``echo``, ``suffix``, log
probabilities, and stop strings (one could span the first and second
token, which no instance would then see whole). When the prefill's answer
has no token ids (an instance without ``return_token_ids``), the plain path
too. A request the first token already ends (``max_tokens`` 1, or the
token was a stop token) is answered from the prefill alone.
"""

from __future__ import annotations

import json
from typing import Any, Optional

#: request fields that keep a completion on the plain path when set
_PLAIN_IF_SET = ("echo", "suffix", "logprobs", "prompt_logprobs", "stop")


def eligible(path: str, body: dict[str, Any]) -> bool:
    """Whether the prefill's token can be the client's first."""
    if not path.endswith("/completions") or path.endswith("/chat/completions"):
        return False
    p = body.get("prompt")
    single = isinstance(p, str) or (
        isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
    )
    if not single:
        return False
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        return False
    if any(body.get(k) not in (None, False, [], "") for k in _PLAIN_IF_SET):
        return False
    if body.get("logprobs") is not None or body.get("prompt_logprobs") is not None:
        return False  # (logprobs 0 asks for the sampled token's own)
    mt = body.get("max_tokens")
    return mt is None or (isinstance(mt, int) and mt >= 1)


def first_of(answer: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The prefill answer's choice with its token and prompt ids, if it has them."""
    ch = answer.get("choices")
    if not isinstance(ch, list) or len(ch) != 1 or not isinstance(ch[0], dict):
        return None
    c = ch[0]
    toks, prompt = c.get("token_ids"), c.get("prompt_token_ids")
    if not (isinstance(toks, list) and len(toks) == 1 and isinstance(prompt, list) and prompt):
        return None
    return c


def ends_here(body: dict[str, Any], choice: dict[str, Any]) -> bool:
    """The first token already finishes the request (no decode hop)."""
    return body.get("max_tokens") == 1 or choice.get("finish_reason") not in (None, "length")


def decode_body(body: dict[str, Any], choice: dict[str, Any], params: Any) -> dict[str, Any]:
    """The client's request, continued after the prefill's token."""
    d = dict(body)
    d["prompt"] = list(choice["prompt_token_ids"]) + list(choice["token_ids"])
    for k in ("max_tokens", "max_completion_tokens"):
        if isinstance(d.get(k), int):
            d[k] = d[k] - 1
    if isinstance(d.get("min_tokens"), int) and d["min_tokens"] > 0:
        d["min_tokens"] -= 1
    # the decode must say the ids to fix up its answer (dropped again below
    # unless the client asked for them)
    d["return_token_ids"] = True
    if params is not None:
        d["kv_transfer_params"] = params
    else:
        d.pop("kv_transfer_params", None)
    return d


class Stitcher:
    """Makes the prefill's first token and the decode's answer one completion."""

    def __init__(self, body: dict[str, Any], prefill_answer: dict[str, Any], choice: dict[str, Any]):
        self.want_ids = bool(body.get("return_token_ids"))
        so = body.get("stream_options") or {}
        self.continuous_usage = bool(isinstance(so, dict) and so.get("continuous_usage_stats"))
        self.include_usage = bool(isinstance(so, dict) and so.get("include_usage"))
        self.id = prefill_answer.get("id")
        self.created = prefill_answer.get("created")
        self.model = prefill_answer.get("model")
        self.choice = choice
        self.prompt_len = len(choice["prompt_token_ids"])

    def _ids(self, c: dict[str, Any], first: bool) -> None:
        if not self.want_ids:
            c.pop("token_ids", None)
            c.pop("prompt_token_ids", None)
        elif first:
            c["prompt_token_ids"] = list(self.choice["prompt_token_ids"])
        else:
            c.pop("prompt_token_ids", None)

    def _usage(self, u: Any) -> Any:
        if isinstance(u, dict) and isinstance(u.get("prompt_tokens"), int):
            u = dict(u)
            u["prompt_tokens"] = self.prompt_len
            if isinstance(u.get("completion_tokens"), int):
                u["completion_tokens"] += 1
        return u

    def _sse(self, choices: list[dict[str, Any]], usage: bool) -> bytes:
        ev: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage:
            ev["usage"] = {"prompt_tokens": self.prompt_len, "completion_tokens": 1,
                           "total_tokens": self.prompt_len + 1}
        return b"data: " + json.dumps(ev).encode() + b"\n\n"

    def _token(self, final: bool) -> dict[str, Any]:
        """The prefill's token as a stream choice (``final``: with its finish reason)."""
        c: dict[str, Any] = {
            "index": 0,
            "text": self.choice.get("text", ""),
            "logprobs": None,
            "finish_reason": self.choice.get("finish_reason") if final else None,
            "stop_reason": self.choice.get("stop_reason") if final else None,
            "token_ids": list(self.choice["token_ids"]),
        }
        self._ids(c, first=True)
        return c

    def first_event(self) -> bytes:
        return self._sse([self._token(final=False)], usage=self.continuous_usage)

    def event(self, raw: bytes) -> bytes:
        """One SSE event of the decode's stream (without its blank line)."""
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            return raw + b"\n\n"
        try:
            ev = json.loads(line[6:])
        except ValueError:
            return raw + b"\n\n"
        if not isinstance(ev, dict) or "choices" not in ev:
            return raw + b"\n\n"  # an error event: as it came
        if self.id is not None:
            ev["id"] = self.id
        for c in ev.get("choices") or []:
            if isinstance(c, dict):
                self._ids(c, first=False)
        if "usage" in ev and ev["usage"] is not None:
            ev["usage"] = self._usage(ev["usage"])
        return b"data: " + json.dumps(ev).encode() + b"\n\n"

    def merge(self, decode_answer: dict[str, Any]) -> dict[str, Any]:
        """A JSON answer: the prefill's token, then the decode's."""
        out = dict(decode_answer)
        if self.id is not None:
            out["id"] = self.id
        chs = out.get("choices")
        if isinstance(chs, list) and chs and isinstance(chs[0], dict):
            c = dict(chs[0])
            c["text"] = (self.choice.get("text") or "") + (c.get("text") or "")
            if isinstance(c.get("token_ids"), list):
                c["token_ids"] = list(self.choice["token_ids"]) + c["token_ids"]
            self._ids(c, first=True)
            out["choices"] = [c] + chs[1:]
        if out.get("usage") is not None:
            out["usage"] = self._usage(out["usage"])
        out.pop("kv_transfer_params", None)
        return out

    def alone_events(self) -> bytes:
        """A stream of the prefill's answer alone: its token (with its
        finish reason), the usage if asked, the end."""
        out = self._sse([self._token(final=True)], usage=self.continuous_usage)
        if self.include_usage:
            out += self._sse([], usage=True)
        return out + b"data: [DONE]\n\n"

    def alone(self, prefill_answer: dict[str, Any]) -> dict[str, Any]:
        """The prefill's answer as the whole completion."""
        out = dict(prefill_answer)
        out.pop("kv_transfer_params", None)
        chs = out.get("choices")
        if isinstance(chs, list) and chs and isinstance(chs[0], dict):
            c = dict(chs[0])
            self._ids(c, first=True)
            out["choices"] = [c]
        return out
