"""Check a GGUF file against the HF model it came from: load it back with transformers (which dequantises
GGUF) and compare the tokenizers' ids and the logits on a few probe prompts."""

from __future__ import annotations

from pathlib import Path

import torch

PROBES = [
    "What is the capital of France?",
    "Write a short poem about the sea and the sky.",
    "Two plus two is 4, and 12 times 12 is 144.",
    "Explain in one sentence why plants need light.",
]

# The bounds an export must meet on the probes: the KL divergence of its next-token distributions from the
# HF model's (nats per position), and the mean absolute logit difference relative to the HF logits' standard
# deviation. Top-1 agreement is printed but not a bound: a pruned, not yet distilled student has many
# near-ties, where a rounding flips the arg-max while the distributions stay close (q8_0 of the quickstart's
# 15-layer pruned student: top-1 0.85, relative difference 0.068). Measured values in docs/export.md.
# A wrong layout (unpermuted q/k rows, swapped tensors) gives near-random logits and fails both bounds.
TOLERANCES: dict[str, dict[str, float]] = {
    "f16": {"kl": 1e-3, "relative_mean_abs": 0.01},
    "q8_0": {"kl": 0.05, "relative_mean_abs": 0.12},
    "q4_0": {"kl": 1.0, "relative_mean_abs": 1.5},
}


def probe_texts(tokenizer) -> list[str]:
    """The probes as the model sees them in use: inside its chat template when it has one."""
    if not tokenizer.chat_template:
        return list(PROBES)
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            + "Sure." for text in PROBES]


@torch.no_grad()
def compare(hf_model, hf_tokenizer, gguf_model, gguf_tokenizer) -> dict:
    """Tokenizer agreement and logit differences of two models over the probe texts.

    Returns: tokens_equal (every probe tokenised to the same ids), max_abs and mean_abs (logit
    differences over all positions and the vocabulary), relative_mean_abs (mean_abs over the HF
    logits' standard deviation), kl (KL(HF || GGUF) of the next-token distributions, nats per position),
    top1 (fraction of positions with the same arg-max), positions.
    """
    tokens_equal, max_abs, abs_sum, scale_sum, kl_sum, same, positions, values = True, 0.0, 0.0, 0.0, 0.0, 0, 0, 0
    for text in probe_texts(hf_tokenizer):
        ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens_equal &= gguf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        input_ids = torch.tensor([ids])
        reference = hf_model(input_ids=input_ids).logits[0].double()
        exported = gguf_model(input_ids=input_ids).logits[0].double()
        difference = (reference - exported).abs()
        max_abs = max(max_abs, difference.max().item())
        abs_sum += difference.sum().item()
        scale_sum += reference.std(dim=-1).sum().item() * reference.shape[-1]
        kl_sum += torch.nn.functional.kl_div(exported.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                             reduction="sum").item()  # KL(HF || GGUF), summed over positions
        same += (reference.argmax(-1) == exported.argmax(-1)).sum().item()
        positions += len(ids)
        values += difference.numel()
    mean_abs = abs_sum / values
    return {"tokens_equal": tokens_equal, "max_abs": max_abs, "mean_abs": mean_abs,
            "relative_mean_abs": abs_sum / scale_sum, "kl": kl_sum / positions, "top1": same / positions, "positions": positions}


def check_gguf(hf_model, hf_tokenizer, path: Path) -> dict:
    """Load `path` with transformers and compare it with the HF model (see `compare`)."""
    from kdlm.models.loading import load_model

    gguf_model, gguf_tokenizer = load_model(str(path))
    return compare(hf_model, hf_tokenizer, gguf_model, gguf_tokenizer)


def failures(result: dict, quant: str) -> list[str]:
    """What in `result` is outside the quantisation's tolerance (empty: the export passed)."""
    limits = TOLERANCES[quant]
    problems = []
    if not result["tokens_equal"]:
        problems.append("the GGUF tokenizer gives other token ids than the HF one on the probes")
    if result["kl"] > limits["kl"]:
        problems.append(f"KL {result['kl']:.4f} nats/token > {limits['kl']}")
    if result["relative_mean_abs"] > limits["relative_mean_abs"]:
        problems.append(f"relative mean logit difference {result['relative_mean_abs']:.4f} > {limits['relative_mean_abs']}")
    return problems
