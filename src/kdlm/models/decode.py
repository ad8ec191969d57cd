"""One batched, step-by-step decode for many requests at once, each with its own sampling settings.

Prompts are left-padded into one batch and decoded with the KV cache, one token per step for every
row, so that a batch of 16 requests costs about as many forward passes as one request. Each row has
its own temperature, top-p, seed, stop strings and token budget; a finished row keeps its place in
the batch (fed a pad token, its output ignored) until the longest row ends, and a cancelled one (its
client left) is dropped the same way at the next step. Rows with the same prompt (the n samples of a
request) share one prefill: the prompt runs through the model once and its KV cache is copied to each.

Log-probabilities are those of the model's raw distribution: a log-softmax of the logits over the
full vocabulary at temperature 1, before top-p, whatever temperature the token was sampled at. That
is the distribution a white-box KD loss wants from a teacher, and it does not change with the
sampling settings of the request that produced it.
"""

from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kdlm.events import token_entry
from kdlm.precision import Bf16Setting, bf16_enabled


@dataclass
class Row:
    """One sequence to generate: a prompt (token ids) and its sampling settings."""

    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = 0  # alternatives returned per token, besides the chosen one
    # Set from another thread when the row's client is gone: the decoder drops it at its next step
    # (finish reason "cancelled"), and a batch whose rows are all finished or cancelled ends.
    cancelled: bool = False


@dataclass
class RowResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", or "cancelled"
    logprobs: list[dict] = field(default_factory=list)  # OpenAI chat format, one entry per token


# on_delta(row index, new text, logprob entry of the new token or None, finish reason or None)
DeltaCallback = Callable[[int, str, dict | None, str | None], None]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def _choose(logits: torch.Tensor, row: Row, generator: torch.Generator) -> int:
    """Pick the next token of one row from its logits (V,)."""
    if row.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / row.temperature, dim=-1)
    if row.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Drop a token when the mass before it already reaches top_p; the most likely always stays.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= row.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _tokens_within(entries: list[dict], length: int) -> list[dict]:
    """The logprob entries of the tokens that start before character `length` (the stop string's start)."""
    kept, at = [], 0
    for entry in entries:
        if at >= length:
            break
        kept.append(entry)
        at += len(entry["token"])
    return kept


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that may still turn into a stop string or a whole character."""
    held = 1 if text.endswith("\ufffd") else 0  # an incomplete UTF-8 sequence: wait for the next token
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                held = max(held, length)
                break
    return held


def _prefill_inputs(rows: list[Row], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Left-padded ids, mask and positions of the distinct prompts, and the index that maps them to the
    rows (None when every row has its own prompt): the n samples of a request are prefilled once."""
    distinct: dict[tuple[int, ...], int] = {}
    owner = [distinct.setdefault(tuple(row.prompt_ids), len(distinct)) for row in rows]
    width = max(len(prompt) for prompt in distinct)
    input_ids = torch.full((len(distinct), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(distinct), width), dtype=torch.long, device=device)
    for i, prompt in enumerate(distinct):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[i, width - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expand = torch.tensor(owner, device=device) if len(distinct) < len(rows) else None
    return input_ids, mask, positions, expand


def _expand(cache, index: torch.Tensor):
    """The KV cache with its batch rows picked (and repeated) by `index`."""
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return cache
    if isinstance(cache, torch.Tensor):
        return cache.index_select(0, index)
    return type(cache)(_expand(part, index) for part in cache)  # legacy tuples, or one cache per model (MiniLLM)


def _drop_cancelled(rows: list[Row], results: list[RowResult], on_delta: DeltaCallback | None) -> None:
    for i, (row, result) in enumerate(zip(rows, results, strict=True)):
        if row.cancelled and result.finish_reason is None:
            result.finish_reason = "cancelled"
            if on_delta is not None:
                on_delta(i, "", None, "cancelled")


def _generator(row: Row, device: torch.device) -> torch.Generator:
    """The row's own random stream: its seed, or a fresh one when it has none."""
    seed = row.seed if row.seed is not None else random.getrandbits(63)
    return torch.Generator(device=device).manual_seed(seed % 2**63)  # any int the API accepts


def _take_token(tokenizer, row: Row, result: RowResult, token: int, logprobs: torch.Tensor) -> dict:
    """Append a chosen (non-EOS) token to the row's result: its logprob entry, the text so far cut at a stop
    string, and the finish reason when a stop string or max_tokens ends the row. Returns the logprob entry.

    Args:
        logprobs: (V,) the row's log-probabilities at this step.
    """
    result.token_ids.append(token)
    entry = token_entry(tokenizer.decode([token]), float(logprobs[token]))
    if row.top_logprobs:
        top = logprobs.topk(row.top_logprobs)
        entry["top_logprobs"] = [
            token_entry(tokenizer.decode([int(t)]), float(v)) for v, t in zip(top.values, top.indices, strict=True)
        ]
    result.logprobs.append(entry)
    text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    cut = min((at for at in (text.find(stop) for stop in row.stop if stop) if at >= 0), default=-1)
    if cut >= 0:
        text, result.finish_reason = text[:cut], "stop"
        result.logprobs = _tokens_within(result.logprobs, cut)
    elif len(result.token_ids) >= row.max_tokens:
        result.finish_reason = "length"
    result.text = text
    return entry


@torch.no_grad()
def decode_batch(
    model, tokenizer, rows: list[Row], on_delta: DeltaCallback | None = None, bf16: Bf16Setting = False,
    on_step: Callable[[], None] | None = None,
) -> list[RowResult]:
    """Generate every row in one batched decode.

    Args:
        model: a causal LM (eval mode).
        tokenizer: its tokenizer (for EOS, padding and decoding).
        rows: the sequences to generate.
        on_delta: called after every step for each row that produced text or finished; text held back
            (a possible start of a stop string, an incomplete character) comes with a later call.
        bf16: run the forward passes under bf16 autocast (True, False or "auto", see kdlm.precision).
        on_step: called after every forward pass (a counter of the decoder's work).

    Returns:
        One result per row, in order.
    """
    device = model.device
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    input_ids, mask, positions, expand = _prefill_inputs(rows, pad, device)
    generators = [_generator(row, device) for row in rows]
    results = [RowResult() for _ in rows]
    sent = [0] * len(rows)  # characters of each row's text already passed to on_delta
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16_enabled(bf16, device) else contextlib.nullcontext()

    # transformers 5 renamed `past_key_values` to `cache`; accept both.
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past = {}
    for _ in range(max(row.max_tokens for row in rows)):
        _drop_cancelled(rows, results, on_delta)
        if all(result.finish_reason for result in results):
            break
        with autocast:
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **past)
        if on_step is not None:
            on_step()
        cache = getattr(out, cache_name, None)
        cache = cache if cache is not None else out.past_key_values
        logits = out.logits[:, -1].float()
        if expand is not None:  # after the prefill of the distinct prompts: one copy per row
            cache, logits, mask, positions = _expand(cache, expand), logits[expand], mask[expand], positions[expand]
            expand = None
        past = {cache_name: cache}
        logprobs = torch.log_softmax(logits, dim=-1)
        next_ids = []
        for i, (row, result) in enumerate(zip(rows, results, strict=True)):
            if result.finish_reason is not None:
                next_ids.append(pad)
                continue
            token = _choose(logits[i], row, generators[i])
            next_ids.append(token)
            if token in eos:
                entry, result.finish_reason = None, "stop"
            else:
                entry = _take_token(tokenizer, row, result, token, logprobs[i])
            end = len(result.text) if result.finish_reason else len(result.text) - _held_back(result.text, row.stop)
            delta = result.text[sent[i] : end] if end > sent[i] else ""
            sent[i] = max(sent[i], end)
            if on_delta is not None and (delta or entry is not None or result.finish_reason):
                on_delta(i, delta, entry, result.finish_reason)
        if all(result.finish_reason for result in results):
            break
        input_ids = torch.tensor(next_ids, device=device)[:, None]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        positions = positions[:, -1:] + 1
    return results
