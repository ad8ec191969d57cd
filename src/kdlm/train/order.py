"""The order in which training examples are visited: fixed by the seed, independent of resumes.

The whole run's schedule is a pure function of (dataset lengths, seed, global batch size), so a run
resumed at step s visits exactly the batches an uninterrupted run visits from step s, and every
process of a distributed run can slice its share of a global batch without talking to the others.
"""

from __future__ import annotations

import torch

from kdlm.errors import KdlmError


def epoch_batches(lengths: list[int], global_batch: int, seed: int, epoch: int, length_grouped: bool) -> list[list[int]]:
    """The global batches of one epoch, as lists of example indices (a remainder is dropped).

    With `length_grouped`, examples are sorted by length inside windows of 16 batches, so a batch
    holds sequences of similar length (less padding), and the batches are then shuffled.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if length_grouped:
        window = global_batch * 16
        order = [
            index
            for start in range(0, len(order), window)
            for index in sorted(order[start : start + window], key=lambda i: -lengths[i])
        ]
    batches = [order[i : i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)]
    if length_grouped:
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in shuffle]
    return batches


def run_schedule(
    lengths: list[int], *, global_batch: int, num_batches: int, seed: int, length_grouped: bool
) -> list[list[int]]:
    """The first `num_batches` global batches of the run, over as many epochs as needed."""
    if len(lengths) < global_batch:
        raise KdlmError(
            f"the training set has {len(lengths)} examples, fewer than one global batch ({global_batch}); "
            "lower train.batch_size or add data"
        )
    schedule: list[list[int]] = []
    epoch = 0
    while len(schedule) < num_batches:
        schedule.extend(epoch_batches(lengths, global_batch, seed, epoch, length_grouped))
        epoch += 1
    return schedule[:num_batches]
