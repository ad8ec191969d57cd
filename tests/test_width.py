"""Width pruning (Minitron) on a tiny random Llama: importance against a float64 hand computation, pruned
models against masked originals, parameter targets, and the settings it refuses."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kdlm.errors import KdlmError
from kdlm.models import describe_model
from kdlm.models.width import (
    Widths,
    build_width_pruned_student,
    check_prunable,
    check_widths,
    count_parameters,
    kept_heads,
    kept_indices,
    prune_width,
    target_parameter_count,
    width_importance,
    widths_for_target,
)
from tiny import save_tiny_teacher, tiny_llama, write_chat_jsonl

VOCAB = 259
HEAD_DIM = 16  # tiny_llama: hidden 64, 4 query heads, 2 KV heads, MLP 128


@pytest.fixture(scope="module")
def model():
    model = tiny_llama(VOCAB, num_layers=2, seed=3)
    with torch.no_grad():  # norms that are not all ones, so that their weights matter
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (3, 12), generator=generator)
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, 7:] = 0  # right padding: it must not count
    attention_mask[2, 10:] = 0
    return input_ids, attention_mask


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch[0], attention_mask=batch[1]).logits.double()


def real(batch, tensor):
    return tensor[batch[1].bool()]  # padded positions are not compared


def plain_forward(model, input_ids):
    """A float64 Llama forward written out (causal attention, GQA, RoPE, SwiGLU) that records the norm
    outputs, each head's output and each MLP neuron's output: the activations Minitron scores."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    length = input_ids.shape[1]
    x = model.model.embed_tokens.weight.double()[input_ids]
    cos, sin = (t.double()[:, :, None, :] for t in model.model.rotary_emb(x.float(), torch.arange(length)[None]))

    def rms(h, weight, eps):
        return weight.double() * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)

    def rope(t):
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

    norms, head_outputs, neurons = [], [], []
    causal = torch.ones(length, length).tril().bool()
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        a = rms(x, layer.input_layernorm.weight, config.rms_norm_eps)
        q = rope((a @ attn.q_proj.weight.double().T).unflatten(-1, (heads, HEAD_DIM)))
        k = rope((a @ attn.k_proj.weight.double().T).unflatten(-1, (kv_heads, HEAD_DIM)))
        v = (a @ attn.v_proj.weight.double().T).unflatten(-1, (kv_heads, HEAD_DIM))
        group = heads // kv_heads
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HEAD_DIM)
        out = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~causal, -math.inf).softmax(-1), v)
        x = x + out.flatten(-2) @ attn.o_proj.weight.double().T
        b = rms(x, layer.post_attention_layernorm.weight, config.rms_norm_eps)
        n = F.silu(b @ mlp.gate_proj.weight.double().T) * (b @ mlp.up_proj.weight.double().T)
        x = x + n @ mlp.down_proj.weight.double().T
        norms += [a, b]
        head_outputs.append(out.norm(dim=-1))  # (B, T, heads): each head's output norm per token
        neurons.append(n)
    return norms, head_outputs, neurons


def by_hand(activations, attention_mask):
    """Mean of |a| over each sequence's real tokens, then the L2 norm over the sequences, one loop per sequence."""
    total = 0
    for row, row_mask in zip(activations, attention_mask.bool(), strict=True):
        total = total + row[row_mask].abs().mean(0) ** 2
    return total.sqrt()


def test_importance_matches_a_float64_hand_computation(model, batch):
    importance = width_importance(model, *batch)
    norms, head_outputs, neurons = plain_forward(model, batch[0])
    hidden = sum(by_hand(a, batch[1]) for a in norms)
    torch.testing.assert_close(importance.hidden.double(), hidden, rtol=1e-4, atol=1e-6)
    for layer in range(2):
        torch.testing.assert_close(importance.heads[layer].double(), by_hand(head_outputs[layer], batch[1]), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(importance.neurons[layer].double(), by_hand(neurons[layer], batch[1]), rtol=1e-4, atol=1e-6)
    # ... and so the same units are kept as the hand computation's order keeps.
    assert kept_indices(importance.hidden, 40) == sorted(torch.argsort(-hidden)[:40].tolist())
    assert kept_indices(importance.neurons[1], 50) == sorted(torch.argsort(-by_hand(neurons[1], batch[1]))[:50].tolist())


def test_padding_does_not_count(model, batch):
    trimmed = (batch[0][1:2, :7], batch[1][1:2, :7])
    padded = (batch[0][1:2], batch[1][1:2])
    for a, b in zip(width_importance(model, *trimmed).neurons, width_importance(model, *padded).neurons, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_heads_are_kept_per_kv_group():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.4, 0.3, 0.2])  # 2 KV groups of 3 query heads
    assert kept_heads(scores, 2, 2) == [1, 3]
    assert kept_heads(scores, 2, 4) == [1, 2, 3, 4]
    assert kept_indices(torch.tensor([1.0, 2.0, 2.0, 0.0]), 2) == [1, 2]  # ties: the lower index


def test_pruned_shapes_config_and_round_trip(model, batch, tmp_path):
    student = prune_width(model, width_importance(model, *batch), Widths(48, 64, 2))
    layer = student.model.layers[0]
    assert tuple(layer.self_attn.q_proj.weight.shape) == (2 * HEAD_DIM, 48)
    assert tuple(layer.self_attn.k_proj.weight.shape) == (2 * HEAD_DIM, 48)  # every KV group is kept
    assert tuple(layer.self_attn.o_proj.weight.shape) == (48, 2 * HEAD_DIM)
    assert tuple(layer.mlp.gate_proj.weight.shape) == (64, 48) and tuple(layer.mlp.down_proj.weight.shape) == (48, 64)
    assert tuple(student.model.embed_tokens.weight.shape) == (VOCAB, 48)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied
    config = student.config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim) == (48, 64, 2, 2, HEAD_DIM)
    assert len(config.kdlm_width["hidden"]) == 48 and [len(h) for h in config.kdlm_width["heads"]] == [2, 2]
    assert describe_model(student)["parameters"] == count_parameters(model, Widths(48, 64, 2), 2)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, batch), logits(student, batch))


def test_pruning_neurons_equals_zeroing_their_down_proj_columns(model, batch):
    importance = width_importance(model, *batch)
    student = prune_width(model, importance, Widths(intermediate_size=48))
    masked = _copy(model)
    with torch.no_grad():
        for layer, scores in zip(masked.model.layers, importance.neurons, strict=True):
            pruned = sorted(set(range(128)) - set(kept_indices(scores, 48)))
            layer.mlp.down_proj.weight[:, pruned] = 0
    torch.testing.assert_close(real(batch, logits(student, batch)), real(batch, logits(masked, batch)), rtol=1e-5, atol=1e-6)
    assert (logits(masked, batch) - logits(model, batch)).abs().max() > 1e-4  # the pruned neurons did something


def test_pruning_heads_equals_zeroing_their_o_proj_columns(model, batch):
    importance = width_importance(model, *batch)
    student = prune_width(model, importance, Widths(num_attention_heads=2))
    masked = _copy(model)
    with torch.no_grad():
        for layer, scores in zip(masked.model.layers, importance.heads, strict=True):
            for head in sorted(set(range(4)) - set(kept_heads(scores, 2, 2))):
                layer.self_attn.o_proj.weight[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] = 0
    torch.testing.assert_close(real(batch, logits(student, batch)), real(batch, logits(masked, batch)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rescale", ["calibrated", "none"])
def test_hidden_channel_pruning_is_a_mask_up_to_the_norm_statistics(model, batch, rescale):
    """Hidden channels are not a plain mask: an RMSNorm divides by the root mean square over H channels, the
    pruned one over H' < H. On a model whose pruned channels are zero everywhere (embeddings, o_proj and
    down_proj rows), pruning is exact once every norm weight is scaled by sqrt(H / H'): the calibrated
    rescaling finds exactly that factor, and plain slicing equals the masked model with its norm weights
    scaled by sqrt(H' / H) instead."""
    pruned = list(range(0, 64, 4))  # 16 of 64 channels
    masked = _copy(model)
    with torch.no_grad():
        masked.model.embed_tokens.weight[:, pruned] = 0  # tied: lm_head reads zeros there anyway
        for layer in masked.model.layers:
            layer.self_attn.o_proj.weight[pruned] = 0
            layer.mlp.down_proj.weight[pruned] = 0
        masked.config.rms_norm_eps = 0.0  # eps is added to a mean over H or H' channels: not part of the claim
        for module in masked.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = 0.0
    importance = width_importance(masked, *batch)
    assert importance.hidden[pruned].abs().max() == 0
    student = prune_width(masked, importance, Widths(hidden_size=48), rescale_norms=rescale)
    assert student.config.kdlm_width["hidden"] == sorted(set(range(64)) - set(pruned))
    if rescale == "none":
        with torch.no_grad():
            for name, parameter in masked.named_parameters():
                if name.endswith("norm.weight"):
                    parameter.mul_(math.sqrt(48 / 64))
    torch.testing.assert_close(real(batch, logits(student, batch)), real(batch, logits(masked, batch)), rtol=1e-5, atol=1e-5)


def test_qwen2_with_qkv_biases_prunes_like_llama(batch):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.uniform_(-0.5, 0.5)
    importance = width_importance(model, *batch)
    student = prune_width(model, importance, Widths(48, 64, 2))
    assert tuple(student.model.layers[0].self_attn.q_proj.bias.shape) == (2 * HEAD_DIM,)
    assert tuple(student.model.layers[0].self_attn.k_proj.bias.shape) == (2 * HEAD_DIM,)
    assert describe_model(student)["parameters"] == count_parameters(model, Widths(48, 64, 2), 1)
    heads_only = prune_width(model, importance, Widths(num_attention_heads=2))
    masked = Qwen2ForCausalLM(model.config).eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for head in sorted(set(range(4)) - set(kept_heads(importance.heads[0], 2, 2))):
            masked.model.layers[0].self_attn.o_proj.weight[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] = 0
    torch.testing.assert_close(real(batch, logits(heads_only, batch)), real(batch, logits(masked, batch)), rtol=1e-5, atol=1e-6)


def test_target_params_fits_the_budget(model, batch):
    teacher_params = describe_model(model)["parameters"]
    target = target_parameter_count(0.5, teacher_params)
    widths = widths_for_target(model, target, Widths())
    assert widths.num_attention_heads == 4  # heads are kept unless given
    student = build_width_pruned_student(model, *batch, Widths(), target)
    size = describe_model(student)["parameters"]
    assert size <= target
    assert widths.hidden_size % 4 == 0 and widths.intermediate_size % 32 == 0
    bigger = Widths(widths.hidden_size + 4, widths.intermediate_size + 32, 4)
    assert count_parameters(model, bigger, 2) > target  # a step up on both grids would not fit
    assert target_parameter_count(50_000, teacher_params) == 50_000


def test_plan_predicts_the_built_student(model, batch):
    from kdlm.models.width import planned_config
    from kdlm.plan import shape_from_config

    teacher_params = describe_model(model)["parameters"]
    planned = planned_config(model.config, 2, Widths(num_attention_heads=2), 0.5, teacher_params)
    built = build_width_pruned_student(model, *batch, Widths(num_attention_heads=2), target_parameter_count(0.5, teacher_params))
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "head_dim", "num_key_value_heads"):
        assert getattr(planned, key) == getattr(built.config, key), key
    assert shape_from_config(planned).params == describe_model(built)["parameters"]


def test_bad_widths_and_targets_name_the_setting(model):
    config = model.config
    cases = [
        (Widths(hidden_size=128), "student.width.hidden_size must be between 1 and the teacher's 64"),
        (Widths(hidden_size=42), "student.width.hidden_size (42) must be a multiple of num_attention_heads (4)"),
        (Widths(hidden_size=42, num_attention_heads=4), "must be a multiple of num_attention_heads (4), e.g. 40"),
        (Widths(num_attention_heads=1), "student.width.num_attention_heads (1) must be a multiple of the teacher's 2 KV"),
        (Widths(num_attention_heads=3), "student.width.num_attention_heads (3)"),
    ]
    for widths, message in cases:
        with pytest.raises(KdlmError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_widths(config, widths)
    with pytest.raises(KdlmError, match=r"student.target_params \(200,000\) is larger than the teacher"):
        target_parameter_count(200_000, describe_model(model)["parameters"])
    with pytest.raises(KdlmError, match="student.target_params .* smaller than the smallest student"):
        widths_for_target(model, 1_000, Widths())  # the embeddings alone, 4 wide, hold 1,036
    with pytest.raises(KdlmError, match="student.target_params .* keep more layers"):
        widths_for_target(model, 90_000, Widths(hidden_size=48))


def test_families_with_another_layout_are_refused(model):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(KdlmError, match="cannot width-prune model type 'gpt2'.*student.num_layers"):
        check_prunable(gpt2)
    # Gemma has Llama's module names, but its norms compute (1 + weight) * x / rms(x): slicing would be wrong.
    gemma = GemmaForCausalLM(GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(KdlmError, match="cannot width-prune model type 'gemma'.*weight \\* x / rms"):
        check_prunable(gemma)
    check_prunable(model)


def _copy(model):
    copy = tiny_llama(VOCAB, num_layers=2)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


# The real CLI entry point, in this process (a subprocess would import kdlm again: 25 s on a loaded 2-core box).
def _cli(root: Path, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from kdlm import cli

    monkeypatch.setenv("KDLM_CACHE", str(root / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = [f"teacher.model={root / 'teacher'}", f"data.train={root / 'chat.jsonl'}", "data.heldout=4",
              "data.teacher_answers=false", "data.max_length=96", f"train.output_dir={root / 'out'}"]
    monkeypatch.setattr(sys, "argv", ["kdlm", "build-student", *common, *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_build_student_cli_prunes_width_and_depth(tmp_path, monkeypatch, capsys):
    save_tiny_teacher(tmp_path / "teacher", num_layers=4)
    write_chat_jsonl(tmp_path / "chat.jsonl", count=12)
    code, output = _cli(tmp_path, monkeypatch, capsys, "student.num_layers=3", "student.target_params=0.5",
                        "student.width.num_attention_heads=2")
    assert code == 0, output
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "student-init")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    assert student.config.num_hidden_layers == 3 and student.config.num_attention_heads == 2
    assert describe_model(student)["parameters"] <= describe_model(teacher)["parameters"] / 2
    assert len(student.config.kdlm_teacher_layers) == 3 and "widths {'hidden_size': " in output

    code, output = _cli(tmp_path, monkeypatch, capsys, "student.width.hidden_size=42")
    assert code == 2 and "Traceback" not in output
    assert "student.width.hidden_size (42) must be a multiple of num_attention_heads (4)" in output

    code, output = _cli(tmp_path, monkeypatch, capsys, "student.init=random", "student.target_params=0.5")
    assert code == 2 and "student.width and student.target_params need student.init=prune, not random" in output

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    code, output = _cli(tmp_path, monkeypatch, capsys, f"teacher.model={tmp_path / 'gpt2'}", "student.width.intermediate_size=32")
    assert code == 2 and "cannot width-prune model type 'gpt2'" in output and "Traceback" not in output


def test_model_card_names_the_width_pruning(tmp_path):
    from kdlm.config import load_config
    from kdlm.evaluate.report import write_model_card

    config = load_config(None, ["student.target_params=0.5", "student.width.num_attention_heads=6"])
    card = write_model_card(tmp_path, {"config": config.model_dump(), "steps": 1, "tokens": 8}, [0, 1]).read_text()
    assert "widths pruned by activation importance" in card and "target_params 0.5" in card
    assert "'num_attention_heads': 6" in card
