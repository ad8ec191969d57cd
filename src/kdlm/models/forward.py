"""Forward passes that project to the vocabulary only where a loss is taken.

A causal LM's logits at prompt and padding positions are never used by the loss, yet the lm_head
over a 49k-152k vocabulary is a large share of a small model's step. These helpers run the decoder,
keep the hidden states of target positions (labels shifted by one, not -100) and let the caller
project them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdlm.losses.fused import LogitTransform


def _unwrap(model):
    """The plain transformers model under DDP/peft wrappers."""
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def lm_head_weight(model) -> Tensor:
    """The output projection weight, (V, H)."""
    return _unwrap(model).get_output_embeddings().weight


def target_mask(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Positions whose next-token label is a target. labels: (B, T) -> mask: (B, T-1)."""
    return labels[:, 1:] != ignore_index


def target_hidden_states(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Last hidden states at target positions and their labels.

    Args:
        model: a causal LM (possibly wrapped by peft); its decoder runs, not its lm_head. Under DDP,
            call this inside the forward of the wrapped module so that gradients are synchronised.
        input_ids: (B, T).
        attention_mask: (B, T).
        labels: (B, T), -100 outside the loss.

    Returns:
        hidden: (N, H) for the N target positions, in row-major (batch, position) order.
        target_ids: (N,) the tokens those positions must predict.
    """
    hidden = decoder_outputs(model, input_ids, attention_mask).last_hidden_state
    mask = target_mask(labels)
    return hidden[:, :-1][mask], labels[:, 1:][mask]


def decoder_outputs(model, input_ids: Tensor, attention_mask: Tensor, *, hidden_states: bool = False, attentions: bool = False):
    """The decoder's outputs (no lm_head): ``last_hidden_state`` (B, T, H), and on request ``hidden_states``
    (embeddings, then each block's output) and ``attentions`` ((B, heads, T, T) per block; eager attention)."""
    decoder = _unwrap(model).get_decoder()
    return decoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden_states,
                   output_attentions=attentions)


def logit_transform(model) -> LogitTransform:
    """The family's logit post-processing (Gemma-2 soft-capping, Cohere's logit scale); identity for most."""
    config = _unwrap(model).config
    return LogitTransform(getattr(config, "final_logit_softcapping", None), getattr(config, "logit_scale", None))


def plain_lm_head(model) -> Tensor | None:
    """The lm_head weight when the head is a bias-free linear layer (what the fused loss needs), else None."""
    head = _unwrap(model).get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None:
        return head.weight
    return None  # a LoRA-wrapped or biased head: use the dense path


def project(model, hidden: Tensor) -> Tensor:
    """Apply the model's lm_head (with any logit scaling the family defines). hidden: (N, H) -> (N, V)."""
    return logit_transform(model)(_unwrap(model).get_output_embeddings()(hidden))
