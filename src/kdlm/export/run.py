"""`kdlm export STUDENT --format gguf`: write the file under a temporary name, check it, then rename it.

A failure anywhere (an unknown architecture, a full disk, a check outside tolerance) removes the
temporary file, so the output path holds either nothing new or a complete, checked file.
"""

from __future__ import annotations

from pathlib import Path

from kdlm.atomic import atomic_path
from kdlm.errors import KdlmError
from kdlm.export.gguf_file import check_llama_family, check_quant, write_gguf

FORMATS = ("gguf",)


def resolve_student(spec: str) -> Path:
    """The HF folder to export: a folder with config.json, or a `kdlm distill` run folder's student/."""
    path = Path(spec).expanduser()
    if (path / "student" / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / "student"
    if not path.exists():
        raise KdlmError(f"student folder {spec!r} does not exist")
    if not (path / "config.json").is_file():
        raise KdlmError(f"{spec!r} is not a Hugging Face model folder (no config.json); give a student folder or a `kdlm distill` run folder")
    return path


def default_out(folder: Path, quant: str) -> Path:
    """`runs/x/student` -> `runs/x/student-q8_0.gguf`, next to the folder."""
    return folder.parent / f"{folder.name}-{quant}.gguf"


def export_gguf(spec: str, out: str | None = None, quant: str = "q8_0", check: bool = True, log=print) -> dict:
    """Export a student folder as GGUF; with `check`, load it back and compare logits before keeping it.

    Returns: {"path", "bytes", "tensor_types", "check" (see `kdlm.export.check.compare`) or None}.
    """
    from transformers import AutoConfig

    from kdlm.export.check import TOLERANCES, check_gguf, failures
    from kdlm.models.loading import load_model

    quant = quant.lower()
    check_quant(quant)
    folder = resolve_student(spec)
    check_llama_family(AutoConfig.from_pretrained(folder), str(folder))  # before loading any weights
    target = Path(out).expanduser() if out else default_out(folder, quant)
    if target.suffix != ".gguf":
        raise KdlmError(f"--out {str(target)!r} must end in .gguf")
    if not target.parent.is_dir():
        raise KdlmError(f"--out {str(target)!r}: folder {str(target.parent)!r} does not exist")
    model, tokenizer = load_model(str(folder))
    with atomic_path(target, per_process=True, suffix=".gguf") as temp:  # .gguf: transformers reads it back
        counts = write_gguf(model, tokenizer, temp, quant)
        result = None
        if check:
            result = check_gguf(model, tokenizer, temp)
            log(f"check ({result['positions']} probe positions): KL {result['kl']:.5f} nats/token, top-1 agreement {result['top1']:.3f}, logit difference "
                f"max {result['max_abs']:.4f} mean {result['mean_abs']:.5f} (relative {result['relative_mean_abs']:.4f}), "
                f"token ids {'equal' if result['tokens_equal'] else 'DIFFERENT'}; tolerance for {quant}: {TOLERANCES[quant]}")
            problems = failures(result, quant)
            if problems:
                raise KdlmError(f"the exported {quant} file does not match the HF student ({'; '.join(problems)}); nothing was kept "
                                f"(a higher-precision --quant keeps more; --no-check keeps the file unchecked)")
    return {"path": str(target), "bytes": target.stat().st_size, "tensor_types": counts, "check": result}
