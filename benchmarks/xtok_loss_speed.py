"""Cost of the cross-tokenizer losses: time against forward KL on one vocabulary, and the fused path's memory.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/xtok_loss_speed.py            # times (the table in the docs)
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/xtok_loss_speed.py --memory   # peak memory, dense vs fused

Times: 512 aligned groups, a 16,384-entry student and a 49,152-entry teacher (the bundled teacher's
vocabulary); 12,000 ids paired for the hybrid. Best of 3. docs/cross-tokenizer.md quotes its output.

Memory (``--memory``): one forward+backward of the whole cross-tokenizer objective (cross-entropy on N student
targets + the loss on G aligned groups, kd_weight 0.5) from hidden states (student and teacher hidden size
576, the bundled teacher's), with a live teacher, dense (``loss.fused=false``: full (N, V_s) student logits,
(G, V_t) teacher log-probs) against fused (``kdlm.losses.fused_cross``, default chunks). Each measurement runs
in a fresh process; peak memory is the growth of the process's peak RSS over the inputs (tracemalloc does not
see torch's CPU allocations); the value column checks that both computed the same loss.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

from kdlm.losses import kd_loss_sums
from kdlm.losses.cross_tokenizer import cross_kd_per_group, hybrid, uld
from kdlm.losses.fused_cross import fused_cross_kd_loss

STUDENT_VOCAB, TEACHER_VOCAB, HIDDEN, PAIRED = 16384, 49152, 576, 12000


def best_time(step, repeats: int = 3) -> float:
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)


def times() -> None:
    torch.manual_seed(0)
    groups = 512
    student = torch.randn(groups, STUDENT_VOCAB, requires_grad=True)
    same_vocab = torch.randn(groups, TEACHER_VOCAB, requires_grad=True)
    teacher = torch.log_softmax(3 * torch.randn(groups, TEACHER_VOCAB), -1)
    labels = torch.randint(0, TEACHER_VOCAB, (groups,))
    student_ids, teacher_ids = torch.randperm(STUDENT_VOCAB)[:PAIRED], torch.randperm(TEACHER_VOCAB)[:PAIRED]
    cases = {
        "forward KL, one shared vocabulary": lambda: kd_loss_sums(same_vocab, teacher, labels, divergence="fkl")[0].backward(),
        "ULD, exact sort": lambda: uld(student, teacher).sum().backward(),
        "ULD, cross_tokenizer_top_k=256": lambda: uld(student, teacher, top_k=256).sum().backward(),
        "hybrid (fkl), exact sort": lambda: sum(x.sum() for x in hybrid(
            student, teacher, student_ids, teacher_ids, divergence="fkl")[:2]).backward(),
        "hybrid (fkl), cross_tokenizer_top_k=256": lambda: sum(x.sum() for x in hybrid(
            student, teacher, student_ids, teacher_ids, divergence="fkl", top_k=256)[:2]).backward(),
    }
    for name, step in cases.items():
        print(f"{name}: {best_time(step):.2f} s")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def measure(mode: str, variant: str, tokens: int, groups: int) -> dict:
    """One forward+backward in this process: peak RSS growth (MB) and the loss value."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, HIDDEN, generator=gen).requires_grad_(True)
    weight = (0.05 * torch.randn(STUDENT_VOCAB, HIDDEN, generator=gen)).requires_grad_(True)
    teacher_hidden = torch.randn(groups, HIDDEN, generator=gen)
    teacher_weight = 0.05 * torch.randn(TEACHER_VOCAB, HIDDEN, generator=gen)
    target_ids = torch.randint(0, STUDENT_VOCAB, (tokens,), generator=gen)
    group_rows = torch.randperm(tokens, generator=gen)[:groups].sort().values
    options = SimpleNamespace(mode=mode, divergence="fkl", temperature=1.0, scale_by_t2=False, top_k=0,
                              student_ids=torch.randperm(STUDENT_VOCAB, generator=gen)[:PAIRED],
                              teacher_ids=torch.randperm(TEACHER_VOCAB, generator=gen)[:PAIRED],
                              divergence_kwargs={}, kd_weight=0.5, ce_weight=0.5)

    def teacher_at(index=None):
        rows = teacher_hidden if index is None else teacher_hidden[index]
        return torch.log_softmax(rows @ teacher_weight.T, dim=-1), None

    baseline = _rss_mb()
    if variant == "fused":
        total = fused_cross_kd_loss(hidden, weight, target_ids, group_rows, teacher_at, options,
                                    teacher_vocab=TEACHER_VOCAB)[0]
    else:  # the dense path of kdlm.xtok.target (loss.fused=false)
        logits = hidden @ weight.T
        ce = torch.nn.functional.cross_entropy(logits, target_ids, reduction="sum")
        teacher, _ = teacher_at()
        kd, _ = cross_kd_per_group(logits[group_rows], teacher, mode=mode, divergence="fkl", temperature=1.0,
                                   scale_by_t2=False, student_ids=options.student_ids, teacher_ids=options.teacher_ids)
        total = 0.5 * ce + 0.5 * kd.sum()
    total.backward()
    return {"peak_mb": _rss_mb() - baseline, "value": total.item()}


def memory(tokens: int, groups: int) -> None:
    print(f"{tokens} student targets, {groups} aligned groups, vocabularies {STUDENT_VOCAB:,} / {TEACHER_VOCAB:,}, "
          f"hidden {HIDDEN}, fp32, live teacher; peak RSS growth over the inputs\n")
    print("| loss | dense MB | fused MB | fused / dense | value rel. diff |")
    print("|---|---|---|---|---|")
    for mode in ("uld", "hybrid"):
        result = {}
        for variant in ("dense", "fused"):
            command = [sys.executable, __file__, "--one", mode, variant, "--tokens", str(tokens), "--groups", str(groups)]
            result[variant] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        dense, fused = result["dense"], result["fused"]
        difference = abs(fused["value"] - dense["value"]) / abs(dense["value"])
        print(f"| {mode} | {dense['peak_mb']:.0f} | {fused['peak_mb']:.0f} | {fused['peak_mb'] / dense['peak_mb']:.2f} "
              f"| {difference:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", action="store_true", help="Peak memory of the dense and the fused path.")
    parser.add_argument("--tokens", type=int, default=1024, help="Student target tokens (--memory).")
    parser.add_argument("--groups", type=int, default=800, help="Aligned groups (--memory).")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.tokens, args.groups)))
    elif args.memory:
        memory(args.tokens, args.groups)
    else:
        times()


if __name__ == "__main__":
    main()
