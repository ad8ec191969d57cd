"""The bench's outputs: a Markdown table, matplotlib plots, and one static HTML page with the plots inside.

With axes (students, data sizes, teacher access, ...) the report adds quality against each axis and, when
the evaluation measured cost, Pareto charts of quality against parameters, disk size and generation
tokens/s, the non-dominated students marked and the teacher drawn as the reference.

Plots are PNGs written next to the report and embedded in report.html as base64 data URIs, so the
page is a single file that opens in any browser, offline.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from kdlm.evaluate.figures import figure_png, markdown_to_html_table

PLOTS = {
    "training_loss": "Training loss against step (one line per run)",
    "quality_vs_step": "Held-out top-1 agreement with the teacher and KL against step (mean over seeds)",
    "quality_vs_wallclock": "Quality against training wall-clock (mean ± std over seeds)",
    "quality_vs_flops": "Quality against estimated training FLOPs",
}


def _fmt(summary: dict | None, digits: int = 2, percent: bool = False) -> str:
    if not summary or summary.get("n", 0) == 0 or math.isnan(summary["mean"]):
        return "-"
    scale = 100 if percent else 1
    mean = f"{summary['mean'] * scale:.{digits}f}"
    if summary["n"] > 1 and not math.isnan(summary["std"]):
        mean += f" ± {summary['std'] * scale:.{digits}f}"
    return mean + ("%" if percent else "")


def markdown_table(result: dict) -> str:
    """Methods ranked by the metric: mean ± std over seeds, the noise mark, cost."""
    metric = result["metric"]
    percent = "agreement" in metric or "shot" in metric or metric.endswith(" acc")
    extra = [c for c in ("bits/byte", "top-1 agreement", "KL to teacher", "ECE") if c != metric]
    lines = [
        f"| rank | method | {metric} | vs best | within noise of | {' | '.join(extra)} | train wall-clock (s) | FLOPs | seeds |",
        "|" + "---|" * (8 + len(extra)),
    ]
    methods = result["methods"]
    scale = max((abs(e["metric"]["mean"]) for e in methods.values() if e["metric"]["n"]), default=1)
    digits = 1 if percent else (3 if scale < 1 else 2)
    for method in sorted(methods, key=lambda m: methods[m]["rank"]):
        entry = methods[method]
        mark = {"best": "**best**", "within noise": "≈ best", "below": "below", "not tested": "n/a (1 seed)"}[entry["vs_best"]]
        lines.append(
            f"| {entry['rank']} | {method} | {_fmt(entry['metric'], digits, percent)} | {mark} | "
            f"{', '.join(entry['ties']) or '-'} | "
            + "".join(f"{_fmt(entry.get(c), 1, True) if c == 'top-1 agreement' else _fmt(entry.get(c), 3)} | " for c in extra)
            + f"{_fmt(entry['wall_s'], 1)} | {entry['flops']['mean']:.2e} | {entry['metric']['n']} |"
        )
    teacher = result.get("teacher")
    if teacher and metric in teacher:
        value = teacher[metric]
        shown = f"{value[0]:.{digits}f}" if isinstance(value, (list, tuple)) else (f"{value:.1%}" if percent else f"{value:.{digits}f}")
        lines.append(f"| - | teacher | {shown} |" + " |" * (5 + len(extra)))
    lines += ["", "≈ best: the difference from the best method is at most twice its standard error from the seed spread "
              "(sqrt(s1²/n1 + s2²/n2)); with one seed nothing is tested."]
    aligned = sorted(row["model"] for row in result.get("evaluation", []) if "aligned" in str(row.get("top-1 on", "")))
    if aligned:  # students with their own tokenizer (kdlm.evaluate.xvocab)
        lines.append(f"Top-1 agreement of {', '.join(aligned)} (another tokenizer than the teacher's) counts only the "
                     "teacher's answer tokens that align 1:1 with one of theirs; they have no KL or ECE.")
    return "\n".join(lines)


def make_plots(result: dict) -> dict[str, bytes]:
    """PNG bytes per plot name (see PLOTS)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["methods"]
    order = result.get("method_order") or list(methods)
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(order)}
    pngs = {}

    figure, axis = plt.subplots(figsize=(7, 4))
    for method in order:
        for index, run in enumerate(methods[method]["runs"]):
            history_file = Path(run["run_dir"]) / "history.json"
            if history_file.exists():
                history = json.loads(history_file.read_text())
                axis.plot([h["step"] for h in history], [h["loss"] for h in history], color=colors[method], alpha=0.8,
                          label=method if index == 0 else None)
    axis.set(xlabel="step", ylabel="training loss (the method's own objective)", yscale="log")
    axis.legend(fontsize=8)
    pngs["training_loss"] = figure_png(figure)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in order:
        curves = [run.get("curve") or [] for run in methods[method]["runs"]]
        steps = sorted({point["step"] for curve in curves for point in curve})
        for axis, key, scale in ((axes[0], "top1_agreement", 100), (axes[1], "kl_to_teacher", 1)):
            means = []
            for step in steps:
                values = [p[key] for curve in curves for p in curve if p["step"] == step and p.get(key) is not None]
                means.append(scale * sum(values) / len(values) if values else math.nan)  # KL: none across tokenizers
            if steps:
                axis.plot(steps, means, marker="o", color=colors[method], label=method)
    axes[0].set(xlabel="step", ylabel="top-1 agreement with the teacher (%)")
    axes[1].set(xlabel="step", ylabel="KL(teacher || student), nats/token")
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    else:
        axes[0].text(0.5, 0.5, "no curve recorded (curve_every: 0)", ha="center", transform=axes[0].transAxes)
    pngs["quality_vs_step"] = figure_png(figure)
    plt.close(figure)

    for name, key, label in (("quality_vs_wallclock", "wall_s", "training wall-clock (s)"), ("quality_vs_flops", "flops", "estimated FLOPs")):
        figure, axis = plt.subplots(figsize=(7, 4))
        for method in order:
            entry = methods[method]
            x, y = entry[key], entry["metric"]
            if y["n"] == 0 or math.isnan(y["mean"]):
                continue
            axis.errorbar(x["mean"], y["mean"], xerr=x["std"] if x["n"] > 1 else None, yerr=y["std"] if y["n"] > 1 else None,
                          fmt="o", color=colors[method], capsize=3, label=method)
            axis.annotate(method, (x["mean"], y["mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        axis.set(xlabel=label, ylabel=result["metric"])
        if key == "flops":
            axis.set_xscale("log")
        pngs[name] = figure_png(figure)
        plt.close(figure)
    return pngs


COST_SHORT = {"params (M)": "params", "disk (MB)": "disk", "generate tok/s": "tok/s"}


def _mean(summary: dict | None) -> float:
    return summary["mean"] if summary and summary.get("n") else math.nan


def frontier_table(frontier: dict) -> str:
    """One row per trained (and quantised) student: cost, quality, and the charts where it is Pareto-optimal."""
    quality = list(frontier["quality"])
    lines = [f"| student | {' | '.join(COST_SHORT)} | {' | '.join(quality)} | "
             + " | ".join(f"Pareto-optimal vs {COST_SHORT[c]}" for c in COST_SHORT) + " |",
             "|" + "---|" * (1 + 2 * len(COST_SHORT) + len(quality))]
    for point in frontier["points"]:
        cells = [_fmt(point[c], 2) for c in COST_SHORT] + [_fmt(point[q], 3) for q in quality]
        fronts = [", ".join(q for q in quality if point["label"] in frontier["pareto"].get(f"{c}|{q}", [])) or "-" for c in COST_SHORT]
        lines.append(f"| {point['label']} | " + " | ".join(cells + fronts) + " |")
    teacher = frontier.get("teacher") or {}
    if any(v is not None for v in teacher.values()):
        shown = [f"{teacher[c]:.3g}" if teacher.get(c) is not None else "-" for c in [*COST_SHORT, *quality]]
        lines.append("| teacher (reference) | " + " | ".join(shown) + " |" + " |" * len(COST_SHORT))
    return "\n".join(lines)


def _line_key(values: dict, axis: str) -> str:
    return " ".join(f"{v}" for k, v in values.items() if k != axis and not (k == "quantize" and v == "none"))


def axis_plots(frontier: dict) -> dict[str, tuple[str, bytes]]:
    """Per axis: each quality column against the axis values, one line per setting of everything else."""
    import matplotlib.pyplot as plt

    plots = {}
    quality = list(frontier["quality"])
    for axis, values in frontier["axes"].items():
        numeric = all(v.get("x") is not None for v in values)
        position = {v["name"]: (v["x"] if numeric else index) for index, v in enumerate(values)}
        series = {v["name"]: v.get("series") or "" for v in values}
        lines: dict[str, list] = {}
        for point in frontier["points"]:
            key = " ".join(part for part in (series[point["values"][axis]], _line_key(point["values"], axis)) if part)
            lines.setdefault(key, []).append(point)
        figure, axes = plt.subplots(1, len(quality), figsize=(5.5 * len(quality), 4), squeeze=False)
        for panel, column in zip(axes[0], quality, strict=True):
            for label, points in lines.items():
                points = sorted(points, key=lambda p: position[p["values"][axis]])
                xs = [position[p["values"][axis]] for p in points]
                ys = [_mean(p[column]) for p in points]
                errors = [p[column]["std"] if p[column].get("n", 0) > 1 else 0 for p in points]
                panel.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=label or "all")
            teacher = frontier["teacher"].get(column)
            if teacher is not None:
                panel.axhline(teacher, color="black", linestyle="--", linewidth=1, label="teacher")
            panel.set(xlabel=axis, ylabel=column, title=f"{column} against {axis}")
            if not numeric:
                panel.set_xticks(list(position.values()), list(position))
        if axes[0][0].get_legend_handles_labels()[0]:
            axes[0][0].legend(fontsize=7)
        plots[f"quality_vs_axis_{axis}"] = (f"Quality against the {axis} axis (mean ± std over seeds; dashed: the teacher)", figure_png(figure))
        plt.close(figure)
    return plots


def pareto_plots(frontier: dict) -> dict[str, tuple[str, bytes]]:
    """Per cost column: each quality column against it, the Pareto-optimal students ringed and joined, the teacher a star."""
    import matplotlib.pyplot as plt

    plots = {}
    quality = list(frontier["quality"])
    for cost, short in COST_SHORT.items():
        if not any(f"{cost}|{q}" in frontier["pareto"] for q in quality):
            continue  # no cost measured (the eval's `cost` task is off)
        figure, axes = plt.subplots(1, len(quality), figsize=(5.5 * len(quality), 4.5), squeeze=False)
        for panel, column in zip(axes[0], quality, strict=True):
            front = set(frontier["pareto"].get(f"{cost}|{column}", []))
            points = [p for p in frontier["points"] if p[cost].get("n") and p[column].get("n")]
            panel.set(xlabel=cost, ylabel=column, title=f"{column} against {short}")
            if not points:  # the column's task did not run (or gave no number)
                panel.text(0.5, 0.5, f"no {column} values", ha="center", transform=panel.transAxes)
                continue
            for point in points:
                x, y = _mean(point[cost]), _mean(point[column])
                marker = "^" if point["values"].get("quantize", "none") != "none" else "o"
                panel.scatter([x], [y], marker=marker, color="tab:red" if point["label"] in front else "tab:gray", zorder=3)
                if point["label"] in front:  # only the optimal ones named: the rest are in the table
                    panel.annotate(point["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6)
            optimal = sorted((_mean(p[cost]), _mean(p[column])) for p in points if p["label"] in front)
            if optimal:
                panel.plot(*zip(*optimal, strict=True), color="tab:red", linewidth=1, label="Pareto-optimal")
            teacher = frontier["teacher"]
            if teacher.get(cost) is not None and teacher.get(column) is not None:
                panel.scatter([teacher[cost]], [teacher[column]], marker="*", s=150, color="black", label="teacher", zorder=4)
            panel.legend(fontsize=7)
        plots[f"pareto_{short.replace('/', '_per_')}"] = (
            f"Pareto chart: quality against {cost} (red: non-dominated students; triangles: int8; star: the teacher)", figure_png(figure))
        plt.close(figure)
    return plots


def write_bench_report(result: dict, output_dir: Path) -> Path:
    """bench.md, plots/*.png and report.html (self-contained); returns the HTML path."""
    table = markdown_table(result)
    frontier = result.get("frontier")
    extra = f"\n## Students: cost, quality, Pareto-optimal\n\n{frontier_table(frontier)}\n" if frontier else ""
    (output_dir / "bench.md").write_text(f"# kdlm bench: {output_dir}\n\n{table}\n{extra}")
    plots = {name: (PLOTS[name], data) for name, data in make_plots(result).items()}
    if frontier:
        plots.update(axis_plots(frontier))
        plots.update(pareto_plots(frontier))
    plots_dir = output_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, (caption, data) in plots.items():
        (plots_dir / f"{name}.png").write_bytes(data)
        encoded = base64.b64encode(data).decode()
        figures.append(f'<figure id="plot-{name}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    failures = "".join(f"<li>{html.escape(f['method'])} seed {f['seed']}: {html.escape(f['error'])}</li>" for f in result.get("failures", []))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kdlm bench</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}figure{{display:inline-block;margin:1em}}img{{max-width:520px}}</style>
</head><body>
<h1>kdlm bench: {html.escape(str(output_dir))}</h1>
<p>Ranked by <b>{html.escape(result['metric'])}</b>; mean ± std over seeds {html.escape(str(result.get('seeds')))}.</p>
{markdown_to_html_table(table)}
<p>≈ best: within twice the standard error of the difference (seed spread). FLOPs: 6·N_student·tokens + 2·N_teacher·teacher tokens, plus 2·N per token each model runs while sampling (on-policy methods).</p>
{'<h2>Students: cost, quality, Pareto-optimal</h2>' + markdown_to_html_table(frontier_table(frontier)) if frontier else ''}
{'<h2>Failed runs</h2><ul>' + failures + '</ul>' if failures else ''}
<h2>Plots</h2>
{''.join(figures)}
</body></html>
"""
    path = output_dir / "report.html"
    path.write_text(page)
    return path
