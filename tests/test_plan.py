"""`kdlm plan`: parameter counts, the memory model against closed forms and measurements, the advice."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

from kdlm.config import RunConfig
from kdlm.plan import (
    GIB,
    ModelShape,
    activation_bytes,
    model_states_bytes,
    recommend,
    shape_from_config,
    step_flops,
)
from test_cli import run_cli
from tiny import save_tiny_teacher, tiny_llama


def test_parameter_counts_from_the_config_equal_the_real_model():
    model = tiny_llama(300, num_layers=3)
    shape = shape_from_config(model.config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.largest_layer == sum(p.numel() for p in model.model.layers[0].parameters())
    pruned = shape_from_config(model.config, num_layers=1)
    assert pruned.params == shape.params - 2 * shape.largest_layer
    frozen = shape_from_config(model.config, trainable="no-embeddings")
    assert frozen.trainable == shape.params - 300 * 64  # tied: one embedding matrix


def test_model_states_match_the_zero_papers_published_figures():
    """ZeRO (arXiv 1910.02054, Figure 1): a 7.5B model with Adam needs 120 GB per device under data parallelism
    (16 bytes per parameter) and 1.9 GB with parameters, gradients and optimizer states sharded over 64 devices."""
    psi = 7.5e9
    shape = ModelShape(params=int(psi), trainable=int(psi), layers=32, hidden=4096, kv_hidden=4096,
                       intermediate=11008, vocab=32000, largest_layer=0)
    assert sum(model_states_bytes(shape, "ddp", 64).values()) == pytest.approx(120e9)
    assert sum(model_states_bytes(shape, "fsdp", 64).values()) == pytest.approx(1.875e9)  # published: 1.9 GB
    zero2 = sum(model_states_bytes(shape, "zero2", 64).values())
    assert zero2 == pytest.approx(4 * psi + 12 * psi / 64)  # fp32 weights stay whole: kdlm keeps no fp16 copy


def test_activation_estimate_is_within_a_quarter_of_the_saved_tensors_of_a_real_step():
    """The per-token activation model against the bytes autograd actually saves (counted with saved-tensor hooks)."""
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 512, (2, 96))
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    for bf16 in (False, True):
        storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.model(input_ids=ids)
        measured = sum(storages.values()) - 4 * 128 * 192  # without the embedding output, saved once
        estimate = activation_bytes(shape_from_config(config), 192, bf16, checkpointing=False)
        assert 0.75 < estimate / measured < 1.25, (bf16, estimate, measured)


def test_step_flops_closed_form():
    shape = ModelShape(params=1000, trainable=1000, layers=1, hidden=10, kv_hidden=10, intermediate=10, vocab=20,
                       largest_layer=800)  # tied: 200 embedding + 800 decoder
    assert step_flops(shape, None, 5) == 6 * 1000 * 5
    teacher = ModelShape(params=3000, trainable=0, layers=1, hidden=10, kv_hidden=10, intermediate=10, vocab=20,
                         largest_layer=2600, untied=True)  # input embedding 200 costs nothing
    assert step_flops(shape, teacher, 5) == 6 * 1000 * 5 + 2 * 2800 * 5


def _config(**train):
    return RunConfig.model_validate({"train": {"batch_size": 8, **train}, "data": {"max_length": 512}})


BIG_STUDENT = ModelShape(params=8_000_000_000, trainable=8_000_000_000, layers=32, hidden=4096, kv_hidden=1024,
                         intermediate=14336, vocab=128256, largest_layer=218_000_000)
BIG_TEACHER = ModelShape(params=70_000_000_000, trainable=0, layers=80, hidden=8192, kv_hidden=1024,
                         intermediate=28672, vocab=128256, largest_layer=856_000_000)


def test_advice_shards_when_one_device_cannot_hold_the_student():
    config = _config()
    config.teacher.cache = "cache"  # trained from a cache: the 70B teacher is not loaded
    plan, notes = recommend(config, BIG_STUDENT, BIG_TEACHER, devices=8, device_memory_gib=80, bf16=True, gpu=True,
                            flops_per_second=4e14)
    assert plan.strategy in ("zero2", "fsdp") and plan.fits and plan.total_gib <= 72
    assert notes[0].startswith(f"strategy: {plan.strategy}")
    single, single_notes = recommend(config, BIG_STUDENT, BIG_TEACHER, devices=1, device_memory_gib=80, bf16=True,
                                     gpu=True, flops_per_second=4e14)
    assert not single.fits and "does not fit" in single_notes[0] and "student.lora" in single_notes[0]


def test_advice_sends_a_teacher_that_crowds_the_device_to_a_cache():
    plan, notes = recommend(_config(), BIG_STUDENT, BIG_TEACHER, devices=8, device_memory_gib=80, bf16=True, gpu=True,
                            flops_per_second=4e14)
    assert any("kdlm cache-teacher" in note for note in notes)


def test_kdlm_plan_on_a_local_model(tmp_path):
    teacher = save_tiny_teacher(tmp_path / "teacher")
    run_cli("plan", f"teacher.model={teacher}", "student.num_layers=2", "--json", str(tmp_path / "plan.json"), cwd=tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    real = tiny_llama(259, num_layers=4)
    assert plan["teacher"]["params"] == sum(p.numel() for p in real.parameters())
    assert plan["student"]["layers"] == 2 and plan["fits"] and plan["total_gib"] * GIB > plan["parts_gib"]["runtime"]
    missing = run_cli("plan", "teacher.model=/nonexistent/model", cwd=tmp_path, check_ok=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_a_teacher_larger_than_free_memory_is_refused_before_loading(tmp_path):
    """A config-only 'teacher' of about 40 GB in fp32 (a folder with just config.json) on this 24 GB machine."""
    import psutil
    from transformers import LlamaConfig

    free = psutil.virtual_memory().available
    hidden = 4096
    layers = max(1, int(1.1 * free / 4 / (12 * hidden * hidden)))  # ~12 H^2 parameters per Llama layer
    LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=11008, num_hidden_layers=layers,
                num_attention_heads=32).save_pretrained(tmp_path / "huge")
    proc = run_cli("distill", f"teacher.model={tmp_path / 'huge'}", f"train.output_dir={tmp_path / 'run'}", cwd=tmp_path,
                   check_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "teacher.dtype=bfloat16" in proc.stderr and "kdlm cache-teacher" in proc.stderr


def _small_run(**loss):
    return RunConfig.model_validate({"train": {"batch_size": 2}, "data": {"max_length": 64}, "loss": loss,
                                     "teacher": {"cache": "cache"}})


def _plan(config, shape, strategy, devices):
    from kdlm.plan import make_plan

    return make_plan(config, shape, shape, devices=devices, device_memory_gib=24, strategy=strategy, micro_batch=2,
                     bf16=False, gpu=False, flops_per_second=1e10)


@pytest.mark.parametrize("untied", [False, True])
def test_fsdp_holds_the_whole_root_unit_a_reduce_scatter_copy_and_gathers_the_student_at_the_end(untied):
    """Closed forms of what FSDP2 holds besides the shards (measured in benchmarks/plan_check.py --strategy fsdp)."""
    vocab, hidden, layer, params = 1000, 64, 50_000, 400_000
    shape = ModelShape(params=params, trainable=params, layers=4, hidden=hidden, kv_hidden=32, intermediate=128,
                       vocab=vocab, largest_layer=layer, untied=untied)
    root = vocab * hidden * (2 if untied else 1)  # embeddings (+ the untied lm_head): 64 000 or 128 000 > one layer
    for fused, root_gradient in ((True, 0), (False, 4 * root)):  # the fused loss already counts the (V, H) gradient
        plan = _plan(_small_run(fused=fused), shape, "fsdp", 4)
        assert plan.parts_gib["sharding buffers"] * GIB == pytest.approx(4 * root + 4 * root + root_gradient)
    runtime = plan.parts_gib["runtime"] * GIB
    assert plan.build_phase_gib * GIB == pytest.approx(runtime + 4 * params + 4 * params / 4)
    # sharded weights and AdamW moments still alive, the gathered state dict and the plain copies made of it
    assert plan.gather_phase_gib * GIB == pytest.approx(runtime + 4 * params / 4 + 8 * params / 4 + 8 * params)
    assert plan.peak_gib == max(plan.total_gib, plan.build_phase_gib, plan.gather_phase_gib)
    ddp = _plan(_small_run(), shape, "ddp", 4)
    assert "sharding buffers" not in ddp.parts_gib and ddp.build_phase_gib == ddp.gather_phase_gib == 0


def test_ddp_holds_gradient_buckets_only_on_several_devices():
    """DDP's reducer copies every gradient into its flat buckets (gradient_as_bucket_view=False, Accelerate's
    default): a second fp32 copy of the gradients per process; one process has no reducer."""
    shape = shape_from_config(tiny_llama(300, num_layers=3).config)
    one, two = _plan(_small_run(), shape, "ddp", 1), _plan(_small_run(), shape, "ddp", 2)
    assert "gradient buckets" not in one.parts_gib
    assert two.parts_gib["gradient buckets"] * GIB == 4 * shape.trainable
    assert two.total_gib - one.total_gib == pytest.approx(4 * shape.trainable / GIB)


def test_the_benchmarked_two_process_runs_plan_as_recorded_in_docs(tmp_path):
    """benchmarks/plan_check.py --strategy fsdp|ddp --processes 2: the planned peaks docs/plan.md sets next to the
    measured ones (a change to the memory model must update that table)."""
    import sys
    from pathlib import Path

    from transformers import LlamaConfig

    from kdlm.plan import config_shapes, make_plan

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import plan_check

    for name, fields in (("student", plan_check.FSDP_STUDENT), ("teacher", plan_check.FSDP_TEACHER)):
        LlamaConfig(**fields).save_pretrained(tmp_path / name)
    planned = {}
    for strategy in ("fsdp", "ddp"):
        config = plan_check.sharded_config(tmp_path, strategy)
        student, teacher = config_shapes(config)
        planned[strategy] = make_plan(config, student, teacher, devices=2, device_memory_gib=24, strategy=strategy,
                                      micro_batch=2, bf16=False, gpu=False, flops_per_second=1e10).peak_gib
    assert student.params == 112_678_656
    assert (round(planned["fsdp"], 2), round(planned["ddp"], 2)) == (1.92, 2.93)
