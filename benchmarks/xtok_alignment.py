"""Alignment statistics of the bundled teacher's tokenizer (SmolLM2, 49,152 tokens) against a 16k BPE student
tokenizer with its own pre-tokenisation (SentencePiece-style "▁" + byte fallback), trained here on WikiText-2.

Run: PYTHONPATH=src python benchmarks/xtok_alignment.py [NUM_RECORDS]
Prints the group shapes, the share of text spelled alike, the vocabulary overlap and the teacher-cache bytes
per student target token (docs/cross-tokenizer.md quotes its output).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kdlm.losses.cross_tokenizer import vocab_map
from kdlm.models import load_tokenizer
from kdlm.xtok.align import token_bytes
from kdlm.xtok.data import alignment_share, encode_pairs

DATA = Path("/work/shared/data")


def student_tokenizer(teacher) -> PreTrainedTokenizerFast:
    model = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    model.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    # The 256 byte pieces go in as special tokens: the trainer's initial_alphabet takes single characters only.
    trainer = trainers.BpeTrainer(vocab_size=16384, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)])
    model.train([str(DATA / "wikitext-2" / "valid.txt")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = teacher.chat_template  # ChatML: its markup tokens are the student's specials too
    return fast


def main(count: int) -> None:
    teacher = load_tokenizer(str(Path.home() / ".cache/kdlm/models/smollm2-135m-instruct"))  # kdlm's converted teacher
    student = student_tokenizer(teacher)
    rows = [json.loads(line) for line in (DATA / "gsm8k" / "train.jsonl").open()][:count]
    records = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
               for r in rows]
    examples = encode_pairs(student, teacher, records, max_length=1024, min_aligned=0)
    shapes = Counter()
    for example in examples:
        for s, t in example["groups"]:
            shapes["1:1" if len(s) == len(t) == 1 else "1:n" if len(s) == 1 else "n:1" if len(t) == 1 else "n:m"] += 1
    groups = sum(shapes.values())
    student_targets = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    teacher_targets = sum(sum(label != -100 for label in e["teacher_labels"][1:]) for e in examples)
    student_ids, _ = vocab_map(token_bytes(student), token_bytes(teacher), len(student), len(teacher))
    print(f"records {len(examples)}; student targets {student_targets}, teacher targets {teacher_targets}, groups {groups}")
    print("group shapes: " + ", ".join(f"{k} {v / groups:.1%}" for k, v in sorted(shapes.items())))
    print(f"text spelled alike: {alignment_share(examples):.2%}; vocabulary pairs spelled alike: {len(student_ids)} "
          f"({len(student_ids) / len(student):.1%} of the student's {len(student)}, {len(student_ids) / len(teacher):.1%} "
          f"of the teacher's {len(teacher)})")
    for k in (64,):
        per_teacher_token = 4 * k + 4  # uint16 ids + float16 log-probs + float32 tail (docs/teacher-cache.md)
        print(f"top-{k} cache in the teacher's tokens: {per_teacher_token} B per teacher token = "
              f"{per_teacher_token * teacher_targets / student_targets:.0f} B per student target; kept at group "
              f"first tokens only: {per_teacher_token * groups / student_targets:.0f} B per student target")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
