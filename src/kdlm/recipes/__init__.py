"""Black-box recipes: the teacher writes the training data (instruction following, chain-of-thought, in-context learning)."""
