"""`kdlm distill` with `loss.cross_tokenizer`: the settings it refuses, and its data (docs/cross-tokenizer.md)."""

from __future__ import annotations

from rich.console import Console

from kdlm.data import encode_records
from kdlm.errors import KdlmError
from kdlm.xtok.data import alignment_share, check_chat_template, encode_pairs


def check_cross_settings(config) -> None:
    """Refuse, before anything loads, what a cross-tokenizer run cannot do, each with its reason."""
    if config.loss.cross_tokenizer == "off":
        return
    if config.hints.enabled:
        raise KdlmError(
            "hint losses (hints.hidden_weight, hints.attention_weight) match the student's and the teacher's states "
            "position by position, and with loss.cross_tokenizer the two models' positions are different tokens: "
            "set the hint weights to 0"
        )
    if config.method.name not in ("offpolicy", "gkd") or (config.method.name == "gkd" and config.method.seq_kd):
        raise KdlmError(f"method.name={config.method.name} with loss.cross_tokenizer: of the on-policy methods only GKD on "
                        "student samples (method.seq_kd=false) runs across tokenizers; use method.name=gkd or offpolicy")
    if config.student.init != "model" or not config.student.model:
        raise KdlmError(
            f"loss.cross_tokenizer needs a student with its own tokenizer: set student.init=model and student.model "
            f"(a folder with the student's weights and tokenizer); student.init={config.student.init} builds the student "
            "from the teacher, with the teacher's tokenizer"
        )
    if config.teacher.signal == "topk" and config.teacher.cache_kind != "topk":
        raise KdlmError(f"teacher.cache_kind={config.teacher.cache_kind} with loss.cross_tokenizer: only top-k caches "
                        "are read across tokenizers; set teacher.cache_kind=topk")
    if config.teacher.signal == "topk" and config.loss.temperature != 1.0:
        raise KdlmError("loss.cross_tokenizer from a top-k cache takes the cached log-probs as they are: set loss.temperature=1")


def prepare_cross_data(config, train_records: list[dict], heldout_records: list[dict], teacher_tokenizer,
                       student_tokenizer) -> tuple[list[dict], list[dict]]:
    """The records of ``prepare_records``, each chat tokenised for both models and aligned (``encode_pairs``).

    Returns (train, heldout); the held-out examples are the student's alone (``encode_records``).
    """
    train = encode_pairs(student_tokenizer, teacher_tokenizer, train_records, max_length=config.data.max_length,
                         min_aligned=config.loss.cross_tokenizer_min_aligned)
    heldout = encode_records(student_tokenizer, heldout_records, max_length=config.data.max_length) if heldout_records else []
    Console().print(f"cross-tokenizer: {sum(len(e['groups']) for e in train)} aligned groups, "
          f"{alignment_share(train):.1%} of response bytes spelled alike by both tokenizers")
    return train, heldout


def load_student_tokenizer(config):
    """The student's own tokenizer, checked before any teacher answer is paid for: fast, with a chat template."""
    from kdlm.models import load_tokenizer

    tokenizer = load_tokenizer(config.student.model)
    check_chat_template(tokenizer, "student", config.student.model)
    if not getattr(tokenizer, "is_fast", False):
        raise KdlmError(f"the student tokenizer ({config.student.model}) is a slow tokenizer; cross-tokenizer alignment "
                        "reads the character offsets that only fast tokenizers give (save it with tokenizer.json)")
    return tokenizer


def teacher_view(examples: list[dict]) -> list[dict]:
    """The teacher's tokens of paired examples, as the teacher cache writes and checks them."""
    return [{"input_ids": e["teacher_input_ids"], "labels": e["teacher_labels"]} for e in examples]
