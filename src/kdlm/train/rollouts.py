"""Student rollouts from a colocated vLLM engine: ``method.rollout_backend: vllm`` (UNTESTED: needs a CUDA GPU).

The on-policy methods sample the student between steps. ``local`` (the default) decodes with
``kdlm.models.decode`` on the very module being trained. ``vllm`` runs a ``vllm.LLM`` in the same process
instead, the way TRL's GKD trainer does in its colocate mode: the engine is built once from a copy of the
student saved at the start, and before the first sample after any optimizer step the student's current
weights are loaded into the engine's model (``load_weights``), so every rollout comes from the weights being
trained. The engine shares the GPU with training; ``method.vllm_gpu_memory`` is the share it may take.

vLLM cannot run on the CPU machine this project is tested on, and pulls its own CUDA torch, so this module has
never been run: it imports vllm lazily, and refuses with a KdlmError naming ``pip install vllm`` and a CUDA
GPU when either is missing. The seeds, temperature, top-p and top-k are passed per request; vLLM's sampler is
not kdlm's, so the same seed gives other samples than ``local``, and resumed runs do not replay them exactly.
"""

from __future__ import annotations

import tempfile

import torch

from kdlm.config import MethodConfig
from kdlm.errors import KdlmError
from kdlm.models.forward import _unwrap

IGNORE_INDEX = -100


def import_vllm():
    """The vllm module, or a KdlmError that names what is missing (checked before any model is built)."""
    try:
        import vllm
    except ImportError:
        raise KdlmError("method.rollout_backend=vllm needs vLLM and a CUDA GPU: pip install vllm (on a machine with "
                        "CUDA), or set method.rollout_backend=local") from None
    if not torch.cuda.is_available():
        raise KdlmError("method.rollout_backend=vllm needs a CUDA GPU (vLLM does not run on this machine's CPU): "
                        "set method.rollout_backend=local")
    return vllm


class VLLMRollouts:
    """Samples of the student's responses from a colocated ``vllm.LLM`` holding the student's current weights."""

    def __init__(self, student, tokenizer, config: MethodConfig, *, seed: int = 0):
        vllm = import_vllm()
        self.vllm, self.config, self.tokenizer = vllm, config, tokenizer
        self.folder = tempfile.TemporaryDirectory(prefix="kdlm-vllm-")  # the engine's starting weights
        _unwrap(student).save_pretrained(self.folder.name)
        tokenizer.save_pretrained(self.folder.name)
        self.llm = vllm.LLM(model=self.folder.name, gpu_memory_utilization=config.vllm_gpu_memory, seed=seed,
                            dtype="bfloat16" if torch.cuda.is_bf16_supported() else "float16")
        self.synced: tuple | None = None

    def sync(self, student) -> None:
        """Load the student's weights into the engine when an optimizer step changed them since the last load."""
        params = list(student.parameters())
        version = tuple(param._version for param in params)  # in-place updates (optimizer.step) bump these
        if version == self.synced:
            return
        weights = [(name, tensor.detach()) for name, tensor in _unwrap(student).state_dict().items()]
        if hasattr(self.llm, "apply_model"):  # vLLM >= 0.9
            self.llm.apply_model(lambda model: model.load_weights(weights))
        else:  # older engines: the model sits on the driver worker
            self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights
        self.synced = version

    def sample(self, student, examples: list[dict], seeds: list[int], prompts: list[list[int]]) -> list[dict]:
        """``examples`` with the responses of those with a prompt replaced by samples (kdlm's sample_examples rules)."""
        self.sync(student)
        config, eos = self.config, self.tokenizer.eos_token_id
        chats = [i for i, prompt in enumerate(prompts) if prompt]
        params = [self.vllm.SamplingParams(temperature=config.temperature, top_p=config.top_p,
                                           top_k=config.top_k if config.top_k > 0 else -1,
                                           max_tokens=config.max_new_tokens, seed=seeds[i]) for i in chats]
        outputs = self.llm.generate([{"prompt_token_ids": prompts[i]} for i in chats], params, use_tqdm=False)
        out = list(examples)
        for i, output in zip(chats, outputs, strict=True):
            completion = output.outputs[0]
            response = list(completion.token_ids)
            if response and response[-1] == eos:
                response.pop()
            if completion.finish_reason == "stop" or not response:
                response.append(eos)  # a finished sample keeps its end-of-sequence token as a target
            out[i] = {"input_ids": prompts[i] + response, "labels": [IGNORE_INDEX] * len(prompts[i]) + response}
        return out

    def close(self) -> None:
        self.folder.cleanup()


def check_rollout_backend(config: MethodConfig) -> None:
    """Refuse ``rollout_backend: vllm`` early (before loading models) when vllm or CUDA is missing."""
    if config.rollout_backend == "vllm":
        if config.name == "offpolicy":
            raise KdlmError("method.rollout_backend=vllm samples the student for on-policy methods; method.name=offpolicy "
                            "samples nothing: drop method.rollout_backend or choose gkd, distillm or imitkd")
        if config.name == "minillm":
            raise KdlmError("method.rollout_backend=vllm: minillm samples from a teacher-student mixture that vLLM cannot "
                            "run; use method.rollout_backend=local with minillm")
        import_vllm()
