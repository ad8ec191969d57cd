"""Per-task normalised objective: Distilling Step-by-Step's loss for records that name their task.

Distilling Step-by-Step (Hsieh et al. 2023) trains one model on two tasks, the label and the rationale,
and its code (google-research/distilling-step-by-step, ``TaskPrefixTrainer.compute_loss``) takes each
task's own mean cross-entropy and mixes them: ``a * mean CE(label) + (1 - a) * mean CE(rationale)``,
``a = 0.5``. Pooling the weighted CE over all target tokens instead hands the short label task a share of
the loss proportional to its share of tokens (a few per cent against long rationales).

When examples carry a ``task``, the objective of an optimizer step is

    L = sum over tasks t of (1 / n_t) * sum over target tokens i of task t of w_i * loss_i

where ``n_t`` is the number of task-t target tokens in the whole step (every micro-batch, every process)
and ``w_i`` the weight of token i's record (default 1); with one weight per task, ``w_t`` times task t's
mean loss. ``loss_i`` is whatever the step trains with: cross-entropy, or ``(1 - kd_weight) CE +
kd_weight D`` with a white-box teacher. Examples without a task form one task together.

The counts come from the step's schedule, not from each micro-batch: gradient accumulation, data
parallelism and the order of examples inside a step leave every task's mean, and the gradient, unchanged.
(The reference takes the means per micro-batch, and Hugging Face's accumulation averages those.) A task
with no token in a step contributes nothing to that step.

It is carried out by scaling each example's weight by ``step_tokens / n_t``: the loop divides every
step's summed loss by ``step_tokens``, which then leaves ``w_i / n_t`` per token.
"""

from __future__ import annotations

from collections import Counter


def has_tasks(examples: list[dict]) -> bool:
    return any("task" in example for example in examples)


def num_targets(example: dict) -> int:
    """Target tokens of a tokenised example (its labels shifted by one, as the loss sees them)."""
    return sum(1 for label in example["labels"][1:] if label != -100)


def task_token_counts(examples: list[dict]) -> Counter:
    """{task (None for examples without one): target tokens of that task among `examples`}."""
    counts: Counter = Counter()
    for example in examples:
        counts[example.get("task")] += num_targets(example)
    return counts


def task_scaled(step_examples: list[dict], batches: list[list[dict]], step_tokens: int) -> list[list[dict]]:
    """Copies of the examples of `batches` whose weight is `weight * step_tokens / n_task`.

    Args:
        step_examples: every example of the optimizer step, on every process (the counts come from them).
        batches: this process's micro-batches of the step.
        step_tokens: the target tokens of the whole step, by which the loop divides the summed loss.
    """
    counts = task_token_counts(step_examples)
    return [[dict(example, weight=example.get("weight", 1.0) * step_tokens / max(counts[example.get("task")], 1))
             for example in batch] for batch in batches]
