"""Cross-tokenizer distillation: token alignment (align), paired examples (data) and the training target."""
