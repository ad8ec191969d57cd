"""Write a Llama-family HF model and its byte-level BPE tokenizer as one GGUF file (llama.cpp's format).

The layout follows what llama.cpp's converter (convert_hf_to_gguf.py) writes for a Llama model, so that
llama.cpp, Ollama and transformers' GGUF reader load the file:

- tensor names from the `gguf` package's own name map (`model.layers.0.self_attn.q_proj` -> `blk.0.attn_q`);
- the rows of q_proj and k_proj permuted from HF's rotary layout (the two halves of each head rotate
  together) back to the interleaved one llama.cpp rotates (pairs of neighbouring rows); see `permute_rows`;
- 1-D tensors (the RMSNorm weights) always float32, as llama.cpp keeps them;
- quantised types from the `gguf` package's pure-Python quantisers. Those cover the block types (Q8_0,
  Q4_0, Q5_0, ...) but not the K-quants (Q4_K_M and friends), which need llama.cpp's C `llama-quantize`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdlm.errors import KdlmError

# Model types whose HF layout is Llama's: the same tensors, RMSNorm, SwiGLU MLP and rotary attention.
LLAMA_FAMILY = {"llama"}
# llama.cpp token types (its SentencePiece-style enum): 1 normal, 3 control (special), 4 user-defined, 5 unused.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# Llama 3's split regex, as its tokenizer.json states it; llama.cpp calls this pre-tokenizer `llama-bpe`.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Quant:
    """One `--quant` choice: the type of the 2-D weights, of the embedding/output matrices, and the file type."""

    weights: str
    embeddings: str
    file_type: str


# The embedding matrix (also the output head when tied) is kept at 8 bits under q4_0: it sets every logit,
# and llama.cpp's quantiser likewise keeps the output matrix at higher precision (Q6_K) in its 4-bit types.
QUANTS: dict[str, Quant] = {
    "f16": Quant("F16", "F16", "MOSTLY_F16"),
    "q8_0": Quant("Q8_0", "Q8_0", "MOSTLY_Q8_0"),
    "q4_0": Quant("Q4_0", "Q8_0", "MOSTLY_Q4_0"),
}
NEEDS_LLAMA_CPP = {"q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q3_k_m", "q2_k", "iq4_nl", "iq4_xs"}


def check_quant(quant: str) -> Quant:
    """The `Quant` for a `--quant` value, or a KdlmError that says what to use instead."""
    key = quant.lower()
    if key in QUANTS:
        return QUANTS[key]
    if key in NEEDS_LLAMA_CPP:
        raise KdlmError(
            f"--quant {quant}: K-quants need llama.cpp's C quantiser (the `gguf` Python package cannot write them); "
            f"export --quant f16, then run `llama-quantize MODEL-f16.gguf MODEL-{key}.gguf {quant.upper()}`, "
            f"or pick one of {', '.join(QUANTS)}"
        )
    raise KdlmError(f"--quant {quant!r} is not known; pick one of {', '.join(QUANTS)} (K-quants: see docs/export.md)")


def check_llama_family(config, folder: str) -> None:
    """Refuse, naming the architecture, any model the Llama tensor layout below does not describe."""
    if config.model_type not in LLAMA_FAMILY:
        architectures = ", ".join(getattr(config, "architectures", None) or []) or "?"
        raise KdlmError(
            f"{folder}: GGUF export knows Llama-family models (model_type llama); this one is "
            f"{config.model_type!r} ({architectures}). Nothing was written."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise KdlmError(f"{folder}: rope scaling {rope.get('rope_type')!r} is not exported to GGUF yet. Nothing was written.")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise KdlmError(f"{folder}: Llama with attention/MLP biases is not exported to GGUF yet. Nothing was written.")


def permute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """HF's rotary layout of q_proj/k_proj rows -> llama.cpp's.

    HF rotates row i of a head with row i + head_dim/2 (`rotate_half`); llama.cpp rotates rows 2i and 2i+1.
    Within each head, row j of the first half goes to 2j and row j of the second half to 2j+1.

    weight: (num_heads * head_dim, hidden_size); for k_proj, num_heads is the number of key/value heads.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hyperparameters(writer, config, file_type: str) -> None:
    """The `llama.*` keys llama.cpp reads to build the graph."""
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    if file_type != "MOSTLY_F16":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (`tokenizer.ggml.pre`), from tokenizer.json's."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (llama-vocab.cpp), not the tokenizer model's "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM's tokenizers: every digit its own token, then GPT-2's split
    if kinds[:1] == ["Split"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise KdlmError(
        f"GGUF export knows the byte-level pre-tokenizers of GPT-2, SmolLM and Llama 3; this tokenizer's is {kinds or 'none'}. "
        "Nothing was written."
    )


def tokenizer_metadata(writer, tokenizer, vocab_size: int) -> None:
    """The `tokenizer.*` keys: a byte-level BPE ("gpt2") vocabulary with merges, special ids and chat template.

    A BPE without merges (a bytes-only test vocabulary) gets token scores instead, since GGUF cannot hold an
    empty array; transformers reads such a file, llama.cpp does not (it requires `tokenizer.ggml.merges`).
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"].get("type") != "BPE" or "ByteLevel" not in json.dumps(backend.get("decoder")):
        raise KdlmError("GGUF export writes byte-level BPE tokenizers only (model 'gpt2'); this one is "
                        f"{backend['model'].get('type')} with decoder {(backend.get('decoder') or {}).get('type')}. Nothing was written.")
    pre = pre_tokenizer_name(backend.get("pre_tokenizer"))
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise KdlmError(f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embeddings. Nothing was written.")
    added = {index: token.special for index, token in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for index in range(vocab_size):
        if index in by_id:
            tokens.append(by_id[index])
            types.append(NORMAL if index not in added else CONTROL if added[index] else USER_DEFINED)
        else:  # embedding rows no token uses (vocabularies padded to a multiple of 64, say)
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in backend["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    else:  # GGUF has no empty arrays; with scores and no merges, readers derive the merges (here: none)
        writer.add_token_scores([0.0] * vocab_size)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        index = getattr(tokenizer, f"{name}_token_id")
        if index is not None:
            add(index)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id and len(probe) > 1)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def gguf_tensors(model, quant: Quant):
    """(GGUF name, array, GGML type name) for each weight, permuted and quantised as llama.cpp expects."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    num_kv_heads = config.num_key_value_heads or config.num_attention_heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd as the output head when `output` is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise KdlmError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}. Nothing was written.")
        array = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            array = permute_rows(array, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = permute_rows(array, num_kv_heads)
        if array.ndim == 1:
            kind = "F32"
        else:
            kind = quant.embeddings if name.startswith(("token_embd", "output.")) else quant.weights
            block = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, kind)][0]
            if array.shape[-1] % block:
                kind = "F16"  # rows not a whole number of blocks: llama.cpp's converter falls back the same way
        yield name, array, kind


def write_gguf(model, tokenizer, path: Path, quant: str) -> dict[str, int]:
    """Write `model` and `tokenizer` to `path` as GGUF; returns how many tensors of each type.

    The caller writes to a temporary name and renames it (see `kdlm.export.run.export_gguf`).
    """
    import gguf

    choice = check_quant(quant)
    check_llama_family(model.config, str(getattr(model.config, "_name_or_path", "model")))
    writer = gguf.GGUFWriter(str(path), "llama")
    try:
        writer.add_name(Path(str(model.config._name_or_path or "student")).name or "student")
        hyperparameters(writer, model.config, choice.file_type)
        tokenizer_metadata(writer, tokenizer, model.config.vocab_size)
        counts: dict[str, int] = {}
        for name, array, kind in gguf_tensors(model, choice):
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            if kind in ("F32", "F16"):
                writer.add_tensor(name, array.astype(np.float32 if kind == "F32" else np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            counts[kind] = counts.get(kind, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return counts
