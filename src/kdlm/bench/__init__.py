"""Method grids on equal budgets (`kdlm bench`): runs, evaluation, noise-aware tables, plots, HTML report."""

from kdlm.bench.config import STANDARD_METHODS, BenchConfig, load_bench_config
from kdlm.bench.runner import run_bench

__all__ = ["STANDARD_METHODS", "BenchConfig", "load_bench_config", "run_bench"]
