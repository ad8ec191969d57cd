"""Prompt scoring for `/v1/completions` with `echo: true, max_tokens: 0` (the OpenAI legacy and vLLM way).

One forward pass over a batch of prompts gives, at every prompt position after the first, the log-prob
of the prompt's own token and the `top_logprobs` most likely tokens, from the raw distribution (log-softmax
of the logits over the full vocabulary at temperature 1, like the generation path). This is what a
white-box teacher cache needs from a served teacher (`kdlm.teachers.api`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from kdlm.precision import Bf16Setting, bf16_enabled


@dataclass
class ScoredToken:
    token_id: int
    logprob: float | None  # None for the first token: nothing precedes it
    top: list[tuple[int, float]]  # (token id, logprob), most likely first; empty for the first token


@torch.no_grad()
def score_prompts(model, prompts: list[list[int]], top_logprobs: int, bf16: Bf16Setting = False) -> list[list[ScoredToken]]:
    """Log-probs of each prompt token given the ones before it, and the top alternatives at each position.

    Args:
        model: a causal LM (eval mode).
        prompts: token ids, one list per prompt (non-empty).
        top_logprobs: alternatives returned per position (0 for none).
        bf16: run the forward pass under bf16 autocast.
    """
    device = model.device
    width = max(len(ids) for ids in prompts)
    input_ids = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(prompts):  # right padding: positions count from 0 in every row
        input_ids[i, : len(ids)] = torch.tensor(ids, device=device)
        mask[i, : len(ids)] = 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16_enabled(bf16, device) else contextlib.nullcontext()
    with autocast:
        logits = model(input_ids=input_ids, attention_mask=mask).logits
    results = []
    for i, ids in enumerate(prompts):
        logprobs = torch.log_softmax(logits[i, : len(ids) - 1].float(), dim=-1)  # row j predicts token j + 1
        own = logprobs.gather(-1, input_ids[i, 1 : len(ids), None]).squeeze(-1).tolist()
        if top_logprobs:
            values, indices = logprobs.topk(min(top_logprobs, logprobs.shape[-1]), dim=-1)
            tops = [list(zip(row_ids, row_values, strict=True)) for row_ids, row_values in zip(indices.tolist(), values.tolist(), strict=True)]
        else:
            tops = [[] for _ in own]
        scored = [ScoredToken(ids[0], None, [])]
        scored += [ScoredToken(token, value, top) for token, value, top in zip(ids[1:], own, tops, strict=True)]
        results.append(scored)
    return results
