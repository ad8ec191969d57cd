"""Loading models and building students, on a tiny random Llama (the bundled teacher only in the slow test)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kdlm.errors import KdlmError
from kdlm.models import (
    apply_lora,
    block_influence,
    build_pruned_student,
    build_random_student,
    cache_dir,
    check_vocab_compatible,
    describe_model,
    ensure_bundled,
    load_model,
    loading,
    save_student,
    select_layers,
)

VOCAB_SIZE = 256
TINY = dict(
    num_hidden_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=VOCAB_SIZE,
    bos_token_id=1,
    eos_token_id=2,
)


def make_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    words = words or [f"w{i}" for i in range(3, VOCAB_SIZE)]
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{word: i for i, word in enumerate(words, start=3)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture
def teacher() -> LlamaForCausalLM:
    torch.manual_seed(0)
    # A larger init than the default 0.02 so that every layer changes the hidden states visibly.
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True, initializer_range=0.2)).eval()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB_SIZE, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding on the second row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        # No cache: the reference of teacher_with_layers keeps the teacher's layer_idx values.
        return model(**batch, use_cache=False).logits


def teacher_with_layers(teacher: LlamaForCausalLM, layer_ids: list[int]) -> LlamaForCausalLM:
    """The reference: the teacher itself, run through only some of its layers."""
    reference = copy.deepcopy(teacher)
    reference.model.layers = nn.ModuleList([reference.model.layers[i] for i in layer_ids])
    reference.config.num_hidden_layers = len(layer_ids)
    if getattr(reference.config, "layer_types", None):
        # Qwen2 picks each layer's mask from config.layer_types[position], not from the layer itself.
        reference.config.layer_types = [reference.config.layer_types[i] for i in layer_ids]
    return reference


# Pruned students


def test_pruned_student_equals_teacher_run_through_kept_layers(teacher, batch):
    student = build_pruned_student(teacher, [0, 2, 3])
    assert torch.equal(logits(student, batch), logits(teacher_with_layers(teacher, [0, 2, 3]), batch))
    assert student.config.num_hidden_layers == 3
    assert student.config.kdlm_teacher_layers == [0, 2, 3]
    assert teacher.config.num_hidden_layers == 4


def test_pruned_student_generates_with_kv_cache(teacher, batch):
    student = build_pruned_student(teacher, [0, 2, 3])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    prompt = batch["input_ids"][:1, :5]
    cached = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 11)
    assert torch.equal(cached, uncached)


def test_pruned_student_with_every_layer_equals_teacher(teacher, batch):
    student = build_pruned_student(teacher, [0, 1, 2, 3])
    assert torch.equal(logits(student, batch), logits(teacher, batch))


def test_pruned_student_shares_no_tensor_with_teacher(teacher, batch):
    before = logits(teacher, batch)
    student = build_pruned_student(teacher, [1, 3])
    teacher_pointers = {p.data_ptr() for p in teacher.parameters()}
    assert not teacher_pointers & {p.data_ptr() for p in student.parameters()}
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied, within the student
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    assert torch.equal(logits(teacher, batch), before)


def test_pruned_student_round_trips_through_a_folder(teacher, batch, tmp_path):
    student = build_pruned_student(teacher, [0, 3])
    save_student(student, make_tokenizer(), tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert torch.equal(logits(loaded, batch), logits(student, batch))
    assert loaded.config.kdlm_teacher_layers == [0, 3]


def test_pruning_slices_per_layer_config_lists(batch):
    torch.manual_seed(0)
    config = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    teacher = Qwen2ForCausalLM(config).eval()
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    student = build_pruned_student(teacher, [1, 2])
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    assert torch.equal(logits(student, batch), logits(teacher_with_layers(teacher, [1, 2]), batch))


def test_pruning_rejects_bad_layer_lists(teacher):
    with pytest.raises(KdlmError, match="out of range"):
        build_pruned_student(teacher, [0, 4])
    with pytest.raises(KdlmError, match="empty"):
        build_pruned_student(teacher, [])


# Choosing layers


def test_select_layers_evenly():
    # DistilBERT: one teacher layer out of two, starting at 0.
    assert select_layers(30, 15, "evenly", keep_first_last=False) == list(range(0, 30, 2))
    kept = select_layers(30, 15, "evenly")
    assert kept[0] == 0 and kept[-1] == 29 and len(set(kept)) == 15 and kept == sorted(kept)
    assert select_layers(4, 4, "evenly") == [0, 1, 2, 3]
    assert select_layers(5, 3, "evenly") == [0, 2, 4]


def test_select_layers_by_influence():
    influence = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.2, 0.01])
    assert select_layers(6, 3, "influence", influence=influence) == [0, 1, 5]
    assert select_layers(6, 3, "influence", influence=influence, keep_first_last=False) == [1, 3, 4]


def test_select_layers_explicit_list_is_validated_and_sorted():
    assert select_layers(6, 3, [4, 0, 2]) == [0, 2, 4]
    for layers, message in [
        ([], "empty"),
        ([0, 6], "out of range"),
        ([1, 1, 2], "repeat"),
        ([0, 1], "num_layers"),
    ]:
        with pytest.raises(KdlmError, match=message):
            select_layers(6, 3, layers)


def test_select_layers_errors():
    with pytest.raises(KdlmError, match="Unknown layer strategy 'every-2'"):
        select_layers(6, 3, "every-2")
    with pytest.raises(KdlmError, match="block_influence"):
        select_layers(6, 3, "influence")
    with pytest.raises(KdlmError, match="between 1 and 6"):
        select_layers(6, 7, "evenly")


# Block influence


def test_block_influence_matches_hidden_states(teacher, batch):
    scores = block_influence(teacher, **batch)

    reference_model = copy.deepcopy(teacher)
    reference_model.config.tie_last_hidden_states = False  # the last output before the final norm
    with torch.no_grad():
        hidden = reference_model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    expected = torch.stack(
        [
            (1 - nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1))[mask].mean()
            for i in range(teacher.config.num_hidden_layers)
        ]
    )
    assert scores.shape == (4,)
    torch.testing.assert_close(scores, expected)


def test_block_influence_of_an_identity_layer_is_zero(teacher, batch):
    with torch.no_grad():  # the layer adds nothing to its residual stream: output = input
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    scores = block_influence(teacher, **batch)
    assert scores[2] < 1e-6
    assert (scores[[0, 1, 3]] > 1e-3).all()
    assert select_layers(4, 3, "influence", influence=scores) == [0, 1, 3]


# Random students and LoRA


def test_build_random_student_applies_overrides(teacher, batch):
    student = build_random_student(
        teacher.config, num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1
    )
    assert student.config.num_hidden_layers == 2
    assert student.config.head_dim == 16
    assert student.config.vocab_size == VOCAB_SIZE
    assert logits(student, batch).shape == (2, 9, VOCAB_SIZE)
    with pytest.raises(KdlmError, match="num_hidden_layerz"):
        build_random_student(teacher.config, num_hidden_layerz=2)
    with pytest.raises(KdlmError, match="num_key_value_heads"):
        build_random_student(teacher.config, num_attention_heads=3, hidden_size=48)


def test_lora_student_saves_merged_weights(teacher, batch, tmp_path):
    student = apply_lora(
        build_pruned_student(teacher, [0, 3]), r=4, alpha=8, dropout=0.0, target_modules=None
    )
    description = describe_model(student)
    assert 0 < description["trainable_parameters"] < description["parameters"]
    with torch.no_grad():  # LoRA starts as a no-op (B = 0); make it change the outputs
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    expected = logits(student, batch)

    folder = save_student(student, make_tokenizer(), tmp_path / "lora")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=1e-4, atol=1e-5)
    assert not any("lora" in name for name in loaded.state_dict())
    assert any(
        "lora_B" in name for name, _ in student.named_parameters()
    )  # the live model keeps its adapters


def test_lora_rejects_unknown_target_modules(teacher):
    with pytest.raises(KdlmError, match="not_a_module"):
        apply_lora(teacher, r=4, alpha=8, dropout=0.0, target_modules=["not_a_module"])


def test_describe_model_counts_parameters_and_disk_size(teacher, tmp_path):
    description = describe_model(teacher)
    # Tied embeddings count once.
    assert description["parameters"] == sum(p.numel() for p in teacher.parameters())
    assert description["trainable_parameters"] == description["parameters"]
    save_student(teacher, make_tokenizer(), tmp_path)
    on_disk = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert describe_model(teacher, tmp_path)["disk_bytes"] == on_disk > 0


# Vocabulary checks


def test_same_tokenizer_is_compatible():
    assert check_vocab_compatible(make_tokenizer(), make_tokenizer(), VOCAB_SIZE, VOCAB_SIZE) == VOCAB_SIZE


def test_padded_vocabulary_warns_and_uses_the_shared_rows():
    with pytest.warns(UserWarning, match="padding"):
        assert (
            check_vocab_compatible(make_tokenizer(), make_tokenizer(), VOCAB_SIZE, VOCAB_SIZE + 64)
            == VOCAB_SIZE
        )


def test_different_tokenizers_are_refused():
    words = [f"w{i}" for i in range(3, VOCAB_SIZE)]
    swapped = make_tokenizer(words[1:2] + words[:1] + words[2:])
    with pytest.raises(KdlmError, match="cross-tokenizer"):
        check_vocab_compatible(make_tokenizer(), swapped, VOCAB_SIZE, VOCAB_SIZE)
    with pytest.raises(KdlmError, match="300 tokens"):
        check_vocab_compatible(make_tokenizer(), make_tokenizer([f"v{i}" for i in range(297)]), 300, 256)
    other_eos = make_tokenizer()
    other_eos.eos_token = "w3"
    with pytest.raises(KdlmError, match="eos_token"):
        check_vocab_compatible(make_tokenizer(), other_eos, VOCAB_SIZE, VOCAB_SIZE)


# Loading


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KDLM_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("KDLM_CACHE")
    assert cache_dir() == cache_dir().home() / ".cache" / "kdlm"


def test_load_model_from_hf_folder(teacher, batch, tmp_path):
    teacher.save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    assert torch.equal(logits(model, batch), logits(teacher, batch))
    assert not model.training
    assert tokenizer.pad_token == "</s>"  # the tokenizer had none: EOS stands in
    assert tokenizer("w5 w7")["input_ids"] == [5, 7]
    bf16_model, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert bf16_model.dtype == torch.bfloat16


@pytest.mark.parametrize("spec", ["./no/such/model", "/no/such/model.gguf", "missing.gguf"])
def test_load_model_missing_path(spec):
    with pytest.raises(KdlmError, match="does not exist") as error:
        load_model(spec)
    assert spec in str(error.value) and "or use bundled:smollm2-135m-instruct." in str(error.value)


def test_load_model_folder_without_config(tmp_path):
    with pytest.raises(KdlmError, match="no config.json"):
        load_model(str(tmp_path))


def test_load_model_unknown_bundled_name():
    with pytest.raises(KdlmError, match="bundled:smollm2-135m-instruct"):
        load_model("bundled:gpt-17")


def test_load_model_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(KdlmError, match="could not be downloaded"):
        load_model("kdlm-tests/no-such-model")


def test_failed_bundled_conversion_leaves_no_folder(monkeypatch, tmp_path):
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setenv("KDLM_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "_load_gguf", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_bundled("smollm2-135m-instruct")
    assert os.listdir(tmp_path / "models") == []


@pytest.mark.slow
def test_bundled_teacher_converts_once_then_loads_from_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("KDLM_CACHE", str(tmp_path))
    first, tokenizer = load_model("bundled:smollm2-135m-instruct")
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert (folder / "config.json").is_file()
    assert os.listdir(tmp_path / "models") == ["smollm2-135m-instruct"]  # no temporary folder left

    again, cached_tokenizer = load_model("bundled:smollm2-135m-instruct")
    assert again.config.num_hidden_layers == 30 and again.config.vocab_size == 49152
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert cached_tokenizer.chat_template == tokenizer.chat_template is not None
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert torch.equal(logits(again, inputs), logits(first, inputs))
