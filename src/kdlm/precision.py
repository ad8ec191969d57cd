"""Which precision to compute in: bf16 autocast only where the hardware runs it fast.

bf16 autocast is a speed knob, not a quality one (weights, optimizer state and the loss stay fp32). Its effect
depends on the processor: on CPUs with avx512_bf16 or AMX (AMD Zen 4, Intel Cooper Lake and Sapphire Rapids
onwards) oneDNN runs bf16 matmuls about 2.5x faster than fp32; without them it emulates bf16 and is about 6x
*slower* (a 2048 x 2048 matmul: 11 GFLOP/s per thread against 67 in fp32 on such a Xeon), while
``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` still answers True there. So every ``bf16`` setting accepts
``auto``: bf16 on CUDA devices that support it and on x86 CPUs that report avx512_bf16 or amx_bf16; on other
CPUs (ARM, or where the flags cannot be read) a short matmul probe decides, cached per machine; fp32 otherwise.
"""

from __future__ import annotations

import functools
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from kdlm.atomic import write_text
from kdlm.paths import cache_dir

#: The type of every ``bf16`` config field: force on, force off, or decide from the hardware.
Bf16Setting = bool | Literal["auto"]

# x86 CPU flags under which oneDNN has native bf16 dot products.
FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# bf16 must beat fp32 by this factor in the probe to be chosen (timer noise must not flip the choice).
PROBE_MARGIN = 1.2


@dataclass(frozen=True)
class Precision:
    """The decision and the one-line reason a user is shown."""

    bf16: bool
    reason: str

    def describe(self) -> str:
        return f"precision: {'bf16 autocast' if self.bf16 else 'fp32'} ({self.reason})"


def bf16_enabled(setting: Bf16Setting, device: torch.device | str | None = None) -> bool:
    """Turn a ``bf16`` setting into a bool: ``True``/``False`` pass through, ``"auto"`` asks the hardware.

    Args:
        setting: ``True``, ``False`` or ``"auto"``.
        device: Where the computation runs (default: CUDA when available, else the CPU).
    """
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"bf16 must be true, false or auto, not {setting!r}")
    return resolve_precision(setting, device).bf16


def resolve_precision(setting: Bf16Setting, device: torch.device | str | None = None) -> Precision:
    """The precision a ``bf16`` setting gives on ``device``, with the reason (for the run's log)."""
    if isinstance(setting, bool):
        return Precision(setting, f"train/teacher bf16={str(setting).lower()} was set")
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return _cuda_precision()
    if kind == "cpu":
        return _cpu_precision()
    return Precision(False, f"auto on a {kind} device: fp32 (set bf16=true to try bf16)")


@functools.cache
def _cuda_precision() -> Precision:
    name = torch.cuda.get_device_name()
    if torch.cuda.is_bf16_supported():
        return Precision(True, f"auto: {name} supports bf16")
    return Precision(False, f"auto: {name} has no bf16 support")


@functools.cache
def _cpu_precision() -> Precision:
    model = cpu_model()
    return decide_from_flags(platform.machine(), cpu_flags(), model) or _probe_cached(model)


def decide_from_flags(machine: str, flags: set[str] | None, model: str) -> Precision | None:
    """The decision an x86 CPU's flags give; None where flags cannot tell (another architecture, no flags)."""
    if flags is None or machine.lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    found = [flag for flag in FAST_BF16_FLAGS if flag in flags]
    if found:
        return Precision(True, f"auto: {model} has {'/'.join(found)}, bf16 matmuls run faster than fp32")
    return Precision(False, f"auto: {model} lacks avx512_bf16 and AMX, where bf16 autocast runs several times "
                            "slower than fp32")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``)."""
    for line in _cpuinfo_lines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on ARM); None where unreadable."""
    for line in _cpuinfo_lines():
        if line.lower().startswith(("flags", "features")):
            return set(line.split(":", 1)[1].split())
    return None


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _probe_cached(model: str) -> Precision:
    """Time bf16 against fp32 once per (CPU, torch version); the answer is kept in the kdlm cache."""

    key = f"{model} | torch {torch.__version__} | {platform.machine()}"
    path = cache_dir() / "precision.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        fp32_s, bf16_s = probe_matmul_seconds()
        known[key] = {"fp32_s": fp32_s, "bf16_s": bf16_s}
        try:
            write_text(path, json.dumps(known, indent=1), per_process=True)  # processes probe at once
        except OSError:
            pass  # an unwritable cache only costs the probe again next time
    fp32_s, bf16_s = known[key]["fp32_s"], known[key]["bf16_s"]
    ratio = fp32_s / max(bf16_s, 1e-12)
    fast = ratio >= PROBE_MARGIN
    return Precision(fast, f"auto: on {model} a bf16 matmul probe ran {ratio:.2f}x the speed of fp32")


def probe_matmul_seconds(size: int = 512, repeats: int = 5) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of a ``size``-square matmul in fp32 and under bf16 autocast (CPU)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)

    def best(bf16: bool) -> float:
        times = []
        for _ in range(repeats + 1):  # the first run warms up oneDNN's kernels
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                torch.mm(a, b)
            times.append(time.perf_counter() - started)
        return min(times[1:])

    return best(False), best(True)
