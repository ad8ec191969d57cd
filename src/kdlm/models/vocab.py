"""Check that a teacher and a student share a vocabulary before their logits are compared.

Same-family models may pad their embedding matrices to different sizes (49,152 vs 49,280;
Qwen2.5's 151,936 vs 152,064): that is not a tokenizer mismatch, and the logits are compared over
the shared rows. Anything else must fail loudly (METHODS.md §5, §12.2): comparing logits of
unrelated tokens trains silently towards nonsense.
"""

from __future__ import annotations

import warnings

from transformers import PreTrainedTokenizerBase

from kdlm.errors import KdlmError

# Text that exercises normalisation and pre-tokenisation, which get_vocab() does not show.
_PROBE_TEXT = "Hello, World!  naïve café 123 4.56\n\tdef f(x): return x**2  # 日本語 🙂"

_CROSS_TOKENIZER_HINT = (
    "Use a student that shares the teacher's tokenizer, or distill across tokenizers with "
    "loss.cross_tokenizer=uld or loss.cross_tokenizer=hybrid (docs/cross-tokenizer.md)."
)


def check_vocab_compatible(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_vocab_size: int,
    student_vocab_size: int,
) -> int:
    """Return the number of vocabulary rows teacher and student logits share.

    Args:
        teacher_tokenizer: The teacher's tokenizer.
        student_tokenizer: The student's tokenizer.
        teacher_vocab_size: Rows of the teacher's logits (``config.vocab_size``).
        student_vocab_size: Rows of the student's logits.

    Returns:
        ``min(teacher_vocab_size, student_vocab_size)``; a warning says so when the sizes differ.

    Raises:
        KdlmError: The tokenizers map some id to different tokens, use different special tokens,
            split text differently, or one has tokens beyond the other model's vocabulary.
    """
    shared = min(teacher_vocab_size, student_vocab_size)
    for side, tokenizer in (("teacher", teacher_tokenizer), ("student", student_tokenizer)):
        if len(tokenizer) > shared:
            raise KdlmError(
                f"The {side} tokenizer has {len(tokenizer)} tokens, more than the {shared} vocabulary rows both "
                f"models share (teacher {teacher_vocab_size}, student {student_vocab_size}). {_CROSS_TOKENIZER_HINT}"
            )

    teacher_tokens = _tokens_by_id(teacher_tokenizer)
    student_tokens = _tokens_by_id(student_tokenizer)
    if teacher_tokens != student_tokens:
        differing = sorted(set(teacher_tokens) ^ set(student_tokens)) or sorted(
            i for i in teacher_tokens if teacher_tokens[i] != student_tokens[i]
        )
        first = differing[0]
        raise KdlmError(
            f"Teacher and student tokenizers differ on {len(differing)} token id(s); the first is id {first}: "
            f"teacher {teacher_tokens.get(first)!r}, student {student_tokens.get(first)!r}. {_CROSS_TOKENIZER_HINT}"
        )

    # Padding is left out: kdlm sets a missing pad token to EOS, and padded positions are masked anyway.
    for name in ("bos_token", "eos_token", "unk_token"):
        teacher_special, student_special = getattr(teacher_tokenizer, name), getattr(student_tokenizer, name)
        if teacher_special != student_special:
            raise KdlmError(
                f"Teacher and student tokenizers disagree on {name}: teacher {teacher_special!r}, "
                f"student {student_special!r}. {_CROSS_TOKENIZER_HINT}"
            )

    teacher_ids = teacher_tokenizer.encode(_PROBE_TEXT, add_special_tokens=False)
    if teacher_ids != student_tokenizer.encode(_PROBE_TEXT, add_special_tokens=False):
        raise KdlmError(
            "Teacher and student tokenizers share their vocabulary but split the same text differently "
            f"(different normalisation or pre-tokenisation). {_CROSS_TOKENIZER_HINT}"
        )

    if teacher_vocab_size != student_vocab_size:
        warnings.warn(
            f"Teacher has {teacher_vocab_size} vocabulary rows and student {student_vocab_size}; the tokenizers "
            f"agree and the extra rows are padding that no token uses, so logits are compared over the first {shared}.",
            stacklevel=2,
        )
    return shared


def _tokens_by_id(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    return {index: token for token, index in tokenizer.get_vocab().items()}
