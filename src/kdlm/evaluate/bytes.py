"""Bits per byte of held-out answers: a fidelity measure that any tokenizer can be scored on.

Token-level KL and perplexity depend on how text is cut into tokens: a student with a 16k
vocabulary spends more tokens (and less loss per token) on the same answer than a 49k teacher.
Dividing the answer's total negative log-likelihood by its UTF-8 bytes gives a number in the same
unit for every tokenizer (Gao et al. 2020, The Pile, §4; Brown et al. 2020 use bits per byte alike).

bits/byte = sum over the answer's target tokens of -ln p(token) / ln 2 / UTF-8 bytes of the answer.

The target tokens are those `encode_chat` trains on: the answer and the end-of-turn token the
model's own chat template writes after it (predicting the end is part of the answer).
"""

from __future__ import annotations

import math

import torch

from kdlm.data import encode_records
from kdlm.data.tokenize import collate
from kdlm.errors import KdlmError
from kdlm.models.forward import project, target_hidden_states

# Long enough that no answer is cut: a cut answer would count bytes the model never scored.
_MAX_LENGTH = 1 << 16


@torch.no_grad()
def answer_bits_per_byte(model, tokenizer, records: list[dict], *, batch_size: int = 8) -> dict:
    """Bits per UTF-8 byte of the answers (last assistant message) of chat records, under `model`.

    Args:
        model: a causal LM; its own `tokenizer` and chat template encode the records.
        records: `{"messages": [..., {"role": "assistant", "content": answer}]}`.

    Returns:
        ``{"bits_per_byte", "answer_bytes", "answer_tokens"}``.
    """
    examples = encode_records(tokenizer, records, max_length=_MAX_LENGTH)
    if len(examples) != len(records):
        raise KdlmError("bits per byte needs every answer scored; some record has an empty answer")
    num_bytes = sum(len(record["messages"][-1]["content"].encode("utf-8")) for record in records)
    model.eval()
    nll_sum, num_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
        batch = {key: value.to(model.device) for key, value in batch.items()}
        hidden, targets = target_hidden_states(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        logprobs = torch.log_softmax(project(model, hidden).float(), -1)
        nll_sum += float(-logprobs.gather(-1, targets[:, None]).sum())
        num_tokens += targets.numel()
    return {
        "bits_per_byte": nll_sum / math.log(2) / max(1, num_bytes),
        "answer_bytes": num_bytes,
        "answer_tokens": num_tokens,
    }
