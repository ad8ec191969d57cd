"""Black-box recipes: the teacher writes text through the generation engine, filters keep the good part,
and the result is training data for `kdlm distill` (instruction following, chain-of-thought, in-context
learning). Each recipe is a module of this package; `kdlm generate` runs the one named in `recipe.name`
through `kdlm.recipes.calls.run_recipe`. Each recipe's settings are a class of
`kdlm.generate.recipe_settings`, validated with the config; a recipe module offers `run(session, settings)`,
or (cot, icl, which run the engine once per stage) `run(config)` taking the whole generate config."""
