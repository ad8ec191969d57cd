"""Export a student for deployment: a GGUF file for llama.cpp and Ollama (`kdlm export`).

gguf_file.py writes the file, check.py compares it with the HF model, run.py does both atomically.
"""
