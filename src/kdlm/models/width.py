"""Width pruning as in Minitron (arXiv 2407.14679): score attention heads, MLP neurons and embedding
(hidden) channels by their activations on calibration text, then slice a Llama-layout model down to
smaller widths. docs/width-pruning.md states every choice made here.

Importance, one forward pass of the unpruned model:
  - MLP neuron j of a layer: the input of ``down_proj`` (``act(gate) * up``), channel j;
  - attention head h: the L2 norm, per token, of head h's slice of the ``o_proj`` input;
  - hidden channel c: the output of every ``input_layernorm`` and ``post_attention_layernorm``,
    channel c, summed over those norms.
Each activation is aggregated as Minitron's best choice (and nvidia-modelopt's implementation):
the mean of ``|a|`` over the real tokens of each sequence, then the L2 norm over the sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from kdlm.errors import KdlmError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
MLP_STEP = 32  # student.target_params rounds MLP widths down to multiples of this
# Every parameter a prunable model may have, per decoder layer (q_norm/k_norm: Qwen3's per-head norms).
LAYER_PARAMETERS = {f"self_attn.{name}.{kind}" for name in ATTENTION for kind in ("weight", "bias")} | {
    f"mlp.{name}.{kind}" for name in MLP for kind in ("weight", "bias")
} | {f"{name}.weight" for name in NORMS} | {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}


@dataclass
class WidthImportance:
    """Scores from :func:`width_importance`; higher is more important.

    Attributes:
        hidden: (H,) one score per hidden (embedding) channel.
        heads: one (num_attention_heads,) tensor per decoder layer.
        neurons: one (intermediate_size,) tensor per decoder layer.
        norm_energy: per norm (2 per layer, then the final norm), (H,) the sum over real tokens of the
            norm's squared input, per channel; it sets how much a norm's statistics change when
            channels go (see :func:`prune_width`).
    """

    hidden: torch.Tensor
    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    norm_energy: list[torch.Tensor] = field(default_factory=list)


def check_prunable(model: PreTrainedModel) -> None:
    """Refuse a model whose layout width pruning does not know (the Llama layout; see the module doc).

    Raises:
        KdlmError: Naming the model type and what does not fit.
    """
    model_type = getattr(model.config, "model_type", type(model).__name__)
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    problem = None
    if not isinstance(layers, nn.ModuleList) or not hasattr(base, "embed_tokens") or not hasattr(base, "norm"):
        problem = "no model.layers / model.embed_tokens / model.norm"
    else:
        outer = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
        unknown = [
            name for name, _ in model.named_parameters(remove_duplicate=False)
            if name not in outer and not (name.startswith("model.layers.") and name.split(".", 3)[3] in LAYER_PARAMETERS)
        ]
        missing = [key for key in ("hidden_size", "intermediate_size", "num_attention_heads")
                   if not isinstance(getattr(model.config, key, None), int)]
        if unknown:
            problem = f"it has parameters width pruning cannot slice, e.g. {unknown[0]!r}"
        elif missing:
            problem = f"its config has no integer {missing[0]}"
        else:
            problem = _shape_problem(model) or _norm_problem([base.norm, *(getattr(layer, n) for layer in layers for n in NORMS)])
    if problem:
        raise KdlmError(
            f"student.width: cannot width-prune model type {model_type!r}: {problem}. Width pruning supports "
            "Llama-layout models (q/k/v/o_proj, gate/up/down_proj, RMSNorm); use depth pruning (student.num_layers) only."
        )


def _shape_problem(model: PreTrainedModel) -> str | None:
    config = model.config
    head_dim = head_dim_of(config)
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    hidden, inner = config.hidden_size, config.intermediate_size
    expected = {
        "q_proj": (config.num_attention_heads * head_dim, hidden), "k_proj": (num_kv_heads * head_dim, hidden),
        "v_proj": (num_kv_heads * head_dim, hidden), "o_proj": (hidden, config.num_attention_heads * head_dim),
        "gate_proj": (inner, hidden), "up_proj": (inner, hidden), "down_proj": (hidden, inner),
    }
    for i, layer in enumerate(model.model.layers):
        for name, shape in expected.items():
            module = getattr(layer.self_attn if name in ATTENTION else layer.mlp, name, None)
            if not isinstance(module, nn.Linear) or tuple(module.weight.shape) != shape:
                return f"layer {i}'s {name} is not a Linear of shape {shape}"
    return None


def _norm_problem(norms: list[nn.Module]) -> str | None:
    """Probe each norm: it must compute weight * x / rms(x), which slicing and rescaling keep exact."""
    generator = torch.Generator().manual_seed(0)
    for norm in norms:
        weight = getattr(norm, "weight", None)
        weight = weight.detach() if isinstance(weight, torch.Tensor) else weight
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            return f"{type(norm).__name__} is not an RMSNorm with one weight per channel"
        probe = 100 * torch.randn(3, weight.numel(), generator=generator)
        weight = weight.float().cpu()
        with torch.no_grad():
            got = norm(probe.to(norm.weight.device, norm.weight.dtype)).float().cpu()
        expected = weight.float() * probe / probe.pow(2).mean(-1, keepdim=True).sqrt()
        if not torch.allclose(got, expected, rtol=1e-2, atol=1e-3 * float(weight.abs().max()) + 1e-6):
            return f"{type(norm).__name__} does not compute weight * x / rms(x)"
    return None


def width_importance(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> WidthImportance:
    """Score heads, neurons and hidden channels on one calibration batch (Minitron's activation importance).

    Args:
        model: A Llama-layout causal LM (see :func:`check_prunable`).
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 for real tokens, 0 for padding; padding never counts.

    Returns:
        The scores, float32 on the CPU.
    """
    check_prunable(model)
    mask = attention_mask.bool()
    if not mask.any():
        raise KdlmError("width_importance got an attention_mask with no real token; give a non-empty batch.")
    config = model.config
    layers = model.model.layers
    num_heads = config.num_attention_heads
    hidden_norms: list[torch.Tensor] = []
    heads: list[torch.Tensor] = [torch.zeros(0)] * len(layers)
    neurons: list[torch.Tensor] = [torch.zeros(0)] * len(layers)
    norm_list = [getattr(layer, n) for layer in layers for n in NORMS] + [model.model.norm]
    energy: list[torch.Tensor] = [torch.zeros(0)] * len(norm_list)

    def on_norm(index: int):
        def hook(module, args, output):
            energy[index] = args[0].float()[mask].pow(2).sum(0).cpu()
            if index < len(norm_list) - 1:  # the final norm counts for its statistics, not for importance
                hidden_norms.append(aggregate(output, mask))
        return hook

    def on_o_proj(index: int):
        def hook(module, args, output):
            per_head = args[0].float().unflatten(-1, (num_heads, -1)).norm(dim=-1)  # (B, T, heads)
            heads[index] = aggregate(per_head, mask)
        return hook

    def on_down_proj(index: int):
        def hook(module, args, output):
            neurons[index] = aggregate(args[0], mask)
        return hook

    handles = [norm.register_forward_hook(on_norm(i)) for i, norm in enumerate(norm_list)]
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_hook(on_o_proj(i)))
        handles.append(layer.mlp.down_proj.register_forward_hook(on_down_proj(i)))
    try:
        with torch.no_grad():
            model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return WidthImportance(torch.stack(hidden_norms).sum(0), heads, neurons, energy)


def aggregate(activations: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Minitron's (batch: L2, sequence: mean) aggregation of |activations| over the real tokens.

    Args:
        activations: (B, T, C).
        mask: (B, T) bool, True for real tokens.

    Returns:
        (C,) float32 on the CPU.
    """
    weights = mask.float().unsqueeze(-1)  # (B, T, 1)
    counts = weights.sum(1).clamp(min=1)  # (B, 1); a sequence without tokens gives 0, not NaN
    per_sequence = (activations.float().abs() * weights).sum(1) / counts  # (B, C)
    return per_sequence.norm(dim=0).cpu()


def kept_indices(scores: torch.Tensor, keep: int) -> list[int]:
    """The ``keep`` highest-scoring indices, sorted; among equal scores the lower index wins."""
    order = torch.argsort(-scores.float(), stable=True)
    return sorted(order[:keep].tolist())


def kept_heads(scores: torch.Tensor, num_kv_heads: int, keep: int) -> list[int]:
    """Query heads to keep: ``keep / num_kv_heads`` from each KV group (GQA), the best of each group.

    Args:
        scores: (num_heads,) one layer's head scores; heads of group g are g*per_group .. (g+1)*per_group-1.
        num_kv_heads: Number of KV groups; every group is kept.
        keep: Query heads to keep in all (a multiple of ``num_kv_heads``).
    """
    per_group = scores.numel() // num_kv_heads
    keep_per_group = keep // num_kv_heads
    kept = []
    for group in range(num_kv_heads):
        best = kept_indices(scores[group * per_group : (group + 1) * per_group], keep_per_group)
        kept += [group * per_group + i for i in best]
    return kept


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def norm_scales(energy: list[torch.Tensor], hidden: list[int], num_hidden: int, mode: str) -> list[float]:
    """Per norm, the factor its weight is multiplied by after pruning to the channels ``hidden``.

    An RMSNorm divides by the root mean square over its channels. ``"calibrated"`` restores the teacher's
    statistic on average: sqrt((H / H') * E_kept / E_all), with E the calibration energy of the norm's input,
    so that a channel kept keeps its teacher scale; a pruned channel that carried no energy gives exactly
    sqrt(H / H'). ``"none"``: 1 (plain slicing, as Minitron).
    """
    if mode == "none":
        return [1.0] * len(energy)
    if mode != "calibrated":
        raise KdlmError(f"Unknown norm rescaling {mode!r}; use 'calibrated' or 'none'.")
    ratio = num_hidden / len(hidden)
    scales = []
    for per_channel in energy:
        total = float(per_channel.double().sum())
        kept = float(per_channel.double()[hidden].sum())
        scales.append(math.sqrt(ratio * kept / total) if total > 0 else math.sqrt(ratio))
    return scales


@dataclass
class Widths:
    """Target widths of a width-pruned student; None keeps the teacher's."""

    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None


def check_widths(config, widths: Widths) -> Widths:
    """Fill in the teacher's widths where none is given and refuse widths that cannot be built.

    Raises:
        KdlmError: Naming the ``student.width`` setting that is wrong.
    """
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    filled = Widths(
        widths.hidden_size or config.hidden_size,
        widths.intermediate_size or config.intermediate_size,
        widths.num_attention_heads or config.num_attention_heads,
    )
    for name in ("hidden_size", "intermediate_size", "num_attention_heads"):
        value, teacher_value = getattr(filled, name), getattr(config, name)
        if not 1 <= value <= teacher_value:
            raise KdlmError(f"student.width.{name} must be between 1 and the teacher's {teacher_value}, got {value}.")
    heads = filled.num_attention_heads
    if heads < num_kv_heads or heads % num_kv_heads:
        raise KdlmError(
            f"student.width.num_attention_heads ({heads}) must be a multiple of the teacher's {num_kv_heads} KV heads "
            f"(at least one query head per KV group), e.g. {max(num_kv_heads, heads // num_kv_heads * num_kv_heads)}."
        )
    if filled.hidden_size % heads:  # transformers' Llama-family configs refuse anything else
        raise KdlmError(
            f"student.width.hidden_size ({filled.hidden_size}) must be a multiple of num_attention_heads ({heads}), "
            f"e.g. {max(heads, filled.hidden_size // heads * heads)}."
        )
    return filled


def prune_width(
    model: PreTrainedModel, importance: WidthImportance, widths: Widths, *, rescale_norms: str = "calibrated"
) -> PreTrainedModel:
    """Build a student with the model's layers at smaller widths, keeping the most important units.

    Every layer keeps the same number of MLP neurons and query heads (its own best ones); every KV group
    keeps ``num_attention_heads / num_key_value_heads`` query heads, so K and V are untouched (GQA stays
    consistent). The same hidden channels go from the embeddings, every norm, the input columns of
    q/k/v/gate/up, the output rows of o_proj/down_proj and lm_head. ``head_dim`` is kept and written
    explicitly to the config.

    Args:
        model: The model to prune (left unchanged; no tensor is shared).
        importance: Scores of this model from :func:`width_importance`.
        widths: The student's widths (None: the model's).
        rescale_norms: ``"calibrated"`` or ``"none"``, see :func:`norm_scales`.

    Returns:
        The student in eval mode; ``config.kdlm_width`` records the hidden channels and query heads kept.
    """
    check_prunable(model)
    config = model.config
    widths = check_widths(config, widths)
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = head_dim_of(config)
    hidden = kept_indices(importance.hidden, widths.hidden_size)
    scales = norm_scales(importance.norm_energy, hidden, config.hidden_size, rescale_norms)
    heads = [kept_heads(scores, num_kv_heads, widths.num_attention_heads) for scores in importance.heads]
    neurons = [kept_indices(scores, widths.intermediate_size) for scores in importance.neurons]

    state_dict = {}
    for key, tensor in model.state_dict().items():
        state_dict[key] = _slice(key, tensor.detach(), hidden, heads, neurons, scales, head_dim).clone()

    new_config = config.to_dict()
    new_config.pop("quantization_config", None)
    new_config.update(
        hidden_size=widths.hidden_size, intermediate_size=widths.intermediate_size,
        num_attention_heads=widths.num_attention_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        # The MLP neurons kept are not recorded: 30 layers x 1,536 indices would swamp config.json.
        kdlm_width={"hidden": hidden, "heads": heads, "rescale_norms": rescale_norms},
    )
    student = type(model).from_pretrained(
        None, config=type(config).from_dict(new_config), state_dict=state_dict, dtype=model.dtype,
        attn_implementation=config._attn_implementation,
    )
    missing = set(student.state_dict()) - set(state_dict)
    if missing:
        raise RuntimeError(f"Width-pruned student has weights the model did not provide: {sorted(missing)[:5]}")
    student.generation_config = model.generation_config
    return student.eval()


def _slice(key, tensor, hidden, heads, neurons, scales, head_dim) -> torch.Tensor:
    """One state-dict entry of the pruned model (see :func:`prune_width`)."""
    hidden_index = torch.tensor(hidden)
    if key in ("model.embed_tokens.weight", "lm_head.weight"):
        return tensor[:, hidden_index]
    if key == "model.norm.weight":
        return tensor[hidden_index] * scales[-1]
    _, _, index, name = key.split(".", 3)
    layer = int(index)
    head_rows = torch.tensor([h * head_dim + d for h in heads[layer] for d in range(head_dim)])
    neuron_index = torch.tensor(neurons[layer])
    if name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return tensor[hidden_index] * scales[2 * layer + NORMS.index(name.split(".")[0])]
    if name == "self_attn.q_proj.weight":
        return tensor[head_rows][:, hidden_index]
    if name == "self_attn.q_proj.bias":
        return tensor[head_rows]
    if name in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        return tensor[:, hidden_index]
    if name == "self_attn.o_proj.weight":
        return tensor[hidden_index][:, head_rows]
    if name in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):
        return tensor[hidden_index]
    if name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        return tensor[neuron_index][:, hidden_index]
    if name in ("mlp.gate_proj.bias", "mlp.up_proj.bias"):
        return tensor[neuron_index]
    if name == "mlp.down_proj.weight":
        return tensor[hidden_index][:, neuron_index]
    return tensor  # k/v biases, q_norm/k_norm (per head_dim): unchanged


def count_parameters(model: PreTrainedModel, widths: Widths, num_layers: int) -> int:
    """Parameters of ``model`` pruned to ``widths`` (filled in, see :func:`check_widths`) and ``num_layers`` layers.

    Tied weights count once, as :func:`kdlm.models.describe_model` counts them.
    """
    hidden, inner = widths.hidden_size, widths.intermediate_size
    query = widths.num_attention_heads * head_dim_of(model.config)
    rows = {"self_attn.q_proj": query, "self_attn.o_proj": hidden, "mlp.down_proj": hidden, "mlp.gate_proj": inner,
            "mlp.up_proj": inner, "input_layernorm": hidden, "post_attention_layernorm": hidden, "model.norm": hidden}
    columns = {"self_attn.o_proj": query, "mlp.down_proj": inner}  # the other matrices read the hidden width
    total = 0
    for name, parameter in model.named_parameters():
        in_layer = name.startswith("model.layers.")
        if in_layer and not name.startswith("model.layers.0."):
            continue  # the layers are alike: count layer 0, num_layers times
        module = (name.split(".", 3)[3] if in_layer else name).rsplit(".", 1)[0]
        shape = list(parameter.shape)
        shape[0] = rows.get(module, shape[0])
        if len(shape) == 2:
            shape[1] = columns.get(module, hidden)
        total += math.prod(shape) * (num_layers if in_layer else 1)
    return total


def target_parameter_count(target: float, teacher_params: int) -> int:
    """``student.target_params`` as a count: a fraction of the teacher's (<= 1) or a count (> 1).

    Raises:
        KdlmError: The target is larger than the teacher.
    """
    count = int(target * teacher_params) if target <= 1 else int(target)
    if count > teacher_params:
        raise KdlmError(f"student.target_params ({count:,}) is larger than the teacher ({teacher_params:,} parameters).")
    return count


def widths_for_target(model: PreTrainedModel, target_params: int, fixed: Widths) -> Widths:
    """The largest widths whose pruned ``model`` has at most ``target_params`` parameters (at its depth).

    The free widths among hidden_size and intermediate_size (those ``fixed`` leaves None) shrink by one
    common factor, rounded down to a multiple of the head count (hidden) or of 32 (MLP); attention heads stay as ``fixed``
    says (the teacher's by default: Minitron-8B pruned embedding and MLP widths and kept its heads).

    Args:
        model: The model to prune, already at the student's depth.
        target_params: The student's parameter budget.
        fixed: Widths given explicitly.

    Raises:
        KdlmError: The target is outside what these settings can build.
    """
    config = model.config
    num_layers = config.num_hidden_layers
    free = [name for name in ("hidden_size", "intermediate_size") if getattr(fixed, name) is None]

    # Grids: the hidden size must divide into the heads; MLP widths stay multiples of 32 (a GGUF block).
    step = {"hidden_size": fixed.num_attention_heads or config.num_attention_heads,
            "intermediate_size": min(MLP_STEP, config.intermediate_size)}

    def at(factor: float) -> Widths:
        widths = Widths(fixed.hidden_size, fixed.intermediate_size, fixed.num_attention_heads)
        for name in free:
            setattr(widths, name, max(step[name], int(getattr(config, name) * factor) // step[name] * step[name]))
        return check_widths(config, widths)

    smallest, largest = count_parameters(model, at(0.0), num_layers), count_parameters(model, at(1.0), num_layers)
    if smallest > target_params:
        raise KdlmError(
            f"student.target_params ({target_params:,}) is smaller than the smallest student these settings allow "
            f"({smallest:,} parameters at {num_layers} layers, {at(0.0)}); raise it, or prune fewer layers or heads."
        )
    if largest < target_params:
        raise KdlmError(
            f"student.target_params ({target_params:,}) is more than the student at {num_layers} layers with "
            f"{'the teacher' if free else 'the given'} widths has ({largest:,}); keep more layers (student.num_layers) "
            "or lower the target."
        )
    low, high = 0.0, 1.0
    for _ in range(40):  # bisection on the common factor: the count grows with it
        middle = (low + high) / 2
        if count_parameters(model, at(middle), num_layers) <= target_params:
            low = middle
        else:
            high = middle
    return at(low)


def build_width_pruned_student(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, widths: Widths,
    target_params: int | None = None,
) -> PreTrainedModel:
    """Score ``model`` on a calibration batch and prune it to ``widths``, or to ``target_params`` parameters.

    Args:
        model: A Llama-layout model at the student's depth (e.g. from ``build_pruned_student``).
        input_ids: (B, T) calibration token ids.
        attention_mask: (B, T) 1 for real tokens.
        widths: Widths given explicitly (None fields: the model's, or free for ``target_params``).
        target_params: A parameter budget; None prunes to ``widths`` exactly.
    """
    check_prunable(model)
    check_widths(model.config, widths)
    if target_params is not None:
        widths = widths_for_target(model, target_params, widths)
    importance = width_importance(model, input_ids.to(model.device), attention_mask.to(model.device))
    return prune_width(model, importance, widths)


def planned_config(teacher_config, num_layers: int, widths: Widths, target_params: float | None, teacher_params: int):
    """The config a width-pruned student will have, from the teacher's config alone (`kdlm plan`: no weights).

    The model is built on the meta device, so nothing is allocated.
    """
    from transformers import AutoModelForCausalLM

    config = type(teacher_config).from_dict({**teacher_config.to_dict(), "num_hidden_layers": num_layers})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    problem = _shape_problem(model)
    if problem:
        raise KdlmError(f"student.width: cannot width-prune model type {config.model_type!r}: {problem}.")
    if target_params is not None:
        widths = widths_for_target(model, target_parameter_count(target_params, teacher_params), widths)
    widths = check_widths(config, widths)
    return type(config).from_dict({
        **config.to_dict(), "hidden_size": widths.hidden_size, "intermediate_size": widths.intermediate_size,
        "num_attention_heads": widths.num_attention_heads, "head_dim": head_dim_of(teacher_config),
    })
