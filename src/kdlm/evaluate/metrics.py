"""Evaluation basics: fidelity to the teacher, perplexity, size and speed.

Fidelity is measured on held-out teacher answers that no student trained on: per target token,
KL(teacher || student) in nats and whether the student's most likely token is the teacher's (top-1
agreement). Both run at temperature 1 in fp32.
"""

from __future__ import annotations

import math
import threading
import time

import psutil
import torch
from torch import Tensor

from kdlm.data.tokenize import collate
from kdlm.losses import kd_loss_sums
from kdlm.models.forward import project, target_hidden_states


def _batches(examples: list[dict], batch_size: int, pad_token_id: int):
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_token_id)


@torch.no_grad()
def target_logits(model, examples: list[dict], *, batch_size: int, pad_token_id: int, vocab_size: int) -> list[Tensor]:
    """fp32 logits at the target positions of each batch, [(N_b, vocab_size)], on the CPU."""
    model.eval()
    out = []
    for batch in _batches(examples, batch_size, pad_token_id):
        batch = {key: value.to(model.device) for key, value in batch.items()}
        hidden, _ = target_hidden_states(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        out.append(project(model, hidden).float()[:, :vocab_size].cpu())  # compared on the CPU with CPU labels
    return out


@torch.no_grad()
def fidelity(
    student,
    examples: list[dict],
    teacher_logits: list[Tensor],
    *,
    batch_size: int,
    pad_token_id: int,
    vocab_size: int,
) -> dict[str, float]:
    """KL(teacher || student), top-1 agreement and the student's perplexity on held-out answers.

    Args:
        teacher_logits: from `target_logits(teacher, examples, ...)` with the same batch size.
    """
    kl_sum = ce_sum = agree = count = 0.0
    student_logits = target_logits(student, examples, batch_size=batch_size, pad_token_id=pad_token_id, vocab_size=vocab_size)
    for batch, s_logits, t_logits in zip(_batches(examples, batch_size, pad_token_id), student_logits, teacher_logits, strict=True):
        labels = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
        kl, ce, num = kd_loss_sums(s_logits, t_logits, labels, divergence="fkl")
        kl_sum += kl.item()
        ce_sum += ce.item()
        agree += (s_logits.argmax(-1) == t_logits.argmax(-1)).sum().item()
        count += num
    return {
        "kl_to_teacher": kl_sum / count,
        "top1_agreement": agree / count,
        "answer_perplexity": math.exp(ce_sum / count),
        "eval_tokens": int(count),
    }


@torch.no_grad()
def text_perplexity(model, tokenizer, text: str, *, max_tokens: int = 4096, window: int = 512) -> float:
    """Perplexity on plain text, in non-overlapping windows of `window` tokens."""
    model.eval()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window]], device=model.device)
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        nll += loss.item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


class PeakRSS:
    """Samples this process's resident memory in a thread; `peak - start` is the growth during the block."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.process = psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        return False


@torch.no_grad()
def speed(model, tokenizer, prompts: list[str], *, batch_size: int = 8, new_tokens: int = 32, seq_len: int = 256) -> dict:
    """Forward tokens/s (batch x seq_len), greedy generation tokens/s, and memory in MB.

    Memory = weights + the largest growth of resident memory during the forward pass.
    """
    model.eval()
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    ids = torch.randint(0, min(tokenizer.vocab_size, model.config.vocab_size), (batch_size, seq_len),
                        generator=torch.Generator().manual_seed(0), device="cpu").to(model.device)
    model(input_ids=ids[:, :16])  # warm-up
    with PeakRSS() as memory:
        started = time.perf_counter()
        model(input_ids=ids)
        forward_seconds = time.perf_counter() - started
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts[:batch_size]]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    tokenizer.padding_side = padding_side
    started = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    generate_seconds = time.perf_counter() - started
    return {
        "forward_tokens_per_s": batch_size * seq_len / forward_seconds,
        "generate_tokens_per_s": len(texts) * new_tokens / generate_seconds,
        "peak_memory_mb": (weights + memory.peak - memory.start) / 2**20,
    }
