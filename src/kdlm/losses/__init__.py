"""Logit-distillation losses: one definition per divergence, used by the dense, top-k and sampled paths."""

from kdlm.losses.divergences import (
    DIVERGENCES,
    akl,
    fkl,
    jsd,
    per_token_divergence,
    rkl,
    skl,
    srkl,
    symkl,
    tvd,
)
from kdlm.losses.logits import SAMPLED_DIVERGENCES, kd_loss_sums, sampled_kd_loss_sums, topk_kd_loss_sums

__all__ = [
    "DIVERGENCES",
    "SAMPLED_DIVERGENCES",
    "akl",
    "fkl",
    "jsd",
    "kd_loss_sums",
    "per_token_divergence",
    "rkl",
    "sampled_kd_loss_sums",
    "skl",
    "srkl",
    "symkl",
    "topk_kd_loss_sums",
    "tvd",
]
