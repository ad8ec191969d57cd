"""MiniLLM (arXiv 2306.08543): sequence-level reverse KL(q‖p) minimised by policy gradient on student samples.

Per sampled response y (shared/METHODS.md §3.5), with q the student and p the teacher, as github
microsoft/LMOps minillm/ runs it (minillm/sampler.py, losses.py, trainer.py; the code here is ours):

- reward r_t = (log p(y_t | y_<t) − log q_old(y_t | y_<t)) / ``reward_scaling``, clipped to ±``reward_clip``,
  computed once when the rollouts are collected (LMOps: --reward-scaling 0.5, --cliprange-reward 100);
- return R_t = Σ_{t'≥t} γ^{t'−t} r_{t'} (γ = 0.95), divided by its number of terms (``length_norm``: count);
  ``current_reward: false`` starts the sum at t + 1, the paper's single-step decomposition;
- advantages whitened over the micro-batch's response tokens (``whiten``);
- teacher-mixed sampling: responses are drawn from p̃ = α·p + (1 − α)·q, and each token carries the importance
  weight w_t = q_old(y_t)/p̃(y_t), fixed at collection;
- PPO: ratio_t = exp(log q_θ − log q_old)·w_t, loss_t = max(−A_t·ratio_t, −A_t·clip(ratio_t, 1 ± ε)), and the
  rollouts of one collection are trained for ``ppo_epochs`` optimizer steps (LMOps: 4), reshuffled each time;
- ``single_step``: plus the exact token-level KL(q(·|y_<t) ‖ p(·|y_<t)) at every position (LMOps's reg loss);
- L_PT: ``pt_weight`` · [(1 − r)·CE + r·FKL] on a separate text corpus (``pt_data``, r = ``pt_kd_ratio``).

Where kdlm differs on purpose: a collection is one optimizer step's worth of prompts (LMOps: 256 rollouts
over 16 GPUs, i.e. one mini-batch per device per PPO epoch, the same shape), taken from the data schedule's
step at which it happens; the prompts of the steps that train on the buffer are not sampled. LMOps draws
its prompts from its own loader. Whitening uses the response tokens only (LMOps's statistics also count
padded positions); the ``reward`` logged is the mean unscaled log p − log q per sampled token.
The paper-only variant: ``current_reward: false, gamma: 1, whiten: false, reward_scaling: 1,
reward_clip: null, ppo_epochs: 1``.
"""

from __future__ import annotations

import math
from collections import deque
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlm.data.tokenize import collate
from kdlm.errors import KdlmError
from kdlm.losses.divergences import rkl, upcast
from kdlm.models.forward import decoder_outputs, project, target_mask
from kdlm.precision import bf16_enabled
from kdlm.train.objective import LossTerms
from kdlm.train.onpolicy import OnPolicyMethod, PolicyWrapper, cache_name, output_cache, prompt_ids


def future_returns(rewards: Tensor, mask: Tensor, *, gamma: float, length_norm: str = "count",
                   include_current: bool = True) -> Tensor:
    """Discounted returns of each position's rewards, optionally length-normalised.

    R_t = Σ_{t' ≥ t, mask} γ^{k(t')} r_{t'}, where k counts the masked positions between t and t' (with a
    contiguous response k = t' − t); without ``include_current`` the sum starts after t (k = t' − t − 1).
    ``length_norm``: "count" divides R_t by its number of terms (LMOps, the paper), "discounted" by Σ γ^k
    over the same terms (TRL), "none" not at all. A position with no terms gets 0.

    Args:
        rewards: (B, L) per-token rewards.
        mask: (B, L) bool, True at response tokens.
        gamma: discount in [0, 1].
        length_norm: "count", "discounted" or "none".
        include_current: include the position's own reward.

    Returns:
        (B, L) returns, 0 outside the mask.
    """
    rewards = rewards.double() if rewards.dtype == torch.float64 else rewards.float()
    mask = mask.bool()
    returns = torch.zeros_like(rewards)
    state = tuple(torch.zeros_like(rewards[:, 0]) for _ in range(3))  # discounted sum, Σ γ^k, number of terms
    for t in reversed(range(rewards.shape[1])):
        here = mask[:, t]
        if include_current:
            state = _add_reward(state, rewards[:, t], here, gamma)
        total, discounted, count = state
        norm = {"count": count, "discounted": discounted}.get(length_norm)
        value = total / norm.clamp(min=1e-12) if norm is not None else total
        returns[:, t] = torch.where(here & (count > 0), value, torch.zeros_like(value))
        if not include_current:
            state = _add_reward(state, rewards[:, t], here, gamma)
    return returns


def _add_reward(state: tuple[Tensor, Tensor, Tensor], reward: Tensor, here: Tensor, gamma: float):
    total, discounted, count = state
    return (torch.where(here, reward + gamma * total, total), torch.where(here, 1 + gamma * discounted, discounted),
            torch.where(here, count + 1, count))


def rollout_rewards(log_q: Tensor, log_p: Tensor, *, teacher_mix: float, reward_scaling: float = 1.0,
                    reward_clip: float | None = None) -> dict[str, Tensor]:
    """What a collection fixes per sampled token: the reward and the importance weight.

    Args:
        log_q: (N,) log q_old of the sampled tokens (the student when the rollouts were drawn).
        log_p: (N,) log p of the same tokens (the teacher).
        teacher_mix: α of the sampling mixture α·p + (1 − α)·q (0: plain student samples, w = 1).
        reward_scaling, reward_clip: r = clip((log p − log q) / reward_scaling, ±reward_clip).

    Returns:
        ``reward`` (scaled, clipped), ``raw_reward`` (log p − log q) and ``weight`` q/p̃, each (N,).
    """
    raw = log_p - log_q
    reward = raw / reward_scaling
    if reward_clip is not None:
        reward = reward.clamp(-reward_clip, reward_clip)
    if teacher_mix > 0:
        log_mix = torch.logaddexp(log_p + math.log(teacher_mix), log_q + math.log1p(-teacher_mix))
        weight = (log_q - log_mix).exp()
    else:
        weight = torch.ones_like(log_q)
    return {"reward": reward, "raw_reward": raw, "weight": weight}


def whiten(values: Tensor) -> Tensor:
    """(x − mean) / sqrt(var + 1e-8) with the unbiased variance (LMOps minillm/utils.py ``whiten``)."""
    if values.numel() < 2:
        return values
    var, mean = torch.var_mean(values)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def minillm_token_losses(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    tokens: Tensor,
    mask: Tensor,
    *,
    old_logprobs: Tensor,
    reward: Tensor,
    weight: Tensor,
    gamma: float = 0.95,
    length_norm: str = "count",
    current_reward: bool = True,
    clip: float = 0.2,
    single_step: bool = True,
    whiten_advantages: bool = True,
) -> dict[str, Tensor]:
    """Per-token MiniLLM terms for one micro-batch of rollouts.

    Args:
        student_logprobs: (N, V) log q_θ at the N response positions (differentiable), row-major over ``mask``.
        teacher_logprobs: (N, V) log p at the same positions.
        tokens: (N,) the sampled tokens.
        mask: (B, L) bool with N True entries: where the rows sit in their sequences (for the returns).
        old_logprobs, reward, weight: (N,) fixed at collection (``rollout_rewards``).
        gamma, length_norm, current_reward: see ``future_returns`` (``current_reward`` is its ``include_current``).
        clip: PPO clip range ε of the importance ratio.
        single_step: add the exact token-level reverse KL.
        whiten_advantages: standardise the advantages over the N tokens.

    Returns:
        dict of (N,) tensors: ``pg`` (policy-gradient loss, differentiable), ``reg`` (token-level RKL,
        differentiable; zeros without ``single_step``), and the detached ``advantage`` and ``ratio``.
    """
    student_logprobs, teacher_logprobs = upcast(student_logprobs), upcast(teacher_logprobs)
    dtype = student_logprobs.dtype
    log_q = student_logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    per_sequence = torch.zeros(mask.shape, dtype=dtype, device=log_q.device)
    per_sequence[mask] = reward.to(dtype)
    advantage = future_returns(per_sequence, mask, gamma=gamma, length_norm=length_norm,
                               include_current=current_reward)[mask]
    if whiten_advantages:
        advantage = whiten(advantage)
    ratio = (log_q - old_logprobs.to(dtype)).exp() * weight.to(dtype)
    pg = torch.maximum(-advantage * ratio, -advantage * ratio.clamp(1 - clip, 1 + clip))
    reg = rkl(student_logprobs, teacher_logprobs.detach()) if single_step else torch.zeros_like(pg)
    return {"pg": pg, "reg": reg, "advantage": advantage.detach(), "ratio": ratio.detach()}


class MixedPolicy(PolicyWrapper):
    """p̃ = α·p + (1 − α)·q as a model ``decode_batch`` can sample from: each model keeps its own KV cache.

    Its "logits" are the mixture's log-probabilities, so sampling at temperature 1 draws from p̃. It wraps
    the trained student itself, not a copy.
    """

    def __init__(self, student, teacher, teacher_mix: float, vocab_size: int):
        super().__init__(student)
        self.teacher = teacher
        self.teacher_mix, self.vocab_size = teacher_mix, vocab_size
        # transformers 5 renamed `past_key_values` to `cache` (decode_batch accepts both; so do we).
        self._cache_names = [cache_name(model) for model in (student, teacher)]

    def forward(self, input_ids, attention_mask, position_ids, use_cache=True, past_key_values=None):
        student_cache, teacher_cache = past_key_values if past_key_values is not None else (None, None)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": True}
        student_out = self.student(**inputs, **{self._cache_names[0]: student_cache})
        teacher_out = self.teacher(**inputs, **{self._cache_names[1]: teacher_cache})
        log_q = F.log_softmax(student_out.logits[:, -1:, : self.vocab_size].float(), dim=-1)
        log_p = F.log_softmax(teacher_out.logits[:, -1:, : self.vocab_size].float(), dim=-1)
        mixed = torch.logaddexp(log_p + math.log(self.teacher_mix), log_q + math.log1p(-self.teacher_mix))
        return SimpleNamespace(logits=mixed, past_key_values=(output_cache(student_out), output_cache(teacher_out)))


def sampled_logprobs(model, batch: dict[str, Tensor], vocab_size: int) -> Tensor:
    """(N,) log-probabilities ``model`` gives the batch's target tokens, row-major over the target mask."""
    mask = target_mask(batch["labels"])
    hidden = decoder_outputs(model, batch["input_ids"], batch["attention_mask"]).last_hidden_state[:, :-1][mask]
    logprobs = F.log_softmax(upcast(project(model, hidden)[:, :vocab_size]), dim=-1)
    return logprobs.gather(-1, batch["labels"][:, 1:][mask][:, None]).squeeze(-1)


class MiniLLM(OnPolicyMethod):
    """Collects rollouts of the teacher-mixed policy, then trains ``ppo_epochs`` steps on them with its own loss."""

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        mix = config.teacher_mix
        self.policy = MixedPolicy(self.student, self.teacher, mix, self.vocab_size) if mix > 0 else self.student
        self.loss = self._loss
        self.rollouts: list[dict] = []  # the current collection: token lists plus per-target floats
        self.epochs_done = 0  # PPO epochs trained on it so far
        self._pending: deque[list[dict]] = deque()  # this step's micro-batches of rollouts, in loss order

    def prepare_step(self, step, batches):
        if any(not prompt_ids(example) for batch in batches for example in batch):
            raise KdlmError(
                "method.name=minillm samples answers to prompts, but data.train has plain-text records (no prompt); "
                "train MiniLLM on chat or prompt/response records"
            )
        sizes = [len(batch) for batch in batches]
        if not self.rollouts or self.epochs_done >= self.config.ppo_epochs or len(self.rollouts) != sum(sizes):
            self.rollouts = [rollout for batch in batches for rollout in self.collect(batch)]
            self.epochs_done = 0
        order = list(range(len(self.rollouts)))
        self.rng.shuffle(order)  # LMOps's rollout loader reshuffles every PPO epoch
        self._pending.clear()
        for size in sizes:
            self._pending.append([self.rollouts[i] for i in order[:size]])
            order = order[size:]
        self.epochs_done += 1
        return [[{"input_ids": r["input_ids"], "labels": r["labels"]} for r in chunk] for chunk in self._pending]

    def collect(self, examples: list[dict]) -> list[dict]:
        """Rollouts for the examples' prompts: samples of the policy with their old log-probs, rewards and weights."""
        sampled = self.sample(self.policy, examples)
        device = next(self.student.parameters()).device
        batch = {k: v.to(device) for k, v in collate(sampled, self.tokenizer.pad_token_id).items()}
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_enabled(self.bf16, device)):
                log_q = sampled_logprobs(self.student, batch, self.vocab_size).float()
                log_p = sampled_logprobs(self.teacher, batch, self.vocab_size).float()
        finally:
            self.student.train(was_training)
        config = self.config
        fixed = {"old_logprobs": log_q, **rollout_rewards(log_q, log_p, teacher_mix=config.teacher_mix,
                                                          reward_scaling=config.reward_scaling,
                                                          reward_clip=config.reward_clip)}
        counts = target_mask(batch["labels"]).sum(-1).tolist()
        rollouts, start = [], 0
        for example, count in zip(sampled, counts, strict=True):
            rollout = {"input_ids": list(example["input_ids"]), "labels": list(example["labels"])}
            rollout.update({key: values[start : start + count].tolist() for key, values in fixed.items()})
            rollouts.append(rollout)
            start += count
        return rollouts

    def _loss(self, objective, batch: dict[str, Tensor], teacher_target):
        """The micro-batch's ``LossTerms``: pg + reg (+ pt_weight · pt) per target token; no kd, ce or hint term."""
        rollouts = self._pending.popleft()
        student = objective.student
        mask = target_mask(batch["labels"])
        tokens = batch["labels"][:, 1:][mask]
        hidden = decoder_outputs(student, batch["input_ids"], batch["attention_mask"]).last_hidden_state[:, :-1][mask]
        student_logprobs = F.log_softmax(upcast(project(student, hidden)[:, : self.vocab_size]), dim=-1)
        with torch.no_grad():
            teacher_logits = teacher_target.transform(teacher_target.hidden.float() @ teacher_target.weight.float().T)
            teacher_logprobs = F.log_softmax(teacher_logits[:, : self.vocab_size], dim=-1)
        fixed = {key: torch.tensor([v for r in rollouts for v in r[key]], device=tokens.device)
                 for key in ("old_logprobs", "reward", "weight", "raw_reward")}
        if fixed["reward"].numel() != tokens.numel():
            raise KdlmError("internal: MiniLLM's rollouts do not match the micro-batch the loop collated")
        config = self.config
        terms = minillm_token_losses(
            student_logprobs, teacher_logprobs, tokens, mask, old_logprobs=fixed["old_logprobs"], reward=fixed["reward"],
            weight=fixed["weight"], gamma=config.gamma, length_norm=config.length_norm, current_reward=config.current_reward,
            clip=config.clip, single_step=config.single_step, whiten_advantages=config.whiten,
        )
        pg, reg = terms["pg"].sum(), terms["reg"].sum()
        count = tokens.numel()
        total = pg + reg
        named = {"pg": pg.item(), "reg": reg.item()}
        weights = {"pg": 1.0, "reg": 1.0}
        pretraining = self.pretraining_term(objective, tokens.device, len(rollouts))
        if pretraining is not None:  # a corpus mean, weighted by this micro-batch's tokens like the loop's sums
            total = total + config.pt_weight * pretraining[0] * count
            named["pt"], weights["pt"] = pretraining[0].item() * count, config.pt_weight
        named["reward"] = fixed["raw_reward"].sum().item()  # logged, not a loss term
        return LossTerms(total, None, None, None, torch.tensor(count, device=tokens.device), named, weights)

    def after_step(self, step):
        record = {**self.counters(), "ppo_epoch": self.epochs_done}
        if self.corpus is None:
            record["pt"] = math.nan
        return record

    def state_dict(self):
        return {**super().state_dict(), "rollouts": self.rollouts, "epochs_done": self.epochs_done}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.rollouts = list(state["rollouts"])
        self.epochs_done = int(state["epochs_done"])
