"""DistiLLM (arXiv 2402.03898): adaptive off-policy distillation with a replay buffer of student outputs.

As github jongwooko/distillm finetune.py runs it (the code here is ours): each micro-batch is fresh student
samples with probability s, a draw from the replay buffer with probability φ − s (fresh while the buffer
fills), else the dataset's; φ rises by ``threshold_step`` when the student's cross-entropy on held-out answers
reaches its reference plus ``loss_eps``, measured before the first step and once per epoch (its
``--eval-interval -1``). The buffer is first in, first out, and a draw takes a micro-batch without
replacement (``random.sample``). An optional L_PT term adds ``pt_weight`` (the scripts' ``--lm-coef``) times
the cross-entropy on a separate text corpus (``pt_data``, their ``--lm-data-dir``).

Where kdlm differs on purpose: the held-out answers are training records set aside (``val_examples``); the
cross-entropy is token-weighted over them (finetune.py averages per-batch means); the random draws come from
the method's own generator (finetune.py uses numpy's and Python's global ones).
"""

from __future__ import annotations

import math
import random
from collections import deque

import torch
import torch.nn.functional as F

from kdlm.config import LossConfig
from kdlm.data.tokenize import collate
from kdlm.errors import KdlmError
from kdlm.models.forward import decoder_outputs, project, target_mask
from kdlm.precision import bf16_enabled
from kdlm.train.onpolicy import OnPolicyMethod, plain_examples, prompt_ids


class ReplayBuffer:
    """First-in-first-out store of generated examples, at most ``capacity`` of them (on CPU, as token lists)."""

    def __init__(self, capacity: int):
        self.items: deque[dict] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) == self.items.maxlen

    def push(self, examples: list[dict]) -> None:
        self.items.extend(plain_examples(examples))

    def sample(self, count: int, rng: random.Random) -> list[dict]:
        """``count`` distinct examples (distillm's ``random.sample``: without replacement)."""
        if count > len(self.items):
            raise KdlmError(f"the replay buffer holds {len(self.items)} examples, fewer than a micro-batch ({count}): "
                            "raise method.capacity to at least train.batch_size")
        return [self.items[i] for i in rng.sample(range(len(self.items)), count)]


class AdaptiveThreshold:
    """DistiLLM's rule: φ rises by ``step`` (up to 1) when a validation loss reaches the reference plus ``eps``.

    The first validation loss becomes the reference; a loss that triggers a rise becomes the new reference;
    other losses leave it unchanged (an improvement does not lower the bar). finetune.py tests
    ``curr_avg_loss >= prev_avg_loss + loss_eps``.
    """

    def __init__(self, initial: float, eps: float, step: float = 0.1):
        self.value, self.eps, self.step = initial, eps, step
        self.reference: float | None = None

    def update(self, validation_loss: float) -> bool:
        """Feed one validation loss; returns whether the threshold rose."""
        if self.reference is None:
            self.reference = validation_loss
            return False
        if validation_loss >= self.reference + self.eps:
            self.value = min(1.0, self.value + self.step)
            self.reference = validation_loss
            return True
        return False


def fresh_probability(threshold: float, step: int, total: int, schedule: str) -> float:
    """s, the probability of generating fresh samples at ``step`` of ``total``, from the threshold φ."""
    progress = step / max(1, total)
    if schedule == "decreasing":
        return threshold * (1 - progress)
    if schedule == "increasing":
        return threshold * progress
    return 0.5 * threshold


def choose_source(r: float, fresh: float, threshold: float, buffer_full: bool) -> str:
    """DistiLLM's choice for a draw r ~ U(0, 1): "fresh" student samples, a "replay" draw, or the "data".

    Fresh when r < s, or when r < φ while the buffer still fills; replay when r < φ otherwise; else data.
    """
    if r < fresh or (r < threshold and not buffer_full):
        return "fresh"
    if r < threshold:
        return "replay"
    return "data"


def answer_cross_entropy(model, examples: list[dict], *, pad_token_id: int, vocab_size: int, batch_size: int,
                         bf16: bool) -> float:
    """Mean cross-entropy per target token of ``model`` on the examples' answers (distillm's validation loss)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_enabled(bf16, device)):
            for start in range(0, len(examples), batch_size):
                batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_token_id).items()}
                mask = target_mask(batch["labels"])
                hidden = decoder_outputs(model, batch["input_ids"], batch["attention_mask"]).last_hidden_state[:, :-1][mask]
                logits = project(model, hidden)[:, :vocab_size].float()
                total += F.cross_entropy(logits, batch["labels"][:, 1:][mask], reduction="sum").item()
                count += int(mask.sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


class DistiLLM(OnPolicyMethod):
    """Adaptive off-policy: fresh student samples, replayed ones, or data, by the threshold rule."""

    def __init__(self, config, *, val_examples: list[dict], loss_config: LossConfig, pad_token_id: int,
                 batch_size: int = 8, steps_per_epoch: int = 1, **kwargs):
        super().__init__(config, **kwargs)
        if loss_config.divergence not in ("skl", "srkl"):
            raise KdlmError(
                f"method.name=distillm trains with skew KL or skew reverse KL; loss.divergence is {loss_config.divergence!r}: "
                "set loss.divergence=skl or loss.divergence=srkl"
            )
        if config.capacity < batch_size:
            raise KdlmError(f"method.capacity={config.capacity} is smaller than a micro-batch (train.batch_size={batch_size}): "
                            "the replay draws a micro-batch without replacement; raise method.capacity")
        self.buffer = ReplayBuffer(config.capacity)
        self.threshold = AdaptiveThreshold(config.init_threshold, config.loss_eps, config.threshold_step)
        self.val_examples, self.kd_weight = val_examples, loss_config.kd_weight
        self.pad_token_id, self.batch_size = pad_token_id, batch_size
        self.eval_every = config.eval_every or max(1, steps_per_epoch)
        self.sources = {"fresh": 0, "replay": 0, "data": 0}
        self.val_loss = math.nan  # the latest measurement not yet logged
        if self.corpus is not None:
            self.loss = self._loss_with_pretraining

    def prepare_step(self, step, batches):
        if self.threshold.reference is None:  # finetune.py evaluates once before training (step 0)
            self.measure()
        fresh = fresh_probability(self.threshold.value, step, self.max_steps, self.config.schedule)
        out = []
        for batch in batches:
            source = choose_source(self.rng.random(), fresh, self.threshold.value, self.buffer.full)
            if source == "fresh":
                batch = self.sample(self.student, batch)
                self.buffer.push([example for example in batch if prompt_ids(example)])
            elif source == "replay":
                batch = self.buffer.sample(len(batch), self.rng)
            self.sources[source] += 1
            out.append(batch)
        return out

    def measure(self) -> float:
        """The student's cross-entropy on the held-out answers, fed to the threshold rule."""
        self.val_loss = answer_cross_entropy(self.student, self.val_examples, pad_token_id=self.pad_token_id,
                                             vocab_size=self.vocab_size, batch_size=self.batch_size, bf16=self.bf16)
        self.threshold.update(self.val_loss)
        return self.val_loss

    def _loss_with_pretraining(self, objective, batch, teacher_target):
        """The loop's own objective on the batch, plus pt_weight · L_PT (a corpus mean, scaled to the batch's tokens)."""
        if objective.hints is not None:  # a method's loss does not receive the teacher's hidden states
            raise KdlmError("method.pt_data with hint terms (hints.hidden_weight, hints.attention_weight) is not supported; "
                            "unset one of them")
        terms = objective(batch, teacher_target, self.kd_weight)
        pt, _ = self.pretraining_term(objective, batch["input_ids"].device, len(batch["input_ids"]))
        tokens = float(terms.count)
        terms.total = terms.total + self.config.pt_weight * pt * tokens
        terms.method["pt"], terms.weights["pt"] = pt.item() * tokens, self.config.pt_weight
        return terms

    def after_step(self, step):
        if step % self.eval_every == 0:
            self.measure()
        record = {**self.counters(), "threshold": self.threshold.value, "val_loss": self.val_loss,
                  "buffer": len(self.buffer), **{f"batches_{k}": v for k, v in self.sources.items()}}
        self.val_loss = math.nan
        return record

    def state_dict(self):
        return {**super().state_dict(), "buffer": list(self.buffer.items), "threshold": self.threshold.value,
                "reference": self.threshold.reference, "sources": dict(self.sources)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.buffer.items.clear()
        self.buffer.push(state["buffer"])
        self.threshold.value, self.threshold.reference = float(state["threshold"]), state["reference"]
        self.sources = {k: int(v) for k, v in state["sources"].items()}
