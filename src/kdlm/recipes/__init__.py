"""Black-box recipes: the teacher writes text through the generation engine, filters keep the good part,
and the result is training data for `kdlm distill` (instruction following, chain-of-thought, in-context
learning). Each recipe is a module of this package; `kdlm generate` runs the one named in `recipe.name`
through `kdlm.recipes.calls.run_recipe`. A recipe module offers either `Settings` (a pydantic model of its
keys) and `run(session, settings)`, or `run(config)` taking the whole generate config and validating its
own `recipe` keys."""
