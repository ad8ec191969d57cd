"""The cross-tokenizer teacher target of one micro-batch, and the student's loss against it.

The training loop knows this path through two calls only: ``CrossTokenizer.teacher_target`` (instead of
running the teacher on the student's tokens) and ``cross_tokenizer_forward`` (inside the student's forward,
so that DDP sees the whole loss). Everything else (batching, accumulation, the token denominator) is the
loop's own: the loss sums are divided by the student's target tokens like every kdlm loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdlm.data.tokenize import collate
from kdlm.losses.cross_tokenizer import cross_kd_per_group, vocab_map
from kdlm.models.forward import decoder_outputs, lm_head_weight, logit_transform, project, target_mask
from kdlm.precision import bf16_enabled
from kdlm.xtok.align import token_bytes_cached


@dataclass
class CrossTokenizerTarget:
    """The teacher at the first token of each aligned group of a micro-batch."""

    teacher_logprobs: Tensor  # (G, V_t) log-probs at T = 1 (-inf outside a top-k list)
    student_rows: Tensor  # (G,) long: the group's first token among the micro-batch's student targets
    teacher_missing: Tensor | None = None  # (G,) log of a top-k teacher's tail mass; None for a live teacher


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
        """Run the live teacher on its own tokens of ``examples``; keep its log-probs at the groups' first tokens."""
        student_rows, teacher_rows = group_firsts(examples)
        batch = collate([{"input_ids": e["teacher_input_ids"], "labels": e["teacher_labels"]} for e in examples],
                        self.teacher_pad_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_enabled(bf16, device)):
            hidden = decoder_outputs(teacher, batch["input_ids"], batch["attention_mask"]).last_hidden_state
            hidden = hidden[:, :-1][target_mask(batch["labels"])][torch.tensor(teacher_rows, dtype=torch.long, device=device)]
            logits = logit_transform(teacher)(hidden @ lm_head_weight(teacher)[: self.teacher_rows].T)
        return CrossTokenizerTarget(torch.log_softmax(logits.float(), dim=-1),
                                    torch.tensor(student_rows, dtype=torch.long, device=device))

    def cached_target(self, cached: list[tuple[Tensor, Tensor]], examples: list[dict], device: torch.device
                      ) -> CrossTokenizerTarget:
        """The same target from a top-k teacher cache in the teacher's tokens: per example (ids (N_t, k),
        log-probs (N_t, k+1), the last column the tail), scattered into (G, V_t) at the groups' first tokens."""
        student_rows, teacher_rows = group_firsts(examples)
        ids = torch.cat([pair[0] for pair in cached])[teacher_rows].to(device)
        logprobs = torch.cat([pair[1] for pair in cached])[teacher_rows].to(device).float()
        dense = torch.full((len(teacher_rows), self.teacher_rows), float("-inf"), device=device)
        dense.scatter_(-1, ids.long(), logprobs[:, : ids.shape[-1]])
        missing = logprobs[:, -1] if logprobs.shape[-1] > ids.shape[-1] else None
        return CrossTokenizerTarget(dense, torch.tensor(student_rows, dtype=torch.long, device=device), missing)


def cross_tokenizer_forward(objective, batch: dict[str, Tensor], target: CrossTokenizerTarget, kd_weight: float):
    """``StudentObjective.forward`` for a cross-tokenizer target: CE on every student target, the cross-tokenizer
    term on the aligned groups; records with a ``weight`` scale both. Returns the objective's 5-tuple and adds
    the teacher's mapped mass and the number of groups to ``objective.cross_stats``."""
    labels = batch["labels"]
    mask = target_mask(labels)
    target_ids = labels[:, 1:][mask]
    hidden = decoder_outputs(objective.student, batch["input_ids"], batch["attention_mask"]).last_hidden_state
    student_logits = project(objective.student, hidden[:, :-1][mask])[:, : objective.vocab_size].float()
    ce = nn.functional.cross_entropy(student_logits, target_ids, reduction="none")
    weights = torch.ones_like(ce)
    if "weights" in batch:
        weights = batch["weights"][:, None].expand(mask.shape)[mask].float()
    loss = objective.loss
    kd, mass = cross_kd_per_group(
        student_logits[target.student_rows], target.teacher_logprobs, mode=loss.cross_tokenizer,
        divergence=loss.divergence, temperature=loss.temperature, scale_by_t2=loss.scale_by_t2,
        student_ids=objective.cross.student_ids, teacher_ids=objective.cross.teacher_ids,
        teacher_missing=target.teacher_missing, top_k=loss.cross_tokenizer_top_k,
        beta=loss.beta, alpha=loss.alpha, lam=loss.lam, akl_alpha=loss.akl_alpha,
    )
    ce_sum = (weights * ce).sum()
    kd_sum = (weights[target.student_rows] * kd).sum()
    stats = objective.cross_stats
    stats["mapped_mass"] = stats.get("mapped_mass", 0.0) + mass.detach().sum().item()
    stats["groups"] = stats.get("groups", 0) + int(target.student_rows.numel())
    count = torch.tensor(target_ids.numel(), device=target_ids.device)
    total = (1 - kd_weight) * ce_sum + kd_weight * kd_sum
    return total, kd_sum, ce_sum, ce_sum.new_zeros(()), count
