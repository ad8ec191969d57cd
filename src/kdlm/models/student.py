"""Build a student: drop teacher layers (DistilBERT, ShortGPT/Minitron depth pruning), start from a
smaller random config, or wrap a model in LoRA. Save it as a plain HF folder.

METHODS.md §4.4 describes the methods; the layer choice and the weights are kept apart so that the
choice can be logged, reviewed, and given explicitly in a config.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from kdlm.errors import KdlmError, os_error_behind

STRATEGIES = ("evenly", "influence")


def block_influence(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Score each decoder layer by how much it changes the hidden state ("Block Importance").

    The score of layer i is ``1 - cos(x_i, y_i)`` between the layer's input and output hidden
    states, averaged over the tokens where ``attention_mask`` is 1 (ShortGPT, arXiv 2403.03853;
    Minitron, arXiv 2407.14679). A layer that leaves its input unchanged scores 0.

    Hooks read the raw layer outputs: ``output_hidden_states`` would give the last layer's output
    after the final norm, which is not what the layer computed.

    Args:
        model: A causal LM whose decoder layers are an ``nn.ModuleList``.
        input_ids: (B, T) token ids of a calibration batch.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.

    Returns:
        (L,) float32 scores on the CPU, one per decoder layer.
    """
    _, layers = _decoder_layers(model)
    mask = attention_mask.bool()
    if not mask.any():
        raise KdlmError("block_influence got an attention_mask with no real token; give a non-empty batch.")
    scores = torch.zeros(len(layers), device="cpu")

    def score_layer(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cosine = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)  # (B, T)
            scores[index] = (1 - cosine)[mask].mean().cpu()

        return hook

    handles = [
        layer.register_forward_hook(score_layer(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            # The base model stops before lm_head: no (B, T, V) logits to allocate.
            model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return scores


def select_layers(
    num_teacher_layers: int,
    num_layers: int,
    strategy: str | list[int],
    *,
    influence: torch.Tensor | None = None,
    keep_first_last: bool = True,
) -> list[int]:
    """Choose which teacher layers a pruned student keeps.

    Args:
        num_teacher_layers: L, the number of teacher decoder layers.
        num_layers: How many layers the student keeps.
        strategy: ``"evenly"``: evenly spaced; with ``keep_first_last`` the first and last layers
            are kept, without it the DistilBERT choice {0, k, 2k, ...}. ``"influence"``: the layers
            with the highest :func:`block_influence`, plus the first and last with
            ``keep_first_last``. A list of indices: exactly those layers.
        influence: (L,) scores from :func:`block_influence`; needed for ``"influence"``.
        keep_first_last: Always keep layer 0 and layer L-1 (ShortGPT finds them the most important).

    Returns:
        The kept teacher layer indices, sorted.

    Raises:
        KdlmError: A count, strategy, index list or score tensor does not fit the teacher.
    """
    if isinstance(strategy, (list, tuple)):
        return _check_layer_list(list(strategy), num_teacher_layers, num_layers)
    if not 1 <= num_layers <= num_teacher_layers:
        raise KdlmError(
            f"num_layers must be between 1 and {num_teacher_layers} (the teacher's layers), got {num_layers}."
        )
    if keep_first_last and num_layers < 2 and num_teacher_layers > 1:
        raise KdlmError(
            "keep_first_last needs num_layers >= 2; raise num_layers or set keep_first_last to false."
        )

    if strategy == "evenly":
        if num_layers == 1:
            return [0]
        if keep_first_last:
            step = (num_teacher_layers - 1) / (num_layers - 1)
            return [int(i * step + 0.5) for i in range(num_layers)]
        return [i * num_teacher_layers // num_layers for i in range(num_layers)]

    if strategy == "influence":
        if influence is None or influence.shape != (num_teacher_layers,):
            raise KdlmError(
                f"strategy 'influence' needs one score per teacher layer ({num_teacher_layers}); "
                "compute them with kdlm.models.block_influence on a calibration batch."
            )
        kept = {0, num_teacher_layers - 1} if keep_first_last else set()
        # A stable sort keeps the lower index among equal scores, so the choice is reproducible.
        for index in torch.argsort(-influence.float(), stable=True).tolist():
            if len(kept) == num_layers:
                break
            kept.add(index)
        return sorted(kept)

    raise KdlmError(
        f"Unknown layer strategy {strategy!r}; use one of {', '.join(STRATEGIES)} or a list of layer indices."
    )


def build_pruned_student(teacher: PreTrainedModel, layer_ids: list[int]) -> PreTrainedModel:
    """Build a student with the teacher's architecture and a subset of its decoder layers.

    Embeddings, the kept layers (in order), the final norm and lm_head are copied from the teacher;
    tied embeddings stay tied. The student is a fresh model, so attention ``layer_idx`` values run
    0..n-1 and the KV cache of ``generate()`` works. Per-layer config lists (``layer_types`` and the
    like) are sliced, and ``config.kdlm_teacher_layers`` records which teacher layers were kept.

    Args:
        teacher: The model to prune; left unchanged, and no tensor is shared with it.
        layer_ids: Teacher layer indices to keep, e.g. from :func:`select_layers`.

    Returns:
        The student, in eval mode, with the teacher's dtype and attention implementation.
    """
    num_teacher_layers = teacher.config.num_hidden_layers
    layer_ids = _check_layer_list(list(layer_ids), num_teacher_layers, len(layer_ids))
    if getattr(teacher.config, "is_heterogeneous", False):
        raise KdlmError(
            "Layer pruning does not support configs with per_layer_config (heterogeneous layers); "
            "use build_random_student, or an explicit student folder."
        )
    prefix, _ = _decoder_layers(teacher)

    config = teacher.config.to_dict()
    config.pop("quantization_config", None)  # A GGUF teacher is dequantized; its student is a plain model.
    for key, value in config.items():
        if _is_per_layer(key, value, num_teacher_layers):
            config[key] = [value[i] for i in layer_ids]
    config["num_hidden_layers"] = len(layer_ids)
    config["kdlm_teacher_layers"] = layer_ids
    config = type(teacher.config).from_dict(config)

    new_index = {old: new for new, old in enumerate(layer_ids)}
    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    state_dict = {}
    for key, tensor in teacher.state_dict().items():
        match = layer_key.match(key)
        if match:
            if int(match[1]) not in new_index:
                continue
            key = f"{prefix}.{new_index[int(match[1])]}.{match[2]}"
        state_dict[key] = tensor.detach().clone()

    # from_pretrained with a state dict skips random init and ties lm_head to the embeddings.
    student = type(teacher).from_pretrained(
        None,
        config=config,
        state_dict=state_dict,
        dtype=teacher.dtype,
        attn_implementation=teacher.config._attn_implementation,
    )
    missing = set(student.state_dict()) - set(state_dict)
    if missing:
        raise RuntimeError(f"Pruned student has weights the teacher did not provide: {sorted(missing)[:5]}")
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()


def build_random_student(teacher_config: PretrainedConfig, **overrides: Any) -> PreTrainedModel:
    """Build a randomly initialised student from the teacher's config with some fields changed.

    The vocabulary stays the teacher's, so logit distillation needs no mapping. Seed with
    ``torch.manual_seed`` first for a reproducible init.

    Args:
        teacher_config: The teacher's config (it is not modified).
        **overrides: Config fields to change, e.g. ``num_hidden_layers=8, hidden_size=256``.
            ``head_dim`` follows ``hidden_size / num_attention_heads`` unless given, and per-layer
            lists (``layer_types``) are rebuilt by the config when the layer count changes.

    Returns:
        The student in train mode.
    """
    config = teacher_config.to_dict()
    for key in ("quantization_config", "kdlm_teacher_layers", "kdlm_width"):
        config.pop(key, None)
    unknown = sorted(key for key in overrides if key not in config)
    if unknown:
        raise KdlmError(
            f"Unknown student config field(s) {unknown} for model type {config.get('model_type')!r}."
        )

    num_teacher_layers = config.get("num_hidden_layers")
    if overrides.get("num_hidden_layers", num_teacher_layers) != num_teacher_layers:
        for key in [key for key, value in config.items() if _is_per_layer(key, value, num_teacher_layers)]:
            if key not in overrides:
                del config[key]
    # A head_dim that was derived from hidden_size / heads must follow new values of either.
    derived_head_dim = config.get("head_dim") is not None and config["head_dim"] == _head_dim(config)
    config.update(overrides)
    if derived_head_dim and "head_dim" not in overrides:
        config["head_dim"] = _head_dim(config)

    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise KdlmError(
            f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads}); "
            "set num_key_value_heads to one of its divisors."
        )
    try:
        student_config = type(teacher_config).from_dict(config)
    except (ValueError, TypeError) as err:
        raise KdlmError(f"Invalid student config {overrides}: {err}") from err
    return AutoModelForCausalLM.from_config(student_config).train()


def apply_lora(
    model: PreTrainedModel, r: int, alpha: int, dropout: float, target_modules: list[str] | None = None
):
    """Wrap a model in LoRA adapters (peft); only the adapters train.

    The model is modified in place. :func:`save_student` merges the adapters
    (``merge_and_unload``) and writes a plain HF folder.

    Args:
        model: The model to adapt.
        r: LoRA rank.
        alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        dropout: Dropout on the LoRA input.
        target_modules: Module names to adapt, e.g. ``["q_proj", "v_proj"]`` or ``["all-linear"]``;
            None takes peft's default for the architecture.

    Returns:
        A ``peft.PeftModel``.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, list) and target_modules == ["all-linear"]:
        target_modules = "all-linear"  # peft wants the string form.
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise KdlmError(f"Cannot apply LoRA with target_modules={target_modules}: {err}") from err


def describe_model(model: PreTrainedModel, folder: Path | None = None) -> dict[str, int]:
    """Count a model's parameters and, given its folder, its size on disk.

    Args:
        model: Any torch model (tied weights count once).
        folder: Where the model is saved; every file under it is counted.

    Returns:
        ``{"parameters", "trainable_parameters"}`` and ``"disk_bytes"`` when ``folder`` is given.
    """
    parameters = list(model.parameters())
    description = {
        "parameters": sum(p.numel() for p in parameters),
        "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
    }
    if folder is not None:
        description["disk_bytes"] = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    return description


def save_student(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path | str) -> Path:
    """Save a student and its tokenizer as an HF folder that ``from_pretrained`` loads.

    A LoRA model is merged into a copy first, so the saved folder is a plain model and the model
    in memory keeps its adapters.

    Returns:
        The folder.
    """
    from peft import PeftModel

    folder = Path(folder)
    if isinstance(model, PeftModel):
        model = copy.deepcopy(model).merge_and_unload()
    try:
        model.save_pretrained(folder)
    except Exception as exc:  # a full disk inside safetensors: an OSError that names the folder
        if isinstance(exc, OSError) or (error := os_error_behind(exc, folder)) is None:
            raise
        raise error from None
    tokenizer.save_pretrained(folder)
    return folder


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the ``nn.ModuleList`` of decoder layers and its state-dict prefix (``model.layers`` in Llama)."""
    num_layers = model.config.num_hidden_layers
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == num_layers
        and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks")
    ]
    if len(found) != 1:
        raise KdlmError(
            f"Cannot find the decoder layers of {type(model).__name__} ({len(found)} candidates); "
            "layer pruning supports decoder-only models whose layers form one list."
        )
    return found[0]


def _head_dim(config: dict[str, Any]) -> int | None:
    hidden_size, heads = config.get("hidden_size"), config.get("num_attention_heads")
    return hidden_size // heads if hidden_size and heads else None


def _is_per_layer(key: str, value: Any, num_layers: int) -> bool:
    # layer_types, mlp_layer_types, no_rope_layers, ...: one entry per decoder layer.
    return isinstance(value, list) and len(value) == num_layers and "layer" in key


def _check_layer_list(layer_ids: list[int], num_teacher_layers: int, num_layers: int) -> list[int]:
    if not layer_ids:
        raise KdlmError("The list of layers to keep is empty; give at least one teacher layer index.")
    bad = [i for i in layer_ids if not isinstance(i, int) or not 0 <= i < num_teacher_layers]
    if bad:
        raise KdlmError(
            f"Layer indices {bad} are out of range; the teacher has layers 0..{num_teacher_layers - 1}."
        )
    if len(set(layer_ids)) != len(layer_ids):
        raise KdlmError(f"Layer indices {layer_ids} repeat a layer; each teacher layer can be kept once.")
    if len(layer_ids) != num_layers:
        raise KdlmError(
            f"The layer list {layer_ids} has {len(layer_ids)} layers but num_layers is {num_layers}."
        )
    return sorted(layer_ids)
