"""One table with the teacher and the students: fidelity, perplexity, size and speed."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kdlm.config import EvalConfig
from kdlm.data import encode_records
from kdlm.errors import KdlmError
from kdlm.evaluate.bytes import answer_bits_per_byte
from kdlm.evaluate.metrics import fidelity, speed, target_logits, text_perplexity
from kdlm.evaluate.xvocab import aligned_top1, per_example
from kdlm.models import describe_model

SPEED_PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Give me three tips for sleeping better.",
    "What is the difference between weather and climate?",
    "Write a short thank-you note to a teacher.",
    "How do plants make their food?",
    "Name three uses of a paperclip.",
    "What does a compiler do?",
    "Suggest a name for a pet turtle.",
]

COLUMNS = [
    ("model", "model", "{}"),
    ("kl_to_teacher", "KL(teacher||model) nats/token", "{:.3f}"),
    ("top1_agreement", "top-1 agreement", "{:.1%}"),
    ("bits_per_byte", "bits/byte on held-out answers", "{:.3f}"),
    ("top1_agreement_aligned", "top-1 agreement, 1:1-aligned tokens", "{:.1%}"),
    ("aligned_share", "1:1-aligned share", "{:.0%}"),
    ("answer_perplexity", "ppl on held-out answers", "{:.2f}"),
    ("text_perplexity", "ppl on text", "{:.2f}"),
    ("parameters", "parameters (M)", "{:.1f}"),
    ("disk_mb", "disk (MB)", "{:.0f}"),
    ("forward_tokens_per_s", "forward tok/s", "{:.0f}"),
    ("generate_tokens_per_s", "generate tok/s", "{:.1f}"),
    ("peak_memory_mb", "peak memory (MB)", "{:.0f}"),
]


def evaluate_models(models: dict, teacher, tokenizer, heldout: list[dict], config: EvalConfig, vocab_size: int, *,
                    records: list[dict] | None = None, tokenizers: dict | None = None) -> list[dict]:
    """Evaluate each `name -> (model, folder or None)` against the teacher on held-out examples.

    Args:
        records: the held-out records; their chats' answers give every model a bits-per-byte column.
        tokenizers: `name -> tokenizer` of the models whose tokenizer is not the teacher's: they get bits per
            byte and top-1 agreement on the 1:1-aligned positions (kdlm.evaluate.xvocab) instead of KL,
            top-1 agreement and perplexities, which need the teacher's tokens.
    """
    pad = tokenizer.pad_token_id
    tokenizers = tokenizers or {}
    chats = [r for r in records or [] if "messages" in r and r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"]]
    if tokenizers and not chats:
        raise KdlmError("a model with another tokenizer than the teacher's is scored on held-out chat answers; "
                        "the held-out records have none (data.train needs chat records)")
    reference = target_logits(teacher, heldout, batch_size=config.batch_size, pad_token_id=pad, vocab_size=vocab_size)
    cross_reference = teacher_answer_logits(teacher, tokenizer, chats, config.batch_size) if tokenizers else None
    text = Path(config.text).read_text() if config.text else None
    rows = []
    for name, (model, folder) in models.items():
        row = {"model": name}
        own = tokenizers.get(name)
        if chats:
            row["bits_per_byte"] = answer_bits_per_byte(model, own or tokenizer, chats, batch_size=config.batch_size)["bits_per_byte"]
        if own is not None:
            row.update(aligned_top1(model, own, tokenizer, chats, cross_reference, max_length=_ANSWER_LENGTH,
                                    batch_size=config.batch_size))
        else:
            row.update(fidelity(model, heldout, reference, batch_size=config.batch_size, pad_token_id=pad, vocab_size=vocab_size))
            if text is not None:
                row["text_perplexity"] = text_perplexity(model, tokenizer, text, max_tokens=config.text_max_tokens)
        info = describe_model(model, folder)
        row["parameters"] = info["parameters"] / 1e6
        if "disk_bytes" in info:
            row["disk_mb"] = info["disk_bytes"] / 2**20
        row.update(speed(model, own or tokenizer, SPEED_PROMPTS, batch_size=min(8, config.batch_size), new_tokens=config.generation_tokens))
        rows.append(row)
    return rows


_ANSWER_LENGTH = 1 << 16  # whole answers: an alignment needs both sides' tokens of the same text


def teacher_answer_logits(teacher, tokenizer, chats: list[dict], batch_size: int) -> list:
    """The teacher's logits at the target positions of each chat, one (targets, V) tensor per chat."""
    examples = encode_records(tokenizer, chats, max_length=_ANSWER_LENGTH)
    logits = target_logits(teacher, examples, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, vocab_size=_ANSWER_LENGTH)
    return per_example(logits, examples, batch_size)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    columns = [c for c in COLUMNS if any(c[0] in row for row in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def print_table(rows: list[dict], console: Console | None = None) -> None:
    columns = [c for c in COLUMNS if any(c[0] in row for row in rows)]
    table = Table(title="teacher and students on held-out teacher answers")
    for _, title, _ in columns:
        table.add_column(title, justify="right")
    for row in rows:
        table.add_row(*(_cell(row, key, fmt) for key, _, fmt in columns))
    (console or Console()).print(table)


def write_report(report: dict, output_dir: Path) -> None:
    """report.json (everything) and report.md (the table and timings); prints the table."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [f"# kdlm run: {output_dir}", ""]
    if report.get("rows"):
        lines += [markdown_table(report["rows"]), ""]
        print_table(report["rows"])
    timings = report.get("timings", {})
    lines += ["| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += ["", f"steps: {report.get('steps')}, target tokens: {report.get('tokens')}"]
    (output_dir / "report.md").write_text("\n".join(lines) + "\n")


def write_model_card(student_dir: Path, report: dict, kept_layers: list[int] | None) -> Path:
    """README.md in the student folder: where it came from (teacher, method, data, budget) and how it scored."""
    config = report["config"]
    teacher, student, loss, train = config["teacher"], config["student"], config["loss"], config["train"]
    method = config.get("method", {}).get("name", "offpolicy")
    base = teacher["model"] if "/" in teacher["model"] and not Path(teacher["model"]).exists() else None
    front = ["---", "library_name: transformers", "tags: [kdlm, knowledge-distillation]"]
    if base:
        front.append(f"base_model: {base}")
    built = {"prune": f"{len(kept_layers or [])} teacher layers kept ({student['layers'] if isinstance(student['layers'], str) else 'listed'}): {kept_layers}",
             "random": "the teacher's architecture, random weights", "model": f"initialised from {student.get('model')}"}
    if student.get("width") or student.get("target_params"):
        built["prune"] += (f"; widths pruned by activation importance (width {student.get('width')}, "
                           f"target_params {student.get('target_params')})")
    signal = "a top-k cache" if teacher["signal"] == "topk" else "the live teacher"
    lines = [*front, "---", "", f"# Student distilled from {teacher['model']} with kdlm", "",
             f"- **Student:** {built.get(student['init'], student['init'])}" + (" with a LoRA adapter (merged)" if student.get("lora") else ""),
             f"- **Method:** {method}; loss {loss['divergence']} at temperature {loss['temperature']}, kd_weight "
             f"{loss['kd_weight']}; teacher signal: {signal}" + (f" (top {teacher['top_k']})" if teacher["signal"] == "topk" else ""),
             f"- **Data:** {config['data']['train']}" + (" (the teacher's own answers)" if config["data"].get("teacher_answers") else ""),
             f"- **Budget:** {report.get('steps')} steps, {report.get('tokens')} target tokens, batch {train['batch_size']} x "
             f"{train['grad_accum']} accumulation, lr {train['lr']}", ""]
    if report.get("rows"):
        lines += ["## Evaluation on held-out teacher answers", "", markdown_table(report["rows"]), ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{student_dir}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{student_dir}")', "```", ""]
    path = Path(student_dir) / "README.md"
    path.write_text("\n".join(lines))
    return path
