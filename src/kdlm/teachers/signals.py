"""Where the per-token teacher targets of a training batch come from.

- `online`: the teacher runs on every batch and supplies full-vocabulary logits at target positions.
- `topk`: the teacher runs once over the training set; each target position keeps its top-k token
  ids and log-probabilities (the rest of the mass becomes one tail bucket in the loss). Training
  then never runs the teacher: the step costs about what a plain fine-tuning step costs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from kdlm.data.tokenize import collate
from kdlm.train.forward import project, target_hidden_states


def teacher_logits(teacher, batch: dict[str, Tensor], *, bf16: bool) -> Tensor:
    """Teacher logits at the batch's target positions, (N, V), fp32. No gradients."""
    device_type = batch["input_ids"].device.type
    with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        hidden, _ = target_hidden_states(teacher, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return project(teacher, hidden).float()


def examples_fingerprint(examples: list[dict]) -> str:
    """Identifies a tokenised dataset (ids and labels), so that a cache is never used for other data."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(str(example["input_ids"]).encode())
        digest.update(str(example["labels"]).encode())
    return digest.hexdigest()[:16]


def compute_topk_targets(
    teacher,
    examples: list[dict],
    *,
    top_k: int,
    pad_token_id: int,
    batch_size: int = 8,
    bf16: bool = True,
    cache_file: Path | None = None,
    teacher_name: str = "",
) -> list[tuple[Tensor, Tensor]]:
    """Run the teacher once and keep, per example, the top-k ids and log-probs at each target position.

    Args:
        teacher: the teacher causal LM.
        examples: tokenised examples (`input_ids`, `labels` lists).
        top_k: entries kept per position.
        cache_file: if given, reuse it when it was made for the same teacher, data and k; else write it.

    Returns:
        Per example, `(ids, logprobs)`, each (n_targets, top_k): int32 ids and float32 log-probs.
    """
    key = {"teacher": teacher_name, "data": examples_fingerprint(examples), "top_k": top_k}
    if cache_file is not None and cache_file.exists():
        saved = torch.load(cache_file, weights_only=True)
        if saved.get("key") == key:
            return list(zip(saved["ids"], saved["logprobs"], strict=True))
    targets: list[tuple[Tensor, Tensor] | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    with Progress(TextColumn("teacher top-k"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("topk", total=len(examples))
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = collate([examples[i] for i in indices], pad_token_id)
            logprobs = torch.log_softmax(teacher_logits(teacher, batch, bf16=bf16), dim=-1)
            values, ids = logprobs.topk(top_k, dim=-1)
            counts = (batch["labels"][:, 1:] != -100).sum(dim=1).tolist()
            for i, values_i, ids_i in zip(indices, values.split(counts), ids.split(counts), strict=True):
                targets[i] = (ids_i.to(torch.int32).clone(), values_i.clone())
            bar.advance(task, len(indices))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save({"key": key, "ids": [t[0] for t in targets], "logprobs": [t[1] for t in targets]}, tmp)
        tmp.replace(cache_file)
    return targets  # type: ignore[return-value]
