"""Students at half the bundled teacher's parameters, before any training: depth only, width only, both.

Calibration (layer influence and width importance): the first 32 windows of 128 tokens of WikiText-2
validation; held-out: the next 24 windows of 256 tokens (never seen by the pruning). Per model: parameters,
perplexity on the held-out text, KL(teacher || student) per token and top-1 agreement with the teacher.

    python benchmarks/width_pruning.py --out runs/bench-width
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdlm.models import (
    Widths,
    block_influence,
    build_pruned_student,
    build_width_pruned_student,
    describe_model,
    load_model,
    select_layers,
    target_parameter_count,
)
from kdlm.models.width import prune_width, width_importance, widths_for_target

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"


def windows(tokenizer, count: int, length: int, skip: int) -> torch.Tensor:
    ids = tokenizer(WIKITEXT.read_text(), add_special_tokens=False)["input_ids"][skip : skip + count * length]
    return torch.tensor(ids).view(count, length)


def students(teacher, calibration: torch.Tensor, fraction: float) -> dict:
    mask = torch.ones_like(calibration)
    influence = block_influence(teacher, calibration, mask)
    target = target_parameter_count(fraction, describe_model(teacher)["parameters"])
    built = {}
    # Depth only: the most layers whose student still fits the budget.
    for num_layers in range(teacher.config.num_hidden_layers, 0, -1):
        depth = build_pruned_student(teacher, select_layers(teacher.config.num_hidden_layers, num_layers, "influence", influence=influence))
        if describe_model(depth)["parameters"] <= target:
            built[f"depth only ({num_layers} layers)"] = depth
            break
    for num_layers in (30, 20):
        kept = select_layers(teacher.config.num_hidden_layers, num_layers, "influence", influence=influence)
        shallower = build_pruned_student(teacher, kept)
        widths = widths_for_target(shallower, target, Widths())
        importance = width_importance(shallower, calibration, mask)
        for rescale in ("calibrated", "none"):
            name = f"{'width' if num_layers == 30 else 'width+depth'} ({num_layers} layers, hidden {widths.hidden_size}, MLP {widths.intermediate_size}; norms {rescale})"
            built[name] = prune_width(shallower, importance, widths, rescale_norms=rescale)
    kept = select_layers(teacher.config.num_hidden_layers, 20, "influence", influence=influence)
    heads = build_width_pruned_student(build_pruned_student(teacher, kept), calibration, mask, Widths(num_attention_heads=6), target)
    built[f"width+depth, heads 9->6 (20 layers, hidden {heads.config.hidden_size}, MLP {heads.config.intermediate_size})"] = heads
    return built


@torch.no_grad()
def score(models: dict, heldout: torch.Tensor, batch_size: int = 4) -> dict:
    totals = {name: {"nll": 0.0, "kl": 0.0, "agree": 0.0} for name in models}
    tokens = 0
    for start in range(0, len(heldout), batch_size):
        ids = heldout[start : start + batch_size]
        reference = F.log_softmax(models["teacher"](input_ids=ids).logits[:, :-1].float(), -1)
        tokens += reference.shape[0] * reference.shape[1]
        for name, model in models.items():
            logprobs = reference if name == "teacher" else F.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
            totals[name]["nll"] += -logprobs.gather(-1, ids[:, 1:, None]).sum().item()
            totals[name]["kl"] += (reference.exp() * (reference - logprobs)).sum().item()
            totals[name]["agree"] += (logprobs.argmax(-1) == reference.argmax(-1)).sum().item()
    return {
        name: {"parameters": describe_model(models[name])["parameters"], "perplexity": math.exp(t["nll"] / tokens),
               "kl_to_teacher": t["kl"] / tokens, "top1_agreement": t["agree"] / tokens}
        for name, t in totals.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-width"))
    parser.add_argument("--fraction", type=float, default=0.5)
    args = parser.parse_args()
    started = time.perf_counter()
    teacher, tokenizer = load_model("bundled:smollm2-135m-instruct")
    calibration = windows(tokenizer, 32, 128, skip=0)
    heldout = windows(tokenizer, 24, 256, skip=32 * 128)
    models = {"teacher": teacher, **students(teacher, calibration, args.fraction)}
    rows = score(models, heldout)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "width_pruning.json").write_text(json.dumps(rows, indent=1))
    print("| student | parameters | held-out perplexity | KL(teacher||student) | top-1 agreement |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['parameters'] / 1e6:.1f}M ({row['parameters'] / rows['teacher']['parameters']:.0%}) | "
              f"{row['perplexity']:.1f} | {row['kl_to_teacher']:.2f} | {row['top1_agreement']:.1%} |")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
