"""Tiny real models and tokenizers for fast tests: a 2-layer Llama and a byte-level BPE with ChatML."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? paris is the capital of france.",
    "plants make food from light, water and air.",
    "two plus two is four. three times three is nine.",
    "write a short poem about the sea and the sky.",
    "water boils at one hundred degrees celsius.",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: 3 special tokens + 256 bytes.

    Built from a fixed vocabulary rather than trained, because the BPE trainer breaks ties
    differently in each process, and the 2-process tests need identical token ids on every rank.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    return fast


def tiny_llama(vocab_size: int, num_layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=2,
        pad_token_id=2,
        bos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def trained_tiny_teacher(num_layers: int = 4, steps: int = 40) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny Llama fitted for a few steps to the test corpus, so that its predictions are peaked
    (a random teacher is nearly uniform and gives a student almost nothing to learn)."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), num_layers=num_layers).train()
    text = " ".join(CORPUS)
    ids = torch.tensor([tokenizer(text)["input_ids"]] * 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer


def save_tiny_teacher(folder: Path, num_layers: int = 4) -> Path:
    """A trained tiny teacher as a HF folder (model + tokenizer with chat template)."""
    model, tokenizer = trained_tiny_teacher(num_layers)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_chat_jsonl(path: Path, count: int = 24) -> Path:
    """Prompt/response records built from the corpus (varied lengths)."""
    lines = []
    for i in range(count):
        prompt = f"{CORPUS[i % len(CORPUS)]} ({i})"
        response = " ".join(CORPUS[(i + k) % len(CORPUS)] for k in range(1 + i % 3))
        lines.append(json.dumps({"prompt": prompt, "response": response}))
    path.write_text("\n".join(lines) + "\n")
    return path


def scripted_model(tokenizer, answer: str):
    """A one-layer Llama that writes `answer` after any chat prompt: its blocks add nothing (o_proj and down_proj
    are zero), so the last hidden state is the current token's embedding, and an untied lm_head maps that
    token to the next one of the chain (generation prompt's last token -> answer -> end of text)."""
    from kdlm.evaluate.quality import chat_prompt_ids  # the generation prompt's last token

    model = tiny_llama(len(tokenizer), num_layers=1, seed=11)
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        head = torch.zeros_like(embeddings)
        chain = [chat_prompt_ids(tokenizer, "x")[-1], *tokenizer(answer, add_special_tokens=False)["input_ids"]]
        assert len(set(chain)) == len(chain), "each token of the answer once, none the prompt's last"
        for current, following in zip(chain, [*chain[1:], tokenizer.eos_token_id], strict=True):
            head[following] = 10 * embeddings[current] / embeddings[current].norm()
        model.lm_head = torch.nn.Linear(embeddings.shape[1], embeddings.shape[0], bias=False)
        model.lm_head.weight.copy_(head)
    return model.eval()


# A second tokenizer, unlike tiny_tokenizer() in every way the cross-tokenizer tests need: SentencePiece-style
# ("▁" for spaces, prepended to the text), byte fallback for what its alphabet lacks (capitals, accents, emoji),
# a few merges, other special tokens and a Zephyr-like chat template. Fixed vocabulary and merges, like
# tiny_tokenizer(), so that ids are the same in every process.
ZEPHYR = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SP_MERGES = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "s"), ("▁", "c"), ("▁", "w"), ("a", "t"),
             ("▁w", "at"), ("e", "r"), ("▁wat", "er"), ("o", "n"), ("▁", "o"), ("▁", "f"), ("▁", "s")]


def tiny_sp_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-like BPE with byte fallback: 6 special tokens + 256 bytes + 46 characters + 15 merges."""
    from tokenizers import decoders as dec

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    alphabet = list("▁abcdefghijklmnopqrstuvwxyz.,?!0123456789()+-*")
    vocab: dict[str, int] = {}
    for token in [*specials, *(f"<0x{b:02X}>" for b in range(256)), *alphabet, *(a + b for a, b in SP_MERGES)]:
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=SP_MERGES, unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = dec.Sequence([dec.Replace("▁", " "), dec.ByteFallback(), dec.Fuse(), dec.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.chat_template = ZEPHYR
    return fast
