"""Typed run configuration: a YAML file plus dotted `key=value` overrides.

Every section is a pydantic model with `extra="forbid"`, so an unknown key or a bad value fails at
once with a message that names the key and the file. Field descriptions double as documentation
(`kdlm config show CONFIG` prints them, with each value and default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from kdlm.errors import KdlmError
from kdlm.losses.divergences import DIVERGENCES
from kdlm.precision import Bf16Setting

M = TypeVar("M", bound=BaseModel)
MASK = "**********"
SECRET_NAMES = {"api_key", "access_token", "token", "password", "secret"}  # settings that hold a secret


def is_secret(dotted_key: str) -> bool:
    return dotted_key.strip().rsplit(".", 1)[-1].lower() in SECRET_NAMES


def _masked(override: str) -> str:
    key, sep, _ = override.partition("=")
    return f"{key}={MASK}" if sep and is_secret(key) else override


class Aliased(BaseModel):
    """A config model whose `ALIASES` maps other names of a setting (another command's, another tool's) to the one
    kdlm uses; giving both is an error. `Section` and `kdlm eval`'s EvalSuiteConfig build on it."""

    ALIASES: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _accept_aliases(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls.ALIASES:
            return data
        data = dict(data)
        for alias, name in cls.ALIASES.items():
            if alias not in data:
                continue
            if name in data:
                raise ValueError(f"{alias} and {name} name the same setting; keep one ({name})")
            data[name] = data.pop(alias)
        return data


class Section(Aliased):
    """A config section: unknown keys are errors; `ALIASES` maps other tools' names to kdlm's (one name per setting)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(Section):
    ALIASES: ClassVar[dict[str, str]] = {"base_url": "api_base"}  # the name `kdlm generate` and openai use
    model: str = Field("bundled:smollm2-135m-instruct", description="bundled:NAME, a HF folder, a .gguf file or a hub id.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights dtype of the teacher.")
    signal: Literal["online", "topk"] = Field(
        "topk",
        description="online: run the teacher at every step (full vocabulary); topk: run it once over the "
        "training data and train from its top-k log-probs plus a tail bucket (no teacher in the loop).",
    )
    top_k: int = Field(64, ge=1, description="Entries kept per token when signal=topk and cache_kind=topk.")
    cache: str | None = Field(
        None,
        description="Folder of a teacher cache written by `kdlm cache-teacher`. When set, `kdlm distill` trains "
        "from it without loading the teacher's weights (the student must be student.init=model); unset, "
        "signal=topk keeps its cache in train.output_dir/teacher_cache.",
    )
    cache_kind: Literal["topk", "sampled"] = Field(
        "topk",
        description="Cached targets: topk (top_k log-probs plus the missing mass) or sampled (`samples` ids drawn "
        "from the teacher at T=1 with their counts: an unbiased estimate, arXiv 2503.16870).",
    )
    samples: int = Field(64, ge=1, le=65535, description="Draws per token when cache_kind=sampled.")
    api_base: str | None = Field(
        None,
        description="`kdlm cache-teacher` asks this OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1 of "
        "`kdlm serve`) for the top_k log-probs instead of loading the teacher; `model` must name the served model "
        "and give its tokenizer.",
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the server's API key, if any.")
    api_key: SecretStr | None = Field(
        None, description="The server's API key, when not in api_key_env. Never written out: errors and reports show "
        "it masked, and config.yaml leaves it out.",
    )

    @field_serializer("api_key")
    def _mask_api_key(self, value: SecretStr | None) -> str | None:
        return MASK if value is not None else None


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="Module names; None lets peft pick for the architecture.")


class WidthConfig(Section):
    """Width pruning (Minitron activation importance, docs/width-pruning.md); unset fields keep the teacher's."""

    hidden_size: int | None = Field(None, ge=1, description="Hidden (embedding) channels to keep; a multiple of the head size.")
    intermediate_size: int | None = Field(None, ge=1, description="MLP neurons to keep in each layer; a multiple of the head size.")
    num_attention_heads: int | None = Field(
        None, ge=1, description="Query heads to keep in each layer; a multiple of num_key_value_heads (every KV group keeps the same number)."
    )


class StudentConfig(Section):
    init: Literal["prune", "random", "model"] = Field(
        "prune", description="prune: keep a subset of the teacher's layers; random: teacher config, random weights; model: load `model`."
    )
    model: str | None = Field(None, description="Student to load when init=model.")
    num_layers: int | None = Field(None, ge=1, description="Layers to keep (prune) or build (random).")
    layers: Literal["evenly", "influence"] | list[int] = Field(
        "influence",
        description="Which teacher layers to keep: evenly spaced, the most influential (1 - cos of a block's "
        "input and output on calibration text), or an explicit list of indices.",
    )
    keep_first_last: bool = Field(True, description="Always keep the first and last teacher layers.")
    width: WidthConfig | None = Field(None, description="prune: also prune widths (heads, MLP neurons, hidden channels) by activation importance.")
    target_params: float | None = Field(
        None, gt=0, description="prune: the student's size, a fraction of the teacher's parameters (<= 1) or a count (> 1); "
        "hidden and MLP widths not set in student.width shrink to fit at num_layers (all teacher layers when unset).",
    )
    calibration_samples: int = Field(32, ge=1, description="Training records used to score layer influence and width importance.")
    lora: LoraConfig | None = Field(None, description="Train a LoRA adapter instead of all weights.")
    freeze_embeddings: bool = Field(
        False, description="Keep token embeddings (and a tied lm_head) fixed: a cheaper step, fewer trainable weights."
    )
    tokenizer: str | None = Field(
        None,
        description="The student's own tokenizer (docs/student-tokenizer.md). None: the teacher's. bpe:N: train a "
        "byte-level BPE of N tokens on tokenizer_text, with the teacher's special tokens and chat template, and "
        "initialise each new embedding row from the teacher's. A folder or tokenizer.json: use that tokenizer.",
    )
    tokenizer_text: list[str] = Field(
        default_factory=list,
        description="Text the bpe:N tokenizer trains on: sources as in data.train (.jsonl/.json/.txt, builtin:NAME, "
        "hf:NAME); empty: data.train.",
    )
    tokenizer_chat_template: Literal["own", "teacher"] = Field(
        "own", description="For a tokenizer folder: own keeps its chat template (and refuses one without); teacher copies the teacher's."
    )

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_spec(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("bpe:") and not value[4:].isdigit():
            raise ValueError(f"bpe:N needs a whole number of tokens, got {value!r} (e.g. bpe:16000)")
        return value


class DataConfig(Section):
    train: str = Field("builtin:quickstart", description="JSONL/JSON/TXT path, hf:NAME[:CONFIG], or builtin:NAME.")
    teacher_answers: bool = Field(
        True, description="Have the teacher answer prompt-only records once (cached on disk) and train on its answers."
    )
    samples_per_prompt: int = Field(1, ge=1, description="Teacher answers per prompt.")
    answer_max_new_tokens: int = Field(192, ge=1)
    answer_temperature: float = Field(0.7, ge=0, description="0 means greedy.")
    answer_top_p: float = Field(0.9, gt=0, le=1)
    heldout: int = Field(16, ge=0, description="Records held out for evaluation (by prompt, never trained on).")
    max_length: int = Field(384, ge=8, description="Tokens per sequence after the chat template.")
    seed: int | None = Field(
        None,
        description="Seed of the held-out split, the teacher's answers and sampled cache targets (default: train.seed); "
        "fix it to train several seeds on the same data (kdlm bench does).",
    )


class LossConfig(Section):
    divergence: str = Field("fkl", description=f"One of {', '.join(DIVERGENCES)}.")
    kd_weight: float = Field(1.0, ge=0, le=1, description="total = (1 - kd_weight) * CE + kd_weight * divergence.")
    temperature: float = Field(1.0, gt=0)
    scale_by_t2: bool = Field(False, description="Multiply the divergence by T^2 (Hinton et al.).")
    beta: float = Field(0.5, ge=0, le=1, description="JSD(beta): 0 is forward KL, 1 is reverse KL.")
    alpha: float = Field(0.1, ge=0, le=1, description="Skew KL / skew reverse KL mixing weight.")
    lam: float = Field(0.9, ge=0, le=1, description="Symmetric KL: (1 - lam) FKL + lam RKL.")
    akl_alpha: float = Field(0.5, gt=0, lt=1, description="AKL head/tail split of the teacher's mass.")
    fused: bool = Field(
        True,
        description="Compute the loss from hidden states chunk by chunk, never holding (tokens x vocabulary) "
        "logits; false: the dense path (full logits, then the loss).",
    )
    chunk_rows: int | None = Field(None, ge=1, description="Tokens per chunk of the fused loss (default: about 4 M logits per chunk, kdlm.losses.fused.DEFAULT_CHUNK_ELEMENTS).")
    cross_tokenizer: Literal["off", "uld", "hybrid"] = Field(
        "off",
        description="A student whose tokenizer differs from the teacher's (docs/cross-tokenizer.md): uld (sorted-probability "
        "Wasserstein, Boizard et al. 2024) or hybrid (loss.divergence on tokens both vocabularies spell alike, ULD on "
        "the rest); off refuses such a student.",
    )
    cross_tokenizer_min_aligned: float = Field(
        0.9, ge=0, le=1,
        description="Least share of response bytes whose tokens spell the same text for both models; below it a "
        "cross-tokenizer run is refused (0: proceed anyway).",
    )
    cross_tokenizer_top_k: int = Field(
        0, ge=0,
        description="ULD's sorted comparison over the k largest probabilities of each side plus one entry for the rest "
        "(about 20x faster than sorting 49k entries on a CPU; never above the exact value); 0: exact.",
    )
    allow_onpolicy_ce: bool = Field(
        False,
        description="Let an on-policy method (gkd, distillm, imitkd) train kd_weight < 1, i.e. cross-entropy on the "
        "student's own samples, which has collapsed training (jongwooko/distillm#16); refused unless true.",
    )

    @field_validator("divergence")
    @classmethod
    def _known_divergence(cls, value: str) -> str:
        if value not in DIVERGENCES:
            raise ValueError(f"unknown divergence {value!r}; choose one of {', '.join(DIVERGENCES)}")
        return value


class HintConfig(Section):
    """Hint-based terms (shared/METHODS.md): intermediate hidden states and MiniLM attention transfer."""

    hidden_weight: float = Field(0.0, ge=0, description="Weight of the hidden-state term (0: off).")
    hidden_loss: Literal["mse", "cosine"] = Field("mse", description="mse (mean over the teacher's width) or 1 - cosine.")
    layer_map: Literal["uniform", "last", "every", "kept", "pairs"] = Field(
        "uniform",
        description="Student->teacher block pairs: uniform (spread over depth, last to last), last (the last "
        "num_layers), every (student s -> teacher (s+1)*every-1), kept (a pruned student's source layers), "
        "pairs (hints.pairs).",
    )
    num_layers: int | None = Field(None, ge=1, description="layer_map=last: how many pairs (default 1).")
    every: int = Field(2, ge=1, description="layer_map=every: teacher layers per student layer.")
    pairs: list[tuple[int, int]] | None = Field(None, description="Explicit [[student, teacher], ...] pairs (counted as layer_index says); -1 is the last.")
    layer_index: Literal["block", "hf_hidden_states"] = Field(
        "block",
        description="How hints.pairs count: block (0 = the first decoder block's output) or hf_hidden_states (an index "
        "into HF's output_hidden_states, as DistillKit's layer_mapping: 0 = the embedding output, i = block i-1's output).",
    )
    hidden_reduce: Literal["mean", "sum"] = Field(
        "mean", description="Combine the hidden-state term's layer pairs by their mean (DistillKit) or their sum."
    )
    project: Literal["auto", "always", "never"] = Field(
        "auto", description="Learned linear projection of the student's states: where widths differ (auto), always, never."
    )
    projection_init: Literal["xavier", "identity", "zero"] = Field("xavier", description="identity needs equal widths.")
    attention_weight: float = Field(0.0, ge=0, description="Weight of MiniLM attention + value-relation transfer (0: off).")
    relation_heads: int | None = Field(
        None,
        ge=1,
        description="Attention transfer as MiniLMv2 (arXiv 2012.15828): query-query, key-key and value-value relations "
        "over this many relation heads, so head counts may differ; unset: MiniLM's attention distributions and value "
        "relations per head (equal head counts).",
    )
    attention_pairs: list[tuple[int, int]] | None = Field(None, description="Block pairs for attention transfer; default the last ([[-1, -1]]).")

    @property
    def enabled(self) -> bool:
        return self.hidden_weight > 0 or self.attention_weight > 0


class TrainConfig(Section):
    ALIASES: ClassVar[dict[str, str]] = {  # TRL / transformers TrainingArguments names
        "learning_rate": "lr",
        "gradient_accumulation_steps": "grad_accum",
        "per_device_train_batch_size": "batch_size",
        "save_steps": "save_every",
        "logging_steps": "log_every",
        "resume_from_checkpoint": "resume",
        "overwrite_output_dir": "overwrite",
    }

    output_dir: str = Field("runs/quickstart", description="Checkpoints, logs, the final student and reports.")
    max_steps: int = Field(60, ge=0, description="Optimizer steps.")
    max_minutes: float | None = Field(None, gt=0, description="Stop (and save) after this much training time.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch on each process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule floor, as a fraction of lr.")
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    bf16: Bf16Setting = Field(
        "auto",
        description="bf16 autocast for the teacher's answers, its cache and training (weights and optimizer stay fp32): "
        "auto picks it only where the hardware runs it fast (CUDA with bf16; CPUs with avx512_bf16 or AMX), "
        "fp32 elsewhere; true/false force it.",
    )
    seed: int = 0
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: off; always at the end, on Ctrl-C and SIGTERM).")
    save_every_minutes: float = Field(
        10, ge=0, description="Also checkpoint when this many minutes passed since the last save (0: off), so that "
        "a run killed without warning (SIGKILL, a lost node) loses at most this much.",
    )
    log_every: int = Field(1, ge=1)
    resume: bool = Field(
        False, description="Continue from the latest checkpoint in output_dir; refused if the config changed "
        "(except the keys in kdlm.train.checkpoint.MAY_CHANGE, such as max_steps).",
    )
    overwrite: bool = Field(
        False, description="Start over in an output_dir that holds checkpoints of an earlier run (deletes them and "
        "its logs); without it such a run is refused.",
    )
    length_grouped: bool = Field(
        True, description="Batch sequences of similar length together (less padding); order stays seeded."
    )
    report_to: Literal["auto", "none"] | list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        "auto", description="Trackers besides train_log.csv (Accelerate's): auto is TensorBoard, plus W&B and MLflow "
        "where installed and configured (WANDB_API_KEY or WANDB_MODE; MLFLOW_TRACKING_URI); none: the CSV only.",
    )
    push_to_hub: str | None = Field(
        None, description="Hub repository id (user/name) the trained student and its model card are pushed to at the "
        "end; a failed push (offline, no token) is reported after everything is saved locally.",
    )
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="How several processes share the student (docs/distill.md, kdlm.train.strategy): ddp "
        "replicates it; fsdp shards weights, gradients and AdamW state (FSDP2, one unit per decoder layer); "
        "deepspeed runs DeepSpeed ZeRO with train.deepspeed_config (needs pip install 'kdlm[deepspeed]').",
    )
    fsdp_offload: bool = Field(False, description="strategy=fsdp: keep the shards and optimizer state on the CPU.")
    deepspeed_config: str = Field(
        "configs/deepspeed/zero2.json", description="strategy=deepspeed: the DeepSpeed JSON config "
        "(configs/deepspeed/zero2.json shards gradients and optimizer state, zero3.json the weights too).",
    )

    @field_validator("strategy", mode="before")
    @classmethod
    def _known_strategy(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("ddp", "fsdp", "deepspeed"):
            raise ValueError(f"unknown strategy {value!r}: use ddp, fsdp or deepspeed (docs/distill.md)")
        return value


class EvalConfig(Section):
    ALIASES: ClassVar[dict[str, str]] = {"perplexity_max_tokens": "text_max_tokens"}  # the name `kdlm eval` uses
    enabled: bool = Field(True, description="Evaluate teacher, student before and after, and write the table.")
    models: list[str] = Field(default_factory=list, description="`kdlm eval`: models to compare with the teacher.")
    batch_size: int = Field(8, ge=1)
    generation_tokens: int = Field(32, ge=1, description="New tokens per prompt when timing generation.")
    text: str | None = Field(None, description="Plain-text file for perplexity, e.g. ../shared/data/wikitext-2/valid.txt.")
    text_max_tokens: int = Field(4096, ge=16)


class MethodConfig(Section):
    """Where the trained responses come from (shared/METHODS.md §3): the data, or the student's own samples."""

    ALIASES: ClassVar[dict[str, str]] = {"max_tokens": "max_new_tokens"}  # the name of `kdlm generate`'s sampling

    name: Literal["offpolicy", "gkd", "distillm", "minillm", "imitkd"] = Field(
        "offpolicy",
        description="offpolicy: the dataset's responses; gkd: student samples with probability lmbda (arXiv 2306.13649); "
        "distillm: adaptive replay of student samples (arXiv 2402.03898); minillm: sequence-level reverse KL by "
        "policy gradient (arXiv 2306.08543); imitkd: per-sequence mixture of data and student samples (arXiv 2009.07253). "
        "All but offpolicy need teacher.signal=online.",
    )
    max_new_tokens: int = Field(64, ge=1, description="Tokens a student (or teacher) sample may have.")
    rollout_backend: Literal["local", "vllm"] = Field(
        "local", description="Where student samples come from: local decodes with the module being trained; vllm "
        "runs a colocated vllm.LLM whose weights are reloaded from the student after each optimizer step (TRL's "
        "colocate mode; needs pip install vllm and a CUDA GPU; untested in kdlm's suite: kdlm.train.rollouts).",
    )
    vllm_gpu_memory: float = Field(0.3, gt=0, lt=1, description="rollout_backend=vllm: share of the GPU's memory vLLM may take.")
    temperature: float = Field(0.9, ge=0, description="Sampling temperature of the samples (0: greedy); the loss stays at loss.temperature.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="Sample the student among its k most likely tokens only (0: all); ImitKD's roll-ins use it.")
    lmbda: float = Field(0.5, ge=0, le=1, description="gkd: fraction of micro-batches whose responses are student samples.")
    seq_kd: bool = Field(False, description="gkd: the other micro-batches get teacher samples instead of the dataset's responses.")
    capacity: int = Field(1000, ge=1, description="distillm: replay buffer size (examples, first in first out).")
    init_threshold: float = Field(0.0, ge=0, le=1, description="distillm: starting probability of training on student outputs.")
    threshold_step: float = Field(0.1, gt=0, le=1, description="distillm: how much the threshold rises at a time.")
    loss_eps: float = Field(
        0.1, ge=0, description="distillm: the threshold rises when the validation cross-entropy reaches its reference plus this."
    )
    schedule: Literal["decreasing", "constant", "increasing"] = Field(
        "decreasing", description="distillm: fresh-sample probability s from the threshold φ: φ(1 - t/T), φ/2, or φ t/T."
    )
    eval_every: int | None = Field(
        None, ge=1, description="distillm: steps between validation cross-entropies (default: once per epoch, as distillm's "
        "--eval-interval -1); one is also measured before the first step."
    )
    val_examples: int = Field(
        16, ge=1, description="distillm: training examples set aside, whose answers the validation cross-entropy is measured on."
    )
    pt_data: str | None = Field(
        None,
        description="distillm, minillm: a separate text corpus (.txt/.jsonl path, hf:NAME, builtin:NAME) for the pre-training "
        "term L_PT (distillm's and LMOps's --lm-data-dir); unset: no L_PT.",
    )
    pt_weight: float = Field(1.0, ge=0, description="distillm, minillm: weight of L_PT (the reference scripts' --lm-coef).")
    pt_kd_ratio: float = Field(
        0.0, ge=0, le=1, description="minillm: L_PT = (1 - r) CE + r FKL(teacher || student) on the corpus (LMOps --kd-ratio; 0.5 in its scripts)."
    )
    teacher_mix: float = Field(0.2, ge=0, lt=1, description="minillm: samples come from teacher_mix * p + (1 - teacher_mix) * q.")
    gamma: float = Field(0.95, ge=0, le=1, description="minillm: discount of future rewards (LMOps 0.95).")
    current_reward: bool = Field(
        True, description="minillm: the return at t starts at r_t (LMOps); false: at r_{t+1} (the paper's single-step decomposition)."
    )
    length_norm: Literal["count", "discounted", "none"] = Field(
        "count", description="minillm: divide a return by its number of terms (LMOps, the paper), by the sum of their discounts (TRL), or not."
    )
    clip: float = Field(0.2, gt=0, description="minillm: the importance ratio is clipped to [1 - clip, 1 + clip] (PPO).")
    single_step: bool = Field(True, description="minillm: add the exact token-level reverse KL of each position (the regulariser).")
    whiten: bool = Field(True, description="minillm: whiten the advantages over each micro-batch's response tokens (LMOps).")
    ppo_epochs: int = Field(4, ge=1, description="minillm: optimizer steps trained on each collection of rollouts (LMOps --ppo-epochs 4).")
    reward_scaling: float = Field(0.5, gt=0, description="minillm: rewards are divided by this (LMOps --reward-scaling 0.5).")
    reward_clip: float | None = Field(100.0, gt=0, description="minillm: scaled rewards are clipped to ±this (LMOps --cliprange-reward 100).")
    data_start: float = Field(1.0, ge=0, le=1, description="imitkd: probability that a sequence comes from the data at the first step.")
    data_end: float = Field(0.0, ge=0, le=1, description="imitkd: the same at the last step (linear schedule).")
    data_schedule: Literal["linear", "exponential"] = Field(
        "linear", description="imitkd: data probability annealed linearly from data_start to data_end, or 200^(-t/T) (ImitKD's exponential)."
    )
    target: Literal["distribution", "argmax"] = Field(
        "distribution",
        description="imitkd: distribution: loss.divergence to the teacher's full next-token distribution; argmax: cross-entropy "
        "on the teacher's most likely next token on student roll-ins (plain ImitKD; needs loss.kd_weight=0).",
    )

    @field_validator("length_norm", mode="before")
    @classmethod
    def _length_norm_bool(cls, value: Any) -> Any:
        if value is True:  # configs written before the modes existed
            return "count"
        if value is False:
            return "none"
        return value


class RunConfig(Section):
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    hints: HintConfig = HintConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    method: MethodConfig = MethodConfig()

    @model_validator(mode="after")
    def _sharding_fits(self) -> RunConfig:
        strategy = self.train.strategy
        if strategy == "ddp":
            return self
        if self.student.lora is not None:
            raise ValueError(f"train.strategy={strategy} shards a whole student, and student.lora trains an adapter "
                             "whose few weights need no sharding: use train.strategy=ddp with LoRA, or drop student.lora")
        if self.method.name != "offpolicy":
            raise ValueError(f"method.name={self.method.name} samples from the student between steps, which a sharded "
                             f"student cannot do here: use train.strategy=ddp for on-policy methods")
        return self


def _parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, booleans, lists, null)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict, dotted_key: str, value: Any) -> None:
    """Set `tree[a][b][c] = value` for `a.b.c`, creating sections as needed."""
    keys = dotted_key.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise KdlmError(f"override {dotted_key}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _error_key(loc: tuple, tree: object) -> str:
    """The dotted key of an error location, without the tags pydantic puts in it for a discriminated union
    (`recipe.lion.rouge_threshold` is `recipe.rouge_threshold` in the file): a part of the location that is
    not a key of the input mapping there, but one of its values, is such a tag."""
    parts = []
    for part in loc:
        if isinstance(tree, dict) and part not in tree and part in tree.values():
            continue
        parts.append(str(part))
        if isinstance(tree, dict):
            tree = tree.get(part)
        elif isinstance(tree, list) and isinstance(part, int) and part < len(tree):
            tree = tree[part]
        else:
            tree = None
    return ".".join(parts) or "(top level)"


def _format_errors(error: ValidationError, source: str, tree: object = None) -> str:
    lines = [f"invalid config ({source}):"]
    for item in error.errors():
        key = _error_key(item["loc"], tree)
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif item["type"] == "value_error" and isinstance(item.get("input"), dict):  # a whole section: the message says it
            lines.append(f"  {key}: {item['msg'].removeprefix('Value error, ')}")
        else:
            got = MASK if is_secret(key) else repr(item.get("input"))
            lines.append(f"  {key}: {item['msg']} (got {got})")
    return "\n".join(lines)


def load_yaml_model(model: type[M], path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
                    what: str = "config", sections: str = "sections", example: str = "train.max_steps=50",
                    tree: dict | None = None) -> M:
    """Read a YAML file into the pydantic `model`, after `key=value` overrides (dotted keys, typed values).

    Shared by every kdlm config (distill, generate, bench). `what` names the file in the not-found error,
    `sections` lists its top-level keys for the not-a-mapping error, `example` shows a valid override;
    `tree` (the Python API) stands for the file's content.

    Raises:
        KdlmError: missing file, bad YAML, unknown key or bad value (the message names the key and the file).
    """
    source = "defaults" if tree is None else "settings given in Python"
    tree = dict(tree or {})
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise KdlmError(f"{what} file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise KdlmError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise KdlmError(f"{path}: the top level must be a mapping of {sections}")
    for item in overrides:
        if "=" not in item:
            raise KdlmError(f"override {item!r} must look like key=value, e.g. {example}")
        key, _, text = item.partition("=")
        apply_override(tree, key.strip(), text if is_secret(key) else _parse_value(text))  # a key is a string, even "0x1F"
    if overrides:  # shown in errors, secrets masked
        source += " with overrides " + " ".join(_masked(item) for item in overrides)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise KdlmError(_format_errors(exc, source, tree)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a `kdlm distill` YAML config (None: the defaults) and apply `key=value` overrides such as
    `train.max_steps=50`; errors name the key and the file (see `load_yaml_model`)."""
    return load_yaml_model(RunConfig, path, overrides, sections="sections (teacher, student, data, ...)")


def dump_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config next to a run's outputs, so that the run can be repeated; without the API key."""
    tree = config.model_dump(mode="json")
    tree["teacher"]["api_key"] = None  # a secret: the rerun reads teacher.api_key_env or takes it as an override
    tree["train"]["overwrite"] = False  # an action, not a setting: rerunning this file must not delete this run
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def describe_settings(model: BaseModel, prefix: str = "") -> list[dict[str, str]]:
    """Every setting of a config, depth first: dotted key, value, default, type and help (`kdlm config show`)."""
    rows = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            rows += describe_settings(value, key + ".")
            continue
        default = field.get_default(call_default_factory=True)
        kind = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
        shown = "**********" if name == "api_key" and value else value
        aliases = [alias for alias, target in getattr(type(model), "ALIASES", {}).items() if target == name]
        help_text = (field.description or "") + (f" (also read as {', '.join(aliases)})" if aliases else "")
        rows.append({"key": key, "value": repr(shown), "default": repr(default), "type": kind, "help": help_text.strip()})
    return rows


GENERATE_KEYS = {"prompts", "sampling", "limits", "recipe", "prices", "output", "cache"}
BENCH_KEYS = {"methods", "base", "method_overrides", "seeds", "shared_student", "shared_cache", "train_data", "curve_every"}


def config_kind(path: str | Path | None) -> str:
    """Which command a YAML config is for (distill, generate or bench), from its top-level keys."""
    if path is None or not Path(path).is_file():
        return "distill"  # the loader then reports a missing file itself
    text = Path(path).read_text()
    first = text.split("\n", 1)[0].split()  # shipped configs start with "# kdlm VERB FILE"
    if len(first) >= 3 and first[:2] == ["#", "kdlm"] and first[2] in ("distill", "generate", "bench"):
        return first[2]
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return "distill"
    keys = set(tree) if isinstance(tree, dict) else set()
    if keys & BENCH_KEYS:
        return "bench"
    if keys & GENERATE_KEYS and not keys & {"student", "loss", "train"}:
        return "generate"
    return "distill"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys: ``{"a": {"b": 1}, "c.d": 2}`` -> ``{"a.b": 1, "c.d": 2}``; lists are leaves."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
