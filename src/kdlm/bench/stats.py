"""Mean and spread per method, and which differences between methods are within noise.

Two methods are *within noise* of each other when the difference of their means is smaller than
at most twice its standard error estimated from the seed spread, sqrt(s_a^2/n_a + s_b^2/n_b) (about a 95%
interval under a normal approximation). With one seed per method there is no spread to estimate
it from: every difference is then reported as "not tested". A percentile bootstrap over the seeds
gives an interval for each mean as well.
"""

from __future__ import annotations

import math
import random
import statistics


def summarise(values: list[float], *, bootstrap: int = 2000, seed: int = 0) -> dict:
    """Mean, sample std, n, and a 95% bootstrap interval of the mean over `values` (one per seed)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0, "low": float("nan"), "high": float("nan")}
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(bootstrap))
    return {"mean": mean, "std": std, "n": len(values), "low": means[int(0.025 * bootstrap)], "high": means[int(0.975 * bootstrap) - 1]}


def within_noise(a: dict, b: dict, z: float = 2.0) -> bool | None:
    """True if |mean_a - mean_b| <= z * standard error of the difference; None without a spread.

    Equal means with zero spread count as within noise (a tie), different ones as not.
    """
    if a["n"] < 2 or b["n"] < 2:
        return None
    stderr = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return abs(a["mean"] - b["mean"]) <= z * stderr


def noise_groups(summaries: dict[str, dict], higher_is_better: bool = True) -> dict[str, dict]:
    """For each method: its rank, whether it is within noise of the best, and the methods it ties with.

    Returns:
        {method: {"rank", "vs_best": "best" | "within noise" | "below" | "not tested", "ties": [...]}}
    """
    ordered = sorted(summaries, key=lambda m: summaries[m]["mean"], reverse=higher_is_better)
    ordered = [m for m in ordered if not math.isnan(summaries[m]["mean"])] + [m for m in ordered if math.isnan(summaries[m]["mean"])]
    best = ordered[0] if ordered else None
    marks = {}
    for rank, method in enumerate(ordered, 1):
        ties = [other for other in ordered if other != method and within_noise(summaries[method], summaries[other])]
        if method == best:
            vs_best = "best"
        else:
            tie = within_noise(summaries[method], summaries[best])
            vs_best = "not tested" if tie is None else ("within noise" if tie else "below")
        marks[method] = {"rank": rank, "vs_best": vs_best, "ties": ties}
    return marks


def pareto_front(points: list[tuple[float, float]], x_higher_is_better: bool, y_higher_is_better: bool) -> list[bool]:
    """For each (x, y) point: True if no other point is at least as good on both and strictly better on one.

    Sorts once and sweeps (n log n): both coordinates are turned into costs to minimise; among points with
    the same x cost only those with the group's least y cost can be optimal, and only if that y cost is
    below every y cost of a point with a smaller x cost. Equal points do not dominate each other. NaN: not optimal.
    """
    costs = [(-x if x_higher_is_better else x, -y if y_higher_is_better else y) for x, y in points]
    order = sorted((i for i, c in enumerate(costs) if not (math.isnan(c[0]) or math.isnan(c[1]))), key=lambda i: costs[i])
    optimal = [False] * len(points)
    best_before = math.inf  # least y cost among points with a strictly smaller x cost
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and costs[order[end]][0] == costs[order[start]][0]:
            end += 1
        group_best = costs[order[start]][1]  # sorted by (x, y): the group's first has its least y cost
        if group_best < best_before:
            for i in order[start:end]:
                optimal[i] = costs[i][1] == group_best
        best_before = min(best_before, group_best)
        start = end
    return optimal
