"""KD against the SFT baseline on the quickstart, at equal steps and at equal wall-clock.

    python benchmarks/quickstart_compare.py [--steps N] [--out benchmarks/results]

Runs `kdlm distill configs/quickstart.yaml` four ways (same teacher, data, student start, seed):
  1. kd-topk       the quickstart as shipped (forward KL from the cached top-k teacher)
  2. sft-steps     cross-entropy on the teacher's answers only, same number of steps
  3. sft-clock     cross-entropy only, as many steps as fit in KD's wall-clock (its training time
                   plus the time it spent caching the teacher's top-k)
  4. kd-evenly     as 1, but the student keeps evenly spaced layers instead of the most influential
and prints one table (also written as Markdown). Finished runs are reused on a rerun.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(name: str, out: Path, overrides: list[str]) -> dict:
    folder = out / name
    report = folder / "report.json"
    if not report.exists():
        command = [sys.executable, "-m", "kdlm.cli", "distill", str(ROOT / "configs/quickstart.yaml"),
                   f"train.output_dir={folder}", *overrides]
        print("$", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)
    return json.loads(report.read_text())


def row(name: str, report: dict) -> dict:
    after = next(r for r in report["rows"] if r["model"] == "student after")
    before = next(r for r in report["rows"] if r["model"] == "student before")
    timings = report["timings"]
    return {
        "run": name,
        "steps": report["steps"],
        "cost_s": timings["train_s"] + timings.get("teacher_signal_s", 0.0),
        "kl_before": before["kl_to_teacher"],
        "kl": after["kl_to_teacher"],
        "top1_before": before["top1_agreement"],
        "top1": after["top1_agreement"],
        "ppl": after["answer_perplexity"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="KD steps (default: the config's).")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--kd-run", type=Path, default=None,
                        help="Reuse a finished `kdlm distill configs/quickstart.yaml` output folder as the KD run.")
    args = parser.parse_args()
    steps = [f"train.max_steps={args.steps}"] if args.steps else []

    kd = json.loads((args.kd_run / "report.json").read_text()) if args.kd_run else run("kd-topk", args.out, steps)
    sft = run("sft-steps", args.out, ["loss.kd_weight=0", f"train.max_steps={kd['steps']}"])
    sft_step_s = sft["timings"]["train_s"] / sft["steps"]
    kd_cost = kd["timings"]["train_s"] + kd["timings"]["teacher_signal_s"]
    clock_steps = int(kd_cost / sft_step_s)
    sft_clock = run("sft-clock", args.out, ["loss.kd_weight=0", f"train.max_steps={clock_steps}"])
    evenly = run("kd-evenly", args.out, [f"train.max_steps={kd['steps']}", "student.layers=evenly"])

    rows = [row("kd-topk (quickstart)", kd), row("sft, equal steps", sft), row("sft, equal wall-clock", sft_clock),
            row("kd-topk, evenly spaced layers", evenly)]
    lines = [
        "| run | steps | training cost (s) | KL before | KL after | top-1 before | top-1 after | ppl on held-out answers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['steps']} | {r['cost_s']:.0f} | {r['kl_before']:.2f} | {r['kl']:.2f} | "
            f"{r['top1_before']:.1%} | {r['top1']:.1%} | {r['ppl']:.2f} |"
        )
    kd_step_s = kd["timings"]["train_s"] / kd["steps"]
    lines.append("")
    lines.append(
        f"KD step {kd_step_s:.2f} s, SFT step {sft_step_s:.2f} s (ratio {kd_step_s / sft_step_s:.2f}x); "
        f"teacher top-k cache {kd['timings']['teacher_signal_s']:.0f} s once."
    )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
