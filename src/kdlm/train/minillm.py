"""MiniLLM (arXiv 2306.08543): sequence-level reverse KL(q‖p) minimised by policy gradient on student samples.

Per sampled response y (shared/METHODS.md §3.5), with q the student and p the teacher:

- reward r_t = log p(y_t | y_<t) − log q(y_t | y_<t) (detached): the sequence-level reverse KL is −E[Σ r_t];
- single-step decomposition: the immediate term is the exact token-level KL(q(·|y_<t) ‖ p(·|y_<t)), so
  the policy gradient only carries the future return R_{t+1} = Σ_{t'>t} γ^{t'−t−1} r_{t'};
- length normalisation: a return is divided by the sum of its discount weights (its number of terms
  when γ = 1), otherwise reverse KL favours short answers;
- teacher-mixed sampling: responses are drawn from p̃ = α·p + (1 − α)·q, and each token's gradient carries
  the importance weight w_t = q(y_t)/p̃(y_t);
- PPO clipping: ratio_t = exp(log q_θ − log q_old)·w_t, loss_t = max(−A_t·ratio_t, −A_t·clip(ratio_t, 1 ± ε)).
  Sampling and training share one step here (one inner epoch), so q_old is q_θ detached: the ratio's
  value is w_t and the clip zeroes the gradient of tokens whose weight is out of range in the direction
  that the advantage pushes.

The weighted ratio and the unweighted single-step term follow github microsoft/LMOps: minillm/minillm/losses.py
(``_pg_loss``, ``_reg_loss``); the code here is ours. An optional LM term adds cross-entropy on the
dataset's own batch (MiniLLM's L_PT uses a separate pre-training corpus).
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlm.data.tokenize import collate
from kdlm.errors import KdlmError
from kdlm.losses.divergences import rkl, upcast
from kdlm.train.forward import decoder_outputs, project, target_mask
from kdlm.train.onpolicy import OnPolicyMethod, prompt_ids


def future_returns(rewards: Tensor, mask: Tensor, *, gamma: float, length_norm: bool, include_current: bool = False) -> Tensor:
    """Discounted returns of each position's future rewards, optionally length-normalised.

    R_t = Σ_{t'>t, mask} γ^{k(t')} r_{t'}, where k counts the masked positions between t and t' (so with a
    contiguous response k = t' − t − 1); with ``include_current`` the sum starts at t' = t (k = t' − t).
    With ``length_norm`` R_t is divided by Σ γ^k over the same terms; a position with no terms gets 0.

    Args:
        rewards: (B, L) per-token rewards.
        mask: (B, L) bool, True at response tokens.
        gamma: discount in [0, 1].
        length_norm: divide by the discounted number of terms.
        include_current: include the position's own reward (no single-step decomposition).

    Returns:
        (B, L) returns, 0 outside the mask.
    """
    rewards = rewards.double() if rewards.dtype == torch.float64 else rewards.float()
    mask = mask.bool()
    returns = torch.zeros_like(rewards)
    total = torch.zeros_like(rewards[:, 0])
    weight = torch.zeros_like(total)
    for t in reversed(range(rewards.shape[1])):
        here = mask[:, t]
        if include_current:
            total = torch.where(here, rewards[:, t] + gamma * total, total)
            weight = torch.where(here, 1 + gamma * weight, weight)
        value = total / weight.clamp(min=1e-12) if length_norm else total
        returns[:, t] = torch.where(here & (weight > 0), value, torch.zeros_like(value))
        if not include_current:
            total = torch.where(here, rewards[:, t] + gamma * total, total)
            weight = torch.where(here, 1 + gamma * weight, weight)
    return returns


def minillm_token_losses(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    tokens: Tensor,
    mask: Tensor,
    *,
    teacher_mix: float = 0.2,
    gamma: float = 1.0,
    length_norm: bool = True,
    clip: float = 0.2,
    single_step: bool = True,
    whiten: bool = False,
) -> dict[str, Tensor]:
    """Per-token MiniLLM terms for sampled responses.

    Args:
        student_logprobs: (N, V) log q at the N response positions (differentiable), row-major over ``mask``.
        teacher_logprobs: (N, V) log p at the same positions.
        tokens: (N,) the sampled tokens.
        mask: (B, L) bool with N True entries: where the rows sit in their sequences (for the returns).
        teacher_mix: α of the sampling mixture α·p + (1 − α)·q (0: plain student samples, w = 1).
        gamma, length_norm: see ``future_returns``.
        clip: PPO clip range ε of the importance ratio.
        single_step: the immediate term is the exact token-level RKL; else the return includes r_t.
        whiten: standardise the advantages over the N tokens.

    Returns:
        dict of (N,) tensors: ``pg`` (policy-gradient loss, differentiable), ``reg`` (token-level RKL,
        differentiable; zeros without ``single_step``), and the detached ``reward``, ``advantage``, ``weight``.
    """
    student_logprobs, teacher_logprobs = upcast(student_logprobs), upcast(teacher_logprobs)
    log_q = student_logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    log_q_old = log_q.detach()
    log_p = teacher_logprobs.gather(-1, tokens[:, None]).squeeze(-1).detach()
    reward = log_p - log_q_old
    per_sequence = torch.zeros(mask.shape, dtype=reward.dtype, device=reward.device)
    per_sequence[mask] = reward
    advantage = future_returns(per_sequence, mask, gamma=gamma, length_norm=length_norm, include_current=not single_step)[mask]
    if whiten and advantage.numel() > 1:
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
    if teacher_mix > 0:
        log_mix = torch.logaddexp(log_p + math.log(teacher_mix), log_q_old + math.log1p(-teacher_mix))
        weight = (log_q_old - log_mix).exp()
    else:
        weight = torch.ones_like(log_q_old)
    ratio = (log_q - log_q_old).exp() * weight
    pg = torch.maximum(-advantage * ratio, -advantage * ratio.clamp(1 - clip, 1 + clip))
    reg = rkl(student_logprobs, teacher_logprobs.detach()) if single_step else torch.zeros_like(pg)
    return {"pg": pg, "reg": reg, "reward": reward, "advantage": advantage, "weight": weight}


def _cache_name(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class MixedPolicy:
    """p̃ = α·p + (1 − α)·q as a model ``decode_batch`` can sample from: each model keeps its own KV cache.

    Its "logits" are the mixture's log-probabilities, so sampling at temperature 1 draws from p̃. It wraps
    the trained student itself, not a copy.
    """

    def __init__(self, student, teacher, teacher_mix: float, vocab_size: int):
        self.student, self.teacher = student, teacher
        self.teacher_mix, self.vocab_size = teacher_mix, vocab_size
        # transformers 5 renamed `past_key_values` to `cache` (decode_batch accepts both; so do we).
        self._cache_names = [_cache_name(model) for model in (student, teacher)]

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

    def forward(self, input_ids, attention_mask, position_ids, use_cache=True, past_key_values=None):
        student_cache, teacher_cache = past_key_values if past_key_values is not None else (None, None)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": True}
        student_out = self.student(**inputs, **{self._cache_names[0]: student_cache})
        teacher_out = self.teacher(**inputs, **{self._cache_names[1]: teacher_cache})
        log_q = F.log_softmax(student_out.logits[:, -1:, : self.vocab_size].float(), dim=-1)
        log_p = F.log_softmax(teacher_out.logits[:, -1:, : self.vocab_size].float(), dim=-1)
        mixed = torch.logaddexp(log_p + math.log(self.teacher_mix), log_q + math.log1p(-self.teacher_mix))
        return SimpleNamespace(logits=mixed, past_key_values=(_output_cache(student_out), _output_cache(teacher_out)))

    __call__ = forward


class MiniLLM(OnPolicyMethod):
    """Every micro-batch's responses are sampled from the teacher-mixed policy; the loss is ``minillm_token_losses``."""

    def __init__(self, config, *, vocab_size: int, **kwargs):
        super().__init__(config, **kwargs)
        self.vocab_size = vocab_size
        mix = config.teacher_mix
        self.policy = MixedPolicy(self.student, self.teacher, mix, vocab_size) if mix > 0 else self.student
        self.loss = self._loss
        self._lm_batches: deque[list[dict]] = deque()
        self._sums = torch.zeros(4)  # pg, reg, reward, tokens

    def prepare_step(self, step, batches):
        if any(not prompt_ids(example) for batch in batches for example in batch):
            raise KdlmError(
                "method.name=minillm samples answers to prompts, but data.train has plain-text records (no prompt); "
                "train MiniLLM on chat or prompt/response records"
            )
        if self.config.lm_weight > 0:
            self._lm_batches = deque(batches)
        return [self.sample(self.policy, batch) for batch in batches]

    def _loss(self, objective, batch: dict[str, Tensor], teacher_target):
        """(objective sum, RKL sum, sample NLL sum, 0, tokens) for one micro-batch of samples."""
        student = objective.student
        mask = target_mask(batch["labels"])
        tokens = batch["labels"][:, 1:][mask]
        hidden = decoder_outputs(student, batch["input_ids"], batch["attention_mask"]).last_hidden_state[:, :-1][mask]
        student_logprobs = F.log_softmax(upcast(project(student, hidden)[:, : self.vocab_size]), dim=-1)
        with torch.no_grad():
            teacher_logits = teacher_target.transform(teacher_target.hidden.float() @ teacher_target.weight.float().T)
            teacher_logprobs = F.log_softmax(teacher_logits[:, : self.vocab_size], dim=-1)
        config = self.config
        terms = minillm_token_losses(
            student_logprobs, teacher_logprobs, tokens, mask, teacher_mix=config.teacher_mix, gamma=config.gamma,
            length_norm=config.length_norm, clip=config.clip, single_step=config.single_step, whiten=config.whiten,
        )
        pg, reg = terms["pg"].sum(), terms["reg"].sum()
        count = tokens.numel()
        total = pg + reg
        if config.lm_weight > 0 and self._lm_batches:
            lm = collate(self._lm_batches.popleft(), self.tokenizer.pad_token_id)
            lm = {k: v.to(hidden.device) for k, v in lm.items()}
            lm_mask = target_mask(lm["labels"])
            lm_hidden = decoder_outputs(student, lm["input_ids"], lm["attention_mask"]).last_hidden_state[:, :-1][lm_mask]
            lm_ce, _, _, lm_count = objective._logit_loss(lm_hidden, lm["labels"][:, 1:][lm_mask], None, 0.0)
            total = total + config.lm_weight * lm_ce * (count / max(int(lm_count), 1))  # a mean CE per sample token
        nll = -student_logprobs.detach().gather(-1, tokens[:, None]).sum()
        self._sums += torch.stack([pg.detach().cpu(), reg.detach().cpu(), terms["reward"].sum().cpu(),
                                   torch.tensor(float(count))]).float()
        return total, reg.detach(), nll, nll.new_zeros(()), torch.tensor(count, device=tokens.device)

    def after_step(self, step):
        pg, reg, reward, count = self._sums.tolist()
        self._sums.zero_()
        count = max(count, 1)
        return {**self.counters(), "pg": pg / count, "reg": reg / count, "reward": reward / count}
