"""Quality metrics on generated text and on next-token distributions.

- ROUGE-L F-measure (the `rouge-score` package, `rougeL`, Porter stemming, as in the
  Super-NaturalInstructions metric that MiniLLM reuses), reported x100.
- Expected calibration error of next-token predictions: confidence = the largest probability,
  correct = the most likely token is the reference token; equal-width confidence bins.
- Batched sampling through the serving decoder (left padding, KV cache, one seed per row, so a
  row's text does not depend on which rows share its batch).
"""

from __future__ import annotations

import math
import statistics

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from kdlm.errors import KdlmError
from kdlm.models.decode import Row, decode_batch

_SCORER = None


def rouge_l(prediction: str, reference: str | list[str]) -> float:
    """ROUGE-L F-measure x100 of `prediction` against one reference or the best of several."""
    global _SCORER
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise KdlmError("ROUGE-L needs the rouge-score package: pip install rouge-score") from None
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    references = [reference] if isinstance(reference, str) else reference
    return 100 * max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def expected_calibration_error(confidence: Tensor, correct: Tensor, num_bins: int = 15) -> float:
    """ECE = sum over bins of (bin size / N) * |accuracy in bin - mean confidence in bin|.

    Args:
        confidence: (N,) probabilities in [0, 1] of the predicted class.
        correct: (N,) booleans, whether the prediction was right.
        num_bins: equal-width bins over [0, 1]; bin b holds confidences in (b/n, (b+1)/n], bin 0 also 0.
    """
    confidence = confidence.double().flatten()
    correct = correct.double().flatten()
    if confidence.numel() == 0:
        return float("nan")
    bins = (confidence * num_bins).ceil().long().clamp(1, num_bins) - 1
    error = 0.0
    for b in range(num_bins):
        in_bin = bins == b
        count = int(in_bin.sum())
        if count:
            error += count / confidence.numel() * abs(float(correct[in_bin].mean() - confidence[in_bin].mean()))
    return error


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt` as a user turn, with the assistant's generation prompt (or plain text)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    *,
    seed: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    max_prompt_tokens: int = 256,
    batch_size: int = 8,
    bf16: bool = False,
    label: str = "generating",
) -> list[str]:
    """Answer each prompt once; prompt i is sampled with seed `seed * 1_000_003 + i`.

    Prompts longer than `max_prompt_tokens` keep their last tokens (the generation prompt stays).
    Batches hold prompts of similar length (sorted), and results come back in input order.
    """
    encoded = [chat_prompt_ids(tokenizer, p)[-max_prompt_tokens:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    texts: list[str] = [""] * len(prompts)
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True) as progress:
        task = progress.add_task(label, total=len(prompts))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            rows = [
                Row(prompt_ids=encoded[i], max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed * 1_000_003 + i)
                for i in chunk
            ]
            for i, result in zip(chunk, decode_batch(model, tokenizer, rows, bf16=bf16), strict=True):
                texts[i] = result.text.strip()
            progress.update(task, advance=len(chunk))
    return texts


@torch.no_grad()
def token_fidelity(student_logits: list[Tensor], teacher_logits: list[Tensor], labels: list[Tensor], num_bins: int = 15) -> dict:
    """KL(teacher || student), top-1 agreement, answer perplexity and ECE, per target token.

    Args:
        student_logits, teacher_logits: per batch, (N_b, V) fp32 logits at the target positions.
        labels: per batch, (N_b,) the reference next tokens (the teacher's answer).
    """
    kl_sum = nll_sum = agree = count = 0.0
    confidences, corrects = [], []
    for s_logits, t_logits, target in zip(student_logits, teacher_logits, labels, strict=True):
        s_logprobs = torch.log_softmax(s_logits.float(), -1)
        t_logprobs = torch.log_softmax(t_logits.float(), -1)
        kl_sum += float((t_logprobs.exp() * (t_logprobs - s_logprobs)).sum())
        nll_sum += float(-s_logprobs.gather(-1, target[:, None]).sum())
        agree += float((s_logits.argmax(-1) == t_logits.argmax(-1)).sum())
        top = s_logprobs.max(-1)
        confidences.append(top.values.exp())
        corrects.append(top.indices == target)
        count += target.numel()
    return {
        "kl_to_teacher": kl_sum / count,
        "top1_agreement": agree / count,
        "answer_perplexity": math.exp(nll_sum / count),
        "ece": expected_calibration_error(torch.cat(confidences), torch.cat(corrects), num_bins),
        "eval_tokens": int(count),
    }
