"""Where the per-token teacher targets of a training batch come from.

- `online`: the teacher runs on every batch and supplies full-vocabulary logits at target positions.
- `topk`: the teacher runs once over the training set (`kdlm.teachers.cache`); each target position
  keeps its top-k token ids and log-probabilities (the rest of the mass becomes one tail bucket in the
  loss), or, with `cache_kind: sampled`, ids drawn from the teacher with their counts. Training then
  never runs the teacher: the step costs about what a plain fine-tuning step costs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdlm.models.forward import project, target_hidden_states
from kdlm.precision import Bf16Setting, bf16_enabled


def teacher_logits(teacher, batch: dict[str, Tensor], *, bf16: Bf16Setting) -> Tensor:
    """Teacher logits at the batch's target positions, (N, V), fp32. No gradients."""
    device = batch["input_ids"].device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_enabled(bf16, device)):
        hidden, _ = target_hidden_states(teacher, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return project(teacher, hidden).float()
