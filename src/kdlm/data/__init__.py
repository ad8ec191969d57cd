"""Records (chat or plain text) from files, Hugging Face datasets or builtin sets; tokenising and batching."""

from kdlm.data.records import is_prompt_only, load_records, normalise_record, split_heldout
from kdlm.data.tokenize import IGNORE_INDEX, collate, encode_chat, encode_records, encode_text

__all__ = [
    "IGNORE_INDEX",
    "collate",
    "encode_chat",
    "encode_records",
    "encode_text",
    "is_prompt_only",
    "load_records",
    "normalise_record",
    "split_heldout",
]
