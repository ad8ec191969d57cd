"""`kdlm analyze`: linear CKA against a float64 closed form, and the command end to end on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdlm.errors import KdlmError
from kdlm.evaluate.analyze import AnalyzeConfig, analyze, token_type
from kdlm.evaluate.cka import cka_matrix, linear_cka
from kdlm.models import build_pruned_student, load_model
from test_cli import run_cli
from tiny import save_tiny_teacher


def reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC form with the centring matrix H = I - 11^T/n: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)), K = XX^T, L = YY^T."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    return float(np.trace(k @ h @ l_ @ h) / np.sqrt(np.trace(k @ h @ k @ h) * np.trace(l_ @ h @ l_ @ h)))


def test_linear_cka_matches_the_closed_form_and_its_invariances():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(12, 7, generator=generator, dtype=torch.float64) + 0.5 * torch.randn(40, 7, generator=generator, dtype=torch.float64)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(reference_cka(x.numpy(), y.numpy()), abs=1e-12)
    orthogonal, _ = torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64))
    assert linear_cka(x @ orthogonal, y) == pytest.approx(linear_cka(x, y), abs=1e-12)
    assert linear_cka(3.7 * x, y) == pytest.approx(linear_cka(x, y), abs=1e-12)
    assert linear_cka(x + 5.0, y) == pytest.approx(linear_cka(x, y), abs=1e-12)  # columns are centred
    # By hand: one feature each, centred x = (-1, 0, 1), y = (-1, 1, 0): CKA = corr^2 = (1)^2 / (2 * 2) = 0.25.
    assert linear_cka(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [3.0], [2.0]])) == pytest.approx(0.25)
    # The Gram route of the matrix gives the same numbers as the feature route.
    matrix = cka_matrix([x, y], [y, x[:, :5]])
    assert matrix[0, 0] == pytest.approx(linear_cka(x, y), abs=1e-12) and matrix[1, 1] == pytest.approx(linear_cka(y, x[:, :5]), abs=1e-12)
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(x, y[:10])


def test_token_types():
    assert [token_type(t) for t in (" 42", ".", " the", "\n", ", ", "\ufffd")] == ["number", "punctuation", "word", "other", "punctuation", "other"]


def test_analyze_end_to_end_on_a_pruned_tiny_student(tmp_path):
    teacher_dir = save_tiny_teacher(tmp_path / "teacher")
    teacher, tokenizer = load_model(str(teacher_dir))
    student = build_pruned_student(teacher, [0, 3])
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in (
        {"prompt": "what is the capital of france?", "category": "geography", "response": "paris is the capital of france."},
        {"prompt": "two plus two is", "category": "math", "response": "four. three times three is nine."},
        {"prompt": "write a short poem about the sea.", "category": "writing"})))  # no response: the teacher's answer
    proc = run_cli("analyze", str(teacher_dir), str(tmp_path / "student"), "--data", str(data), "--out", str(tmp_path / "out"),
                   "--limit", "3", "--max-new-tokens", "12", cwd=tmp_path)
    assert "report.html" in proc.stderr
    report = json.loads((tmp_path / "out" / "analyze.json").read_text())
    page = (tmp_path / "out" / "report.html").read_text()
    for title in ("Per-layer linear CKA", "Divergence by position in the answer", "Divergence by token type",
                  "Divergence by prompt category", "Largest disagreement", "geography"):
        assert title in page
    # Recompute the CKA of each student layer against the teacher layer it was copied from, on the same tokens.
    hidden = {}
    for name, model in (("teacher", teacher), ("student", student)):
        with torch.no_grad():
            states = [model(input_ids=torch.tensor([e["input_ids"]]), output_hidden_states=True).hidden_states for e in report["prompts"]]
        hidden[name] = [np.concatenate([s[k][0, 1:].double().numpy() for s in states]) for k in range(len(states[0]))]  # first positions out
    order = {e["prompt"]: i for i, e in enumerate(report["prompts"])}
    assert sorted(order) == sorted(json.loads(line)["prompt"] for line in data.read_text().splitlines())
    for row, kept in zip(report["layers"][1:], [0, 3], strict=True):
        assert row["copied_from_layer"] == kept + 1
        expected = reference_cka(hidden["student"][row["student_layer"]], hidden["teacher"][kept + 1])
        assert row["copied_from_cka"] == pytest.approx(expected, abs=1e-6)
        assert f"<td>{expected:.3f}</td>" in page
    # The first student layer is the teacher's first layer on the same input: identical states.
    assert report["layers"][1]["copied_from_cka"] == pytest.approx(1.0, abs=1e-6)
    assert report["layers"][2]["copied_from_cka"] < 0.999
    assert sum(r["tokens"] for r in report["by_position"]) == report["overall"]["tokens"] == sum(e["tokens"] for e in report["prompts"])
    with pytest.raises(KdlmError, match="--data .*missing.jsonl: file not found"):
        analyze(str(teacher_dir), str(tmp_path / "student"), AnalyzeConfig(data=str(tmp_path / "missing.jsonl")))
