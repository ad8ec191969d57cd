"""On-policy and adaptive distillation: where a step's responses come from (shared/METHODS.md §3).

The training loop stays the same; a method only swaps a micro-batch's examples before the teacher and the
loss see them (``prepare_step``), and logs a few facts after the step (``after_step``). Samples come from
``kdlm.serve.sampling.decode_batch``, the batched, KV-cached decode the server and the generate engine use,
run on the very student module being trained (switched to eval mode for the decode, no second copy).

- GKD (arXiv 2306.13649): with probability ``lmbda`` a micro-batch's responses are student samples;
  otherwise the dataset's, or teacher samples with ``seq_kd``. The divergence is ``loss.divergence``
  (generalized JSD(β) in configs/gkd.yaml).
- DistiLLM (arXiv 2402.03898): a replay buffer of student outputs, drawn with a probability (threshold φ)
  that rises by ``threshold_step`` whenever the validation loss exceeds its reference by more than
  ``loss_eps``; losses skew KL / skew reverse KL.
- ImitKD (arXiv 2009.07253): each sequence comes from the data with a probability annealed from
  ``data_start`` to ``data_end`` over the run, otherwise from the student.
- MiniLLM (arXiv 2306.08543): its own policy-gradient loss, in ``kdlm.train.minillm``.

Every random choice uses the method's own generator seeded from ``train.seed``, never torch's global
one, so a method that draws nothing (GKD with lmbda 0) trains exactly as the off-policy loop does.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable

import torch

from kdlm.config import LossConfig, MethodConfig
from kdlm.errors import KdlmError
from kdlm.losses import kd_loss_sums
from kdlm.serve.sampling import Row, decode_batch

IGNORE_INDEX = -100


def prompt_ids(example: dict) -> list[int]:
    """The tokens before the first target of an example: the prompt of a chat record ([] for plain text)."""
    labels = example["labels"]
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return list(example["input_ids"][:first])


def sample_examples(model, tokenizer, examples: list[dict], *, max_new_tokens: int, temperature: float, top_p: float,
                    seeds: list[int], bf16: bool) -> list[dict]:
    """Examples whose responses are samples of ``model`` given their prompts; plain-text examples pass through.

    ``model`` is switched to eval mode for the decode and back to its former mode after. A sample that
    ended on an end-of-sequence token keeps it as its last target (the student learns to stop).
    """
    chats = [i for i, example in enumerate(examples) if prompt_ids(example)]
    out = list(examples)
    if not chats:
        return out
    rows = [Row(prompt_ids=prompt_ids(examples[i]), max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                seed=seeds[i]) for i in chats]
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        results = decode_batch(model, tokenizer, rows, bf16=bf16)
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    for i, row, result in zip(chats, rows, results, strict=True):
        response = list(result.token_ids)
        if result.finish_reason == "stop" or not response:
            response.append(tokenizer.eos_token_id)
        out[i] = {"input_ids": row.prompt_ids + response, "labels": [IGNORE_INDEX] * len(row.prompt_ids) + response}
    return out


class OnPolicyMethod:
    """Base: holds the student, the teacher, the sampling settings and the method's random generator."""

    loss: Callable | None = None  # a method with its own objective sets this (see StudentObjective.forward)

    def __init__(self, config: MethodConfig, *, student, teacher, tokenizer, max_steps: int, seed: int = 0,
                 bf16: bool = False):
        self.config = config
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        self.max_steps = max_steps
        self.bf16 = bf16
        self.rng = random.Random(seed)
        self.generated = 0  # sequences sampled so far (for the log)
        # Tokens each model has run through while sampling (prompt prefill + decoded), for the cost estimate
        # of `kdlm bench`: decoding costs about 2 x parameters FLOPs per token and model.
        self.decode_tokens = {"student": 0, "teacher": 0}

    def sample(self, model, examples: list[dict]) -> list[dict]:
        seeds = [self.rng.getrandbits(63) for _ in examples]
        self.generated += len(examples)
        out = sample_examples(model, self.tokenizer, examples, max_new_tokens=self.config.max_new_tokens,
                              temperature=self.config.temperature, top_p=self.config.top_p, seeds=seeds, bf16=self.bf16)
        processed = sum(len(new["input_ids"]) for old, new in zip(examples, out, strict=True) if new is not old)
        runners = ["student"] if model is self.student else ["teacher"] if model is self.teacher else ["student", "teacher"]
        for name in runners:  # anything else is MiniLLM's mixture, which runs both models at every token
            self.decode_tokens[name] += processed
        return out

    def counters(self) -> dict:
        """Cumulative facts for the training log: sequences sampled, and tokens run by each model to sample them."""
        return {"generated": self.generated, **{f"decode_tokens_{k}": v for k, v in self.decode_tokens.items()}}

    def prepare_step(self, step: int, batches: list[list[dict]]) -> list[list[dict]]:
        return batches

    def after_step(self, step: int) -> dict:
        return self.counters()


class GKD(OnPolicyMethod):
    """Generalized KD: a micro-batch is student-sampled with probability lmbda, else data (or teacher samples)."""

    def prepare_step(self, step, batches):
        out = []
        for batch in batches:
            if self.rng.random() < self.config.lmbda:
                batch = self.sample(self.student, batch)
            elif self.config.seq_kd:
                batch = self.sample(self.teacher, batch)
            out.append(batch)
        return out


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
        self.items.extend(examples)

    def sample(self, count: int, rng: random.Random) -> list[dict]:
        return [self.items[rng.randrange(len(self.items))] for _ in range(count)]


class AdaptiveThreshold:
    """DistiLLM's rule: φ rises by ``step`` (up to 1) when a validation loss exceeds the reference by more than ``eps``.

    The first validation loss becomes the reference; a loss that triggers a rise becomes the new reference;
    other losses leave it unchanged (an improvement does not lower the bar).
    """

    def __init__(self, initial: float, eps: float, step: float = 0.1):
        self.value, self.eps, self.step = initial, eps, step
        self.reference: float | None = None

    def update(self, validation_loss: float) -> bool:
        """Feed one validation loss; returns whether the threshold rose."""
        if self.reference is None:
            self.reference = validation_loss
            return False
        if validation_loss - self.reference > self.eps:
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


class DistiLLM(OnPolicyMethod):
    """Adaptive off-policy: fresh student samples, replayed ones, or data, by the threshold rule."""

    def __init__(self, config, *, val_examples: list[dict], loss_config: LossConfig, vocab_size: int,
                 pad_token_id: int, batch_size: int = 8, **kwargs):
        super().__init__(config, **kwargs)
        if loss_config.divergence not in ("skl", "srkl"):
            raise KdlmError(
                f"method.name=distillm trains with skew KL or skew reverse KL; loss.divergence is {loss_config.divergence!r}: "
                "set loss.divergence=skl or loss.divergence=srkl"
            )
        self.buffer = ReplayBuffer(config.capacity)
        self.threshold = AdaptiveThreshold(config.init_threshold, config.loss_eps, config.threshold_step)
        self.val_examples, self.loss_config, self.vocab_size = val_examples, loss_config, vocab_size
        self.pad_token_id, self.batch_size = pad_token_id, batch_size
        self._teacher_logits = None
        self.sources = {"fresh": 0, "replay": 0, "data": 0}

    def prepare_step(self, step, batches):
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

    def validation_loss(self) -> float:
        """Mean per-token ``loss.divergence`` of the student to the teacher on the validation examples."""
        from kdlm.evaluate.metrics import target_logits

        options = {"batch_size": self.batch_size, "pad_token_id": self.pad_token_id, "vocab_size": self.vocab_size}
        was_training = self.student.training
        if self._teacher_logits is None:  # the teacher is frozen: its logits are computed once
            self._teacher_logits = target_logits(self.teacher, self.val_examples, **options)
        student_logits = target_logits(self.student, self.val_examples, **options)
        self.student.train(was_training)
        total = count = 0.0
        loss = self.loss_config
        for s_logits, t_logits in zip(student_logits, self._teacher_logits, strict=True):
            labels = torch.zeros(s_logits.shape[0], dtype=torch.long, device=s_logits.device)  # all targets; CE unused
            divergence, _, num = kd_loss_sums(s_logits, t_logits, labels, divergence=loss.divergence,
                                              temperature=loss.temperature, alpha=loss.alpha)
            total += divergence.item()
            count += num
        return total / max(count, 1)

    def after_step(self, step):
        record = {**self.counters(), "threshold": self.threshold.value, "val_loss": math.nan,
                  **{f"batches_{k}": v for k, v in self.sources.items()}}
        if step % self.config.eval_every == 0:
            record["val_loss"] = self.validation_loss()
            self.threshold.update(record["val_loss"])
            record["threshold"] = self.threshold.value
        return record


def data_probability(step: int, total: int, start: float, end: float) -> float:
    """ImitKD's probability that a sequence comes from the data at ``step`` (0-based) of ``total``: linear."""
    return start + (end - start) * step / max(1, total - 1)


class ImitKD(OnPolicyMethod):
    """Per-sequence mixture of teacher-forced data and student samples, moving towards the student."""

    def prepare_step(self, step, batches):
        keep = data_probability(step, self.max_steps, self.config.data_start, self.config.data_end)
        out = []
        for batch in batches:
            chosen = [i for i in range(len(batch)) if self.rng.random() >= keep]
            batch = list(batch)
            if chosen:
                sampled = self.sample(self.student, [batch[i] for i in chosen])
                for i, example in zip(chosen, sampled, strict=True):
                    batch[i] = example
            out.append(batch)
        return out


def samples_student(config: MethodConfig) -> bool:
    """Whether a method can put the student's own samples in a batch that the logit loss trains on."""
    if config.name == "gkd":
        return config.lmbda > 0
    if config.name == "imitkd":
        return min(config.data_start, config.data_end) < 1
    return config.name == "distillm"  # its replay buffer holds student samples; MiniLLM has its own objective


def check_method_loss(config: MethodConfig, loss_config: LossConfig) -> None:
    """Refuse the loss weights an on-policy method cannot train with (a KdlmError naming the setting)."""
    if config.name == "offpolicy":
        return
    if loss_config.kd_weight == 0:
        raise KdlmError(f"method.name={config.name} distills from the teacher on generated answers; loss.kd_weight=0 turns "
                        "the teacher off: set loss.kd_weight > 0 (the configs use 1.0)")
    if loss_config.kd_weight < 1 and samples_student(config) and not loss_config.allow_onpolicy_ce:
        # The CE target of a student sample is the sample itself: the student is taught its own outputs, which
        # collapsed DistiLLM's training once its replay threshold rose (jongwooko/distillm#16); the reference
        # scripts run kd_ratio 1.0.
        raise KdlmError(
            f"method.name={config.name} with loss.kd_weight={loss_config.kd_weight} puts {1 - loss_config.kd_weight:g} x "
            "cross-entropy on the student's own samples, teaching it its own outputs (this collapsed training in "
            "jongwooko/distillm#16): set loss.kd_weight=1 (the shipped configs do), or loss.allow_onpolicy_ce=true "
            "to train it anyway"
        )


def build_method(config: MethodConfig, *, student, teacher, tokenizer, loss_config: LossConfig, max_steps: int,
                 seed: int, bf16: bool, vocab_size: int, batch_size: int, val_examples: list[dict] | None = None):
    """The method object for ``config.name`` (None for offpolicy)."""
    if config.name == "offpolicy":
        return None
    if teacher is None:
        raise KdlmError(f"method.name={config.name} needs the live teacher (teacher.signal=online, no teacher.cache)")
    check_method_loss(config, loss_config)
    common = {"student": student, "teacher": teacher, "tokenizer": tokenizer, "max_steps": max_steps, "seed": seed,
              "bf16": bf16}
    if config.name == "gkd":
        return GKD(config, **common)
    if config.name == "imitkd":
        return ImitKD(config, **common)
    if config.name == "distillm":
        if not val_examples:
            raise KdlmError("method.name=distillm needs validation examples (method.val_examples > 0)")
        return DistiLLM(config, val_examples=val_examples, loss_config=loss_config, vocab_size=vocab_size,
                        pad_token_id=tokenizer.pad_token_id, batch_size=batch_size, **common)
    from kdlm.train.minillm import MiniLLM

    return MiniLLM(config, vocab_size=vocab_size, **common)
