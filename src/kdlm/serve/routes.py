"""The /v1 endpoints: models, stats, chat completions, completions (generation and prompt scoring).

Each endpoint gets the server's state (`get_state`) and, for a completion, its admitted `Call`
(kdlm.serve.depends) as FastAPI dependencies; the router checks the API key on every route. Whole
answers use OpenAI's own types where the server's JSON fits them: /v1/models (`Model`), usage
(`CompletionUsage`) and generated completions (`Completion`). Chat answers do not fit
(`ChatCompletionTokenLogprob` requires `top_logprobs`, which this server leaves out when none are
asked for), nor scored prompts (their `top_logprobs` starts with null, as OpenAI's API answers), nor
streamed chunks: those stay plain dicts, with the same fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from openai.types import Completion, Model

from kdlm.serve import answers
from kdlm.serve.backends import Params
from kdlm.serve.depends import Call, authorize, chat_call, completion_call
from kdlm.serve.flow import ApiError, TrackedStream
from kdlm.serve.schemas import BaseRequest, ChatRequest, CompletionRequest
from kdlm.serve.state import ServeState, get_state

router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
# With an API key, /openapi.json is served here, behind the key (FastAPI's own one is off).
docs_router = APIRouter(dependencies=[Depends(authorize)])


@docs_router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request):
    return request.app.openapi()


@router.get("/models")
async def models(state: ServeState = Depends(get_state)):
    backend = state.backend
    info = backend.model_info() if hasattr(backend, "model_info") else {}
    model = Model(id=backend.name, object="model", created=0, owned_by="kdlm", **info)
    return {"object": "list", "data": [model.model_dump(exclude_unset=True)]}


@router.get("/kdlm/stats")
async def stats(state: ServeState = Depends(get_state)):
    load = state.load
    return {**state.backend.stats(), **state.counts, "in_flight_requests": load.requests, "in_flight_rows": load.rows}


def _params(body: BaseRequest, max_tokens: int | None, top_logprobs: int) -> Params:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise ApiError(400, "stop: at most 4 stop sequences", "invalid_request", "stop")
    default_max_tokens = 16 if isinstance(body, CompletionRequest) else 256  # OpenAI's legacy default is 16
    return Params(
        max_tokens=max_tokens or default_max_tokens,
        temperature=body.temperature, top_p=body.top_p, n=body.n, seed=body.seed, stop=stop,
        top_logprobs=top_logprobs,
    )


async def _encode(state: ServeState, encoder, prompt, num_chars: int, params: Params, param: str):
    """Token ids of a prompt that fits the context, tokenised off the event loop; else a 400."""
    problem = getattr(state.backend, "check_chars", lambda *_: None)(num_chars, params)  # before tokenising it
    if not problem:
        ids = await asyncio.get_running_loop().run_in_executor(state.tokenizing, encoder, prompt)
        problem = state.backend.check_length(ids, params)
    if problem:
        raise ApiError(400, problem, "context_length_exceeded", param)
    return ids


def _stream(call: Call, chunks) -> TrackedStream:
    """A streamed answer: it holds the call's admission until it ends, and logs how it ended."""
    ticket = call.ticket
    ticket.kept = True  # released by the stream when it ends, not by the admission

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


@router.post("/chat/completions")
async def chat(call: Call = Depends(chat_call, scope="function"), state: ServeState = Depends(get_state)):
    body: ChatRequest = call.body
    backend = state.backend
    params = _params(body, body.max_completion_tokens or body.max_tokens, body.top_logprobs or 0)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    num_chars = sum(len(message["content"]) for message in messages)
    prompt_ids = await _encode(state, backend.encode_chat, messages, num_chars, params, "messages")
    header = answers.header("chatcmpl", "chat.completion", backend.name)
    if body.stream:
        chunks = answers.chat_chunks(backend, prompt_ids, params, body.logprobs, header, body.wants_usage())
        return _stream(call, chunks)
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


@router.post("/completions")
async def completions(call: Call = Depends(completion_call, scope="function"),
                      state: ServeState = Depends(get_state)):
    body: CompletionRequest = call.body
    prompts = body.prompts()
    if not prompts or not all(prompts):
        raise ApiError(400, "prompt: give a string, token ids, or a non-empty list of them", "invalid_request",
                       "prompt")
    if body.echo:
        if body.max_tokens != 0 or body.stream:
            raise ApiError(400, "echo=true is supported for scoring a prompt only: set max_tokens=0 (and no "
                           "stream)", "unsupported_parameter", "echo")
        response = await call.until_gone(_score(state, body, prompts))
        await call.finish()
        return JSONResponse(response)
    return await _generate(call, state, prompts)


async def _generate(call: Call, state: ServeState, prompts: list):
    """The /v1/completions answer for text prompts: n completions of each."""
    body: CompletionRequest = call.body
    if body.max_tokens == 0:
        raise ApiError(400, "max_tokens=0 generates nothing; it is meant for echo=true (prompt scoring)",
                       "invalid_request", "max_tokens")
    if any(not isinstance(prompt, str) for prompt in prompts):
        raise ApiError(400, "token-id prompts are supported with echo=true (prompt scoring) only",
                       "unsupported_parameter", "prompt")
    if body.stream and len(prompts) > 1:
        raise ApiError(400, "stream=true takes a single prompt", "unsupported_parameter", "prompt")
    backend = state.backend
    params = _params(body, body.max_tokens, body.logprobs or 0)
    all_ids = [await _encode(state, backend.encode_text, prompt, len(prompt), params, "prompt") for prompt in prompts]
    header = answers.header("cmpl", "text_completion", backend.name)
    want_logprobs = body.logprobs is not None
    if body.stream:
        chunks = answers.completion_chunks(backend, all_ids[0], params, want_logprobs, header, body.wants_usage())
        return _stream(call, chunks)
    per_prompt = await call.until_gone(asyncio.gather(*(answers.collect(backend, ids, params) for ids in all_ids)))
    choices = [choice for group in per_prompt for choice in group]
    await call.finish()
    answer = Completion.model_validate({
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
    return JSONResponse(answer.model_dump(exclude_unset=True))


async def _score_ids(state: ServeState, prompts: list) -> list[list[int]]:
    """Token ids of prompts to score, each within the context alone; token-id prompts are checked as given."""
    backend, all_ids, alone = state.backend, [], Params(max_tokens=0)
    for prompt in prompts:
        if isinstance(prompt, str):
            all_ids.append(await _encode(state, backend.encode_text, prompt, len(prompt), alone, "prompt"))
            continue
        if any(not 0 <= token < backend.vocab_size for token in prompt):
            raise ApiError(400, f"prompt: token ids must lie in [0, {backend.vocab_size})", "invalid_request", "prompt")
        problem = backend.check_length(prompt, alone)
        if problem:
            raise ApiError(400, problem, "context_length_exceeded", "prompt")
        all_ids.append(prompt)
    return all_ids


async def _score(state: ServeState, body: CompletionRequest, prompts: list) -> dict:
    """The /v1/completions answer to echo=true, max_tokens=0: each prompt with its tokens' logprobs."""
    backend = state.backend
    if not hasattr(backend, "score"):
        raise ApiError(400, "this backend cannot score prompts (echo=true)", "unsupported_parameter", "echo")
    all_ids = await _score_ids(state, prompts)
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
    return {**header, "choices": choices, "usage": answers.usage(sum(len(ids) for ids in all_ids), [])}
