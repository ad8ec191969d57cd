"""Load teachers and students, build students (prune, random, LoRA), and check vocabularies."""

from kdlm.models.loading import (
    BUNDLED_MODELS,
    cache_dir,
    default_device,
    ensure_bundled,
    load_model,
    load_tokenizer,
)
from kdlm.models.student import (
    apply_lora,
    block_influence,
    build_pruned_student,
    build_random_student,
    describe_model,
    save_student,
    select_layers,
)
from kdlm.models.vocab import check_vocab_compatible
from kdlm.models.width import (
    Widths,
    build_width_pruned_student,
    check_prunable,
    prune_width,
    target_parameter_count,
    width_importance,
)

__all__ = [
    "BUNDLED_MODELS",
    "Widths",
    "apply_lora",
    "block_influence",
    "build_pruned_student",
    "build_random_student",
    "build_width_pruned_student",
    "check_prunable",
    "cache_dir",
    "check_vocab_compatible",
    "describe_model",
    "ensure_bundled",
    "default_device",
    "load_model",
    "load_tokenizer",
    "prune_width",
    "save_student",
    "select_layers",
    "target_parameter_count",
    "width_importance",
]
