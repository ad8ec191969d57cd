"""Hint-based distillation: match the teacher's intermediate hidden states and attention.

Two terms, each added to the objective with its own weight (``hints.hidden_weight``,
``hints.attention_weight``) and summed over the same target tokens as the logit loss, so that the global
token normalisation of the loop covers them too:

- hidden states (FitNets, TinyBERT): for each mapped (student layer, teacher layer) pair, MSE (mean over
  the teacher's width) or 1 − cosine between a learned linear projection of the student's hidden state
  and the teacher's; the pairs' terms are averaged (``hidden_reduce: mean``, as DistillKit does, so the
  term's scale does not grow with the number of pairs) or summed. Projections exist where the widths
  differ, or everywhere with ``project: always``.
- attention transfer (MiniLM, Wang et al. 2020): for each pair, KL(teacher ‖ student) between the
  attention distributions of every head, plus KL between the value-relation distributions
  softmax(V·Vᵀ/√d) per key/value head, both averaged over heads; causal masks apply to both. Rows are the
  target positions; keys are all positions. Needs equal head counts (MiniLM's condition). With
  ``relation_heads`` set, MiniLMv2 (arXiv 2012.15828) instead: the query, key and value projections are
  each concatenated over heads and re-split into that many relation heads, and the Q-Q, K-K and V-V
  relations softmax(X·Xᵀ/√d_r) are matched by KL (averaged over relation heads, summed over the three),
  so head counts may differ. Queries and keys are taken before the rotary embedding (the q/k_proj
  outputs); no attention probabilities are needed, so attention stays on the fast kernels.

Layer indices. Layer maps and ``attention_pairs`` count decoder blocks: 0 is the first block, -1 the last.
``hints.pairs`` follow ``layer_index``: ``block`` (the same), or ``hf_hidden_states``, an index into the
tuple that HF's ``output_hidden_states=True`` returns, which DistillKit's ``layer_mapping`` uses: entry 0 is
the embedding output, entry i the output of block i − 1, and the last entry is taken after the model's
final norm (HF's convention, also what block -1 reads).

The projections live in ``HintObjective``, train with the student, are saved in checkpoints (under
``hints.``), and are not part of the exported student.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdlm.config import HintConfig
from kdlm.errors import KdlmError
from kdlm.losses.divergences import fkl


def layer_pairs(config: HintConfig, student_layers: int, teacher_layers: int, kept: list[int] | None,
                explicit: list[tuple[int, int]] | None, what: str, unit: str = "layer") -> list[tuple[int, int]]:
    """(student, teacher) pairs of a layer map; negative indices count from the end.

    ``student_layers``/``teacher_layers`` are the number of valid indices: blocks, or with ``unit="hidden
    state"`` the entries of HF's hidden-states tuple (blocks + 1; only explicit pairs are read that way).
    """
    mapping = config.layer_map
    if explicit:
        pairs = [tuple(pair) for pair in explicit]
    elif mapping == "uniform":  # student block s ends where teacher block round((s + 1)·Lt/Ls) − 1 ends
        pairs = [(s, round((s + 1) * teacher_layers / student_layers) - 1) for s in range(student_layers)]
    elif mapping == "last":
        k = min(config.num_layers or 1, student_layers, teacher_layers)
        pairs = [(student_layers - k + j, teacher_layers - k + j) for j in range(k)]
    elif mapping == "every":
        step = config.every
        pairs = [(s, (s + 1) * step - 1) for s in range(student_layers) if (s + 1) * step - 1 < teacher_layers]
    elif mapping == "kept":
        if kept is None:
            raise KdlmError("hints.layer_map=kept needs a pruned student (student.init=prune); use uniform, last, every or pairs")
        pairs = list(enumerate(kept))
    else:
        raise KdlmError(f"hints.layer_map={mapping!r} needs hints.pairs")
    resolved = []
    for student_index, teacher_index in pairs:
        s = student_index + student_layers if student_index < 0 else student_index
        t = teacher_index + teacher_layers if teacher_index < 0 else teacher_index
        if not 0 <= s < student_layers:
            raise KdlmError(f"{what}: student {unit} {student_index} is out of range (the student has {student_layers} {unit}s)")
        if not 0 <= t < teacher_layers:
            raise KdlmError(f"{what}: teacher {unit} {teacher_index} is out of range (the teacher has {teacher_layers} {unit}s)")
        resolved.append((s, t))
    if not resolved:
        raise KdlmError(f"{what}: the layer map {mapping!r} gives no pairs for {student_layers} student and {teacher_layers} teacher layers")
    return resolved


def _projection(student_width: int, teacher_width: int, init: str) -> nn.Linear:
    linear = nn.Linear(student_width, teacher_width, bias=False)
    if init == "identity":
        if student_width != teacher_width:
            raise KdlmError(f"hints.projection_init=identity needs equal widths, got student {student_width} and teacher {teacher_width}")
        nn.init.eye_(linear.weight)
    elif init == "zero":
        nn.init.zeros_(linear.weight)
    else:
        nn.init.xavier_uniform_(linear.weight)
    return linear


def _projection_widths(config) -> tuple[int, int]:
    """(query width, key/value width) of a decoder's attention: heads x head_dim and kv_heads x head_dim."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim, (getattr(config, "num_key_value_heads", None) or heads) * head_dim


def _check_attention_shapes(config: HintConfig, student_config, teacher_config) -> None:
    if config.relation_heads is None:  # MiniLM: per-head distributions, so the heads must correspond
        for name in ("num_attention_heads", "num_key_value_heads"):
            s_heads = getattr(student_config, name, None) or student_config.num_attention_heads
            t_heads = getattr(teacher_config, name, None) or teacher_config.num_attention_heads
            if s_heads != t_heads:
                raise KdlmError(
                    f"attention transfer needs the same {name} in student ({s_heads}) and teacher ({t_heads}); "
                    "set hints.relation_heads (MiniLMv2 relations work across head counts), use "
                    "hints.attention_weight=0, or a student with the teacher's heads"
                )
        return
    for who, model_config in (("student", student_config), ("teacher", teacher_config)):
        widths = _projection_widths(model_config)
        if any(width % config.relation_heads for width in widths):
            raise KdlmError(
                f"hints.relation_heads={config.relation_heads} must divide the {who}'s query width ({widths[0]}) and "
                f"key/value width ({widths[1]}); choose a common divisor of both models' widths"
            )


class HintObjective(nn.Module):
    """Projections and the two hint terms; ``needs_attention`` tells the caller to run eager attention."""

    def __init__(self, config: HintConfig, student_config, teacher_config, kept_layers: list[int] | None = None):
        super().__init__()
        self.config = config
        s_layers, t_layers = student_config.num_hidden_layers, teacher_config.num_hidden_layers
        self.hidden_pairs: list[tuple[int, int]] = []
        self.attention_pairs: list[tuple[int, int]] = []
        self.projections = nn.ModuleList()
        if config.hidden_weight > 0:  # pairs of indices into HF's hidden-states tuples (see the module docstring)
            if config.layer_index == "hf_hidden_states" and config.pairs:
                self.hidden_pairs = layer_pairs(config, s_layers + 1, t_layers + 1, None, config.pairs,
                                                "hints.pairs (layer_index=hf_hidden_states)", unit="hidden state")
            else:
                blocks = layer_pairs(config, s_layers, t_layers, kept_layers, config.pairs, "hints.pairs")
                self.hidden_pairs = [(s + 1, t + 1) for s, t in blocks]
            s_width, t_width = student_config.hidden_size, teacher_config.hidden_size
            use = config.project == "always" or (config.project == "auto" and s_width != t_width)
            if config.project == "never" and s_width != t_width:
                raise KdlmError(f"hints.project=never but the widths differ (student {s_width}, teacher {t_width})")
            if use:
                self.projections.extend(_projection(s_width, t_width, config.projection_init) for _ in self.hidden_pairs)
        if config.attention_weight > 0:
            pairs = config.attention_pairs or [(-1, -1)]  # MiniLM: the last layer
            self.attention_pairs = layer_pairs(config, s_layers, t_layers, kept_layers, pairs, "hints.attention_pairs")
            _check_attention_shapes(config, student_config, teacher_config)

    @property
    def needs_attention(self) -> bool:
        return bool(self.attention_pairs)

    @property
    def needs_attention_probs(self) -> bool:
        """MiniLM reads attention probabilities (eager attention only); MiniLMv2 relations need none."""
        return self.needs_attention and self.config.relation_heads is None

    @property
    def projection_names(self) -> tuple[str, ...]:
        """The attention projections whose outputs the attention term reads (``capture_projections``)."""
        return ("v_proj",) if self.config.relation_heads is None else ("q_proj", "k_proj", "v_proj")

    @property
    def needs_hidden(self) -> bool:
        return bool(self.hidden_pairs)

    def hidden_sum(self, student_states: tuple[Tensor, ...], teacher_states: tuple[Tensor, ...], mask: Tensor) -> Tensor:
        """Σ over target tokens of the hidden-state loss, averaged (or summed) over pairs; states are HF's tuples."""
        total = student_states[0].new_zeros((), dtype=torch.float32)
        for index, (s, t) in enumerate(self.hidden_pairs):
            student = student_states[s][:, :-1][mask].float()
            teacher = teacher_states[t][:, :-1][mask].float()
            if len(self.projections):
                student = self.projections[index](student)
            if self.config.hidden_loss == "cosine":
                total = total + (1 - nn.functional.cosine_similarity(student, teacher, dim=-1)).sum()
            else:
                total = total + (student - teacher).pow(2).mean(-1).sum()
        return total / len(self.hidden_pairs) if self.config.hidden_reduce == "mean" else total

    def attention_sum(self, student: dict, teacher: dict, mask: Tensor) -> Tensor:
        """Σ over target tokens and pairs of KL(attention) + KL(value relation), each averaged over heads.

        With ``relation_heads``: Σ over target tokens, pairs and the Q-Q, K-K, V-V relations of their KL,
        averaged over relation heads. ``student``/``teacher``: "attentions" (HF's tuple, MiniLM only),
        "projections" ({(name, block): (B, T, width)} from ``capture_projections``), "attention_mask",
        "num_kv_heads".
        """
        if self.config.relation_heads is not None:
            return self._relation_sum(student, teacher, mask)
        total = mask.new_zeros((), dtype=torch.float32)
        for s, t in self.attention_pairs:
            rows = mask.nonzero(as_tuple=True)  # (batch, position) of each target token
            # (B, H, T, T) -> (N, H, T): the attention rows of the target positions.
            student_rows = student["attentions"][s].float().permute(0, 2, 1, 3)[rows]
            teacher_rows = teacher["attentions"][t].float().permute(0, 2, 1, 3)[rows]
            # Clamp, not log(0): the floor's gradient is 0 where a log(0) would send NaN back through the mask.
            tiny = torch.finfo(torch.float32).tiny
            total = total + fkl(student_rows.clamp_min(tiny).log(), teacher_rows.clamp_min(tiny).log()).mean(-1).sum()
            student_relation = self_relation(student["projections"][("v_proj", s)], student["num_kv_heads"], student["attention_mask"])
            teacher_relation = self_relation(teacher["projections"][("v_proj", t)], teacher["num_kv_heads"], teacher["attention_mask"])
            total = total + fkl(student_relation.permute(0, 2, 1, 3)[rows], teacher_relation.permute(0, 2, 1, 3)[rows]).mean(-1).sum()
        return total

    def _relation_sum(self, student: dict, teacher: dict, mask: Tensor) -> Tensor:
        total = mask.new_zeros((), dtype=torch.float32)
        rows = mask.nonzero(as_tuple=True)
        heads = self.config.relation_heads
        for s, t in self.attention_pairs:
            for name in self.projection_names:
                student_relation = self_relation(student["projections"][(name, s)], heads, student["attention_mask"])
                teacher_relation = self_relation(teacher["projections"][(name, t)], heads, teacher["attention_mask"])
                # (B, heads, T, T) -> (N, heads, T): the relation rows of the target positions
                kl = fkl(student_relation.permute(0, 2, 1, 3)[rows], teacher_relation.permute(0, 2, 1, 3)[rows])
                total = total + kl.mean(-1).sum()
        return total


def self_relation(vectors: Tensor, num_heads: int, attention_mask: Tensor) -> Tensor:
    """log softmax(X_h X_hᵀ / √d_h) over ``num_heads`` slices of the width, causal and padding-masked: (B, H, T, T).

    MiniLM's value relation with the model's key/value heads; MiniLMv2's Q-Q, K-K, V-V relations with
    relation heads (the projection's width re-split, whatever the model's head count).
    """
    batch, length, width = vectors.shape
    heads = vectors.float().view(batch, length, num_heads, width // num_heads).transpose(1, 2)
    scores = heads @ heads.transpose(-1, -2) / math.sqrt(width // num_heads)
    allowed = torch.ones(length, length, dtype=torch.bool, device=vectors.device).tril()
    # A position always sees itself, so no row is all -inf (its softmax would be NaN, and so its gradient).
    allowed = (allowed & attention_mask.bool()[:, None, None, :]) | torch.eye(length, dtype=torch.bool, device=vectors.device)
    return torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)


def capture_projections(model, layers: list[int], names: tuple[str, ...] = ("v_proj",)) -> tuple[dict, list]:
    """Forward hooks that keep the outputs of the named attention projections of the given decoder blocks.

    Returns (store, handles): ``store[(name, block)]`` is filled by the next forward; remove the handles after it.
    """
    from kdlm.models.forward import _unwrap

    store: dict[tuple[str, int], Tensor] = {}
    handles = []
    blocks = _unwrap(model).get_decoder().layers
    for index in layers:
        for name in names:
            module = getattr(blocks[index].self_attn, name)

            def hook(_module, _inputs, output, key=(name, index)):
                store[key] = output

            handles.append(module.register_forward_hook(hook))
    return store, handles


def use_eager_attention(model) -> None:
    """Attention probabilities are only returned by the eager implementation (SDPA/flash do not expose them)."""
    from kdlm.models.forward import _unwrap

    base = _unwrap(model)
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation("eager")
    else:
        base.config._attn_implementation = "eager"
