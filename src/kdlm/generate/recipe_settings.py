"""The typed settings of the black-box recipes (`recipe:` of a `kdlm generate` config), one class per recipe.

`RecipeSettings` is their union, told apart by `recipe.name`: the config is validated as a whole when it is
read, and an error names the bad key (`recipe.rouge_threshold`, `recipe.colour: unknown key`). The recipes
themselves live in kdlm.recipes; this module holds only what they are configured with, so that the generate
config can name them without importing the recipes (which import the engine).

The sampling classes below give each recipe step its own defaults: overriding one field
(`recipe.generation.max_tokens=256`) keeps the step's other defaults instead of falling back to the engine's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kdlm.generate.sections import SamplingSection, TeacherSection

# Self-Instruct (bootstrap_instructions.py) rejects instructions about things a text model cannot see or make.
BLOCKED_WORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                 "draw", "plot", "go to")

# Our wording of each in-depth operation of Evol-Instruct (shared/METHODS.md §8.3).
DEPTH_OPERATIONS = {
    "constraints": "Add one more constraint or requirement to it.",
    "deepening": "If it asks about a particular issue, widen and deepen the inquiry.",
    "concretizing": "Replace general concepts in it with more specific ones.",
    "reasoning": "If a few simple thinking steps would solve it, rewrite it so that it explicitly asks for "
                 "reasoning in several steps.",
    "complicate_input": "Give it a more complex input that the task has to work with, such as a table, a piece of "
                        "code or a formula.",
}
OPERATIONS = (*DEPTH_OPERATIONS, "breadth")


# ---- sampling of each recipe step, with the published defaults ---------------------------------------

class Creative(SamplingSection):
    """Writing new instructions: Self-Instruct's temperature 0.7 and top_p 0.5 (presence_penalty 2 is not
    sent: the engine speaks the common subset of the API, and `kdlm serve` ignores penalties)."""

    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.5, gt=0, le=1)
    max_tokens: int = Field(1024, ge=1)


class Greedy(SamplingSection):
    """Labels, instances and judgements: temperature 0 (Self-Instruct's classification and instance steps)."""

    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(350, ge=1)


class Short(Greedy):
    """A one-word verdict (yes/no, equal/not equal)."""

    max_tokens: int = Field(8, ge=1)


class Answer(SamplingSection):
    """The teacher (or student) answering an instruction."""

    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)


class Referee(SamplingSection):
    """Lion's referee: temperature 0.2."""

    temperature: float = Field(0.2, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)


class Generation(Creative):
    """Self-Instruct's instruction writing: Creative, stopped after the last item the prompt asks for."""

    stop: list[str] | None = ["\n17.", "\n17 ."]  # the prompt asks for items 9 to 16


# ---- tasks of the chain-of-thought and in-context-learning recipes ------------------------------------

class TaskSpec(BaseModel):
    """Where a task's examples come from and how its answers are read."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="Name in reports (default: the file's folder or name).")
    source: str = Field(..., description="File path; for format=arith, `arith:COUNT:SEED` (synthetic problems).")
    format: Literal["qa", "gsm8k", "svamp", "pubmedqa", "legalbench", "arith"] = Field(
        "qa", description="qa: JSONL with question, answer (and optional rationale); the others: those data sets' files."
    )
    answer_type: Literal["number", "label"] = Field("number", description="How answers are parsed.")
    labels: list[str] | None = Field(None, description="answer_type=label: the label set (e.g. [yes, no, maybe]).")
    instruction: str | None = Field(None, description="A line that states the task: icl puts it before k-shot "
                                       "prompts, cot before each question (LegalBench rows hold only the facts).")
    limit: int | None = Field(None, ge=1, description="Use only the first N examples.")

    def display_name(self) -> str:
        if self.name:
            return self.name
        path = Path(self.source)
        return path.parent.name if self.format in ("legalbench", "gsm8k", "svamp", "pubmedqa") else path.stem


# ---- the recipes -------------------------------------------------------------------------------------

class SelfInstructSettings(BaseModel):
    """`recipe:` of Self-Instruct (arXiv 2212.10560): grow a pool of instructions from seed tasks."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["self_instruct"] = "self_instruct"

    seed_tasks: str = Field("../shared/data/self-instruct-seed/seed_tasks.jsonl",
                            description="JSONL of seed tasks: instruction, instances [{input, output}], is_classification.")
    num_instructions: int = Field(100, ge=1, description="Machine instructions to keep.")
    human_examples: int = Field(6, ge=0, description="Seed instructions shown per request.")
    machine_examples: int = Field(2, ge=0, description="Machine instructions shown per request (seeds fill in early on).")
    requests_per_round: int = Field(5, ge=1, description="Requests sent together; the pool grows after each round.")
    max_rounds: int = Field(100, ge=1, description="Stop even if fewer instructions were kept (a weak teacher).")
    classification_only: bool = Field(False, description="Ask for classification tasks only, from the classification "
                                      "seed tasks only (the paper's variant).")
    rouge_threshold: float = Field(0.7, gt=0, le=1, description="Keep an instruction when its max ROUGE-L is below this.")
    min_words: int = Field(4, ge=1)
    max_words: int = Field(150, ge=1)
    blocked_words: list[str] = Field(list(BLOCKED_WORDS))
    classify_examples: int = Field(8, ge=0, description="Labelled seed tasks in the classification prompt.")
    instance_examples: int = Field(2, ge=0, description="Seed tasks with their instances in the instance prompt.")
    instances_per_task: int = Field(5, ge=1)
    encoding: Literal["templates", "plain"] = Field("templates", description="templates: the reference's prompt "
                                                    "layouts, one drawn per instance; plain: instruction, blank line, input.")
    seed: int = Field(0, description="Seed of the example draws.")
    generation: Generation = Field(default_factory=Generation)
    classify: Short = Field(default_factory=Short)
    instances: Greedy = Field(default_factory=Greedy)


class EvolInstructSettings(BaseModel):
    """`recipe:` of Evol-Instruct (WizardLM, arXiv 2304.12244): rewrite instructions round by round."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["evol_instruct"] = "evol_instruct"

    rounds: int = Field(4, ge=1, description="Evolution rounds (WizardLM: 4).")
    operations: list[str] = Field(list(OPERATIONS), description=f"Drawn uniformly per instruction per round: {', '.join(OPERATIONS)}.")
    include_original: bool = Field(True, description="Also output the starting instructions with the teacher's answers.")
    sorry_max_words: int = Field(80, ge=1, description="An answer with 'sorry' shorter than this fails the evolution.")
    seed: int = Field(0, description="Seed of the operation draws.")
    evolve: Answer = Field(default_factory=Answer)
    answer: Answer = Field(default_factory=Answer)
    judge: Short = Field(default_factory=Short)

    @field_validator("operations")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in OPERATIONS]
        if unknown or not value:
            raise ValueError(f"unknown operations {unknown}; choose from {', '.join(OPERATIONS)}")
        return value


class LionSettings(BaseModel):
    """`recipe:` of Lion (arXiv 2305.12870): imitation, discrimination and generation rounds."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["lion"] = "lion"

    student: TeacherSection = Field(description="The student model: backend, model, base_url (as for teacher).")
    rounds: int = Field(1, ge=1)
    gap: float = Field(1.0, description="Hard when the referee's averaged teacher score minus student score >= gap.")
    new_hard: int = Field(3000, ge=0, description="New instructions written from hard seeds per round (Lion: 3000).")
    new_easy: int = Field(3000, ge=0, description="New instructions written from easy seeds per round (Lion: 3000).")
    referee_retries: int = Field(2, ge=0, description="Re-asks of a review whose two scores cannot be read.")
    cache_pool_max: int | None = Field(None, ge=1, description="Keep only the newest entries of the Cache Pool.")
    rouge_threshold: float = Field(0.7, gt=0, le=1)
    train_config: str | None = Field(None, description="A `kdlm distill` config: train the student on each round's "
                                     "imitation data, and let the trained student answer the next discrimination.")
    train_overrides: list[str] = Field(default_factory=list, description="Overrides for train_config.")
    answer: Answer = Field(default_factory=Answer, description="Sampling of teacher and student answers.")
    referee: Referee = Field(default_factory=Referee)
    create: Answer = Field(default_factory=lambda: Answer(temperature=1.0, top_p=1.0, max_tokens=1024),
                           description="Sampling of new instructions; max_tokens is an upper bound on the per-seed limit.")
    create_tokens_per_word: int | None = Field(4, ge=1, description="max_tokens of a creation request: this many per "
                                               "word of its seed (Lion: 4); null: create.max_tokens.")
    seed: int = Field(0, description="Seed of the random draws of creation seeds.")


class CotSettings(BaseModel):
    """The `recipe:` section of a chain-of-thought generate config."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["cot"] = "cot"
    task: TaskSpec
    heldout: int = Field(0, ge=0, description="Questions held out for evaluation (the last ones of the task).")
    rationales: Literal["teacher", "dataset"] = Field("teacher", description="dataset: worked solutions, no teacher.")
    prompt: Literal["zero_shot", "few_shot"] = Field("zero_shot")
    demonstrations: int = Field(4, ge=1, description="few_shot: worked examples shown (taken out of training).")
    two_stage: Literal["always", "missing", "off"] = Field(
        "always", description="always: 'Let's think step by step', then a second call for every answer (Fine-tune-CoT); "
        "missing: ask for an Answer: line, and a second call only where a rationale states none; off: no second call.")
    answer_max_tokens: int = Field(32, ge=1, description="Token limit of the second-stage (answer) calls.")
    cue: str | None = Field(None, description="The request after each question, in place of the built-in cue (the "
                            "applications' domain forms: cite the evidence, tutor step by step, name the rule); it "
                            "should ask for a last line 'Answer: ...'.")
    filter: Literal["gold", "majority", "none"] = Field("gold")
    min_agreement: float = Field(0.5, ge=0, le=1, description="filter=majority: least share of samples agreeing.")
    rationalize: bool = Field(True, description="filter=gold: explain the gold answer where no sample is correct.")
    distinct: bool = Field(True, description="Keep each distinct rationale of a question once.")
    format: Literal["finetune_cot", "step_by_step", "mt_cot", "label_only"] = Field("finetune_cot")
    label_weight: float = Field(0.5, ge=0, description="step_by_step / mt_cot: weight of the label task (the reference's a).")
    rationale_weight: float = Field(0.5, ge=0, description="step_by_step / mt_cot: weight of the rationale task (1 - a).")
    task_means: bool = Field(True, description="step_by_step / mt_cot: records name their task, so that the loss is "
                             "each task's mean, weighted; false: weighted CE pooled over all target tokens.")
    label_prefix: str = Field("[label] ", description="step_by_step: prefix of the label task.")
    rationale_prefix: str = Field("[rationale] ", description="step_by_step: prefix of the rationale task.")
    seed: int = Field(0, description="Shuffles the task before the split.")

    @field_validator("two_stage", mode="before")
    @classmethod
    def _older_boolean(cls, value):
        """The older boolean: true asked only where no answer was stated."""
        return ("missing" if value else "off") if isinstance(value, bool) else value


class IclSettings(BaseModel):
    """The `recipe:` section of an in-context-learning distillation config."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["icl"] = "icl"
    setting: Literal["multitask", "meta"] = Field("multitask")
    tasks: list[TaskSpec] = Field(..., min_length=1, description="Training tasks (multitask: also the evaluation tasks).")
    eval_tasks: list[TaskSpec] = Field(default_factory=list, description="meta: unseen evaluation tasks.")
    shots: int = Field(4, ge=1, description="k: demonstrations per prompt.")
    queries: int | None = Field(None, ge=1, description="Training queries per task (default: all of its pool).")
    heldout: int = Field(8, ge=0, description="Held-out queries per evaluation task.")
    label_source: Literal["teacher", "gold"] = Field("teacher")
    lm_weight: float = Field(0.5, ge=0, description="Weight of the LM term on the demonstrations (0: off).")
    seed: int = 0

    @model_validator(mode="after")
    def _evaluation_tasks(self) -> IclSettings:
        if self.setting == "meta":
            if not self.eval_tasks:
                raise ValueError("recipe.setting=meta evaluates on unseen tasks: set recipe.eval_tasks")
            seen = {spec.source for spec in self.tasks}
            overlap = [spec.source for spec in self.eval_tasks if spec.source in seen]
            if overlap:
                raise ValueError(f"recipe.setting=meta: eval_tasks must be unseen in training, but {overlap} are also in tasks")
        elif self.eval_tasks:
            raise ValueError("recipe.eval_tasks is for setting=meta; multitask evaluates on held-out queries of its tasks")
        return self


RECIPES = ("self_instruct", "evol_instruct", "lion", "cot", "icl")

RecipeSettings = Annotated[
    SelfInstructSettings | EvolInstructSettings | LionSettings | CotSettings | IclSettings,
    Field(discriminator="name"),
]
