"""`kdlm eval MODEL [MORE...]`: quality, fidelity to the teacher and cost of each model, as JSON and Markdown.

Each (model, task) result is stored in `output_dir/results.json` as soon as it is computed, keyed by
a fingerprint of the model folder and the task settings, so an interrupted or repeated evaluation
computes only what is missing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import ConfigDict, Field, field_validator, model_validator
from rich.console import Console

from kdlm.atomic import write_text
from kdlm.config import Aliased
from kdlm.data import encode_records
from kdlm.data.tokenize import collate
from kdlm.errors import KdlmError
from kdlm.evaluate.bytes import answer_bits_per_byte
from kdlm.evaluate.domain import (
    abstention,
    answer_matches,
    calibration,
    label_probabilities,
    parse_answer,
    rationale_metrics,
    refusal_metrics,
)
from kdlm.evaluate.metrics import speed, target_logits, text_perplexity
from kdlm.evaluate.quality import generate_texts, mean_std, rouge_l, token_fidelity
from kdlm.evaluate.quantize import float_parameter_bytes, quantize_int8, quantized_bytes
from kdlm.evaluate.report import SPEED_PROMPTS
from kdlm.evaluate.robustness import (
    PERPLEXITY_CHARS_PER_TOKEN,
    check_ood_pairs,
    expand_tasks,
    ood_rows,
    robustness_markdown,
    robustness_rows,
    run_perturbed,
)
from kdlm.evaluate.tasks import Task, build_prompt, load_task
from kdlm.evaluate.xvocab import aligned_top1, per_example
from kdlm.fingerprint import fingerprint
from kdlm.generate.teacher_answers import answer_prompts
from kdlm.models import check_vocab_compatible, describe_model, load_model
from kdlm.precision import Bf16Setting

console = Console(stderr=True)
DEFAULT_TASKS = ["selfinst", "gsm8k", "svamp", "pubmedqa", "legalbench", "wikitext-2", "tinyshakespeare", "fidelity", "cost"]


class EvalSuiteConfig(Aliased):
    """Settings of `kdlm eval MODEL...`; every field is also a command-line option."""

    model_config = ConfigDict(extra="forbid")
    ALIASES: ClassVar[dict[str, str]] = {"text_max_tokens": "perplexity_max_tokens"}  # the name of distill's eval section

    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_TASKS), description="Tasks to run (see kdlm.evaluate.tasks), plus fidelity and cost.")
    limit: int | None = Field(None, ge=1, description="Items per task (the first ones); None: all.")
    seeds: list[int] = Field(default_factory=lambda: [10, 20, 30], description="Sampling seeds for ROUGE-L (MiniLLM/DistiLLM use 10, 20, ...).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature for ROUGE-L (MiniLLM protocol: 1).")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1, description="New tokens per ROUGE-L answer (MiniLLM allows 512).")
    max_prompt_tokens: int = Field(256, ge=8, description="Prompt tokens kept (the last ones), as MiniLLM's 256.")
    shots: list[int] = Field(default_factory=lambda: [0, 3], description="k of the k-shot accuracy runs (greedy decoding).")
    answer_max_new_tokens: int = Field(192, ge=1, description="New tokens per accuracy answer (labels: at most 48).")
    perplexity_max_tokens: int = Field(4096, ge=16, description="Text tokens scored per perplexity task.")
    teacher: str | None = Field("bundled:smollm2-135m-instruct", description="Teacher for fidelity and the speed-up/compression ratios; None: skip both.")
    teacher_row: bool = Field(True, description="Evaluate the teacher too (its own row).")
    fidelity_prompts: int = Field(16, ge=1, description="Held-out prompts (the last Self-Instruct user prompts) the teacher answers for KL/top-1/ECE.")
    fidelity_max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(8, ge=1)
    bf16: Bf16Setting = Field(
        "auto", description="Generate under bf16 autocast (auto: only where the hardware runs it fast); scores stay fp32."
    )
    generation_tokens: int = Field(32, ge=1, description="New tokens per prompt when timing generation.")
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: evaluate each model (not the teacher row) with int8 dynamic quantisation of its Linear layers, "
        "on the CPU, named MODEL-int8 (see kdlm.evaluate.quantize).")
    output_dir: str = Field("runs/eval")
    perturb: list[str] = Field(default_factory=list, description="Perturbations applied to every task, LEVEL[.OP]:RATE "
                               "(char, word, sentence; rate in [0, 1]), e.g. [char:0.05, word:0.1]; one task alone: NAME@SPEC in tasks.")
    ood: list[str] = Field(default_factory=list, description="Out-of-distribution pairs IN->OUT, e.g. [gsm8k->svamp, "
                           "selfinst-seed->selfinst, legalbench-hearsay->legalbench-proa]; both tasks run.")

    @field_validator("perturb")
    @classmethod
    def _check_perturb(cls, value: list[str]) -> list[str]:
        from kdlm.evaluate.perturb import parse_spec

        return [str(parse_spec(text, "perturb")) for text in value]

    @model_validator(mode="after")
    def _int8_runs_fp32(self):
        if self.quantize == "int8" and self.bf16 is True:
            raise ValueError("quantize: int8 and bf16: true do not mix (int8 dynamic quantisation takes fp32 activations); use bf16: false")
        return self


def resolve_model(spec: str) -> tuple[str, str]:
    """(display name, load spec): a `kdlm distill` run folder stands for its `student/`."""
    path = Path(spec)
    if path.is_dir() and (path / "student").is_dir() and not (path / "config.json").exists():
        return path.name, str(path / "student")
    if path.is_dir():
        return (path.parent.name if path.name == "student" else path.name), str(path)
    return spec, spec


def _model_key(spec: str) -> str:
    path = Path(spec)
    if path.is_dir():  # the weights' size and time of change: a retrained model gets a new key
        files = sorted((str(f.relative_to(path)), f.stat().st_size, int(f.stat().st_mtime)) for f in path.rglob("*") if f.is_file())
        return fingerprint({"spec": str(path.resolve()), "files": files})
    return fingerprint({"spec": spec})


class ResultStore:
    """results.json: {"models": {name: {...}}, "keys": {name/task: fingerprint}}; saved after every task."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / "results.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data.setdefault("models", {})
        self.data.setdefault("keys", {})

    def get(self, model: str, task: str, key: str):
        if self.data["keys"].get(f"{model}/{task}") == key:
            return self.data["models"].get(model, {}).get(task)
        return None

    def put(self, model: str, task: str, key: str, value) -> None:
        self.data["models"].setdefault(model, {})[task] = value
        self.data["keys"][f"{model}/{task}"] = key
        write_text(self.path, json.dumps(self.data, indent=1, default=float))


def rouge_task(model, tokenizer, task: Task, config: EvalSuiteConfig) -> dict:
    """ROUGE-L x100 per seed (mean over items), then mean and std over seeds."""
    items = task.items[: config.limit]
    prompts = [item.prompt for item in items]
    per_seed, per_item, all_texts = [], [], []
    for seed in config.seeds:
        texts = generate_texts(
            model, tokenizer, prompts, seed=seed, temperature=config.temperature, top_p=config.top_p,
            max_new_tokens=config.max_new_tokens, max_prompt_tokens=config.max_prompt_tokens,
            batch_size=config.batch_size, bf16=config.bf16, label=f"{task.name} seed {seed}",
        )
        per_item.append([rouge_l(text, item.reference) for text, item in zip(texts, items, strict=True)])
        per_seed.append(sum(per_item[-1]) / len(items))
        all_texts.append(texts)
    mean, std = mean_std(per_seed)
    return {"rouge_l": mean, "rouge_l_std": std, "per_seed": per_seed, "seeds": config.seeds, "items": len(items), "example": texts[0],
            "per_item": per_item, "texts": all_texts}


def accuracy_task(model, tokenizer, task: Task, config: EvalSuiteConfig) -> dict:
    """Exact-match accuracy after answer extraction, greedy, for each k in `shots`; with each, the parse rate
    and the task's domain metrics (kdlm.evaluate.domain)."""
    items = task.items[: config.limit]
    budget = config.answer_max_new_tokens if task.answer_kind == "number" else min(48, config.answer_max_new_tokens)
    result: dict = {"items": len(items), "skipped_rows": len(task.skipped)}
    for shots in config.shots:
        prompts = [build_prompt(task, item, shots) for item in items]
        texts = generate_texts(
            model, tokenizer, prompts, seed=0, temperature=0.0, max_new_tokens=budget,
            max_prompt_tokens=max(config.max_prompt_tokens, 1024), batch_size=config.batch_size, bf16=config.bf16,
            label=f"{task.name} {shots}-shot",
        )
        result.update({f"{shots}-shot{key}": value for key, value in domain_scores(model, tokenizer, task, items, prompts, texts).items()})
        result[f"{shots}-shot_example"] = texts[0]
    return result


def domain_scores(model, tokenizer, task: Task, items: list, prompts: list[str], texts: list[str]) -> dict:
    """Accuracy (unparseable outputs count as wrong), parse rate, accuracy over parsed outputs, and the
    checks the task names: calibration and abstention (labels), rationale correctness (numbers)."""
    abstain_as = "maybe" if "abstention" in task.checks else None
    answers = [parse_answer(text, task.answer_kind, task.labels, abstain_as) for text in texts]
    correct = [answer_matches(a, item.reference, task.answer_kind) for a, item in zip(answers, items, strict=True)]
    parsed = sum(a is not None for a in answers)
    out = {"": sum(correct) / len(items), "_items": [int(c) for c in correct], "_parse_rate": parsed / len(items),
           "_unparsed": len(items) - parsed, "_acc_parsed": sum(correct) / parsed if parsed else float("nan")}
    if "calibration" in task.checks:
        scored = [(label_probabilities(model, tokenizer, prompt, text, task.labels), answer, item.reference)
                  for prompt, text, answer, item in zip(prompts, texts, answers, items, strict=True) if answer is not None]
        scored = [row for row in scored if row[0] is not None]  # an abstention phrase states no label to score
        calib = calibration([p for p, _, _ in scored], [a for _, a, _ in scored], [g for _, _, g in scored], task.labels)
        out.update({f"_{key}": value for key, value in calib.items()})
    if "abstention" in task.checks:
        out.update({f"_{key}": value for key, value in abstention(answers, [item.reference for item in items]).items()})
    if "rationale" in task.checks:
        out.update({f"_{key}": value for key, value in rationale_metrics(texts, [item.reference for item in items]).items()})
    return out


def refusal_task(model, tokenizer, task: Task, config: EvalSuiteConfig) -> dict:
    """Greedy answers to the refusal prompts, scored by `kdlm.evaluate.domain.is_refusal`."""
    items = task.items[: config.limit]
    texts = generate_texts(model, tokenizer, [item.prompt for item in items], seed=0, temperature=0.0,
                           max_new_tokens=min(96, config.answer_max_new_tokens), max_prompt_tokens=config.max_prompt_tokens,
                           batch_size=config.batch_size, bf16=config.bf16, label=task.name)
    return {**refusal_metrics(texts, [str(item.reference) for item in items]), "items": len(items), "example": texts[0]}


class Fidelity:
    """The teacher's answers to held-out prompts and its logits on them, computed once for all models."""

    def __init__(self, teacher, tokenizer, config: EvalSuiteConfig):
        prompts = load_task("selfinst")[0].items[-config.fidelity_prompts :]
        records = [{"messages": [{"role": "user", "content": item.prompt}]} for item in prompts]
        answered = answer_prompts(
            teacher, tokenizer, records, teacher_name=config.teacher, max_new_tokens=config.fidelity_max_new_tokens,
            temperature=0.7, top_p=0.9, seed=0, bf16=config.bf16, batch_size=config.batch_size,
        )
        self.tokenizer = tokenizer
        self.records = answered
        self.max_length = config.max_prompt_tokens + config.fidelity_max_new_tokens + 8
        self.examples = encode_records(tokenizer, answered, max_length=self.max_length)
        self.batch_size = config.batch_size
        self.vocab_size = teacher.config.vocab_size
        self.teacher_logits = target_logits(teacher, self.examples, batch_size=self.batch_size, pad_token_id=tokenizer.pad_token_id, vocab_size=self.vocab_size)
        self.labels = []
        for start in range(0, len(self.examples), self.batch_size):
            labels = collate(self.examples[start : start + self.batch_size], tokenizer.pad_token_id)["labels"][:, 1:]
            self.labels.append(labels[labels != -100])

    def __call__(self, model, tokenizer) -> dict:
        """Bits per byte for any tokenizer; KL, top-1 and ECE for a student with the teacher's tokenizer, and
        top-1 agreement on the 1:1-aligned positions (kdlm.evaluate.xvocab) for one with another tokenizer."""
        result = answer_bits_per_byte(model, tokenizer, self.records, batch_size=self.batch_size)
        result["prompts"] = len(self.records)
        try:
            vocab = check_vocab_compatible(self.tokenizer, tokenizer, self.vocab_size, model.config.vocab_size)
        except KdlmError as exc:  # token positions do not correspond: KL and ECE are undefined
            result["token_metrics_skipped"] = f"another tokenizer than the teacher's ({exc})"
            result.update(self.aligned(model, tokenizer))
            return result
        student = target_logits(model, self.examples, batch_size=self.batch_size, pad_token_id=self.tokenizer.pad_token_id, vocab_size=vocab)
        result.update(token_fidelity(student, [t[:, :vocab] for t in self.teacher_logits], self.labels))
        return result

    def aligned(self, model, tokenizer) -> dict:
        """Top-1 agreement on aligned positions, or why it could not be computed (``aligned_skipped``)."""
        if len(self.examples) != len(self.records):
            return {"aligned_skipped": "some held-out answer has no target token within the length limit"}
        try:
            return aligned_top1(model, tokenizer, self.tokenizer, self.records,
                                per_example(self.teacher_logits, self.examples, self.batch_size),
                                max_length=self.max_length, batch_size=self.batch_size)
        except KdlmError as exc:  # e.g. a slow tokenizer (no offsets), or a template that hides the answer
            return {"aligned_skipped": str(exc)}


def score_task(model, tokenizer, task: Task, config: EvalSuiteConfig) -> dict:
    """The task's own scorer: ROUGE-L, accuracy, refusal or perplexity."""
    if task.kind == "rouge":
        return rouge_task(model, tokenizer, task, config)
    if task.kind == "accuracy":
        return accuracy_task(model, tokenizer, task, config)
    if task.kind == "refusal":
        return refusal_task(model, tokenizer, task, config)
    return {"perplexity": text_perplexity(model, tokenizer, task.text, max_tokens=config.perplexity_max_tokens)}


def _seed_scorer(model, tokenizer, config: EvalSuiteConfig):
    """score(task, seed): the task's scorer with `seeds` = [seed] (ROUGE-L samples with the perturbation's seed)."""
    return lambda task, seed: score_task(model, tokenizer, task, config.model_copy(update={"seeds": [seed]}))


def lm_eval_task(model, tokenizer, spec: str, config: EvalSuiteConfig) -> dict:
    """`lm-eval:TASK`: an lm-evaluation-harness task; our local ones (kdlm_*) run offline."""
    from kdlm.evaluate.lm_eval_bridge import LOCAL_TASKS, run_lm_eval, write_local_tasks

    task = spec[len("lm-eval:") :]
    include = write_local_tasks(Path(config.output_dir) / "lm_eval_tasks", [task]) if task in LOCAL_TASKS else None
    results = run_lm_eval(model, tokenizer, [task], include_path=include, limit=config.limit, batch_size=config.batch_size)
    return results.get(task, {})


def cost_task(model, tokenizer, folder: Path | None, config: EvalSuiteConfig) -> dict:
    info = describe_model(model, folder)
    result = {"parameters_m": info["parameters"] / 1e6}
    if "disk_bytes" in info:
        result["disk_mb"] = info["disk_bytes"] / 2**20
    result.update(speed(model, tokenizer, SPEED_PROMPTS, batch_size=min(8, config.batch_size), new_tokens=config.generation_tokens))
    if getattr(model, "kdlm_quantized", None):  # the folder holds fp32 weights; count the int8 ones in memory
        packed = quantized_bytes(model)
        result["disk_mb"] = packed / 2**20
        result["parameters_m"] = model.kdlm_parameters / 1e6
        result["peak_memory_mb"] += (packed - float_parameter_bytes(model)) / 2**20
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": SPEED_PROMPTS[0]}], add_generation_prompt=True, return_tensors="pt", return_dict=True).to(model.device)
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=config.generation_tokens, min_new_tokens=config.generation_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    result["latency_s"] = time.perf_counter() - started  # one prompt, batch 1, `generation_tokens` new tokens
    return result


def _settings_key(model_key: str, task: str, config: EvalSuiteConfig, quantize: str = "none") -> str:
    fields = config.model_dump(exclude={"tasks", "output_dir", "teacher_row", "batch_size", "perturb", "ood", "quantize"})
    if quantize != "none":  # only quantised results depend on it: fp32 ones stay cached across int8 runs
        fields["quantize"] = quantize
    if task == "fidelity":  # 2: top-1 agreement on aligned tokens for another tokenizer; older results lack it
        fields["fidelity_version"] = 2
    return fingerprint({"model": model_key, "task": task, **fields})


def evaluate_suite(models: list[str], config: EvalSuiteConfig) -> dict:
    """Evaluate each model (and the teacher) on every task; returns and writes the results."""
    if not models and not (config.teacher and config.teacher_row):
        raise KdlmError("nothing to evaluate: name at least one model folder")
    output_dir = Path(config.output_dir)
    store = ResultStore(output_dir)
    extra = ("fidelity", "cost")
    lm_eval_tasks = [spec for spec in config.tasks if spec.startswith("lm-eval:")]
    pairs = check_ood_pairs(config.ood)
    specs_wanted = [spec for spec in config.tasks if spec not in extra and spec not in lm_eval_tasks]
    tasks, perturbed = expand_tasks(specs_wanted + [name for pair in pairs for name in pair if name not in specs_wanted], config.perturb)
    specs = [resolve_model(spec) for spec in models]
    if config.quantize != "none":
        specs = [(f"{name}-{config.quantize}", spec) for name, spec in specs]
    if config.teacher and config.teacher_row:
        specs.insert(0, ("teacher", config.teacher))
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        raise KdlmError(f"two models have the same name ({names}); pass folders with different names")
    fidelity = None
    for name, spec in specs:
        model_key = _model_key(spec)
        quantize = config.quantize if name != "teacher" else "none"  # the teacher row stays the fp32 reference
        # int8 kernels take fp32 activations only: no bf16 autocast for a quantised model
        run_config = config.model_copy(update={"bf16": False}) if quantize != "none" else config
        todo = [t for t in [*(task.name for task in tasks), *(p.name for p in perturbed), *lm_eval_tasks, *(s for s in extra if s in config.tasks)]
                if store.get(name, t, _settings_key(model_key, t, config, quantize)) is None]
        if "fidelity" in todo and not config.teacher:
            todo.remove("fidelity")
        if not todo:
            console.print(f"{name}: all results cached in {store.path}")
            continue
        console.print(f"[bold]{name}[/] ({spec}): {', '.join(todo)}")
        model, tokenizer = load_model(spec)
        if quantize == "int8":
            model = quantize_int8(model)
        folder = Path(spec) if Path(spec).is_dir() else None
        for task in tasks:
            if task.name not in todo:
                continue
            started = time.perf_counter()
            value = score_task(model, tokenizer, task, run_config)
            value["seconds"] = time.perf_counter() - started
            store.put(name, task.name, _settings_key(model_key, task.name, config, quantize), value)
        for entry in perturbed:
            if entry.name in todo:
                started = time.perf_counter()
                value = run_perturbed(entry, config.seeds, _seed_scorer(model, tokenizer, run_config),
                                      config.perplexity_max_tokens * PERPLEXITY_CHARS_PER_TOKEN)
                value["seconds"] = time.perf_counter() - started
                store.put(name, entry.name, _settings_key(model_key, entry.name, config, quantize), value)
        for spec_name in lm_eval_tasks:
            if spec_name in todo:
                store.put(name, spec_name, _settings_key(model_key, spec_name, config, quantize), lm_eval_task(model, tokenizer, spec_name, run_config))
        if "fidelity" in todo:
            if fidelity is None:
                same = spec == config.teacher and not getattr(model, "kdlm_quantized", None)  # an int8 copy is no reference
                teacher, teacher_tokenizer = (model, tokenizer) if same else load_model(config.teacher)
                fidelity = Fidelity(teacher, teacher_tokenizer, config)
                del teacher
            value = fidelity(model, tokenizer)
            if "token_metrics_skipped" in value:
                aligned = ("top-1 agreement on 1:1-aligned positions" if "aligned_skipped" not in value
                           else f"no top-1 agreement ({value['aligned_skipped']})")
                console.print(f"{name}: bits per byte and {aligned}; KL and ECE skipped: {value['token_metrics_skipped']}")
            store.put(name, "fidelity", _settings_key(model_key, "fidelity", config, quantize), value)
        if "cost" in todo:
            store.put(name, "cost", _settings_key(model_key, "cost", config, quantize), cost_task(model, tokenizer, folder, run_config))
        del model
    results = {name: store.data["models"].get(name, {}) for name in names}
    add_ratios(results, "teacher" if config.teacher and config.teacher_row else None)
    rows = summary_rows({name: {t: v for t, v in result.items() if "@" not in t} for name, result in results.items()})
    robust = robustness_rows(results, "teacher" if config.teacher and config.teacher_row else None)
    ood = ood_rows(results, pairs)
    report = {"models": results, "rows": rows, "robustness": robust, "ood": ood, "settings": config.model_dump()}
    (output_dir / "eval.json").write_text(json.dumps(report, indent=1, default=float))
    text = markdown(rows, config) + ("\n\n" + robustness_markdown(robust, ood) if robust or ood else "")
    (output_dir / "eval.md").write_text(text + "\n")
    print(text)
    return report


def add_ratios(results: dict, teacher: str | None) -> None:
    """Speed-up and compression of each model over the teacher, from the cost results."""
    base = results.get(teacher, {}).get("cost") if teacher else None
    if not base:
        return
    for result in results.values():
        cost = result.get("cost")
        if cost:
            cost["speedup_generate"] = cost["generate_tokens_per_s"] / base["generate_tokens_per_s"]
            cost["speedup_forward"] = cost["forward_tokens_per_s"] / base["forward_tokens_per_s"]
            cost["compression"] = base["parameters_m"] / cost["parameters_m"]


def summary_rows(results: dict) -> list[dict]:
    """One flat row per model: column title -> value."""
    rows = []
    mixed = any("top1_agreement_aligned" in result.get("fidelity", {}) for result in results.values())
    for name, result in results.items():
        row: dict = {"model": name}
        for task, value in result.items():
            if not isinstance(value, dict):
                continue
            if "rouge_l" in value:
                row[f"{task} ROUGE-L"] = (value["rouge_l"], value["rouge_l_std"])
            if task.startswith("lm-eval:") and "acc,none" in value:
                row[f"{task} acc"] = value["acc,none"]
            if "perplexity" in value:
                row[f"{task} ppl"] = value["perplexity"]
            for key, number in value.items():
                if key.endswith("-shot"):
                    row[f"{task} {key}"] = number
                shot, _, metric = key.partition("-shot_")
                if metric in DOMAIN_COLUMNS and shot.isdigit():
                    row[f"{task} {shot}-shot {DOMAIN_COLUMNS[metric]}"] = number
            for key in ("refusal_rate", "over_refusal"):
                if key in value:
                    row[f"{task} {DOMAIN_COLUMNS[key]}"] = value[key]
        row.update(fidelity_columns(result.get("fidelity", {}), mixed))
        cost = result.get("cost", {})
        for key, title in (("parameters_m", "params (M)"), ("disk_mb", "disk (MB)"), ("forward_tokens_per_s", "forward tok/s"),
                           ("generate_tokens_per_s", "generate tok/s"), ("latency_s", "latency (s)"), ("peak_memory_mb", "peak memory (MB)"),
                           ("speedup_generate", "speed-up"), ("compression", "compression")):
            if key in cost:
                row[title] = cost[key]
        rows.append(row)
    return rows


def fidelity_columns(fid: dict, mixed: bool) -> dict:
    """Fidelity columns of one row; `mixed`: some model has another tokenizer, so a "top-1 on" column says
    which positions each top-1 agreement counts."""
    row = {}
    for key, title in (("bits_per_byte", "bits/byte"), ("kl_to_teacher", "KL to teacher"), ("top1_agreement", "top-1 agreement"), ("ece", "ECE")):
        if key in fid:
            row[title] = fid[key]
        elif key == "top1_agreement" and "top1_agreement_aligned" in fid:
            row[title] = fid["top1_agreement_aligned"]
        elif "token_metrics_skipped" in fid:
            row[title] = "n/a (tokenizer)"
        if key == "top1_agreement" and mixed and "top-1 agreement" in row:
            row["top-1 on"] = (f"1:1-aligned ({fid['aligned_share']:.0%} of tokens)" if "top1_agreement_aligned" in fid
                               else "all tokens" if key in fid else "-")
    return row


TOP1_NOTE = ("top-1 agreement of a model with another tokenizer than the teacher's counts only the teacher's answer tokens "
             "that align 1:1 with one of its tokens by bytes (their share in \"top-1 on\"), comparing the bytes the two "
             "argmax tokens spell; KL and ECE need a shared vocabulary.")


DOMAIN_COLUMNS = {"parse_rate": "parsed", "ece": "ECE", "abstention_rate": "abstain", "maybe_recall": "maybe recall",
                  "rationale_correct": "rationale ok", "refusal_rate": "refusal", "over_refusal": "over-refusal"}


def _format(title: str, value) -> str:
    if isinstance(value, (tuple, list)):
        return f"{value[0]:.2f} ± {value[1]:.2f}"
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if title.endswith("ECE"):
        return f"{value:.3f}"
    if "shot" in title or title == "top-1 agreement" or title.endswith((" acc", "refusal")):
        return f"{value:.1%}"
    if title in ("speed-up", "compression"):
        return f"{value:.2f}x"
    if title in ("KL to teacher", "ECE", "latency (s)", "bits/byte"):
        return f"{value:.3f}"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def markdown(rows: list[dict], config: EvalSuiteConfig | None = None) -> str:
    """A Markdown table of `summary_rows` (a column per metric seen in any row)."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format(c, row.get(c)) for c in columns) + " |")
    if config is not None:
        lines += ["", f"ROUGE-L: sampling at T={config.temperature}, top-p {config.top_p}, seeds {config.seeds} (mean ± std over seeds), "
                  f"{config.max_new_tokens} new tokens; accuracy: greedy, exact match after answer extraction; limit {config.limit}."]
    if any("top-1 on" in row for row in rows):
        lines += ["", TOP1_NOTE]
    return "\n".join(lines)
