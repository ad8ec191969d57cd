"""The fused loss inside the training objective on real model families: Gemma-2's soft-capped and Cohere's
scaled logits take the fused path with the family's own transform, and a LoRA-wrapped or biased lm_head falls
back to the dense path. Every loss and gradient is checked against a float64 reference computed from the
model's own forward logits (where transformers applies the family's transform)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

from kdlm.config import LossConfig
from kdlm.train.loop import StudentObjective
from tiny import tiny_llama

VOCAB, KD_WEIGHT, TEMPERATURE = 61, 0.7, 2.0
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def gemma2():
    torch.manual_seed(0)
    config = Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=0.2, attn_logit_softcapping=None,
                          query_pre_attn_scalar=16, attn_implementation="eager")
    return Gemma2ForCausalLM(config)


def cohere():
    torch.manual_seed(0)
    return CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.3, attn_implementation="eager"))


def biased_head():
    model = tiny_llama(VOCAB, num_layers=1, seed=0)
    model.config.tie_word_embeddings = False
    torch.manual_seed(1)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, VOCAB, bias=True)
    return model


def lora_head():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(VOCAB, num_layers=1, seed=0)
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(model.config.hidden_size, VOCAB, bias=False)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    return peft


def batch():
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, VOCAB, (2, 9), generator=generator)
    labels = input_ids.clone()
    labels[0, :3] = -100  # prompt tokens
    labels[1, :5] = -100
    mask = labels[:, 1:] != -100
    teacher = torch.randn(int(mask.sum()), VOCAB, generator=generator) * 3
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}, teacher


def reference(model, batch: dict, teacher: torch.Tensor):
    """(total, kd, ce) and the gradients of total, in float64, from the model's own forward logits."""
    model = copy.deepcopy(model).double().train()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    student, targets = logits[:, :-1][mask], batch["labels"][:, 1:][mask]
    ce = -torch.log_softmax(student, -1).gather(-1, targets[:, None]).sum()
    t = torch.log_softmax(teacher.double() / TEMPERATURE, -1)
    s = torch.log_softmax(student / TEMPERATURE, -1)
    kd = (t.exp() * (t - s)).sum()
    total = (1 - KD_WEIGHT) * ce + KD_WEIGHT * kd
    total.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return (total.item(), kd.item(), ce.item()), grads


def objective_run(model, batch: dict, teacher: torch.Tensor, fused: bool):
    model = copy.deepcopy(model).train()
    loss = LossConfig(divergence="fkl", kd_weight=KD_WEIGHT, temperature=TEMPERATURE, fused=fused)
    objective = StudentObjective(model, loss, VOCAB)
    total, kd, ce, _, _ = objective(batch, teacher, KD_WEIGHT)
    total.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return objective.fused, (total.item(), kd.item(), ce.item()), grads


def assert_matches(run, expected):
    (values, grads), (ref_values, ref_grads) = run, expected
    assert values == pytest.approx(ref_values, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("make", [gemma2, cohere], ids=["gemma2-softcap", "cohere-scale"])
def test_fused_path_applies_the_familys_logit_transform(make):
    model = make()
    inputs, teacher = batch()
    expected = reference(model, inputs, teacher)
    for fused in (True, False):
        took_fused, values, grads = objective_run(model, inputs, teacher, fused)
        assert took_fused is fused
        assert_matches((values, grads), expected)


@pytest.mark.parametrize("make", [biased_head, lora_head], ids=["lm_head-bias", "lora-lm_head"])
def test_a_head_the_fused_loss_cannot_take_falls_back_to_the_dense_path(make):
    model = make()
    inputs, teacher = batch()
    took_fused, values, grads = objective_run(model, inputs, teacher, fused=True)
    assert took_fused is False
    assert_matches((values, grads), reference(model, inputs, teacher))
