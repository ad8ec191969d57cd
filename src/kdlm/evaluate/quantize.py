"""int8 dynamic quantisation for evaluating a student as it would run on a CPU (`kdlm eval --set quantize=int8`).

Every `nn.Linear` (attention, MLP and the output head) gets int8 weights, one scale per tensor, and
quantises its input to int8 on the fly at each call (torch.ao's `quantize_dynamic`, fbgemm/x86 kernels);
embeddings, norms and the attention softmax stay fp32. On SmolLM2 this loses most of the quality (KL 1.7
nats/token to its fp32 self): one int8 scale per input tensor cannot hold its outlier channels; see
docs/export.md, where the GGUF q8_0 file (blocks of 32) keeps it. torch marks torch.ao.quantization deprecated in
favour of torchao, which is not among this project's dependencies; `quantize_int8` is the one place to
change when moving.
"""

from __future__ import annotations

import io
import warnings

import torch

from kdlm.errors import KdlmError

QUANTIZE_CHOICES = ("none", "int8")


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Quantise `model`'s Linear layers to int8 in place (dynamic activations); CPU only."""
    from torch.ao.quantization import quantize_dynamic

    device = next(model.parameters()).device
    if device.type != "cpu":
        raise KdlmError(f"quantize: int8 runs on the CPU only (torch's dynamic int8 kernels); the model is on {device}")
    model.kdlm_parameters = sum(p.numel() for p in model.parameters())  # the int8 weights are no longer Parameters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices, once per layer
        quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    model.kdlm_quantized = "int8"
    return model


def quantized_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as `torch.save` writes them (int8 packed weights and their scales included)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def float_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters that stayed floating point (what `kdlm.evaluate.metrics.speed` counts as weights)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
