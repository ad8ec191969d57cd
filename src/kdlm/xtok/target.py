"""The cross-tokenizer teacher target of one micro-batch, and the student's loss against it.

The training loop knows this path through two calls only: ``CrossTokenizer.teacher_target`` (instead of
running the teacher on the student's tokens) and ``cross_tokenizer_forward`` (inside the student's forward,
so that DDP sees the whole loss). Everything else (batching, accumulation, the token denominator) is the
loop's own: the loss sums are divided by the student's target tokens like every kdlm loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kdlm.data.tokenize import collate
from kdlm.losses.cross_tokenizer import cross_kd_per_group, vocab_map
from kdlm.losses.divergences import upcast
from kdlm.losses.fused import LogitTransform
from kdlm.losses.fused_cross import CrossChunkOptions, fused_cross_kd_loss
from kdlm.models.forward import (
    decoder_outputs,
    lm_head_weight,
    logit_transform,
    plain_lm_head,
    project,
    target_mask,
)
from kdlm.precision import bf16_enabled
from kdlm.xtok.align import token_bytes_cached


@dataclass
class CrossTokenizerTarget:
    """The teacher at the first token of each aligned group of a micro-batch, kept small until a loss asks.

    A live teacher is kept as its hidden states at the G group-first tokens and its lm_head; a top-k cache as
    its (G, k) ids and log-probs. ``teacher_at`` makes the (g, V_t) log-probs of any groups: all at once for the
    dense loss, a chunk's groups at a time for the fused one (``kdlm.losses.fused_cross``).
    """

    student_rows: Tensor  # (G,) long: the group's first token among the micro-batch's student targets
    teacher_vocab: int  # V_t, the teacher's logit rows
    hidden: Tensor | None = None  # (G, H_t) a live teacher's last hidden states, in the dtype of its projection
    weight: Tensor | None = None  # (V_t, H_t) its lm_head weight, same dtype
    transform: LogitTransform = field(default_factory=LogitTransform)
    topk_ids: Tensor | None = None  # (G, k) a top-k cache's ids
    topk_logprobs: Tensor | None = None  # (G, k) their log-probs, or (G, k+1) with the log of the tail last

    def teacher_at(self, groups: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(log-probs (g, V_t) at T = 1, -inf outside a top-k list; log of a top-k tail (g,) or None) of
        the groups ``groups`` (None: all)."""
        if self.hidden is not None:
            hidden = self.hidden if groups is None else self.hidden[groups]
            return torch.log_softmax(self.transform(hidden @ self.weight.T).float(), dim=-1), None
        ids = self.topk_ids if groups is None else self.topk_ids[groups]
        logprobs = (self.topk_logprobs if groups is None else self.topk_logprobs[groups]).float()
        dense = torch.full((ids.shape[0], self.teacher_vocab), float("-inf"), device=ids.device)
        dense.scatter_(-1, ids.long(), logprobs[:, : ids.shape[-1]])
        return dense, logprobs[:, -1] if logprobs.shape[-1] > ids.shape[-1] else None


def group_firsts(examples: list[dict]) -> tuple[list[int], list[int]]:
    """Rows of each group's first student and first teacher target, counted over the micro-batch's targets."""
    student_rows, teacher_rows = [], []
    student_offset = teacher_offset = 0
    for example in examples:
        for student_group, teacher_group in example["groups"]:
            student_rows.append(student_offset + student_group[0])
            teacher_rows.append(teacher_offset + teacher_group[0])
        student_offset += sum(1 for label in example["labels"][1:] if label != -100)
        teacher_offset += sum(1 for label in example["teacher_labels"][1:] if label != -100)
    return student_rows, teacher_rows


class CrossTokenizer:
    """What the loop needs to distill across tokenizers: the mode, the teacher's padding and the vocabulary map.

    Args:
        mode: "uld" or "hybrid" (``loss.cross_tokenizer``).
        student_rows / teacher_rows: the logit rows of each model (``config.vocab_size``).
    """

    def __init__(self, mode: str, student_tokenizer, teacher_tokenizer, student_rows: int, teacher_rows: int):
        self.mode = mode
        self.teacher_pad_id = teacher_tokenizer.pad_token_id
        if self.teacher_pad_id is None:
            self.teacher_pad_id = teacher_tokenizer.eos_token_id
        self.teacher_rows = teacher_rows
        self.student_ids, self.teacher_ids = vocab_map(token_bytes_cached(student_tokenizer),
                                                       token_bytes_cached(teacher_tokenizer), student_rows, teacher_rows)

    def teacher_target(self, teacher: nn.Module, examples: list[dict], device: torch.device, *, bf16: bool
                       ) -> CrossTokenizerTarget:
        """Run the live teacher on its own tokens of ``examples``; keep its hidden states at the groups' first tokens."""
        student_rows, teacher_rows = group_firsts(examples)
        batch = collate([{"input_ids": e["teacher_input_ids"], "labels": e["teacher_labels"]} for e in examples],
                        self.teacher_pad_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        use_bf16 = bf16_enabled(bf16, device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            hidden = decoder_outputs(teacher, batch["input_ids"], batch["attention_mask"]).last_hidden_state
            hidden = hidden[:, :-1][target_mask(batch["labels"])][torch.tensor(teacher_rows, dtype=torch.long, device=device)]
        weight = lm_head_weight(teacher)[: self.teacher_rows].detach()
        dtype = torch.bfloat16 if use_bf16 else torch.promote_types(hidden.dtype, weight.dtype)  # as autocast's matmul
        return CrossTokenizerTarget(torch.tensor(student_rows, dtype=torch.long, device=device), self.teacher_rows,
                                    hidden=hidden.to(dtype), weight=weight.to(dtype), transform=logit_transform(teacher))

    def cached_target(self, cached: list[tuple[Tensor, Tensor]], examples: list[dict], device: torch.device
                      ) -> CrossTokenizerTarget:
        """The same target from a top-k teacher cache in the teacher's tokens: per example (ids (N_t, k),
        log-probs (N_t, k+1), the last column the tail), the rows of the groups' first tokens."""
        student_rows, teacher_rows = group_firsts(examples)
        ids = torch.cat([pair[0] for pair in cached])[teacher_rows].to(device)
        logprobs = torch.cat([pair[1] for pair in cached])[teacher_rows].to(device)
        return CrossTokenizerTarget(torch.tensor(student_rows, dtype=torch.long, device=device), self.teacher_rows,
                                    topk_ids=ids, topk_logprobs=logprobs)


def cross_tokenizer_forward(objective, batch: dict[str, Tensor], target: CrossTokenizerTarget, kd_weight: float):
    """``StudentObjective.forward`` for a cross-tokenizer target: CE on every student target, the cross-tokenizer
    term on the aligned groups; records with a ``weight`` scale both. With ``objective.fused`` the loss runs chunk
    by chunk from hidden states (``fused_cross_kd_loss``), otherwise on the dense logits; both give the same
    value and gradients. Returns the objective's 5-tuple and adds the teacher's mapped mass and the number of
    groups to ``objective.cross_stats``."""
    labels = batch["labels"]
    mask = target_mask(labels)
    target_ids = labels[:, 1:][mask]
    hidden = decoder_outputs(objective.student, batch["input_ids"], batch["attention_mask"]).last_hidden_state[:, :-1][mask]
    weights = None
    if "weights" in batch:
        weights = batch["weights"][:, None].expand(mask.shape)[mask].float()
    options = _chunk_options(objective, kd_weight)
    if objective.fused:
        total, kd_sum, ce_sum, mass = fused_cross_kd_loss(
            hidden, plain_lm_head(objective.student)[: objective.vocab_size], target_ids, target.student_rows,
            target.teacher_at, options, weights=weights, teacher_vocab=target.teacher_vocab,
            chunk_rows=objective.loss.chunk_rows, student_transform=logit_transform(objective.student))
    else:
        total, kd_sum, ce_sum, mass = _dense_cross_loss(objective, hidden, target_ids, weights, target, options)
    stats = objective.cross_stats
    stats["mapped_mass"] = stats.get("mapped_mass", 0.0) + mass.item()
    stats["groups"] = stats.get("groups", 0) + int(target.student_rows.numel())
    count = torch.tensor(target_ids.numel(), device=target_ids.device)
    return total, kd_sum, ce_sum, ce_sum.new_zeros(()), count


def _chunk_options(objective, kd_weight: float) -> CrossChunkOptions:
    loss = objective.loss
    return CrossChunkOptions(
        mode=loss.cross_tokenizer, divergence=loss.divergence, temperature=loss.temperature, scale_by_t2=loss.scale_by_t2,
        student_ids=objective.cross.student_ids, teacher_ids=objective.cross.teacher_ids, top_k=loss.cross_tokenizer_top_k,
        divergence_kwargs={"beta": loss.beta, "alpha": loss.alpha, "lam": loss.lam, "akl_alpha": loss.akl_alpha},
        kd_weight=kd_weight, ce_weight=1 - kd_weight)


def _dense_cross_loss(objective, hidden: Tensor, target_ids: Tensor, weights: Tensor | None,
                      target: CrossTokenizerTarget, options: CrossChunkOptions):
    """(objective, KD sum, CE sum, mapped mass sum) on the student's full (N, V_s) logits (``loss.fused=false``)."""
    student_logits = upcast(project(objective.student, hidden)[:, : objective.vocab_size])
    ce = nn.functional.cross_entropy(student_logits, target_ids, reduction="none")
    if weights is None:
        weights = torch.ones_like(ce)
    teacher_logprobs, missing = target.teacher_at()
    kd, mass = cross_kd_per_group(
        student_logits[target.student_rows], teacher_logprobs, mode=options.mode, divergence=options.divergence,
        temperature=options.temperature, scale_by_t2=options.scale_by_t2, student_ids=options.student_ids,
        teacher_ids=options.teacher_ids, teacher_missing=missing, top_k=options.top_k, **options.divergence_kwargs,
    )
    ce_sum = (weights * ce).sum()
    kd_sum = (weights[target.student_rows] * kd).sum()
    return options.ce_weight * ce_sum + options.kd_weight * kd_sum, kd_sum, ce_sum, mass.detach().sum()
