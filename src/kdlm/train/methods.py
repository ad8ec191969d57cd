"""The training methods by name: ``build_method`` turns a ``method:`` config into its object.

The methods live in their own modules (``onpolicy``: the base, GKD and ImitKD; ``distillm``; ``minillm``); this
factory sits above them all, so that no method module imports another one's subclass.
"""

from __future__ import annotations

from kdlm.config import LossConfig, MethodConfig
from kdlm.errors import KdlmError
from kdlm.train.distillm import DistiLLM
from kdlm.train.minillm import MiniLLM
from kdlm.train.onpolicy import GKD, ImitKD


def samples_student(config: MethodConfig) -> bool:
    """Whether a method can put the student's own samples in a batch that the logit loss trains on."""
    if config.name == "gkd":
        return config.lmbda > 0
    if config.name == "imitkd":
        return min(config.data_start, config.data_end) < 1
    return config.name == "distillm"  # its replay buffer holds student samples; MiniLLM has its own objective


def check_method_loss(config: MethodConfig, loss_config: LossConfig) -> None:
    """Refuse the loss weights an on-policy method cannot train with (a KdlmError naming the setting)."""
    if config.name == "offpolicy":
        return
    if config.name == "imitkd" and config.target == "argmax":  # plain ImitKD: CE on the teacher's argmax, no KD
        if loss_config.kd_weight != 0:
            raise KdlmError("method.target=argmax (plain ImitKD) trains cross-entropy on the teacher's most likely "
                            "tokens: set loss.kd_weight=0")
        return
    if loss_config.kd_weight == 0:
        raise KdlmError(f"method.name={config.name} distills from the teacher on generated answers; loss.kd_weight=0 turns "
                        "the teacher off: set loss.kd_weight > 0 (the configs use 1.0)")
    if loss_config.kd_weight < 1 and samples_student(config) and not loss_config.allow_onpolicy_ce:
        # The CE target of a student sample is the sample itself: the student is taught its own outputs, which
        # collapsed DistiLLM's training once its replay threshold rose (jongwooko/distillm#16); the reference
        # scripts run kd_ratio 1.0.
        raise KdlmError(
            f"method.name={config.name} with loss.kd_weight={loss_config.kd_weight} puts {1 - loss_config.kd_weight:g} x "
            "cross-entropy on the student's own samples, teaching it its own outputs (this collapsed training in "
            "jongwooko/distillm#16): set loss.kd_weight=1 (the shipped configs do), or loss.allow_onpolicy_ce=true "
            "to train it anyway"
        )


def build_method(config: MethodConfig, *, student, teacher, tokenizer, loss_config: LossConfig, max_steps: int,
                 seed: int, bf16: bool, vocab_size: int, batch_size: int, val_examples: list[dict] | None = None,
                 pt_examples: list[dict] | None = None, steps_per_epoch: int = 1):
    """The method object for ``config.name`` (None for offpolicy).

    Args:
        val_examples: distillm's held-out records (their answers give the validation cross-entropy).
        pt_examples: the tokenised ``method.pt_data`` corpus (plain text: every token a target), or None.
        steps_per_epoch: optimizer steps per pass over the training set (distillm's default evaluation interval).
    """
    if config.name == "offpolicy":
        return None
    if teacher is None:
        raise KdlmError(f"method.name={config.name} needs the live teacher (teacher.signal=online, no teacher.cache)")
    check_method_loss(config, loss_config)
    if config.pt_data and not pt_examples:
        raise KdlmError(f"method.pt_data={config.pt_data} gave no training text")
    common = {"student": student, "teacher": teacher, "tokenizer": tokenizer, "max_steps": max_steps, "seed": seed,
              "bf16": bf16, "vocab_size": vocab_size, "pt_examples": pt_examples}
    if config.name == "gkd":
        return GKD(config, **common)
    if config.name == "imitkd":
        return ImitKD(config, **common)
    if config.name == "distillm":
        if not val_examples:
            raise KdlmError("method.name=distillm needs validation examples (method.val_examples > 0)")
        return DistiLLM(config, val_examples=val_examples, loss_config=loss_config, pad_token_id=tokenizer.pad_token_id,
                        batch_size=batch_size, steps_per_epoch=steps_per_epoch, **common)
    return MiniLLM(config, **common)
