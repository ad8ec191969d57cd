"""kdlm: knowledge distillation of large language models.

The Python API (kdlm.api) is importable from here: ``from kdlm import distill, DistillConfig``; it is loaded
on first use, so that ``import kdlm`` stays cheap for the CLI.
"""

__version__ = "0.1.0"
__all__ = ["DistillConfig", "distill", "evaluate", "generate"]


def __getattr__(name: str):
    if name in __all__:
        from kdlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdlm' has no attribute {name!r}")
