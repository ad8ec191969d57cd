"""On-policy and adaptive distillation: where a step's responses come from (shared/METHODS.md §3).

The training loop stays the same; a method only swaps a micro-batch's examples before the teacher and the
loss see them (``prepare_step``), and logs a few facts after the step (``after_step``). Samples come from
``kdlm.models.decode.decode_batch``, the batched, KV-cached decode the server and the generate engine use,
run on the very student module being trained (switched to eval mode for the decode, no second copy).

- GKD (arXiv 2306.13649): with probability ``lmbda`` a micro-batch's responses are student samples;
  otherwise the dataset's, or teacher samples with ``seq_kd``. The divergence is ``loss.divergence``
  (generalized JSD(β) in configs/gkd.yaml).
- DistiLLM (arXiv 2402.03898; github jongwooko/distillm finetune.py): a replay buffer of student outputs,
  drawn with a probability (threshold φ) that rises by ``threshold_step`` whenever the student's
  cross-entropy on held-out answers reaches its reference plus ``loss_eps``. The cross-entropy is measured
  before the first step and once per epoch, as finetune.py does; an optional L_PT term (``pt_data``,
  ``pt_weight`` = the scripts' --lm-coef) adds cross-entropy on a separate text corpus. In ``kdlm.train.distillm``.
- ImitKD (arXiv 2009.07253; github asappresearch/imitkd generation/distillation.py): each sequence comes
  from the data with a probability annealed from ``data_start`` to ``data_end`` (or 200^(-t/T)), otherwise it
  is a student roll-in (``top_k`` sampling optional); the target is the teacher's distribution (ImitKD*'s
  "full" variant) or, with ``target: argmax``, the teacher's most likely token under cross-entropy.
- MiniLLM (arXiv 2306.08543): its own policy-gradient loss, in ``kdlm.train.minillm``.

Every random choice uses the method's own generator seeded from ``train.seed``, never torch's global
one, so a method that draws nothing (GKD with lmbda 0) trains exactly as the off-policy loop does. A
method's whole state (generator, buffers, threshold, counters) is plain numbers and lists returned by
``state_dict()``, which the training loop stores in each checkpoint: a resumed run equals an
uninterrupted one.

Where kdlm still differs from the reference code on purpose (DistiLLM and MiniLLM: in their modules):
- ImitKD's reference decodes greedy roll-ins with a seq2seq student; here the roll-ins use the sampling
  settings (``temperature: 0`` is greedy), and the probability is applied per sequence as there.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from kdlm.config import MethodConfig
from kdlm.data.tokenize import collate
from kdlm.models.decode import Row, decode_batch
from kdlm.models.forward import decoder_outputs, logit_transform, plain_lm_head, project, target_mask
from kdlm.precision import bf16_enabled
from kdlm.train.rollouts import VLLMRollouts

IGNORE_INDEX = -100
# ImitKD's exponential schedule: the data probability is EXP_BASE^(-t/T) (asappresearch/imitkd: exp_base 200).
EXP_BASE = 200.0


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


def cache_name(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class PolicyWrapper:
    """A model ``decode_batch`` can sample from that wraps the trained student (not a copy)."""

    def __init__(self, student):
        self.student = student

    @property
    def device(self):
        return self.student.device

    @property
    def generation_config(self):
        return self.student.generation_config

    @property
    def training(self) -> bool:
        return self.student.training

    def eval(self):
        self.student.eval()
        return self

    def train(self, mode: bool = True):
        self.student.train(mode)
        return self

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class TopKPolicy(PolicyWrapper):
    """The student with all but its ``top_k`` most likely next tokens masked out (ImitKD's ``sample_top_k``)."""

    def __init__(self, student, top_k: int):
        super().__init__(student)
        self.top_k = top_k
        self._cache_name = cache_name(student)

    def forward(self, input_ids, attention_mask, position_ids, use_cache=True, past_key_values=None):
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                           **{self._cache_name: past_key_values})
        logits = out.logits[:, -1:].float()
        kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        return SimpleNamespace(logits=logits.masked_fill(logits < kth, -math.inf), past_key_values=output_cache(out))


def rng_state(rng: random.Random) -> dict:
    """A ``random.Random``'s state as plain numbers (checkpoints hold no pickled objects)."""
    version, internal, gauss = rng.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def set_rng_state(rng: random.Random, state: dict) -> None:
    rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


def plain_examples(examples: list[dict]) -> list[dict]:
    """Token-list copies of examples (input_ids, labels), storable in a checkpoint."""
    return [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in examples]


class PretrainingCorpus:
    """L_PT's text corpus: batches drawn epoch by epoch in an order of the method's generator."""

    def __init__(self, examples: list[dict], rng: random.Random):
        self.examples, self.rng = examples, rng
        self.order: list[int] = []

    def next_batch(self, size: int) -> list[dict]:
        batch = []
        while len(batch) < size:
            if not self.order:
                self.order = list(range(len(self.examples)))
                self.rng.shuffle(self.order)
            batch.append(self.examples[self.order.pop()])
        return batch


def pretraining_sums(objective, batch: dict, *, teacher, kd_ratio: float, vocab_size: int, bf16: bool):
    """(L_PT sum, CE sum, tokens) of a corpus batch: (1 - kd_ratio)·CE + kd_ratio·FKL(teacher ‖ student), summed.

    With ``kd_ratio`` 0 the teacher does not run. LMOps's pt_loss uses the cross-entropy form −Σ p log q of the
    forward KL; kdlm's ``fkl`` is the KL itself, which differs by the teacher's entropy (same gradient).
    """
    from kdlm.losses import kd_loss_sums
    from kdlm.losses.fused import fused_kd_loss
    from kdlm.train.objective import run_teacher

    student = objective.student
    mask = target_mask(batch["labels"])
    target_ids = batch["labels"][:, 1:][mask]
    target = None
    if kd_ratio > 0:
        target, _ = run_teacher(teacher, batch, vocab_size, bf16=bf16, online=True, hints=None)
    hidden = decoder_outputs(student, batch["input_ids"], batch["attention_mask"]).last_hidden_state[:, :-1][mask]
    if objective.fused:
        total, _, ce, _ = fused_kd_loss(hidden, plain_lm_head(student)[:vocab_size], target_ids, target, divergence="fkl",
                                       kd_weight=kd_ratio, ce_weight=1 - kd_ratio, chunk_rows=objective.loss.chunk_rows,
                                       student_transform=logit_transform(student))
        return total, ce, target_ids.numel()
    student_logits = project(student, hidden)[:, :vocab_size].float()
    ce = F.cross_entropy(student_logits, target_ids, reduction="sum")
    if target is None:
        return ce, ce, target_ids.numel()
    teacher_logits = target.transform(target.hidden.float() @ target.weight.float().T)
    kd, _, _ = kd_loss_sums(student_logits, teacher_logits, target_ids, divergence="fkl")
    return (1 - kd_ratio) * ce + kd_ratio * kd, ce, target_ids.numel()


class OnPolicyMethod:
    """Base: holds the student, the teacher, the sampling settings and the method's random generator."""

    loss: Callable | None = None  # a method with its own objective sets this (see StudentObjective.forward)

    def __init__(self, config: MethodConfig, *, student, teacher, tokenizer, max_steps: int, seed: int = 0,
                 bf16: bool = False, vocab_size: int | None = None, pt_examples: list[dict] | None = None):
        self.config = config
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        self.max_steps = max_steps
        self.bf16 = bf16
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)
        self.generated = 0  # sequences sampled so far (for the log)
        # Tokens each model has run through while sampling (prompt prefill + decoded), for the cost estimate
        # of `kdlm bench`: decoding costs about 2 x parameters FLOPs per token and model.
        self.decode_tokens = {"student": 0, "teacher": 0}
        self.student_policy = TopKPolicy(student, config.top_k) if config.top_k > 0 else student
        self.corpus = PretrainingCorpus(pt_examples, random.Random(seed + 1)) if pt_examples else None
        # method.rollout_backend=vllm: student samples from a colocated vLLM engine (kdlm.train.rollouts; untested here)
        self.rollouts = VLLMRollouts(student, tokenizer, config, seed=seed) if config.rollout_backend == "vllm" else None

    def sample(self, model, examples: list[dict]) -> list[dict]:
        seeds = [self.rng.getrandbits(63) for _ in examples]
        self.generated += len(examples)
        policy = self.student_policy if model is self.student else model
        if model is self.student and self.rollouts is not None:
            out = self.rollouts.sample(self.student, examples, seeds, [prompt_ids(example) for example in examples])
        else:
            out = sample_examples(policy, self.tokenizer, examples, max_new_tokens=self.config.max_new_tokens,
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

    def pretraining_term(self, objective, device, size: int):
        """(L_PT mean per corpus token, CE mean) on the next corpus batch of ``size`` records, or None without a corpus."""
        if self.corpus is None or self.config.pt_weight == 0:
            return None
        batch = {k: v.to(device) for k, v in collate(self.corpus.next_batch(size), self.tokenizer.pad_token_id).items()}
        kd_ratio = self.config.pt_kd_ratio if self.config.name == "minillm" else 0.0  # distillm's pt_loss is CE only
        total, ce, count = pretraining_sums(objective, batch, teacher=self.teacher, kd_ratio=kd_ratio,
                                            vocab_size=self.vocab_size, bf16=self.bf16)
        return total / max(count, 1), ce.detach() / max(count, 1)

    def state_dict(self) -> dict:
        """Everything a resumed run needs, as plain numbers, lists and dicts (JSON-serialisable)."""
        state = {"rng": rng_state(self.rng), "generated": self.generated, "decode_tokens": dict(self.decode_tokens)}
        if self.corpus is not None:
            state["corpus"] = {"rng": rng_state(self.corpus.rng), "order": list(self.corpus.order)}
        return state

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(self.rng, state["rng"])
        self.generated = int(state["generated"])
        self.decode_tokens = {k: int(v) for k, v in state["decode_tokens"].items()}
        if self.corpus is not None and "corpus" in state:
            set_rng_state(self.corpus.rng, state["corpus"]["rng"])
            self.corpus.order = [int(i) for i in state["corpus"]["order"]]


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


def data_probability(step: int, total: int, start: float, end: float, schedule: str = "linear") -> float:
    """ImitKD's probability that a sequence comes from the data at ``step`` (0-based) of ``total``.

    linear: from ``start`` to ``end``; exponential: 200^(-step/total) (asappresearch/imitkd's ``exp_base`` 200).
    """
    if schedule == "exponential":
        return EXP_BASE ** (-step / max(1, total))
    return start + (end - start) * step / max(1, total - 1)


class ImitKD(OnPolicyMethod):
    """Per-sequence mixture of teacher-forced data and student roll-ins, moving towards the student."""

    def prepare_step(self, step, batches):
        config = self.config
        keep = data_probability(step, self.max_steps, config.data_start, config.data_end, config.data_schedule)
        out = []
        for batch in batches:
            chosen = [i for i in range(len(batch)) if self.rng.random() >= keep]
            batch = list(batch)
            if chosen:
                sampled = self.sample(self.student, [batch[i] for i in chosen])
                if config.target == "argmax":
                    sampled = self.teacher_argmax_labels(sampled)
                for i, example in zip(chosen, sampled, strict=True):
                    batch[i] = example
            out.append(batch)
        return out

    def teacher_argmax_labels(self, examples: list[dict]) -> list[dict]:
        """The examples with each response target replaced by the teacher's most likely token at that prefix."""
        device = next(self.teacher.parameters()).device
        batch = {k: v.to(device) for k, v in collate(examples, self.tokenizer.pad_token_id).items()}
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_enabled(self.bf16, device)):
            hidden = decoder_outputs(self.teacher, batch["input_ids"], batch["attention_mask"]).last_hidden_state[:, :-1]
            best = project(self.teacher, hidden)[..., : self.vocab_size].argmax(-1).cpu()
        out = []
        for row, example in enumerate(examples):
            labels = list(example["labels"])
            for i in range(1, len(labels)):
                if labels[i] != IGNORE_INDEX:
                    labels[i] = int(best[row, i - 1])
            out.append({"input_ids": list(example["input_ids"]), "labels": labels})
        return out
