"""`kdlm analyze TEACHER STUDENT`: what the student lost, on the same tokens as the teacher.

1. The teacher answers each prompt (greedy); both models then read the same prompt + answer tokens
   (the record's own `response`/`reference` when it has one, else the teacher's answer).
2. Per-layer linear CKA (kdlm.evaluate.cka) between every student layer and every teacher layer, on
   all those tokens; for a pruned student (config.kdlm_teacher_layers) also against the teacher layer
   each student layer was copied from.
3. Per answer token: KL(teacher || student) and top-1 agreement, grouped by position in the answer,
   by token type (number, punctuation, word, other; `rare` = the last quarter of the vocabulary ids,
   which byte-level BPE assigns to its latest, least frequent merges) and by prompt category.
4. The prompts with the largest mean KL, with the teacher's and the student's greedy answers.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdlm.errors import KdlmError
from kdlm.evaluate.cka import cka_matrix
from kdlm.evaluate.quality import chat_prompt_ids, generate_texts
from kdlm.evaluate.tasks import _jsonl, data_root
from kdlm.models import check_vocab_compatible, load_model

POSITION_BUCKETS = [(0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 128), (128, 10**9)]
CATEGORY_KEYS = ("category", "task", "domain", "motivation_app")
RARE_FRACTION = 0.75  # ids at or above this fraction of the vocabulary count as rare


class AnalyzeConfig(BaseModel):
    """Settings of `kdlm analyze`."""

    model_config = ConfigDict(extra="forbid")
    data: str | None = Field(None, description="JSONL of prompts (prompt, instruction[+input] or messages; optional category; "
                             "optional response/reference: the answer both models read instead of the teacher's). "
                             "None: the Self-Instruct user-oriented instructions (category: motivation_app).")
    limit: int = Field(8, ge=1, description="Prompts analysed (the first ones).")
    max_new_tokens: int = Field(64, ge=1, description="Tokens of each greedy answer.")
    max_cka_tokens: int = Field(1024, ge=4, description="Tokens (prompt + answer, in order, each sequence's first left out) that CKA compares "
                                "(memory: one N x N float64 Gram per teacher layer, 8 MB each at 1,024).")
    top: int = Field(5, ge=1, description="Prompts shown side by side (largest mean KL first).")
    output_dir: str = Field("runs/analyze")


def load_prompts(path: str | None, limit: int) -> list[dict]:
    """[{prompt, category}] from a JSONL file (or the default set)."""
    file = Path(path) if path else data_root() / "self-instruct-user-eval/user_oriented_instructions.jsonl"
    if not file.is_file():
        raise KdlmError(f"--data {file}: file not found" if path else f"default prompts not found at {file}; pass --data FILE")
    prompts = []
    for number, row in enumerate(_jsonl(file), 1):
        if "prompt" in row:
            prompt = row["prompt"]
        elif "instruction" in row:
            first = (row.get("instances") or [{}])[0]
            extra = row.get("input") or first.get("input")
            prompt = row["instruction"] + (f"\n\n{extra}" if extra else "")
        elif "messages" in row:
            prompt = next((m.get("content") for m in row["messages"] if m.get("role") == "user"), None)
        else:
            prompt = None
        if not isinstance(prompt, str) or not prompt.strip():
            raise KdlmError(f"{file}:{number}: needs a `prompt` string (or `instruction`, or `messages` with a user turn)")
        category = next((str(row[key]) for key in CATEGORY_KEYS if row.get(key) is not None), None)
        answer = row.get("response", row.get("reference"))
        prompts.append({"prompt": prompt, "category": category, "answer": answer if isinstance(answer, str) else None})
        if len(prompts) == limit:
            break
    if not prompts:
        raise KdlmError(f"{file}: no prompts")
    return prompts


def token_type(text: str) -> str:
    """number | punctuation | word | other (spaces, newlines, bytes of a split character)."""
    stripped = text.strip()
    if any(c.isdigit() for c in stripped):
        return "number"
    if any(c.isalpha() for c in stripped):
        return "word"
    if stripped and not any(c.isalnum() for c in stripped) and "\ufffd" not in stripped:
        return "punctuation"
    return "other"


def position_bucket(position: int) -> str:
    low, high = next(b for b in POSITION_BUCKETS if b[0] <= position < b[1])
    return f"{low}+" if high == 10**9 else f"{low}-{high - 1}"


@torch.no_grad()
def _forward(model, ids: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hidden states (embeddings, then each layer), each (T, D) fp32, and the logits (T, V) fp32."""
    out = model(input_ids=torch.tensor([ids], device=model.device), output_hidden_states=True)
    return [h[0].float().cpu() for h in out.hidden_states], out.logits[0].float().cpu()


def _group(stats: list[dict], key: str) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for token in stats:
        if token[key] is not None:
            groups.setdefault(token[key], []).append(token)
    return [{key: name, "tokens": len(items), "kl": statistics.fmean(t["kl"] for t in items),
             "top1_agreement": statistics.fmean(t["agree"] for t in items)} for name, items in groups.items()]


def _token_stats(teacher_logits, student_logits, answer_ids: list[int], start: int, tokenizer, category, vocab: int) -> list[dict]:
    """Per answer token: KL(teacher || student) in nats, top-1 agreement, position, type, rarity, category."""
    if not answer_ids:
        return []
    rows = slice(start - 1, start - 1 + len(answer_ids))  # the logits at t predict token t + 1
    teacher = torch.log_softmax(teacher_logits[rows, :vocab].double(), -1)
    student = torch.log_softmax(student_logits[rows, :vocab].double(), -1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    agree = teacher.argmax(-1) == student.argmax(-1)
    rare_from = int(RARE_FRACTION * vocab)
    return [{"kl": float(kl[j]), "agree": float(agree[j]), "position": position_bucket(j),
             "type": token_type(tokenizer.decode([token])), "rare": "rare" if token >= rare_from else None, "category": category}
            for j, token in enumerate(answer_ids)]


def layer_rows(matrix: torch.Tensor, kept: list[int] | None) -> list[dict]:
    """Per student layer (row i of the (student+1, teacher+1) CKA matrix, 0 = embeddings): same depth, copied from, best."""
    student_layers, teacher_layers = matrix.shape[0] - 1, matrix.shape[1] - 1
    rows = []
    for i in range(matrix.shape[0]):
        same = round(i * teacher_layers / student_layers)
        best = int(matrix[i].argmax())
        row = {"student_layer": i, "same_depth_layer": same, "same_depth_cka": float(matrix[i, same]),
               "best_layer": best, "best_cka": float(matrix[i, best])}
        if kept is not None:
            copied = 0 if i == 0 else kept[i - 1] + 1  # hidden state index: teacher layer k's output is index k + 1
            row.update(copied_from_layer=copied, copied_from_cka=float(matrix[i, copied]))
        rows.append(row)
    return rows


def _models(teacher_spec: str, student_spec: str):
    teacher, tokenizer = load_model(teacher_spec)
    student, student_tokenizer = load_model(student_spec)
    try:
        vocab = check_vocab_compatible(tokenizer, student_tokenizer, teacher.config.vocab_size, student.config.vocab_size)
    except KdlmError as exc:
        raise KdlmError(f"kdlm analyze compares the two models on the same tokens: {exc}") from None
    kept = getattr(student.config, "kdlm_teacher_layers", None)
    if kept is not None and (len(kept) != student.config.num_hidden_layers or max(kept) >= teacher.config.num_hidden_layers):
        kept = None  # pruned from another teacher: no copied-from comparison
    return teacher.eval(), student.eval(), tokenizer, vocab, kept


def analyze(teacher_spec: str, student_spec: str, config: AnalyzeConfig) -> dict:
    """Run the analysis; writes analyze.json and report.html into `config.output_dir` and returns the report."""
    from kdlm.evaluate.analyze_report import write_analyze_report

    prompts = load_prompts(config.data, config.limit)
    teacher, student, tokenizer, vocab, kept = _models(teacher_spec, student_spec)
    texts = [p["prompt"] for p in prompts]
    answers = {name: generate_texts(model, tokenizer, texts, seed=0, temperature=0.0, max_new_tokens=config.max_new_tokens,
                                    label=f"{name} answers") for name, model in (("teacher", teacher), ("student", student))}
    teacher_hidden, student_hidden, stats, examples = [], [], [], []
    for index, prompt in enumerate(prompts):
        prompt_ids = chat_prompt_ids(tokenizer, prompt["prompt"])
        answer = prompt.pop("answer") or answers["teacher"][index]  # the record's own answer, else the teacher's
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: config.max_new_tokens]
        ids = prompt_ids + answer_ids
        t_hidden, t_logits = _forward(teacher, ids)
        s_hidden, s_logits = _forward(student, ids)
        teacher_hidden.append(t_hidden)
        student_hidden.append(s_hidden)
        tokens = _token_stats(t_logits, s_logits, answer_ids, len(prompt_ids), tokenizer, prompt["category"], vocab)
        stats += tokens
        examples.append({**prompt, "teacher": answers["teacher"][index], "student": answers["student"][index],
                         "tokens": len(tokens), "input_ids": ids, "answer_start": len(prompt_ids),
                         "kl": statistics.fmean(t["kl"] for t in tokens) if tokens else float("nan"),
                         "top1_agreement": statistics.fmean(t["agree"] for t in tokens) if tokens else float("nan")})

    def stacked(per_prompt: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        # Each sequence's first position is left out: Llama-family models give that token "massive activations"
        # (Sun et al. 2024, arXiv 2402.17762), e.g. a norm of 25,070 against ~150 for the others in
        # SmolLM2-135M's middle layers, and linear CKA on raw states is then that one direction: 1.000 between
        # any two middle layers of the trained quickstart student and the teacher, 0.77-0.88 without it.
        return [torch.cat([layers[k][1:] for layers in per_prompt])[: config.max_cka_tokens] for k in range(len(per_prompt[0]))]

    matrix = cka_matrix(stacked(student_hidden), stacked(teacher_hidden))
    if not stats:
        raise KdlmError("the teacher wrote no answer tokens for any prompt; raise --max-new-tokens or use other prompts")
    report = {
        "teacher": teacher_spec, "student": student_spec, "settings": config.model_dump(), "kept_layers": kept,
        "cka_tokens": int(min(config.max_cka_tokens, sum(len(e["input_ids"]) - 1 for e in examples))),
        "cka_matrix": matrix.tolist(), "layers": layer_rows(matrix, kept),
        "overall": _group([{**t, "all": "all"} for t in stats], "all")[0],
        "by_position": sorted(_group(stats, "position"), key=lambda r: int(r["position"].split("-")[0].rstrip("+"))),
        "by_token_type": _group(stats, "type") + [{"type": "rare (also counted above)", **{k: v for k, v in r.items() if k != "rare"}}
                                                  for r in _group(stats, "rare")],
        "by_category": sorted(_group(stats, "category"), key=lambda r: -r["kl"]),
        "prompts": sorted(examples, key=lambda e: -e["kl"] if e["tokens"] else float("inf")),
    }
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "analyze.json").write_text(json.dumps(report, indent=1, default=float))
    write_analyze_report(report, output_dir)
    return report
