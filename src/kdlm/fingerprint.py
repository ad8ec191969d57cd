"""The one stable hash of a JSON value that kdlm keys its caches, results and checkpoints with.

A floor module (it imports nothing of kdlm): generate/, train/, teachers/, evaluate/ and bench/ all use it,
so that the same payload always gives the same key wherever it is made. Changing it would orphan every
answer cache, evaluation result, benchmark run and checkpoint written before; tests/test_fingerprint.py
pins known values.
"""

from __future__ import annotations

import hashlib
import json

__all__ = ["fingerprint"]


def fingerprint(payload: object, length: int = 16, *, ensure_ascii: bool = True) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``payload`` as sorted-key JSON: stable across runs.

    ``ensure_ascii=False`` hashes non-ASCII text as UTF-8 rather than as ``\\u`` escapes (the tokenizer
    fingerprint of the teacher cache was made that way, and keeps its values).
    """
    text = json.dumps(payload, sort_keys=True, ensure_ascii=ensure_ascii)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
