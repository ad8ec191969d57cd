"""Readers of the domain data sets (GSM8K, SVAMP, PubMedQA, LegalBench), shared by `kdlm generate` recipes
and `kdlm eval` tasks.

Two kinds of bad input, told apart:
- a file in the wrong format (not JSON/JSONL/TSV of the expected shape, a record without its question
  or text): a `KdlmError` naming the file, the line and the expected fields or columns;
- a row whose label is missing or unknown (a PubMedQA decision that is not yes/no/maybe, a LegalBench
  label that is not Yes/No, a GSM8K solution without `#### N`): counted and skipped. `DomainRows.skipped`
  lists them as "file:line: reason", so that a report can give the count.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from kdlm.errors import KdlmError

PUBMEDQA_LABELS = ("yes", "no", "maybe")
LEGALBENCH_LABELS = ("Yes", "No")
CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: "48/2 = <<48/2=24>>24"
NUMBER = re.compile(r"^-?\d[\d,]*(?:\.\d+)?$")
EXPECTED = {
    "gsm8k": 'JSONL, one object per line with "question" and "answer" (the worked solution, ending "#### N")',
    "svamp": 'a JSON list of objects with "Body", "Question", "Equation" and "Answer"',
    "pubmedqa": 'a JSON object of id -> {"QUESTION", "CONTEXTS" (list), "LONG_ANSWER", "final_decision"}',
    "legalbench": "a TSV with columns label, text (rule_qa: answer, text)",
}


@dataclass
class DomainRows:
    """Rows of one domain file: each {"where", "question", "answer", "rationale", ...}; skipped rows as reasons."""

    path: Path
    rows: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def skip(self, where: str, reason: str) -> None:
        self.skipped.append(f"{where}: {reason}")

    def check_not_empty(self) -> DomainRows:
        if not self.rows:
            first = f" (first: {self.skipped[0]})" if self.skipped else ""
            raise KdlmError(f"{self.path}: no usable rows; {len(self.skipped)} skipped for a missing or unknown label{first}")
        return self


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def jsonl_objects(path: Path, expected: str = ""):
    """(where, record, line) of each non-blank line of a JSONL file; a line that is not JSON stops with its
    place (`expected`, when given, is added to the message: the columns the caller needs)."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise KdlmError(f"{where}: not valid JSON ({error.msg})" + (f"; expected {expected}" if expected else "")) from None
        yield where, record, line


def json_records(path: Path, kind: str) -> list[tuple[int, object, object]]:
    """(line, key or index, value) of each element of the top-level JSON list or object in `path`."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    try:
        decoder.decode(text)
    except json.JSONDecodeError as error:
        raise KdlmError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); expected {EXPECTED[kind]}") from None
    start = len(text) - len(text.lstrip())
    opener = text[start : start + 1]
    wanted = "[" if kind == "svamp" else "{"
    if opener != wanted:
        raise KdlmError(f"{path}:{_line_of(text, start)}: expected {EXPECTED[kind]}")
    out, position, index = [], start + 1, 0
    while True:
        position = _skip(text, position, ",")
        if text[position] in "]}":
            return out
        key: object = index
        if opener == "{":
            key, position = decoder.raw_decode(text, position)
            position = _skip(text, position, ":")
        value, end = decoder.raw_decode(text, position)
        out.append((_line_of(text, position), key, value))
        position, index = end, index + 1


def _skip(text: str, position: int, separators: str) -> int:
    while text[position].isspace() or text[position] in separators:
        position += 1
    return position


def number_text(value: float) -> str:
    """51.0 -> "51", 2.5 -> "2.5" (never an exponent)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def read_gsm8k(path: Path) -> DomainRows:
    """GSM8K JSONL: the question, the gold number after `####`, the worked solution without calculator notes."""
    out = DomainRows(path)
    for where, record, _ in jsonl_objects(path, EXPECTED["gsm8k"]):
        if not isinstance(record, dict) or not isinstance(record.get("question"), str):
            raise KdlmError(f"{where}: no \"question\"; expected {EXPECTED['gsm8k']}")
        solution = record.get("answer")
        if not isinstance(solution, str) or "####" not in solution:
            out.skip(where, 'no gold answer ("answer" ending "#### N")')
            continue
        rationale, _, final = solution.rpartition("####")
        final = final.strip()
        if not NUMBER.match(final):
            out.skip(where, f"gold answer {final!r} is not a number")
            continue
        out.rows.append({"where": where, "question": record["question"], "answer": final,
                         "rationale": CALCULATOR.sub("", rationale).strip()})
    return out.check_not_empty()


def read_svamp(path: Path) -> DomainRows:
    """SVAMP JSON: body and question joined, the gold number, the equation as a one-line rationale."""
    out = DomainRows(path)
    for line, _, item in json_records(path, "svamp"):
        where = f"{path}:{line}"
        if not isinstance(item, dict) or not all(isinstance(item.get(key), str) for key in ("Body", "Question")):
            raise KdlmError(f"{where}: a record without \"Body\"/\"Question\"; expected {EXPECTED['svamp']}")
        answer = item.get("Answer")
        if isinstance(answer, bool) or not isinstance(answer, (int, float)):
            out.skip(where, f"gold answer {answer!r} is not a number")
            continue
        question = f"{item['Body'].strip().rstrip('.')}. {item['Question'].strip()}"
        equation, shown = str(item.get("Equation", "")).strip(), number_text(answer)
        out.rows.append({"where": where, "question": question, "answer": shown, "equation": equation,
                         "rationale": f"{equation} = {shown}." if equation else None})
    return out.check_not_empty()


def read_pubmedqa(path: Path) -> DomainRows:
    """PubMedQA JSON: question, contexts (the abstract without its conclusion), decision, long answer."""
    out = DomainRows(path)
    for line, key, item in json_records(path, "pubmedqa"):
        where = f"{path}:{line}"
        if not isinstance(item, dict) or not isinstance(item.get("QUESTION"), str) or "CONTEXTS" not in item:
            raise KdlmError(f"{where}: record {key!r} lacks \"QUESTION\" or \"CONTEXTS\"; expected {EXPECTED['pubmedqa']}")
        contexts = item["CONTEXTS"] if isinstance(item["CONTEXTS"], list) else [str(item["CONTEXTS"])]
        decision = item.get("final_decision")
        if not isinstance(decision, str) or decision.strip().lower() not in PUBMEDQA_LABELS:
            out.skip(where, f"final_decision {decision!r} is not one of yes/no/maybe")
            continue
        out.rows.append({"where": where, "id": key, "question": item["QUESTION"], "contexts": [str(c) for c in contexts],
                         "answer": decision.strip().lower(), "rationale": item.get("LONG_ANSWER")})
    return out.check_not_empty()


def read_legalbench(path: Path) -> DomainRows:
    """A LegalBench TSV: `label, text` (Yes/No tasks) or `answer, text` (rule_qa, a free-text reference)."""
    out = DomainRows(path)
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        columns = set(reader.fieldnames or [])
        if "text" not in columns or not columns & {"label", "answer"}:
            raise KdlmError(f"{path}:1: expected {EXPECTED['legalbench']}; found columns {sorted(columns) or 'none'}")
        target = "label" if "label" in columns else "answer"
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not isinstance(row.get("text"), str) or not row["text"].strip():
                raise KdlmError(f"{where}: a row without text; expected {EXPECTED['legalbench']}")
            value = (row.get(target) or "").strip()
            if target == "label" and value.capitalize() not in LEGALBENCH_LABELS:
                out.skip(where, f"label {value!r} is not Yes/No")
                continue
            if not value:
                out.skip(where, f"no {target}")
                continue
            out.rows.append({"where": where, "question": row["text"].strip(),
                             "answer": value.capitalize() if target == "label" else value, "rationale": None})
    return out
