"""One micro-batch's training objective: the student's forward and its loss, as named terms (``LossTerms``).

``StudentObjective`` wraps the student so that DDP sees the whole loss computation inside one forward. The
teacher target it reads is one of the types ``kdlm.losses.fused`` defines (``TeacherHidden``, ``TeacherLogits``,
``TeacherTopK``, ``TeacherSampled``), a ``kdlm.xtok.target.CrossTokenizerTarget``, or None (cross-entropy only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor, nn

from kdlm.config import LossConfig
from kdlm.losses import kd_loss_sums, sampled_kd_loss_sums, topk_kd_loss_sums
from kdlm.losses.fused import (
    TeacherHidden,
    TeacherLogits,
    TeacherSampled,
    TeacherTarget,
    TeacherTopK,
    fused_kd_loss,
    sparse_target,
)
from kdlm.models.forward import (
    _unwrap,
    decoder_outputs,
    lm_head_weight,
    logit_transform,
    plain_lm_head,
    project,
    target_mask,
)
from kdlm.precision import bf16_enabled
from kdlm.train.hints import HintObjective, capture_projections
from kdlm.xtok.target import CrossTokenizer, CrossTokenizerTarget, cross_tokenizer_forward


@dataclass
class LossTerms:
    """One micro-batch's objective, as sums over its target tokens (the loop divides by the step's tokens).

    ``total`` (with gradients) is what is backpropagated. ``kd``, ``ce`` and ``hint`` are the loop's own terms,
    weighted ``kd_weight``, ``1 - kd_weight`` and 1 in ``total``; None where a method's objective replaces them
    (they are then logged as NaN). ``method`` holds a method's own terms (plain floats, e.g. MiniLLM's ``pg``
    and ``reg``) and ``weights`` their weights in ``total``; a term without a weight is logged only. The logged
    ``loss`` is the weighted sum of the logged means. It unpacks and indexes as (total, kd, ce, hint, count),
    the tuple ``StudentObjective`` returned before.
    """

    total: Tensor
    kd: Tensor | None
    ce: Tensor | None
    hint: Tensor | None
    count: Tensor  # target tokens
    method: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def __iter__(self) -> Iterator:
        return iter(self._as_tuple())

    def __getitem__(self, index):
        return self._as_tuple()[index]

    def _as_tuple(self) -> tuple:
        return (self.total, self.kd, self.ce, self.hint, self.count)


def as_teacher_target(target):
    """A teacher target in the types of ``kdlm.losses.fused``: a cached (ids, logprobs) or (ids, log_weights,
    logprobs) tuple becomes ``TeacherTopK`` / ``TeacherSampled``, a dense logits tensor ``TeacherLogits``."""
    if isinstance(target, tuple):
        return sparse_target(*target)
    if isinstance(target, Tensor):
        return TeacherLogits(target)
    return target


def rows_of(target: TeacherTarget, rows: Tensor) -> TeacherTarget:
    """The teacher target at some target rows (a live teacher's lm_head weight is shared, not sliced)."""
    if target is None:
        return None
    if isinstance(target, TeacherHidden):
        return replace(target, hidden=target.hidden[rows])
    return replace(target, **{f.name: getattr(target, f.name)[rows] for f in fields(target)})


class StudentObjective(nn.Module):
    """Wraps the student so that DDP sees the whole loss computation inside one forward.

    With ``loss.fused`` (and a plain lm_head) the loss runs from hidden states chunk by chunk and no
    (tokens, vocabulary) logits exist; otherwise the student's logits are projected, then the dense loss.
    """

    def __init__(self, student: nn.Module, loss: LossConfig, vocab_size: int, hints: HintObjective | None = None,
                 cross: CrossTokenizer | None = None):
        super().__init__()
        self.cross = cross  # teacher and student tokenizers differ (kdlm.xtok): its own loss path
        self.cross_stats: dict = {}
        self.student = student
        self.loss = loss
        self.vocab_size = vocab_size
        self.fused = loss.fused and plain_lm_head(student) is not None
        self.hints = hints

    def forward(self, batch: dict[str, Tensor], teacher_target, kd_weight: float, teacher_states: dict | None = None,
                method_loss: Callable | None = None) -> LossTerms:
        """The micro-batch's ``LossTerms``.

        ``teacher_target``: a teacher target (module docstring; cached tuples and dense logits tensors are
        accepted and typed by ``as_teacher_target``). ``teacher_states``: the teacher's hidden states / attentions
        for the hint terms. ``method_loss``: a training method's own objective (MiniLLM), called here so that
        DDP sees it.
        """
        teacher_target = as_teacher_target(teacher_target)
        if method_loss is not None:
            return method_loss(self, batch, teacher_target)
        if isinstance(teacher_target, CrossTokenizerTarget):
            return LossTerms(*cross_tokenizer_forward(self, batch, teacher_target, kd_weight))
        mask = target_mask(batch["labels"])
        target_ids = batch["labels"][:, 1:][mask]
        outputs, hint_sum = self._student_outputs(batch, mask, teacher_states)
        hidden = outputs.last_hidden_state[:, :-1][mask]
        if "weights" in batch:  # per-example loss weights (records with "weight" or "task")
            token_weights = batch["weights"][:, None].expand(mask.shape)[mask]
            total, kd, ce, count = self._weighted_loss(hidden, target_ids, teacher_target, kd_weight, token_weights)
        else:
            total, kd, ce, count = self._logit_loss(hidden, target_ids, teacher_target, kd_weight)
        return LossTerms(total + hint_sum, kd, ce, hint_sum.detach(), count)

    def _student_outputs(self, batch: dict[str, Tensor], mask: Tensor, teacher_states: dict | None):
        """The student's decoder outputs and the weighted hint sum (zero without hint terms)."""
        hint_sum = batch["input_ids"].new_zeros((), dtype=torch.float32)
        hints = self.hints
        if hints is None:
            return decoder_outputs(self.student, batch["input_ids"], batch["attention_mask"]), hint_sum
        store, handles = capture_projections(self.student, [s for s, _ in hints.attention_pairs], hints.projection_names)
        try:
            outputs = decoder_outputs(self.student, batch["input_ids"], batch["attention_mask"],
                                      hidden_states=hints.needs_hidden, attentions=hints.needs_attention_probs)
        finally:
            for handle in handles:
                handle.remove()
        if hints.needs_hidden:
            hint_sum = hints.config.hidden_weight * hints.hidden_sum(outputs.hidden_states, teacher_states["hidden_states"], mask)
        if hints.needs_attention:
            student_states = {"attentions": outputs.attentions, "projections": store, "attention_mask": batch["attention_mask"],
                              "num_kv_heads": num_kv_heads(self.student)}
            hint_sum = hint_sum + hints.config.attention_weight * hints.attention_sum(student_states, teacher_states, mask)
        return outputs, hint_sum

    def _weighted_loss(self, hidden: Tensor, target_ids: Tensor, teacher_target, kd_weight: float, token_weights: Tensor):
        """``_logit_loss`` with each token's terms times its weight: one call per distinct weight (a step holds
        a few, one per task), so every loss path (dense, fused, top-k, sampled, online) is weighted alike."""
        sums = [hidden.new_zeros((), dtype=torch.float32) for _ in range(3)]
        for value in token_weights.unique().tolist():
            rows = (token_weights == value).nonzero().squeeze(-1)
            parts = self._logit_loss(hidden[rows], target_ids[rows], rows_of(teacher_target, rows), kd_weight)[:3]
            sums = [total + value * part for total, part in zip(sums, parts, strict=True)]
        return (*sums, _count(target_ids))

    def _logit_loss(self, hidden: Tensor, target_ids: Tensor, teacher_target: TeacherTarget, kd_weight: float):
        """(objective sum, divergence sum, CE sum, number of target tokens) from the student's hidden states."""
        options = {
            "divergence": self.loss.divergence,
            "temperature": self.loss.temperature,
            "scale_by_t2": self.loss.scale_by_t2,
            "beta": self.loss.beta,
            "alpha": self.loss.alpha,
            "lam": self.loss.lam,
            "akl_alpha": self.loss.akl_alpha,
        }
        count = _count(target_ids)
        if self.fused:
            total, kd, ce, _ = fused_kd_loss(
                hidden, plain_lm_head(self.student)[: self.vocab_size], target_ids, teacher_target,
                kd_weight=kd_weight, ce_weight=1 - kd_weight, chunk_rows=self.loss.chunk_rows,
                student_transform=logit_transform(self.student), **options,
            )
            return total, kd, ce, count
        student_logits = project(self.student, hidden)[:, : self.vocab_size]
        if teacher_target is None:  # plain fine-tuning (kd_weight 0): cross-entropy only
            ce = nn.functional.cross_entropy(student_logits.float(), target_ids, reduction="sum")
            return ce, ce.new_zeros(()), ce, count
        if isinstance(teacher_target, TeacherTopK):
            kd, ce, _ = topk_kd_loss_sums(student_logits, teacher_target.ids, teacher_target.logprobs, target_ids, **options)
        elif isinstance(teacher_target, TeacherSampled):
            kd, ce, _ = sampled_kd_loss_sums(student_logits, teacher_target.ids, teacher_target.log_weights,
                                             teacher_target.logprobs, target_ids, **options)
        else:
            kd, ce, _ = kd_loss_sums(student_logits, dense_teacher_logits(teacher_target), target_ids, **options)
        return (1 - kd_weight) * ce + kd_weight * kd, kd, ce, count


def dense_teacher_logits(target: TeacherHidden | TeacherLogits) -> Tensor:
    """The full teacher logits at the target rows (a live teacher's: its hidden states times its lm_head)."""
    if isinstance(target, TeacherHidden):
        return target.transform(target.hidden @ target.weight.T)
    return target.logits


def _count(target_ids: Tensor) -> Tensor:
    """The number of target tokens, as a tensor on their device (summed across processes later)."""
    return torch.tensor(target_ids.numel(), device=target_ids.device)


def num_kv_heads(model) -> int:
    config = _unwrap(model).config
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def run_teacher(teacher: nn.Module, batch: dict[str, Tensor], vocab_size: int, *, bf16: bool, online: bool,
                hints: HintObjective | None) -> tuple[TeacherHidden | None, dict | None]:
    """One teacher forward (no gradients): the online logit target and/or the states the hint terms need."""
    device = batch["input_ids"].device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_enabled(bf16, device)):
        store, handles = capture_projections(teacher, [t for _, t in hints.attention_pairs], hints.projection_names) if hints else ({}, [])
        try:
            outputs = decoder_outputs(teacher, batch["input_ids"], batch["attention_mask"],
                                      hidden_states=bool(hints and hints.needs_hidden),
                                      attentions=bool(hints and hints.needs_attention_probs))
        finally:
            for handle in handles:
                handle.remove()
    target = None
    if online:
        hidden = outputs.last_hidden_state[:, :-1][target_mask(batch["labels"])]
        target = TeacherHidden(hidden, lm_head_weight(teacher)[:vocab_size].detach(), logit_transform(teacher))
    states = None
    if hints is not None:
        states = {"hidden_states": outputs.hidden_states, "attentions": outputs.attentions, "projections": store,
                  "attention_mask": batch["attention_mask"], "num_kv_heads": num_kv_heads(teacher)}
    return target, states
