"""Forward + backward time of the cross-tokenizer losses against forward KL on one shared vocabulary.

Run: OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/xtok_loss_speed.py
512 aligned groups, a 16,384-entry student and a 49,152-entry teacher (the bundled teacher's vocabulary);
12,000 ids paired for the hybrid. Best of 3. docs/cross-tokenizer.md quotes its output.
"""

from __future__ import annotations

import time

import torch

from kdlm.losses import kd_loss_sums
from kdlm.losses.cross_tokenizer import hybrid, uld


def best_time(step, repeats: int = 3) -> float:
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    groups, student_vocab, teacher_vocab = 512, 16384, 49152
    student = torch.randn(groups, student_vocab, requires_grad=True)
    same_vocab = torch.randn(groups, teacher_vocab, requires_grad=True)
    teacher = torch.log_softmax(3 * torch.randn(groups, teacher_vocab), -1)
    labels = torch.randint(0, teacher_vocab, (groups,))
    student_ids, teacher_ids = torch.randperm(student_vocab)[:12000], torch.randperm(teacher_vocab)[:12000]
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


if __name__ == "__main__":
    main()
