"""`kdlm export --format gguf` and int8 evaluation, on tiny real Llamas: the file is read back by transformers'
own GGUF reader and compared with the HF model; bad input leaves no file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from typer.testing import CliRunner

from kdlm.cli import app
from kdlm.errors import KdlmError
from kdlm.evaluate.quantize import quantize_int8
from kdlm.export.check import TOLERANCES, failures
from kdlm.export.gguf_file import permute_rows, pre_tokenizer_name
from kdlm.export.run import export_gguf
from test_cli import run_cli
from tiny import CHATML, tiny_llama, tiny_tokenizer

TEXT = "the theme: 12 times 12 is 144.\n<|im_start|>user\nthe sea<|im_end|>"


def merged_tokenizer() -> PreTrainedTokenizerFast:
    """tests/tiny.py's byte-level vocabulary plus three merges (t+h, th+e, Ġ+the), as real BPEs have."""
    base = json.loads(tiny_tokenizer().backend_tokenizer.to_str())
    vocab = base["model"]["vocab"]
    for token in ("th", "the", "Ġthe"):
        vocab[token] = len(vocab)
    base["model"]["merges"] = [["t", "h"], ["th", "e"], ["Ġ", "the"]]
    from tokenizers import Tokenizer

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(base)), eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny Llama (GQA: 4 query heads, 2 key/value heads) with 2 unused embedding rows, saved as a run folder."""
    root = tmp_path_factory.mktemp("export")
    tokenizer = merged_tokenizer()
    model = tiny_llama(len(tokenizer) + 2, seed=5)
    with torch.no_grad():  # larger weights than the init's: peaked logits, so top-1 agreement means something
        for parameter in model.parameters():
            parameter.mul_(4 if parameter.ndim == 2 else 1)
    model.save_pretrained(root / "run" / "student")
    tokenizer.save_pretrained(root / "run" / "student")
    return root


def reload(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_pre_tokenizer_names_are_llama_cpps():
    """`tokenizer.ggml.pre` must be a name llama.cpp's llama-vocab.cpp knows ("gpt-2", not the model name "gpt2":
    llama.cpp refused kdlm's files with `unknown pre-tokenizer type: 'gpt2'`, checked with llama-cpp-python 0.3.36)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"  # what transformers' GGUF conversion of SmolLM2 gives
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}) == "smollm"  # SmolLM2's own tokenizer.json
    with pytest.raises(KdlmError, match="Nothing was written"):
        pre_tokenizer_name({"type": "Metaspace"})


def test_permute_rows_pairs_each_heads_halves():
    # Head of 4 rows [a0 a1 | b0 b1] (HF rotates a_i with b_i) -> [a0 b0 a1 b1] (llama.cpp rotates neighbours).
    weight = np.arange(16, dtype=np.float32).reshape(8, 2)  # 2 heads x 4 rows
    rows = permute_rows(weight, num_heads=2)[:, 0] // 2
    assert rows.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_export_reloads_with_close_logits_and_the_same_tokens(student, quant):
    out = student / f"student-{quant}.gguf"
    result = export_gguf(str(student / "run"), out=str(out), quant=quant, log=lambda line: None)
    assert out.is_file() and result["bytes"] == out.stat().st_size
    assert not failures(result["check"], quant)
    # Independently of export's own check: the reloaded model's logits against the HF ones, in float64.
    reference = AutoModelForCausalLM.from_pretrained(student / "run" / "student", dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(student / "run" / "student")
    exported, gguf_tokenizer = reload(out)
    ids = hf_tokenizer(TEXT)["input_ids"]
    assert gguf_tokenizer(TEXT)["input_ids"] == ids
    assert hf_tokenizer.convert_ids_to_tokens(ids)[:2] == ["the", "Ġthe"]  # the merges were used
    assert gguf_tokenizer.decode(ids) == TEXT
    with torch.no_grad():
        a = reference(input_ids=torch.tensor([ids])).logits.double()
        b = exported(input_ids=torch.tensor([ids])).logits.double()
    relative = ((a - b).abs().mean() / a.std(-1).mean()).item()
    assert relative < TOLERANCES[quant]["relative_mean_abs"]
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="sum").item() / len(ids)
    assert kl < TOLERANCES[quant]["kl"] and (a.argmax(-1) == b.argmax(-1)).double().mean().item() >= 0.9
    if quant == "f16":  # 11 significant bits: far tighter than the q8_0 bound
        assert relative < 1e-3
    assert exported.config.tie_word_embeddings and exported.config.num_key_value_heads == 2


def test_q4_k_m_names_llama_quantize_and_writes_nothing(student):
    with pytest.raises(KdlmError, match="llama-quantize"):
        export_gguf(str(student / "run"), out=str(student / "k.gguf"), quant="q4_k_m")
    with pytest.raises(KdlmError, match="not known"):
        export_gguf(str(student / "run"), out=str(student / "k.gguf"), quant="q3")
    assert not list(student.glob("k*.gguf")) and not list(student.glob(".*"))


def test_cli_export_and_bad_input(student, tmp_path):
    done = run_cli("export", str(student / "run"), "--quant", "q8_0", cwd=tmp_path)
    assert "top-1 agreement" in done.stderr and (student / "run" / "student-q8_0.gguf").is_file()
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(tmp_path / "gpt2")
    # The refusals through the same command, in this process (a subprocess costs seconds each): a model family
    # the writer does not know (its architecture named), a missing folder, an unknown format or suffix, a K-quant.
    for args, message in (([str(tmp_path / "gpt2"), "--out", str(tmp_path / "g.gguf")], "'gpt2' (GPT2LMHeadModel)"),
                          ([str(tmp_path / "nope")], "does not exist"), ([str(student / "run"), "--format", "onnx"], "--format 'onnx'"),
                          ([str(student / "run"), "--out", str(tmp_path / "x.bin")], "must end in .gguf"),
                          ([str(tmp_path / "gpt2"), "--quant", "q4_k_m"], "llama-quantize")):
        result = CliRunner().invoke(app, ["export", *args])
        assert isinstance(result.exception, KdlmError) and message in str(result.exception), (args, result.output)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*gguf"))


def test_int8_quantisation_keeps_logits_close(student):
    model = AutoModelForCausalLM.from_pretrained(student / "run" / "student", dtype=torch.float32).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(student / "run" / "student")(TEXT)["input_ids"]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits.double()
        quantized = quantize_int8(model)
        logits = quantized(input_ids=ids).logits.double()
    assert isinstance(quantized.model.layers[0].mlp.up_proj, torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(quantized.lm_head, torch.ao.nn.quantized.dynamic.Linear)
    relative = ((reference - logits).abs().mean() / reference.std(-1).mean()).item()
    assert 0 < relative < 0.1  # rounded (not identical), yet close: per-tensor int8 weights and activations


def test_eval_scores_the_int8_student_against_its_fp32_self(student):
    from kdlm.evaluate.suite import EvalSuiteConfig, evaluate_suite

    folder = student / "run" / "student"
    config = EvalSuiteConfig(tasks=["fidelity", "cost"], teacher=str(folder), teacher_row=False, quantize="int8",
                             fidelity_prompts=2, fidelity_max_new_tokens=6, generation_tokens=2, batch_size=2,
                             output_dir=str(student / "eval"))
    report = evaluate_suite([str(student / "run")], config)
    result = report["models"]["run-int8"]
    # KL > 0: the reference is the fp32 model, not the int8 copy; the random tiny model has near-ties, so top-1 only > 0.5
    assert 0 < result["fidelity"]["kl_to_teacher"] < 0.05 and result["fidelity"]["top1_agreement"] > 0.5
    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
    assert result["cost"]["disk_mb"] * 2**20 < 4 * parameters and result["cost"]["parameters_m"] == parameters / 1e6
    # The fp32 rows (the teacher's) keep their cache keys in an int8 run; the int8 rows get their own.
    from kdlm.evaluate.suite import _settings_key

    fp32 = config.model_copy(update={"quantize": "none"})
    assert _settings_key("m", "cost", config) == _settings_key("m", "cost", fp32) != _settings_key("m", "cost", config, "int8")
    with pytest.raises(ValueError, match="bf16: true do not mix"):
        EvalSuiteConfig(quantize="int8", bf16=True)


def test_the_check_refuses_a_file_without_the_q_k_permutation(student, monkeypatch):
    # Without llama.cpp's row order, the reader's inverse permutation scrambles q and k: the check must catch it.
    monkeypatch.setattr("kdlm.export.gguf_file.permute_rows", lambda weight, num_heads: weight)
    out = student / "unpermuted.gguf"
    with pytest.raises(KdlmError, match="does not match the HF student"):
        export_gguf(str(student / "run"), out=str(out), quant="f16", log=lambda line: None)
    assert not out.exists() and not list(student.glob(".unpermuted*"))


def test_eval_scores_an_exported_gguf_file(tmp_path):
    # `kdlm eval` loads a .gguf file (dequantised by transformers): the quality of the deployed q8_0 weights.
    # No padding rows here: their `[PADn]` tokens would make the vocabularies differ for the fidelity task.
    from kdlm.evaluate.suite import EvalSuiteConfig, evaluate_suite

    tokenizer = merged_tokenizer()
    tiny_llama(len(tokenizer), seed=6).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    out = tmp_path / "student-q8_0.gguf"
    export_gguf(str(tmp_path / "student"), out=str(out), quant="q8_0", check=False)
    config = EvalSuiteConfig(tasks=["fidelity"], teacher=str(tmp_path / "student"), teacher_row=False,
                             fidelity_prompts=2, fidelity_max_new_tokens=6, batch_size=2, output_dir=str(tmp_path / "eval"))
    fidelity = evaluate_suite([str(out)], config)["models"][str(out)]["fidelity"]
    assert 0 < fidelity.get("kl_to_teacher", -1) < TOLERANCES["q8_0"]["kl"], fidelity
