"""``pegaflow-router``: the HTTP entry point of prefill/decode disaggregation.

One OpenAI-compatible front (``/v1/completions``, ``/v1/chat/completions``,
streaming or not) over two lists of vLLM instances: prefill instances
(``kv_role: kv_producer``) and decode instances (``kv_role: kv_consumer``).
Each request goes

1. to a prefill instance, as the same request with ``max_tokens: 1``, no
   streaming, and ``kv_transfer_params: {"do_remote_decode": true}``: it
   computes the prompt's KV cache and saves it; its answer carries the
   ``kv_transfer_params`` that name what it saved (its text is dropped);
2. then to a decode instance, as the client's request plus those
   ``kv_transfer_params``: it loads the prompt's KV instead of computing it
   and generates; its answer (or its stream) goes back to the client as is.

Both hops carry the client's ``X-Request-Id`` (one is made when the client
sent none), so the id in the client's answer and in both instances' logs is
the same; the answer also carries ``X-PD-Prefill-Ms``, how long the
prefill hop took. Endpoints are probed on ``/health``; a side with no healthy
endpoint is answered at once with 503 and a message naming the side, an
endpoint that refuses or drops a connection before answering is marked down
and the next one of its side is tried, and an error the instance itself
returns (a 4xx) goes back to the client unchanged.

It is a Python module on aiohttp (a dependency of vLLM, so present wherever
vLLM is) rather than a Rust binary: it adds two local HTTP hops per request
(well under a millisecond each against a prefill of hundreds), and users get
it with ``pip install pegaflow`` without another build. See docs/pd.md.
"""

from pegaflow.router.app import Endpoint, Router, RouterConfig, build_app, main

__all__ = ["Endpoint", "Router", "RouterConfig", "build_app", "main"]
