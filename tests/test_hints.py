"""Hint terms: layer maps, the hidden-state and MiniLM attention losses by hand, and training with them."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdlm.config import HintConfig, LossConfig, TrainConfig
from kdlm.data import encode_records, load_records
from kdlm.data.tokenize import collate
from kdlm.errors import KdlmError
from kdlm.train.hints import HintObjective, layer_pairs, use_eager_attention
from kdlm.train.loop import StudentObjective, run_teacher, train
from tiny import tiny_llama, tiny_tokenizer, trained_tiny_teacher, write_chat_jsonl


def narrow_llama(vocab_size: int, hidden: int = 32, num_layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 3):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=2, pad_token_id=2, bos_token_id=1)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    data = write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl")
    examples = encode_records(tokenizer, load_records(str(data)), max_length=96)
    teacher, _ = trained_tiny_teacher(num_layers=4)  # trained: its attention is far from the student's
    return tokenizer, examples, teacher


# ---------------------------------------------------------------- layer maps


def test_layer_maps():
    def pairs(**kwargs):
        explicit = kwargs.pop("explicit", None)
        kept = kwargs.pop("kept", None)
        return layer_pairs(HintConfig(hidden_weight=1, **kwargs), 3, 12, kept, explicit, "hints.pairs")

    assert pairs() == [(0, 3), (1, 7), (2, 11)]  # uniform: block ends aligned, last to last
    assert pairs(layer_map="last", num_layers=2) == [(1, 10), (2, 11)]
    assert pairs(layer_map="every", every=4) == [(0, 3), (1, 7), (2, 11)]
    assert pairs(layer_map="every", every=5) == [(0, 4), (1, 9)]
    assert pairs(layer_map="kept", kept=[0, 5, 11]) == [(0, 0), (1, 5), (2, 11)]
    assert pairs(layer_map="pairs", explicit=[(0, 2), (-1, -1)]) == [(0, 2), (2, 11)]
    with pytest.raises(KdlmError, match="student layer 3 is out of range .the student has 3 layers"):
        pairs(layer_map="pairs", explicit=[(3, 0)])
    with pytest.raises(KdlmError, match="teacher layer -13 is out of range"):
        pairs(layer_map="pairs", explicit=[(0, -13)])
    with pytest.raises(KdlmError, match="needs a pruned student"):
        pairs(layer_map="kept")
    with pytest.raises(KdlmError, match="needs hints.pairs"):
        pairs(layer_map="pairs")


def test_head_mismatch_and_bad_projection_are_clear_errors():
    teacher = tiny_llama(50, num_layers=2).config
    with pytest.raises(KdlmError, match="num_attention_heads in student .2. and teacher .4.*hints.relation_heads"):
        HintObjective(HintConfig(attention_weight=1), narrow_llama(50, heads=2, kv_heads=2).config, teacher)
    # MiniLMv2 relation heads need no head match, only widths they divide (student q 32, kv 16; teacher 64, 32)
    HintObjective(HintConfig(attention_weight=1, relation_heads=4), narrow_llama(50, heads=2, kv_heads=1).config, teacher)
    with pytest.raises(KdlmError, match=r"hints.relation_heads=32 must divide the student's query width \(32\) and key/value width \(16\)"):
        HintObjective(HintConfig(attention_weight=1, relation_heads=32), narrow_llama(50, heads=2, kv_heads=1).config, teacher)
    with pytest.raises(KdlmError, match="identity needs equal widths"):
        HintObjective(HintConfig(hidden_weight=1, projection_init="identity"), narrow_llama(50).config, teacher)
    with pytest.raises(KdlmError, match="widths differ"):
        HintObjective(HintConfig(hidden_weight=1, project="never"), narrow_llama(50).config, teacher)
    square = HintObjective(HintConfig(hidden_weight=1, project="always", projection_init="identity"), teacher, teacher)
    assert torch.equal(square.projections[0].weight, torch.eye(64))
    assert len(HintObjective(HintConfig(hidden_weight=1), teacher, teacher).projections) == 0  # auto, same width


# ---------------------------------------------------------------- the terms, against a hand computation


def test_hidden_terms_by_hand():
    gen = torch.Generator().manual_seed(0)
    student_states = tuple(torch.randn(2, 5, 3, generator=gen) for _ in range(3))  # embeddings + 2 blocks
    teacher_states = tuple(torch.randn(2, 5, 4, generator=gen) for _ in range(5))
    mask = torch.tensor([[False, True, True, False], [True, True, False, False]])
    student_config = LlamaConfig(hidden_size=3, num_hidden_layers=2, num_attention_heads=1)
    teacher_config = LlamaConfig(hidden_size=4, num_hidden_layers=4, num_attention_heads=1)
    for loss, reduce in (("mse", "mean"), ("cosine", "mean"), ("mse", "sum")):
        hints = HintObjective(HintConfig(hidden_weight=1, hidden_loss=loss, hidden_reduce=reduce), student_config, teacher_config)
        expected = 0.0
        for index, (s, t) in enumerate([(0, 1), (1, 3)]):
            weight = hints.projections[index].weight.detach().double()
            for b, p in mask.nonzero().tolist():
                x = weight @ student_states[s + 1][b, p].double()
                y = teacher_states[t + 1][b, p].double()
                if loss == "mse":
                    expected += float(((x - y) ** 2).mean())
                else:
                    expected += 1 - float(x @ y / (x.norm() * y.norm()))
        actual = hints.hidden_sum(student_states, teacher_states, mask)
        assert math.isclose(actual.item(), expected / 2 if reduce == "mean" else expected, rel_tol=1e-5)  # 2 pairs


def test_pairs_in_hf_hidden_states_numbering():
    """DistillKit's layer_mapping counts HF's hidden_states: 0 is the embedding output, i is block i - 1."""
    gen = torch.Generator().manual_seed(1)
    student_states = tuple(torch.randn(2, 5, 3, generator=gen) for _ in range(3))  # embeddings + 2 blocks
    teacher_states = tuple(torch.randn(2, 5, 3, generator=gen) for _ in range(5))  # embeddings + 4 blocks
    mask = torch.tensor([[False, True, True, False], [True, True, False, False]])
    student_config = LlamaConfig(hidden_size=3, num_hidden_layers=2, num_attention_heads=1)
    teacher_config = LlamaConfig(hidden_size=3, num_hidden_layers=4, num_attention_heads=1)

    def objective(pairs, layer_index):
        config = HintConfig(hidden_weight=1, layer_map="pairs", pairs=pairs, layer_index=layer_index)
        return HintObjective(config, student_config, teacher_config)

    hf = objective([(0, 0), (1, 2), (-1, -1)], "hf_hidden_states")
    assert hf.hidden_pairs == [(0, 0), (1, 2), (2, 4)]
    assert objective([(0, 1), (-1, -1)], "block").hidden_pairs == [(1, 2), (2, 4)]  # the same states, counted by block
    expected = sum(float(((student_states[s][b, p] - teacher_states[t][b, p]) ** 2).mean())
                   for s, t in [(0, 0), (1, 2), (2, 4)] for b, p in mask.nonzero().tolist()) / 3
    assert math.isclose(hf.hidden_sum(student_states, teacher_states, mask).item(), expected, rel_tol=1e-5)
    with pytest.raises(KdlmError, match=r"student hidden state 3 is out of range .the student has 3 hidden states"):
        objective([(3, 0)], "hf_hidden_states")


def test_attention_transfer_by_hand(setup):
    """KL of attention rows and of value relations for a narrow student and the teacher, in float64 loops."""
    tokenizer, examples, teacher = setup
    student = narrow_llama(len(tokenizer))
    for model in (student, teacher):
        use_eager_attention(model)
    config = HintConfig(attention_weight=1.0, attention_pairs=[(0, 1), (-1, -1)])
    hints = HintObjective(config, student.config, teacher.config)
    batch = collate(examples[:2], tokenizer.pad_token_id)
    objective = StudentObjective(student, LossConfig(kd_weight=0.0), len(tokenizer), hints)
    _, teacher_states = run_teacher(teacher, batch, len(tokenizer), bf16=False, online=False, hints=hints)
    _, _, _, hint_sum, count = objective(batch, None, 0.0, teacher_states)

    captured = {}
    def keep(name):
        return lambda _m, _i, output: captured.__setitem__(name, output.detach().double())
    handles = [model.model.layers[i].self_attn.v_proj.register_forward_hook(keep((tag, i)))
               for tag, model, layers in (("s", student, (0, 1)), ("t", teacher, (1, 3))) for i in layers]
    with torch.no_grad():
        s_out = student.model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_attentions=True)
        t_out = teacher.model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_attentions=True)
    for handle in handles:
        handle.remove()

    def kl(p, q):
        return sum(float(a * (math.log(a) - math.log(b))) for a, b in zip(p, q, strict=True) if a > 0)

    def relation(values, kv_heads, head, row, length):
        d = values.shape[-1] // kv_heads
        v = values[:, head * d:(head + 1) * d]
        scores = [float(v[row] @ v[k]) / math.sqrt(d) for k in range(row + 1) if k < length]
        top = max(scores)
        exps = [math.exp(x - top) for x in scores]
        return [e / sum(exps) for e in exps] + [0.0] * (length - len(exps))

    expected = 0.0
    labels = batch["labels"]
    for b in range(2):
        length = int(batch["attention_mask"][b].sum())
        for p in range(labels.shape[1] - 1):
            if labels[b, p + 1] == -100:
                continue
            for s, t in [(0, 1), (1, 3)]:
                heads = student.config.num_attention_heads
                expected += sum(kl(t_out.attentions[t][b, h, p, :length].double().tolist(),
                                   s_out.attentions[s][b, h, p, :length].double().tolist()) for h in range(heads)) / heads
                kv = 2
                expected += sum(kl(relation(captured[("t", t)][b], kv, h, p, length),
                                   relation(captured[("s", s)][b], kv, h, p, length)) for h in range(kv)) / kv
    assert int(count) > 10
    assert math.isclose(hint_sum.item(), expected, rel_tol=1e-4)


def test_minilmv2_relations_by_hand_across_head_counts(setup):
    """Q-Q, K-K, V-V relations over 4 relation heads, a 2-head student and a 4-head teacher, in float64 loops."""
    tokenizer, examples, teacher = setup
    student = narrow_llama(len(tokenizer), heads=2, kv_heads=1)
    config = HintConfig(attention_weight=1.0, attention_pairs=[(0, 1), (-1, -1)], relation_heads=4)
    hints = HintObjective(config, student.config, teacher.config)
    assert not hints.needs_attention_probs  # no eager attention needed
    batch = collate(examples[:2], tokenizer.pad_token_id)
    objective = StudentObjective(student, LossConfig(kd_weight=0.0), len(tokenizer), hints)
    _, teacher_states = run_teacher(teacher, batch, len(tokenizer), bf16=False, online=False, hints=hints)
    _, _, _, hint_sum, count = objective(batch, None, 0.0, teacher_states)

    captured = {}
    handles = [getattr(model.model.layers[i].self_attn, name).register_forward_hook(
                   lambda _m, _i, output, key=(tag, name, i): captured.__setitem__(key, output.detach().double()))
               for tag, model, layers in (("s", student, (0, 1)), ("t", teacher, (1, 3)))
               for i in layers for name in ("q_proj", "k_proj", "v_proj")]
    with torch.no_grad():
        for model in (student, teacher):
            model.model(**{k: batch[k] for k in ("input_ids", "attention_mask")})
    for handle in handles:
        handle.remove()

    def relation(vectors, head, row, length):  # softmax over the keys a causal row sees, of one relation head
        d = vectors.shape[-1] // 4
        x = vectors[:, head * d:(head + 1) * d]
        exps = torch.exp(x[: min(row + 1, length)] @ x[row] / math.sqrt(d))
        return exps / exps.sum()

    def kl(p, q):
        return float((p * (p.log() - q.log())).sum())

    expected = 0.0
    for b in range(2):
        length = int(batch["attention_mask"][b].sum())
        for p in range(batch["labels"].shape[1] - 1):
            if batch["labels"][b, p + 1] == -100:
                continue
            for (s, t), name, head in itertools.product([(0, 1), (1, 3)], ("q_proj", "k_proj", "v_proj"), range(4)):
                expected += kl(relation(captured[("t", name, t)][b], head, p, length),
                               relation(captured[("s", name, s)][b], head, p, length)) / 4
    assert int(count) > 10
    assert math.isclose(hint_sum.item(), expected, rel_tol=1e-4)


# ---------------------------------------------------------------- training


def _train(setup, output_dir, hint_config, *, steps=6, resume=False, on_step=None, student=None, lr=3e-3):
    tokenizer, examples, teacher = setup
    student = student or narrow_llama(len(tokenizer))
    config = TrainConfig(output_dir=str(output_dir), max_steps=steps, batch_size=4, lr=lr, warmup_steps=0,
                         bf16=False, resume=resume)
    result = train(student, examples, train_config=config, loss_config=LossConfig(kd_weight=0.5),
                   pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), teacher=teacher,
                   hint_config=hint_config, on_step=on_step)
    return student, result


@pytest.mark.parametrize("hint_config", [
    HintConfig(hidden_weight=1.0, hidden_loss="cosine"),
    HintConfig(hidden_weight=0.1, layer_map="last", num_layers=1),
    HintConfig(attention_weight=1.0),
], ids=["hidden-cosine", "hidden-mse-projected", "attention"])
def test_hint_terms_decrease_and_projections_are_checkpointed(setup, tmp_path, hint_config):
    student, result = _train(setup, tmp_path, hint_config, lr=1e-2)
    hint = [r["hint"] for r in result.history]
    assert hint[-1] < 0.8 * hint[0]
    saved = torch.load(tmp_path / "checkpoints" / "step-000006" / "model.pt", weights_only=True)
    projections = {name for name in saved if name.startswith("hints.")}
    pairs = 0 if not hint_config.hidden_weight else 1 if hint_config.layer_map == "last" else 2
    assert projections == {f"hints.projections.{i}.weight" for i in range(pairs)}
    assert not any("hints" in name for name in student.state_dict())  # the exported student has none


def test_minilmv2_relations_train_a_student_with_other_head_counts(setup, tmp_path):
    tokenizer = setup[0]
    student = narrow_llama(len(tokenizer), heads=2, kv_heads=1)  # the teacher has 4 heads, 2 key/value heads
    # The relation KLs are small (~0.02 per token at the start), hence the weight.
    _, result = _train(setup, tmp_path, HintConfig(attention_weight=20.0, relation_heads=4), steps=12, student=student, lr=1e-2)
    hint = [r["hint"] for r in result.history]
    assert hint[-1] < 0.8 * hint[0]
    assert student.config._attn_implementation != "eager"  # relations need no attention probabilities


def test_resume_restores_the_projections(setup, tmp_path):
    config = HintConfig(hidden_weight=0.1)
    _train(setup, tmp_path / "straight", config, steps=4)
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "step-000004" / "model.pt", weights_only=True)

    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(setup, tmp_path / "resumed", config, steps=4, on_step=interrupt)
    _train(setup, tmp_path / "resumed", config, steps=4, resume=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "step-000004" / "model.pt", weights_only=True)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-6, atol=1e-7, msg=name)


def test_hints_without_a_teacher_are_refused(setup, tmp_path):
    tokenizer, examples, _ = setup
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, bf16=False)
    with pytest.raises(KdlmError, match="need the live teacher"):
        train(narrow_llama(len(tokenizer)), examples, train_config=config, loss_config=LossConfig(kd_weight=0.0),
              pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), hint_config=HintConfig(hidden_weight=1))
