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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import secrets
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdlm.serve import answers
from kdlm.serve.backends import Params
from kdlm.serve.flow import ApiError, ClientGone, Load, Ticket, TrackedStream, until_gone
from kdlm.serve.guard import LOOPBACK_HOSTS, BodyTooLarge, RequestGuard, error_body

# The largest legitimate body is a batch of token-id prompts to score (kdlm.teachers.api): 32 prompts of
# 8,192 ids take about 2 MB as JSON, a 128k-token text prompt about 0.5 MB. 4 MB leaves room and keeps
# what a request can cost the server in memory to tens of MB.
MAX_BODY_BYTES = 4 * 2**20
# Sequences queued or decoding: 16 batches of 32. A request further back would wait longer than clients
# usually do; told to retry later, it costs nothing meanwhile.
MAX_QUEUE_ROWS = 512


class _Request(BaseModel):
    # Unknown OpenAI parameters (user, frequency_penalty, ...) are accepted and ignored.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Request):
    # Token-id prompts (OpenAI and vLLM accept them too) skip tokenisation: what a scoring client needs.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: score the prompt, generate nothing
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM's extension: tokens as "token_id:N", never ambiguous


@dataclass
class Faults:
    """Faults injected before a completion request is served, each drawn at its rate."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_stall: float = 0.0
    retry_after_s: float = 1.0
    stall_s: float = 30.0  # then the request gets a 503; the client should have given up by then
    seed: int = 0


class RequestLog:
    """A JSONL file with one line per completion request: the fingerprint of its body and its outcome."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, fingerprint: str, status: str, received: float) -> None:
        if self.path is not None:
            entry = {"fingerprint": fingerprint, "status": status, "received": received, "time": time.time()}
            with self.path.open("a") as sink:
                sink.write(json.dumps(entry) + "\n")


def _protect_docs(app: FastAPI, authorize) -> None:
    """With an API key: no /docs or /redoc (a browser cannot send the key), /openapi.json only with the key."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorize)])
    async def openapi():
        return app.openapi()


def _handle_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return JSONResponse(
            error_body(error.status, error.message, error.code, error.param), error.status, headers=error.headers
        )

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, error: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": no one reads it

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"] if part != "body") or "body"
            problems.append(f"{where}: {item['msg']}")
        param = ".".join(str(part) for part in error.errors()[0]["loc"] if part != "body") if error.errors() else None
        return JSONResponse(error_body(400, "invalid request: " + "; ".join(problems), "invalid_request", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        if isinstance(error, BodyTooLarge):  # close: the rest of the body is never read
            return JSONResponse(error_body(413, str(error.detail), "request_too_large"), 413,
                                headers={"connection": "close"})
        return JSONResponse(error_body(error.status_code, str(error.detail), "http_error"), error.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception):
        return JSONResponse(error_body(500, f"internal error: {type(error).__name__}: {error}", "server_error"), 500)


def create_app(
    backend, *, api_key: str | None = None, faults: Faults | None = None, request_log: Path | None = None,
    max_body_bytes: int = MAX_BODY_BYTES, max_queue: int = MAX_QUEUE_ROWS,
    allowed_hosts: Collection[str] | None = LOOPBACK_HOSTS,
) -> FastAPI:
    """Build the API around a backend (see kdlm.serve.backends).

    Args:
        backend: a ModelBackend or an EchoBackend.
        api_key: when set, every /v1 request (and /openapi.json) needs `Authorization: Bearer <api_key>`,
            and /docs and /redoc are off.
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
    app.state.backend = backend
    faults = faults or Faults()
    fault_draw = random.Random(faults.seed)
    log = RequestLog(request_log)
    # received: completion requests that passed authentication; the rest are their outcomes.
    counts = {"received": 0, "answered": 0, "client_gone": 0, "429": 0, "500": 0, "stall": 0, "rejected": 0,
              "busy": 0}
    load = app.state.load = Load(max_queue)
    app.state.counts = counts
    # One thread tokenises, off the event loop: a long prompt does not stall other requests, and a
    # tokenizer is never called from two threads at once (fast tokenizers can refuse that).
    tokenizing = ThreadPoolExecutor(1, thread_name_prefix="kdlm-tokenize")
    wait_estimate = getattr(backend, "wait_estimate", lambda rows: 1.0)
    _handle_errors(app)

    async def authorize(request: Request) -> None:
        # A dependency rather than an HTTP middleware: starlette's middleware wrapper hides a client's
        # disconnect from the handler, and the request log needs to see it.
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                counts["rejected"] += 1
                message = "invalid API key: send `Authorization: Bearer <key>` with the key the server was started with"
                raise ApiError(401, message, "invalid_api_key")

    if not docs:
        _protect_docs(app, authorize)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    async def models():
        info = backend.model_info() if hasattr(backend, "model_info") else {}
        return {"object": "list", "data": [{"id": backend.name, "object": "model", "created": 0, "owned_by": "kdlm", **info}]}

    @v1.get("/kdlm/stats")
    async def stats():
        return {**backend.stats(), **counts, "in_flight_requests": load.requests, "in_flight_rows": load.rows}

    class Call:
        """One completion request on its way: its fingerprint, arrival time and admission."""

        def __init__(self, request: Request, fingerprint: str):
            self.request, self.fingerprint, self.received = request, fingerprint, time.time()
            self.ticket: Ticket | None = None

        def outcome(self, status: str) -> None:
            counts[status] += 1
            log.write(self.fingerprint, status, self.received)

        async def finish(self) -> None:
            self.outcome("client_gone" if await self.request.is_disconnected() else "answered")

        async def until_gone(self, work):
            try:
                return await until_gone(self.request, work)
            except ClientGone:
                self.outcome("client_gone")
                raise

    @contextlib.asynccontextmanager
    async def admitted(request: Request, body: _Request, rows: int):
        """The checks every completion request goes through, then its admission, held until it ends."""
        call = Call(request, hashlib.sha256(await request.body()).hexdigest()[:16])
        call.ticket = load.open()
        try:
            counts["received"] += 1
            if body.model != backend.name:
                raise ApiError(404, f"model {body.model!r} is not served here; this server serves {backend.name!r}",
                               "model_not_found", "model")
            await _inject_fault(call)
            try:
                load.admit(call.ticket, rows, wait_estimate)
            except ApiError as error:
                if error.status == 429:
                    call.outcome("busy")
                raise
            yield call
        finally:
            if not call.ticket.kept:
                call.ticket.release()

    async def _inject_fault(call: Call) -> None:
        draw = fault_draw.random()
        if draw < faults.rate_429:
            call.outcome("429")
            raise ApiError(429, "rate limit reached (injected fault)", "rate_limit_exceeded",
                           headers={"Retry-After": f"{faults.retry_after_s:g}"})
        if draw < faults.rate_429 + faults.rate_500:
            call.outcome("500")
            raise ApiError(500, "internal error (injected fault)", "server_error")
        if draw < faults.rate_429 + faults.rate_500 + faults.rate_stall:
            call.outcome("stall")
            await until_gone(call.request, asyncio.sleep(faults.stall_s))  # ends early if the client gives up
            raise ApiError(503, "stalled (injected fault)", "stalled")

    def _params(body: _Request, max_tokens: int | None, top_logprobs: int) -> Params:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "stop: at most 4 stop sequences", "invalid_request", "stop")
        default_max_tokens = 16 if isinstance(body, CompletionRequest) else 256  # OpenAI's legacy default is 16
        return Params(
            max_tokens=max_tokens or default_max_tokens,
            temperature=body.temperature, top_p=body.top_p, n=body.n, seed=body.seed, stop=stop,
            top_logprobs=top_logprobs,
        )

    async def _encode(encoder, prompt, num_chars: int, params: Params, param: str):
        """Token ids of a prompt that fits the context, tokenised off the event loop; else a 400."""
        problem = getattr(backend, "check_chars", lambda *_: None)(num_chars, params)  # before tokenising it
        if not problem:
            ids = await asyncio.get_running_loop().run_in_executor(tokenizing, encoder, prompt)
            problem = backend.check_length(ids, params)
        if problem:
            raise ApiError(400, problem, "context_length_exceeded", param)
        return ids

    def _stream(call: Call, chunks) -> TrackedStream:
        """A streamed answer: it holds the call's admission until it ends, and logs how it ended."""
        ticket = call.ticket
        ticket.kept = True  # released by the stream when it ends, not by `admitted`

        async def body():
            ended = False
            try:
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
                ended = True
                await call.finish()
            finally:
                if not ended:
                    call.outcome("client_gone")

        return TrackedStream(body(), on_close=ticket.release, media_type="text/event-stream")

    @v1.post("/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        async with admitted(request, body, body.n) as call:
            params = _params(body, body.max_completion_tokens or body.max_tokens, body.top_logprobs or 0)
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
            num_chars = sum(len(message["content"]) for message in messages)
            prompt_ids = await _encode(backend.encode_chat, messages, num_chars, params, "messages")
            header = answers.header("chatcmpl", "chat.completion", backend.name)
            if body.stream:
                usage = bool((body.stream_options or {}).get("include_usage"))
                return _stream(call, answers.chat_chunks(backend, prompt_ids, params, body.logprobs, header, usage))
            choices = await call.until_gone(answers.collect(backend, prompt_ids, params))
            await call.finish()
        return JSONResponse({
            **header,
            "choices": [
                {
                    "index": index,
                    "message": {"role": "assistant", "content": choice["text"]},
                    "finish_reason": choice["finish"],
                    "logprobs": {"content": choice["logprobs"]} if body.logprobs else None,
                }
                for index, choice in enumerate(choices)
            ],
            "usage": answers.usage(len(prompt_ids), choices),
        })

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) or _is_ids(body.prompt) else body.prompt
        async with admitted(request, body, len(prompts) * (1 if body.echo else body.n)) as call:
            if not prompts or not all(prompts):
                raise ApiError(400, "prompt: give a string, token ids, or a non-empty list of them", "invalid_request",
                               "prompt")
            if body.echo:
                if body.max_tokens != 0 or body.stream:
                    raise ApiError(400, "echo=true is supported for scoring a prompt only: set max_tokens=0 (and no "
                                   "stream)", "unsupported_parameter", "echo")
                response = await call.until_gone(_score(body, prompts))
                await call.finish()
                return JSONResponse(response)
            return await _generate(call, body, prompts)

    async def _generate(call: Call, body: CompletionRequest, prompts: list):
        """The /v1/completions answer for text prompts: n completions of each."""
        if body.max_tokens == 0:
            raise ApiError(400, "max_tokens=0 generates nothing; it is meant for echo=true (prompt scoring)",
                           "invalid_request", "max_tokens")
        if any(not isinstance(prompt, str) for prompt in prompts):
            raise ApiError(400, "token-id prompts are supported with echo=true (prompt scoring) only", "unsupported_parameter", "prompt")
        if body.stream and len(prompts) > 1:
            raise ApiError(400, "stream=true takes a single prompt", "unsupported_parameter", "prompt")
        params = _params(body, body.max_tokens, body.logprobs or 0)
        all_ids = [await _encode(backend.encode_text, prompt, len(prompt), params, "prompt") for prompt in prompts]
        header = answers.header("cmpl", "text_completion", backend.name)
        want_logprobs = body.logprobs is not None
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return _stream(call, answers.completion_chunks(backend, all_ids[0], params, want_logprobs, header, usage))
        per_prompt = await call.until_gone(asyncio.gather(*(answers.collect(backend, ids, params) for ids in all_ids)))
        choices = [choice for group in per_prompt for choice in group]
        await call.finish()
        return JSONResponse({
            **header,
            "choices": [
                {
                    "index": index,
                    "text": choice["text"],
                    "finish_reason": choice["finish"],
                    "logprobs": answers.legacy_logprobs(choice["logprobs"]) if want_logprobs else None,
                }
                for index, choice in enumerate(choices)
            ],
            "usage": answers.usage(sum(len(ids) for ids in all_ids), choices),
        })

    async def _score(body: CompletionRequest, prompts: list) -> dict:
        """The /v1/completions answer to echo=true, max_tokens=0: each prompt with its tokens' logprobs."""
        if not hasattr(backend, "score"):
            raise ApiError(400, "this backend cannot score prompts (echo=true)", "unsupported_parameter", "echo")
        all_ids, alone = [], Params(max_tokens=0)  # the prompt alone must fit
        for prompt in prompts:
            if isinstance(prompt, str):
                all_ids.append(await _encode(backend.encode_text, prompt, len(prompt), alone, "prompt"))
                continue
            if any(not 0 <= token < backend.vocab_size for token in prompt):
                raise ApiError(400, f"prompt: token ids must lie in [0, {backend.vocab_size})", "invalid_request", "prompt")
            problem = backend.check_length(prompt, alone)
            if problem:
                raise ApiError(400, problem, "context_length_exceeded", "prompt")
            all_ids.append(prompt)
        scored = await backend.score(all_ids, body.logprobs or 0)

        def name(token_id: int) -> str:
            return f"token_id:{token_id}" if body.return_tokens_as_token_ids else backend.token_text(token_id)

        choices = []
        for index, tokens in enumerate(scored):
            texts = [backend.token_text(token.token_id) for token in tokens]
            logprobs = None
            if body.logprobs is not None:
                logprobs = {
                    "tokens": [name(token.token_id) for token in tokens],
                    "token_logprobs": [token.logprob for token in tokens],
                    # OpenAI's shape: null at the first token, then {token: logprob}, most likely first
                    "top_logprobs": [None] + [{name(i): value for i, value in token.top} for token in tokens[1:]],
                    "text_offset": [sum(len(text) for text in texts[:j]) for j in range(len(texts))],
                }
            choices.append({"index": index, "text": "".join(texts), "finish_reason": "length", "logprobs": logprobs})
        header = answers.header("cmpl", "text_completion", backend.name)
        total = sum(len(ids) for ids in all_ids)
        return {**header, "choices": choices, "usage": {"prompt_tokens": total, "completion_tokens": 0, "total_tokens": total}}

    app.include_router(v1)
    return app


def _is_ids(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(token, int) for token in prompt)
