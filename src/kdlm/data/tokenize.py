"""Turn normalised records into token ids and labels, and batch them.

Labels are aligned with `input_ids` (the loss shifts them by one) and are -100 wherever the
student is not trained: the prompt of a chat record and the padding of a batch.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from kdlm.data.records import is_prompt_only
from kdlm.errors import KdlmError

IGNORE_INDEX = -100


def encode_chat(tokenizer, messages: list[dict], *, max_length: int) -> dict[str, list[int]]:
    """Tokenise a chat whose last message is the assistant's response, masking the prompt.

    The prompt is every message but the last, rendered by the tokenizer's chat template with the
    generation prompt (e.g. `<|im_start|>assistant\\n`); the targets are the rest of the full
    rendering: the response and the end-of-turn token the template writes after it (e.g.
    `<|im_end|>`), so the student learns to stop. Whitespace the template adds after that token
    (ChatML writes a newline) is not a target: at generation time nothing follows the stop token.

    The prompt ids are those of the prompt tokenised alone, as at generation time. If the template
    renders the prompt differently inside the full chat (some templates rewrite earlier turns), the
    response is tokenised on its own and followed by the tokenizer's eos token instead.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        messages: `[{"role", "content"}, ...]` ending with an assistant message.
        max_length: the sequence is cut to this many tokens, keeping its start.

    Returns:
        `{"input_ids": [...], "labels": [...]}`; the labels are all -100 when the prompt alone
        fills `max_length` (the caller drops such records).
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise KdlmError("a chat to train on must end with an assistant message (the response)")
    prompt_text = _render(tokenizer, messages[:-1], add_generation_prompt=True)
    full_text = _render(tokenizer, messages, add_generation_prompt=False)
    prompt_ids = _ids(tokenizer, prompt_text)
    if full_text.startswith(prompt_text):
        response_text = full_text[len(prompt_text) :].rstrip()
        full_ids = _ids(tokenizer, prompt_text + response_text)
        if full_ids[: len(prompt_ids)] == prompt_ids:
            response_ids = full_ids[len(prompt_ids) :]
        else:  # a token merged across the prompt/response boundary: keep the prompt as generation sees it
            response_ids = _ids(tokenizer, response_text)
    else:
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        response_ids = _ids(tokenizer, messages[-1]["content"]) + eos
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def encode_text(tokenizer, text: str, *, max_length: int) -> list[dict[str, list[int]]]:
    """Tokenise plain text into windows of at most `max_length` tokens; every token is a target.

    A window of a single token has nothing to predict and is left out.
    """
    ids = _ids(tokenizer, text)
    windows = (ids[start : start + max_length] for start in range(0, len(ids), max_length))
    return [{"input_ids": window, "labels": list(window)} for window in windows if len(window) > 1]


def encode_records(tokenizer, records: list[dict], *, max_length: int) -> list[dict[str, list[int]]]:
    """Encode normalised records: chat records with `encode_chat`, text records with `encode_text`.

    An example keeps its record's `weight` and `task`. Records left without a target token (a prompt that fills `max_length`, a one-token text) are
    dropped with one warning that counts them.

    Raises:
        KdlmError: a record has no response yet, or no record has a target token.
    """
    examples: list[dict[str, list[int]]] = []
    dropped = 0
    for index, record in enumerate(records):
        if "text" in record:
            windows = encode_text(tokenizer, record["text"], max_length=max_length)
            extra = {key: record[key] for key in ("weight", "task") if key in record}
            windows = [dict(window, **extra) for window in windows]
            examples.extend(windows)
            dropped += not windows
            continue
        if is_prompt_only(record):
            raise KdlmError(
                f"record {index + 1} has no response: generate teacher answers first (data.teacher_answers: true)"
            )
        example = encode_chat(tokenizer, record["messages"], max_length=max_length)
        example.update({key: record[key] for key in ("weight", "task") if key in record})
        if any(label != IGNORE_INDEX for label in example["labels"]):
            examples.append(example)
        else:
            dropped += 1
    if not examples:
        raise KdlmError(
            f"none of the {len(records)} records has a token to train on within max_length={max_length}: "
            "raise data.max_length or shorten the prompts"
        )
    if dropped:
        warnings.warn(
            f"dropped {dropped} of {len(records)} records with no target token within max_length={max_length} "
            "(the prompt fills it); raise data.max_length to keep them",
            stacklevel=2,
        )
    return examples


def collate(examples: list[dict], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad a batch to its longest sequence.

    Returns:
        `input_ids` (B, T) padded with `pad_token_id`, `attention_mask` (B, T) with 1 on real tokens,
        and `labels` (B, T) with -100 on padding; `weights` (B,) when an example carries a `weight`
        (the others count 1).
    """
    if pad_token_id is None:
        raise KdlmError(
            "the tokenizer has no pad token: set one (e.g. tokenizer.pad_token = tokenizer.eos_token)"
        )
    length = max(len(example["input_ids"]) for example in examples)
    shape = (len(examples), length)
    # Batches are built on the CPU; the training loop moves them to its device.
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long, device="cpu")
    attention_mask = torch.zeros(shape, dtype=torch.long, device="cpu")
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long, device="cpu")
    for row, example in enumerate(examples):
        size = len(example["input_ids"])
        input_ids[row, :size] = torch.tensor(example["input_ids"], dtype=torch.long, device="cpu")
        attention_mask[row, :size] = 1
        labels[row, :size] = torch.tensor(example["labels"], dtype=torch.long, device="cpu")
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any("weight" in example for example in examples):
        batch["weights"] = torch.tensor([float(example.get("weight", 1.0)) for example in examples], device="cpu")
    return batch


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise KdlmError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no chat template: "
            'use an instruct/chat model\'s tokenizer, or train on {"text"} records'
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _ids(tokenizer, text: str) -> list[int]:
    # Templates write special tokens (BOS, <|im_start|>) into the text themselves.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
