"""Applications (configs/apps/*.yaml, `kdlm app`): every config validates, bad app configs name the key, and the
education pipeline runs end to end at tiny sizes (rule-based arithmetic teacher served on loopback -> CoT recipe
with the gold filter -> white-box distillation from a tiny teacher's top-k -> domain eval -> report)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_data
from kdlm.apps import load_app_config, run_app
from kdlm.config import load_config
from kdlm.errors import KdlmError
from kdlm.final_answer import extract_number
from kdlm.recipes.arith import ArithTeacher, make_dataset
from kdlm.serve import ServerThread
from tiny import save_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
APPS = ROOT / "configs" / "apps"


@pytest.mark.parametrize("domain", ["healthcare", "education", "law"])
def test_each_app_config_validates_and_joins_the_steps(domain, tmp_path):
    config = load_app_config(APPS / f"{domain}.yaml", [f"output_dir={tmp_path}"])
    assert config.domain == domain and config.steps == ["generate", "distill", "eval"]
    assert config.distill.data.train == config.generate.output == str(tmp_path / "data" / "train.jsonl")
    assert config.distill.data.teacher_answers is False and config.eval.output_dir == str(tmp_path / "eval")
    assert config.generate.recipe.cue and config.generate.recipe.filter == "gold"
    assert "selfinst" in config.eval.tasks and "wikitext-2" in config.eval.tasks  # retention


def test_an_api_teacher_route_distills_by_seqkd_and_the_report_says_so(tmp_path):
    from kdlm.apps import write_report

    config = load_app_config(APPS / "healthcare.yaml", [f"output_dir={tmp_path}", "route=openai", "distill.loss.kd_weight=0"])
    report = write_report(config).read_text()
    assert "teacher route: openai" in report and "SeqKD (CE on kept outputs)" in report
    assert "## Data" not in report  # nothing generated yet: no invented counts


def test_the_domain_teacher_config_is_a_gold_answer_fine_tune():
    config = load_config(APPS / "domain_teacher.yaml")
    assert config.loss.kd_weight == 0 and config.student.init == "model" and config.data.teacher_answers is False


def test_bad_app_configs_name_the_key(tmp_path):
    with pytest.raises(KdlmError, match=r"(?s)distill.train.max_step: unknown key"):
        load_app_config(APPS / "education.yaml", ["distill.train.max_step=3"])
    with pytest.raises(KdlmError, match=r"recipe.filter: Input should be 'gold'"):
        load_app_config(APPS / "education.yaml", ["generate.recipe.filter=best"])
    with pytest.raises(KdlmError, match="generate.recipe.name must be cot"):
        load_app_config(APPS / "education.yaml", ["generate.recipe.name=lion"])
    with pytest.raises(KdlmError, match="app config file not found"):
        load_app_config(tmp_path / "nope.yaml")


def test_app_cli_checks_a_config(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    kdlm = [sys.executable, "-m", "kdlm.cli", "app"]
    ok = subprocess.run([*kdlm, str(APPS / "law.yaml"), "--check", f"output_dir={tmp_path}"], env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "generate.yaml").is_file() and (tmp_path / "distill.yaml").is_file()
    assert "--tasks legalbench,legalbench-rule_qa,selfinst,wikitext-2" in (tmp_path / "commands.sh").read_text()
    # (bad configs: test_bad_app_configs_name_the_key; the CLI prints a KdlmError as one line and exits 2, as every verb)


class SometimesMuteTeacher(ArithTeacher):
    """Solves (and slips at its error rate), but ignores the answer format on one question in three: no number."""

    def answer(self, messages, seed):
        user = messages[-1]["content"]
        if len(messages) == 1 and "correct answer is" not in user and len(user) % 3 == 0:
            return "I would rather not say."
        return super().answer(messages, seed)


def tiny_overrides(tmp_path: Path, url: str) -> list[str]:
    return [
        f"output_dir={tmp_path / 'app'}", "route=arith",
        f"generate.teacher.base_url={url}", "generate.teacher.model=arith-teacher", "generate.progress=false",
        "generate.recipe.task.format=arith", "generate.recipe.task.source=arith:24:0", "generate.recipe.task.limit=null",
        "generate.sampling.n=3", "generate.limits.concurrency=4",
        f"distill.teacher.model={tmp_path / 'teacher'}", "distill.teacher.top_k=4", "distill.student.init=random",
        "distill.student.num_layers=1", "distill.train.max_steps=2", "distill.train.batch_size=4", "distill.data.heldout=0",
        "distill.data.max_length=160",
        "eval.tasks=[gsm8k-test,svamp,selfinst,wikitext-2]", "eval.limit=2", "eval.seeds=[1]", "eval.max_new_tokens=6",
        "eval.answer_max_new_tokens=12", "eval.perplexity_max_tokens=64", "eval.bf16=false", "eval.batch_size=2",
    ]


def test_education_app_runs_end_to_end_with_the_rule_based_teacher(tmp_path):
    shared_data()
    save_tiny_teacher(tmp_path / "teacher", num_layers=2)
    teacher = SometimesMuteTeacher(error_rate=0.3)
    with ServerThread(teacher) as server:  # in-process (the CLI: test_app_cli_checks_a_config)
        overrides = tiny_overrides(tmp_path, server.url)
        run_app(load_app_config(APPS / "education.yaml", overrides))
        asked = teacher.requests
        # A rerun pays for nothing twice: the generate step is answered from its cache, eval from its results.
        run_app(load_app_config(APPS / "education.yaml", [*overrides, "steps=[generate,eval]"]))
        assert teacher.requests == asked
    app = tmp_path / "app"
    stats = json.loads((app / "data" / "train.stats.json").read_text())
    assert stats["unparsed"] > 0 and stats["skipped_rows"] == 0  # the format-ignoring answers were counted
    golds = {p["question"]: str(p["answer"]) for p in make_dataset(24, 0)}
    records = [json.loads(line) for line in (app / "data" / "train.jsonl").read_text().splitlines()]
    assert records and all(extract_number(r["response"], reading="rationale") == golds[r["prompt"]] for r in records)  # the gold filter
    assert all(r["response"].endswith(" END") for r in records)  # finetune_cot: steps --> answer END
    samples = [json.loads(line) for line in (app / "data" / "train.rationales.jsonl").read_text().splitlines()]
    assert samples[0]["messages"][0]["content"].endswith("'Answer: <number>'.")  # the tutor cue of education.yaml
    assert (app / "student" / "student" / "config.json").is_file()
    results = json.loads((app / "eval" / "eval.json").read_text())["models"]["student"]
    assert {"gsm8k-test", "svamp", "selfinst", "wikitext-2"} <= set(results)
    for task in ("gsm8k-test", "svamp"):
        assert {"0-shot", "0-shot_parse_rate", "0-shot_unparsed", "0-shot_rationale_correct", "0-shot_step_accuracy"} <= set(results[task])
    report = (app / "report.md").read_text()
    assert "teacher route: arith" in report and "white-box, teacher top-k" in report
    unparsed_line = f"({stats['unparsed']} unparseable, dropped)"
    assert unparsed_line in report and "rows skipped for a missing or unknown label: 0" in report
    assert "gsm8k-test 0-shot rationale ok" in report and "wikitext-2 ppl" in report
    assert (app / "commands.sh").read_text().splitlines()[1] == f"kdlm generate {app / 'generate.yaml'}"
    assert load_config(app / "distill.yaml").data.train == str(app / "data" / "train.jsonl")  # the written step config


class FormTeacher(ArithTeacher):
    """Answers every question in the domain's form with one fixed label; told the correct answer, gives that one."""

    def __init__(self, body: str, label: str):
        super().__init__()
        self.body, self.label = body, label

    def answer(self, messages, seed):
        told = messages[-1]["content"].rsplit("The correct answer is ", 1)
        label = told[1].split(".")[0] if len(told) == 2 else self.label
        return f"{self.body}\nAnswer: {label}"


def test_law_and_healthcare_generate_steps_write_domain_rationales_and_count_skipped_rows(tmp_path):
    tsv = tmp_path / "hearsay.tsv"
    tsv.write_text("label\ttext\nYes\tA said so.\nNo\tB nodded.\nmaybe\tC wrote it.\nYes\tD told E.\n")
    pubmed = tmp_path / "pubmed.json"
    pubmed.write_text(json.dumps({str(i): {"QUESTION": f"Does drug {i} work?", "CONTEXTS": [f"Trial {i} ran."],
                                           "final_decision": decision} for i, decision in
                                  enumerate(["yes", "maybe", "unknown", "yes", "no"])}, indent=1))
    cases = [("law", str(tsv), "Rule: hearsay is an out-of-court statement offered for its truth.", "Yes"),
             ("healthcare", str(pubmed), "Evidence: 'Trial ran.' The trial supports it.", "yes")]
    for domain, source, body, label in cases:
        teacher = FormTeacher(body, label)
        out = tmp_path / domain
        with ServerThread(teacher) as server:
            config = load_app_config(APPS / f"{domain}.yaml", [
                f"output_dir={out}", "steps=[generate]", f"generate.teacher.base_url={server.url}",
                "generate.teacher.model=arith-teacher", "generate.progress=false", "generate.sampling.n=2",
                f"generate.recipe.task.source={source}", "generate.recipe.task.limit=null"])
            report = run_app(config).read_text()
        assert "rows skipped for a missing or unknown label: 1" in report
        records = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
        assert len(records) == (3 if domain == "law" else 4) and all(r["response"].startswith(body) for r in records)
        assert all(r["response"].endswith(f"--> {r['meta']['gold']} END") for r in records)  # wrong labels rationalized
        asked = json.loads((out / "data" / "train.rationales.jsonl").read_text().splitlines()[0])["messages"][0]["content"]
        assert asked.endswith("'Answer: No'." if domain == "law" else "'Answer: maybe'.")  # the domain cue
    law = [json.loads(line) for line in (tmp_path / "law" / "data" / "train.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith("Is this evidence hearsay") for r in law)  # task.instruction before the facts
