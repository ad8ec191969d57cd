"""The shapes of the answers: whole completions collected from a backend's events, streamed chunks,
usage counts and the legacy logprobs layout of /v1/completions."""

from __future__ import annotations

import contextlib
import secrets
import time

from openai.types import CompletionUsage

from kdlm.serve.backends import Params


def header(prefix: str, kind: str, model: str) -> dict:
    return {"id": f"{prefix}-{secrets.token_hex(12)}", "object": kind, "created": int(time.time()), "model": model}


async def collect(backend, prompt_ids, params: Params) -> list[dict]:
    choices = [{"text": "", "finish": None, "logprobs": []} for _ in range(params.n)]
    async with contextlib.aclosing(backend.stream(prompt_ids, params)) as events:  # closed early: cancelled
        async for choice, text, entry, finish in events:
            choices[choice]["text"] += text
            if entry is not None:
                choices[choice]["logprobs"].append(entry)
            if finish:
                choices[choice]["finish"] = finish
    return choices


def usage(prompt_tokens: int, choices: list[dict]) -> dict:
    """Token counts of an answer: its choices hold one logprob entry per generated token."""
    return _usage(prompt_tokens, sum(len(choice["logprobs"]) for choice in choices))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    counts = CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                             total_tokens=prompt_tokens + completion_tokens)
    return counts.model_dump(exclude_unset=True)


def legacy_logprobs(entries: list[dict]) -> dict:
    """The /v1/completions logprobs shape: parallel lists, top alternatives as {token: logprob}."""
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry["token"])
    return {
        "tokens": [entry["token"] for entry in entries],
        "token_logprobs": [entry["logprob"] for entry in entries],
        "top_logprobs": [{top["token"]: top["logprob"] for top in entry.get("top_logprobs", [])} for entry in entries],
        "text_offset": offsets,
    }


async def chat_chunks(backend, prompt_ids, params: Params, logprobs: bool, header: dict, usage: bool):
    header = {**header, "object": "chat.completion.chunk"}
    for index in range(params.n):
        yield {**header, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    tokens = 0
    async with contextlib.aclosing(backend.stream(prompt_ids, params)) as events:  # closed early: cancelled
        async for choice, text, entry, finish in events:
            tokens += entry is not None
            item = {"index": choice, "delta": {"content": text} if text else {}, "finish_reason": finish}
            if logprobs:
                item["logprobs"] = {"content": [entry] if entry is not None else []}
            yield {**header, "choices": [item]}
    if usage:
        yield {**header, "choices": [], "usage": _usage(len(prompt_ids), tokens)}


async def completion_chunks(backend, prompt_ids, params: Params, logprobs: bool, header: dict, usage: bool):
    tokens = 0
    async with contextlib.aclosing(backend.stream(prompt_ids, params)) as events:  # closed early: cancelled
        async for choice, text, entry, finish in events:
            tokens += entry is not None
            item = {"index": choice, "text": text, "finish_reason": finish, "logprobs": None}
            if logprobs:
                item["logprobs"] = legacy_logprobs([entry] if entry is not None else [])
            yield {**header, "choices": [item]}
    if usage:
        yield {**header, "choices": [], "usage": _usage(len(prompt_ids), tokens)}
