"""The HTML page of `kdlm analyze`: tables, a CKA heatmap and the prompts side by side, in one file.

Built like the bench's report (kdlm.bench.report): PNGs from matplotlib embedded as data URIs, so the
page opens offline; analyze.md holds the same tables as Markdown.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from kdlm.evaluate.figures import figure_png, markdown_to_html_table


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def layer_table(report: dict) -> str:
    copied = report["kept_layers"] is not None
    head = "| student layer | same-depth teacher layer | CKA | best teacher layer | CKA |" + (" copied from teacher layer | CKA |" if copied else "")
    lines = [head, "|" + "---|" * (7 if copied else 5)]
    for row in report["layers"]:
        line = (f"| {row['student_layer']} | {row['same_depth_layer']} | {_number(row['same_depth_cka'])} | {row['best_layer']} | "
                f"{_number(row['best_cka'])} |")
        if copied:
            line += f" {row['copied_from_layer']} | {_number(row['copied_from_cka'])} |"
        lines.append(line)
    return "\n".join(lines)


def group_table(rows: list[dict], key: str, title: str) -> str:
    lines = [f"| {title} | tokens | KL(teacher‖student) nats | top-1 agreement |", "|---|---|---|---|"]
    lines += [f"| {row[key]} | {row['tokens']} | {_number(row['kl'])} | {row['top1_agreement']:.1%} |" for row in rows]
    return "\n".join(lines)


def tables(report: dict) -> dict[str, str]:
    out = {"layers": layer_table(report), "position": group_table(report["by_position"], "position", "answer position (tokens)"),
           "token_type": group_table(report["by_token_type"], "type", "token type")}
    if report["by_category"]:
        out["category"] = group_table(report["by_category"], "category", "prompt category")
    return out


def _plots(report: dict) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs = {}
    figure, axis = plt.subplots(figsize=(8, 4))
    image = axis.imshow(report["cka_matrix"], aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
    axis.set(xlabel="teacher hidden state (0 = embeddings, k = after layer k)", ylabel="student hidden state")
    figure.colorbar(image, label="linear CKA")
    if report["kept_layers"] is not None:
        axis.plot([r["copied_from_layer"] for r in report["layers"]], [r["student_layer"] for r in report["layers"]], "w.", label="copied from")
        axis.legend(fontsize=8, loc="upper left")
    pngs["cka"] = figure_png(figure)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(7, 3.5))
    rows = report["by_position"]
    axis.bar([r["position"] for r in rows], [r["kl"] for r in rows], color="tab:red")
    axis.set(xlabel="position in the teacher's answer (tokens)", ylabel="KL(teacher || student), nats/token")
    pngs["position"] = figure_png(figure)
    plt.close(figure)
    return pngs


def _side_by_side(report: dict) -> str:
    top = report["settings"]["top"]
    cells = []
    for example in [e for e in report["prompts"] if e["tokens"]][:top]:
        cells.append(f"<tr><td>{html.escape(example['prompt'])}<br><small>{html.escape(example['category'] or '')}</small></td>"
                     f"<td>{html.escape(example['teacher'])}</td><td>{html.escape(example['student'])}</td>"
                     f"<td>{_number(example['kl'])}</td><td>{example['top1_agreement']:.1%}</td></tr>")
    return ('<table class="text"><tr><th>prompt</th><th>teacher</th><th>student</th><th>mean KL</th><th>top-1 agreement</th></tr>'
            + "".join(cells) + "</table>")


def write_analyze_report(report: dict, output_dir: Path) -> Path:
    """analyze.md (tables), plots/*.png and report.html (self-contained); returns the HTML path."""
    parts = tables(report)
    overall = report["overall"]
    summary = (f"{report['student']} against {report['teacher']}: {overall['tokens']} answer tokens, mean KL {overall['kl']:.3f} nats, "
               f"top-1 agreement {overall['top1_agreement']:.1%}; CKA on {report['cka_tokens']} tokens.")
    titles = {"layers": "Per-layer linear CKA", "position": "Divergence by position in the answer",
              "token_type": "Divergence by token type", "category": "Divergence by prompt category"}
    (output_dir / "analyze.md").write_text(f"# kdlm analyze\n\n{summary}\n\n"
                                           + "".join(f"## {titles[k]}\n\n{v}\n\n" for k, v in parts.items()))
    figures = []
    (output_dir / "plots").mkdir(parents=True, exist_ok=True)
    for name, data in _plots(report).items():
        (output_dir / "plots" / f"analyze_{name}.png").write_bytes(data)
        figures.append(f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}"></figure>')
    body = "".join(f'<h2 id="{k}">{titles[k]}</h2>\n{markdown_to_html_table(v)}\n' for k, v in parts.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kdlm analyze</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}table.text td{{text-align:left;vertical-align:top;white-space:pre-wrap}}
figure{{display:inline-block;margin:1em}}img{{max-width:520px}}</style>
</head><body>
<h1>kdlm analyze</h1>
<p>{html.escape(summary)}</p>
{''.join(figures)}
{body}
<h2 id="prompts">Largest disagreement</h2>
{_side_by_side(report)}
</body></html>
"""
    path = output_dir / "report.html"
    path.write_text(page)
    return path
