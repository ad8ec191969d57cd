"""Export a student for deployment: a GGUF file for llama.cpp and Ollama (`kdlm export`)."""

from kdlm.export.gguf_file import QUANTS, write_gguf
from kdlm.export.check import check_gguf

__all__ = ["QUANTS", "check_gguf", "write_gguf"]
