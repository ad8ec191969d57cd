"""Give a student its own tokenizer: train a byte-level BPE, or bring one, and carry the teacher's
embeddings over to the new vocabulary.

A new token's embedding row is the mean of the teacher's rows for the teacher's tokenisation of the
same bytes (the initialisation of FOCUS/WECHSEL-style vocabulary transfer without the similarity
weighting; e.g. Gee et al. 2022, "Fast Vocabulary Transfer", arXiv 2208.09997). Byte-level tokens
are compared as bytes, not as decoded strings: a token that holds half of a UTF-8 character has no
string, but the teacher spells the same bytes with its own byte tokens.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from kdlm.errors import KdlmError

BPE_SPEC = re.compile(r"^bpe:(\d+)$")
NUM_BYTES = 256

# The student's own pre-tokenisation (cl100k-style): words with a leading non-letter, numbers in
# groups of up to three digits, punctuation runs, newlines apart from other spaces. It differs from
# SmolLM2's (single digits), so a student built with it splits text differently from its teacher.
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ByteLevel's printable stand-in character for each byte (GPT-2's table): printable bytes stand for
# themselves, the others take the characters from U+0100 on, in byte order.
_PRINTABLE = [*range(33, 127), *range(161, 173), *range(174, 256)]
_CHAR_OF_BYTE = {byte: chr(byte) for byte in _PRINTABLE} | {
    byte: chr(256 + n) for n, byte in enumerate(b for b in range(256) if b not in _PRINTABLE)
}
_BYTE_OF_CHAR = {char: byte for byte, char in _CHAR_OF_BYTE.items()}
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's special tokens (named ones and added ones flagged special), in id order."""
    added = {index: token.content for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    named = {tokenizer.convert_tokens_to_ids(token): token for token in tokenizer.all_special_tokens}
    return [token for _, token in sorted({**named, **added}.items())]


def train_bpe_tokenizer(
    teacher_tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], vocab_size: int
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with the teacher's special tokens, their roles and its chat template.

    Args:
        teacher_tokenizer: Gives the special tokens (ids 0..k-1 of the new vocabulary, in the
            teacher's order), bos/eos/pad/unk roles, a BOS the teacher prepends, and the chat template.
        texts: Training text.
        vocab_size: Tokens in the new vocabulary, special tokens and the 256 bytes included.

    Returns:
        The tokenizer; it has fewer tokens than asked (with a warning) when the text runs out of merges.

    Raises:
        KdlmError: ``vocab_size`` cannot hold the byte alphabet and the special tokens.
    """
    specials = special_tokens(teacher_tokenizer)
    minimum = NUM_BYTES + len(specials)
    if vocab_size < minimum:
        raise KdlmError(
            f"student.tokenizer=bpe:{vocab_size} is too small: a byte-level BPE needs the {NUM_BYTES} bytes and the "
            f"teacher's {len(specials)} special tokens, so at least bpe:{minimum}."
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() < vocab_size:
        warnings.warn(
            f"the tokenizer text ran out of merges at {tokenizer.get_vocab_size()} tokens (asked bpe:{vocab_size}); "
            "give more text in student.tokenizer_text for a larger vocabulary",
            stacklevel=2,
        )
    bos = teacher_tokenizer.bos_token
    if bos and teacher_tokenizer("a")["input_ids"][:1] == [teacher_tokenizer.bos_token_id]:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    roles = {name: getattr(teacher_tokenizer, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=teacher_tokenizer.model_max_length,
        **{name: token for name, token in roles.items() if token is not None},
    )
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in roles.values()]})
    fast.chat_template = teacher_tokenizer.chat_template
    return fast


def load_user_tokenizer(
    path: str, teacher_tokenizer: PreTrainedTokenizerBase, chat_template: str
) -> PreTrainedTokenizerBase:
    """Load a tokenizer a user brings (an HF folder or a tokenizer.json file).

    Args:
        chat_template: ``own`` keeps the tokenizer's template and refuses one without; ``teacher``
            copies the teacher's (the explicit fallback).
    """
    where = Path(path)
    if not where.exists():
        raise KdlmError(f"student.tokenizer: {path} does not exist; give a tokenizer folder, a tokenizer.json or bpe:N.")
    try:
        if where.is_file():
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(where))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError, TypeError) as err:
        raise KdlmError(f"student.tokenizer: cannot load a tokenizer from {path}: {err}") from None
    if chat_template == "teacher":
        tokenizer.chat_template = teacher_tokenizer.chat_template
    if not tokenizer.chat_template and teacher_tokenizer.chat_template:
        raise KdlmError(
            f"student.tokenizer: {path} has no chat template; add one to it, or set "
            "student.tokenizer_chat_template=teacher to copy the teacher's."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bytes:
    """The bytes a token stands for: byte-level pieces are mapped back byte by byte, ``<0xNN>``
    byte-fallback tokens give their byte, added tokens their text, SentencePiece's ``▁`` a space."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token_id in tokenizer.added_tokens_decoder:
        return tokenizer.added_tokens_decoder[token_id].content.encode()
    if (match := _BYTE_FALLBACK.match(token)) is not None:
        return bytes([int(match[1], 16)])
    if _is_byte_level(tokenizer) and all(char in _BYTE_OF_CHAR for char in token):
        return bytes(_BYTE_OF_CHAR[char] for char in token)
    return token.replace("\u2581", " ").encode()


def teacher_ids_for_bytes(teacher_tokenizer: PreTrainedTokenizerBase, pieces: list[bytes]) -> list[list[int]]:
    """The teacher's tokenisation of each byte string; bytes that are not valid UTF-8 use its byte
    tokens (an empty list when it has none for some byte)."""
    texts: dict[int, str] = {}
    for index, data in enumerate(pieces):
        try:
            texts[index] = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    encoded = teacher_tokenizer(list(texts.values()), add_special_tokens=False)["input_ids"] if texts else []
    ids = dict(zip(texts, encoded, strict=True))
    vocab = teacher_tokenizer.get_vocab()
    byte_level = _is_byte_level(teacher_tokenizer)
    return [list(ids[i]) if i in ids else _teacher_byte_tokens(vocab, byte_level, data) for i, data in enumerate(pieces)]


def init_embeddings_from_teacher(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
) -> int:
    """Resize the student to its tokenizer and set each row to the mean of the teacher's rows.

    Row i of the input embeddings (and of an untied lm_head) becomes the float64 mean of the
    teacher's rows for ``teacher_ids_for_bytes(token_bytes(student_tokenizer, i))``; a token the
    teacher cannot spell (a byte its vocabulary lacks) gets the mean of all teacher rows. Special
    token ids in ``config`` and ``generation_config`` follow the new tokenizer.

    Returns:
        The number of rows that fell back to the mean of all teacher rows.
    """
    size = len(student_tokenizer)
    pieces = teacher_ids_for_bytes(teacher_tokenizer, [token_bytes(student_tokenizer, i) for i in range(size)])
    teacher_input = teacher.get_input_embeddings().weight.detach()
    teacher_output = teacher.get_output_embeddings()
    tied = student.get_output_embeddings() is None or (
        student.get_output_embeddings().weight is student.get_input_embeddings().weight
    )
    resize_to_tokenizer(student, student_tokenizer)
    _mean_rows(student.get_input_embeddings().weight, teacher_input, pieces)
    if not tied:
        _mean_rows(student.get_output_embeddings().weight, teacher_output.weight.detach(), pieces)
    return sum(not ids or any(i >= teacher_input.shape[0] for i in ids) for ids in pieces)


def resize_to_tokenizer(student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the student one embedding row per token of ``tokenizer`` and its special token ids."""
    student.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name)
        setattr(student.config, name, value)
        if student.generation_config is not None:
            setattr(student.generation_config, name, value)


def _mean_rows(target: torch.Tensor, source: torch.Tensor, pieces: list[list[int]]) -> None:
    """target[row] = mean of source[pieces[row]] in float64 (one index_add, not a loop over rows)."""
    usable = [bool(ids) and max(ids) < source.shape[0] for ids in pieces]
    rows = torch.tensor([row for row, ids in enumerate(pieces) if usable[row] for _ in ids], dtype=torch.long)
    flat = torch.tensor([i for row, ids in enumerate(pieces) if usable[row] for i in ids], dtype=torch.long)
    source64 = source.double()
    sums = torch.zeros(len(pieces), source.shape[1], dtype=torch.float64).index_add_(0, rows, source64[flat])
    counts = torch.bincount(rows, minlength=len(pieces)).clamp(min=1).double()[:, None]
    means = torch.where(torch.tensor(usable)[:, None], sums / counts, source64.mean(0))
    with torch.no_grad():
        target.copy_(means.to(target.dtype))


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in str(backend.decoder)


def _teacher_byte_tokens(vocab: dict[str, int], byte_level: bool, data: bytes) -> list[int]:
    names = [_CHAR_OF_BYTE[byte] if byte_level else f"<0x{byte:02X}>" for byte in data]
    return [vocab[name] for name in names] if all(name in vocab for name in names) else []


def record_texts(records: list[dict]) -> list[str]:
    """Every piece of text in normalised records: plain text, and each chat message's content."""
    texts = []
    for record in records:
        if "text" in record:
            texts.append(record["text"])
        texts += [message["content"] for message in record.get("messages", []) if message.get("content")]
    return texts
