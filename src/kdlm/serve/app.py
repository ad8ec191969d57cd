"""The OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions, /v1/kdlm/stats.

/v1/completions also scores prompts (``echo: true, max_tokens: 0, logprobs: k``, prompts as text or token
ids, optionally ``return_tokens_as_token_ids`` as in vLLM), and /v1/models adds the served model's
``vocab_size`` and ``tokenizer_fingerprint``: a white-box teacher cache can be filled from the API.

Bad requests get a 4xx answer in OpenAI's error format (`{"error": {"message", "type", "param",
"code"}}`), never a crash: a body over the size cap is refused before it is read (413), a prompt
too long for the context before it is tokenised (400), and a full queue answers 429 with Retry-After.
A client that disconnects or times out takes its rows out of the decoder. For tests and benchmarks
the app can inject faults (429 with Retry-After, 500, stalls) at set rates and log every request it
answers, by a fingerprint of its body.

The endpoints are in kdlm.serve.routes, what a request passes before them (API key, admission) in
kdlm.serve.depends, and the server's state (`app.state.serve`) in kdlm.serve.state.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from fastapi import FastAPI

from kdlm.serve.errors import handle_errors
from kdlm.serve.flow import Load
from kdlm.serve.guard import LOOPBACK_HOSTS, RequestGuard
from kdlm.serve.routes import docs_router, router
from kdlm.serve.state import Faults, RequestLog, ServeState

__all__ = ["MAX_BODY_BYTES", "MAX_QUEUE_ROWS", "Faults", "create_app"]

# The largest legitimate body is a batch of token-id prompts to score (kdlm.teachers.api): 32 prompts of
# 8,192 ids take about 2 MB as JSON, a 128k-token text prompt about 0.5 MB. 4 MB leaves room and keeps
# what a request can cost the server in memory to tens of MB.
MAX_BODY_BYTES = 4 * 2**20
# Sequences queued or decoding: 16 batches of 32. A request further back would wait longer than clients
# usually do; told to retry later, it costs nothing meanwhile.
MAX_QUEUE_ROWS = 512


def create_app(
    backend, *, api_key: str | None = None, faults: Faults | None = None, request_log: Path | None = None,
    max_body_bytes: int = MAX_BODY_BYTES, max_queue: int = MAX_QUEUE_ROWS,
    allowed_hosts: Collection[str] | None = LOOPBACK_HOSTS,
) -> FastAPI:
    """Build the API around a backend (see kdlm.serve.backends).

    Args:
        backend: a ModelBackend or an EchoBackend.
        api_key: when set, every /v1 request (and /openapi.json) needs `Authorization: Bearer <api_key>`,
            and /docs and /redoc are off (a browser cannot send the key).
        faults: inject 429/500/stalls (for tests and benchmarks of clients).
        request_log: append one JSONL line per completion request (fingerprint, outcome).
        max_body_bytes: larger request bodies get a 413 before they are read.
        max_queue: sequences (n per prompt) queued or decoding at once; more get a 429 with Retry-After.
        allowed_hosts: names accepted in the Host header (see kdlm.serve.guard); None accepts any.
    """
    docs = api_key is None
    app = FastAPI(title="kdlm serve", docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, allowed_hosts=allowed_hosts)
    state = app.state.serve = ServeState(backend, Load(max_queue), api_key, faults or Faults(), RequestLog(request_log))
    # The names callers used before the state had one object (the same objects, not copies).
    app.state.backend, app.state.load, app.state.counts = backend, state.load, state.counts
    handle_errors(app)
    if not docs:
        app.include_router(docs_router)
    app.include_router(router)
    return app
