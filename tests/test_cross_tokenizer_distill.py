"""`kdlm distill` across tokenizers: a tiny byte-level teacher into a tiny SentencePiece-like student, end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdlm.config import load_config
from kdlm.data import load_records, split_heldout
from kdlm.errors import KdlmError
from kdlm.losses.cross_tokenizer import vocab_map
from kdlm.pipeline import distill
from kdlm.xtok.align import token_bytes
from kdlm.xtok.data import encode_pair
from test_cli import run_cli
from test_cross_tokenizer_loss import reference_hybrid, reference_uld
from tiny import save_tiny_teacher, tiny_llama, tiny_sp_tokenizer, write_chat_jsonl

NUM_TRAIN = 12  # 16 records, 4 held out: one batch holds them all, so step 1's loss is over all of them


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok")
    save_tiny_teacher(root / "teacher", num_layers=2)
    write_chat_jsonl(root / "chat.jsonl", count=16)
    tokenizer = tiny_sp_tokenizer()
    student = tiny_llama(len(tokenizer), num_layers=2, seed=3)
    student.config.update({"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                           "bos_token_id": tokenizer.bos_token_id})
    student.save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    return root


def args(root: Path, output: str, *extra: str) -> list[str]:
    return [f"teacher.model={root / 'teacher'}", f"data.train={root / 'chat.jsonl'}", "data.heldout=4",
            "data.teacher_answers=false", "data.max_length=96", "student.init=model", f"student.model={root / 'student'}",
            f"train.batch_size={NUM_TRAIN}", "train.max_steps=8", "train.lr=3e-3", "train.warmup_steps=0",
            f"train.output_dir={root / output}", "eval.enabled=false", "loss.kd_weight=0.5", *extra]


def reference_first_loss(root: Path, saved: dict, mode: str) -> float:
    """Step 1's objective from the definitions, in float64, one example at a time (no padding):
    0.5 * CE over all student targets + 0.5 * Σ_groups D(first tokens), over the number of student targets."""
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher").double()
    student = AutoModelForCausalLM.from_pretrained(root / "student").double()
    teacher_tokenizer, student_tokenizer = AutoTokenizer.from_pretrained(root / "teacher"), AutoTokenizer.from_pretrained(root / "student")
    student_ids, teacher_ids = vocab_map(token_bytes(student_tokenizer), token_bytes(teacher_tokenizer),
                                         student.config.vocab_size, teacher.config.vocab_size)
    pairs = list(zip(student_ids.tolist(), teacher_ids.tolist(), strict=True))
    train_records, _ = split_heldout(load_records(str(root / "chat.jsonl")), 4, seed=saved["train"]["seed"])
    ce, kd, count = 0.0, 0.0, 0
    for record in train_records:
        example = encode_pair(student_tokenizer, teacher_tokenizer, record["messages"], max_length=96)
        with torch.no_grad():
            student_logits = _target_rows(student, example["input_ids"], example["labels"])
            teacher_logprobs = torch.log_softmax(_target_rows(teacher, example["teacher_input_ids"], example["teacher_labels"]), -1)
        targets = torch.tensor([label for label in example["labels"][1:] if label != -100])
        ce -= torch.log_softmax(student_logits, -1)[torch.arange(len(targets)), targets].sum().item()
        count += len(targets)
        rows = [group[0][0] for group in example["groups"]], [group[1][0] for group in example["groups"]]
        if mode == "uld":
            kd += sum(reference_uld(student_logits[rows[0]], teacher_logprobs[rows[1]]))
        else:
            kd += sum(reference_hybrid(student_logits[rows[0]], teacher_logprobs[rows[1]], pairs, "fkl"))
    return 0.5 * ce / count + 0.5 * kd / count


def _target_rows(model, input_ids: list[int], labels: list[int]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([input_ids])).logits[0, :-1]
    return logits[torch.tensor(labels[1:]) != -100]


def read_log(folder: Path) -> list[dict]:
    with (folder / "train_log.csv").open() as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def test_distill_hybrid_with_the_live_teacher_through_the_cli(workspace):
    run_cli("distill", *args(workspace, "hybrid", "loss.cross_tokenizer=hybrid", "teacher.signal=online"), cwd=workspace)
    log = read_log(workspace / "hybrid")
    saved = json.loads((workspace / "hybrid" / "report.json").read_text())["config"]
    assert log[0]["loss"] == pytest.approx(reference_first_loss(workspace, saved, "hybrid"), rel=1e-4)
    assert log[-1]["kd"] < 0.8 * log[0]["kd"] and log[-1]["loss"] < log[0]["loss"]
    assert 0.5 < log[0]["mapped_mass"] <= 1.0  # the byte-level teacher's tokens nearly all exist in the student
    saved_tokenizer = AutoTokenizer.from_pretrained(workspace / "hybrid" / "student")  # the student keeps its own
    assert saved_tokenizer.get_vocab() == tiny_sp_tokenizer().get_vocab()


def test_distill_uld_from_the_teacher_cache(workspace):
    """The cache stays in the teacher's tokens (a full top-k here, so that it holds the whole distribution)."""
    distill(load_config(None, args(workspace, "uld-cache", "loss.cross_tokenizer=uld", "teacher.signal=topk",
                                   "teacher.top_k=259")))
    log = read_log(workspace / "uld-cache")
    saved = json.loads((workspace / "uld-cache" / "report.json").read_text())["config"]
    assert log[0]["loss"] == pytest.approx(reference_first_loss(workspace, saved, "uld"), rel=2e-3)  # float16 cache
    assert log[-1]["kd"] < log[0]["kd"]
    manifest = json.loads((workspace / "uld-cache" / "teacher_cache" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 259  # the teacher's vocabulary, not the student's 323


def test_distill_from_a_served_teachers_cache_without_loading_the_teacher(workspace):
    """Gray-box across tokenizers: `kdlm cache-teacher` fills a cache from a served teacher's top-k log-probs (its
    own tokens, knowing nothing of the student); the cross-tokenizer run trains from it with the server gone."""
    from kdlm.pipeline import run_cache_teacher
    from kdlm.serve import ModelBackend, ServerThread

    folder, teacher_folder = workspace / "served-cache", str(workspace / "teacher")
    model = AutoModelForCausalLM.from_pretrained(teacher_folder).eval()
    with ServerThread(ModelBackend(teacher_folder, model, AutoTokenizer.from_pretrained(teacher_folder))) as server:
        run_cache_teacher(load_config(None, args(workspace, "cache-writer", "teacher.signal=topk", "teacher.top_k=8",
                                                 f"teacher.cache={folder}", f"teacher.api_base={server.url}")))
    distill(load_config(None, args(workspace, "from-cache", "loss.cross_tokenizer=hybrid", "teacher.signal=topk",
                                   "teacher.top_k=8", f"teacher.cache={folder}", "teacher.api_base=http://127.0.0.1:9/v1",
                                   "train.max_steps=3")))
    log = read_log(workspace / "from-cache")
    assert len(log) == 3 and log[-1]["kd"] < log[0]["kd"]
    assert 0 < log[0]["mapped_mass"] <= 1.0


def test_gkd_trains_on_student_samples_paired_again_for_the_teacher(workspace):
    from kdlm.xtok.onpolicy import CrossTokenizerSamples

    distill(load_config(None, args(workspace, "gkd", "loss.cross_tokenizer=hybrid", "teacher.signal=online",
                                   "method.name=gkd", "method.lmbda=1", "method.max_new_tokens=6", "loss.kd_weight=1",
                                   "train.max_steps=2", "train.batch_size=4")))
    log = read_log(workspace / "gkd")
    assert [row["generated"] for row in log] == [4, 8] and all(row["kd"] > 0 for row in log)

    student_tokenizer = tiny_sp_tokenizer()
    teacher_tokenizer = AutoTokenizer.from_pretrained(workspace / "teacher")
    prompt = [{"role": "user", "content": "q"}]
    original = {**encode_pair(student_tokenizer, teacher_tokenizer, [*prompt, {"role": "assistant", "content": "x"}],
                              max_length=96), "prompt_messages": prompt}
    start = [i for i, label in enumerate(original["labels"]) if label != -100][0]
    canonical = encode_pair(student_tokenizer, teacher_tokenizer, [*prompt, {"role": "assistant", "content": "water is"}],
                            max_length=96)
    sampled_ids = canonical["input_ids"][start:-1]  # what the student would sample, without its end of turn
    sample = {"input_ids": original["input_ids"][:start] + sampled_ids, "labels": [-100] * start + sampled_ids}
    paired = CrossTokenizerSamples(None, student_tokenizer, teacher_tokenizer, 96).paired(sample, original)
    assert paired["input_ids"] == canonical["input_ids"]  # its own tokens, then the template's end of turn
    assert paired["teacher_input_ids"] == canonical["teacher_input_ids"]
    assert paired["groups"] == canonical["groups"] and len(paired["groups"]) == 6  # w, at/a+t, er/e+r, ▁, is/i+s, end


@pytest.mark.parametrize(("extra", "message"), [
    ((), "loss.cross_tokenizer=uld or loss.cross_tokenizer=hybrid"),  # today's refusal names the new option
    (("loss.cross_tokenizer=uld", "hints.hidden_weight=1"), "the two models' positions are different tokens"),
    (("loss.cross_tokenizer=uld", "student.init=prune"), "needs a student with its own tokenizer"),
    (("loss.cross_tokenizer=uld", "method.name=minillm"), "only GKD on student samples"),
    (("loss.cross_tokenizer=uld", "method.name=gkd", "method.seq_kd=true"), "only GKD on student samples"),
])
def test_what_a_cross_tokenizer_run_refuses(workspace, extra, message):
    with pytest.raises(KdlmError, match=message):
        distill(load_config(None, args(workspace, "refused", "train.overwrite=true", *extra)))


def test_a_student_without_chat_template_is_refused_before_any_work(workspace):
    folder = workspace / "no-template"
    tokenizer = tiny_sp_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    with pytest.raises(KdlmError, match="student tokenizer .* has no chat template"):
        distill(load_config(None, args(workspace, "no-template-run", "loss.cross_tokenizer=uld", f"student.model={folder}")))


def test_record_weights_scale_both_terms_of_the_cross_tokenizer_loss():
    from types import SimpleNamespace

    from kdlm.data.tokenize import collate
    from kdlm.xtok.target import CrossTokenizer, cross_tokenizer_forward
    from tiny import tiny_tokenizer

    student_tokenizer, teacher_tokenizer = tiny_sp_tokenizer(), tiny_tokenizer()
    examples = [encode_pair(student_tokenizer, teacher_tokenizer, [{"role": "user", "content": "q"},
                                                                   {"role": "assistant", "content": text}], max_length=64)
                for text in ("water is on", "the cat")]
    cross = CrossTokenizer("hybrid", student_tokenizer, teacher_tokenizer, len(student_tokenizer), len(teacher_tokenizer))
    teacher = tiny_llama(len(teacher_tokenizer), seed=1)
    target = cross.teacher_target(teacher, examples, torch.device("cpu"), bf16=False)
    objective = SimpleNamespace(student=tiny_llama(len(student_tokenizer), seed=2), vocab_size=len(student_tokenizer), fused=False,
                                loss=load_config(None, ["loss.cross_tokenizer=hybrid"]).loss, cross=cross, cross_stats={})
    batch = collate(examples, student_tokenizer.pad_token_id)
    _, kd, ce, _, count = cross_tokenizer_forward(objective, batch, target, 0.5)
    weighted = collate([{**examples[0], "weight": 3.0}, examples[1]], student_tokenizer.pad_token_id)
    _, kd_weighted, ce_weighted, _, _ = cross_tokenizer_forward(objective, weighted, target, 0.5)
    first = dict(batch, input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1], labels=batch["labels"][:1])
    first_target = cross.teacher_target(teacher, examples[:1], torch.device("cpu"), bf16=False)
    _, kd_first, ce_first, _, _ = cross_tokenizer_forward(objective, first, first_target, 0.5)
    torch.testing.assert_close(kd_weighted, kd + 2 * kd_first)  # the first record counts 3 times, the second once
    torch.testing.assert_close(ce_weighted, ce + 2 * ce_first)
    assert count.item() == sum(label != -100 for e in examples for label in e["labels"][1:])
    assert objective.cross_stats["groups"] == 2 * len(target.student_rows) + len(first_target.student_rows)
