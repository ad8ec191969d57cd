"""Black-box recipes: the teacher writes text through the generation engine, filters keep the good part,
and the result is training data for `kdlm distill` (chain-of-thought, in-context learning, instruction
following). Each recipe is a module of this package; `kdlm generate` runs the one named in `recipe.name`."""
