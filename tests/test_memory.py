"""The pre-run memory estimate (common.estimate_peak_memory / check_memory) and the measurement it
was fitted to."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO_ROOT, load_algorithm
from transformers import GPT2Config, Qwen2Config

import common

QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)


def run_args(**overrides):
    base = dict(model_name="", cuda=True, max_new_tokens=512, micro_batch_size=64,
                micro_batch_tokens=16384, fsdp=False, gradient_checkpointing=False,
                rollout="generate", prompts_per_step=64, group_size=8, eval_prompts=512,
                eval_samples=8, final_eval_samples=64, beta=0.0)
    return SimpleNamespace(**{**base, **overrides})


def test_estimate_is_static_plus_its_largest_phase():
    coefficients = common.memory_coefficients(SMALL)
    # tied embedding + attention + MLP, by hand
    params = 512 * 64 + 2 * (2 * 64 * (64 + 32) + 3 * 64 * 160)
    assert coefficients["params"] == params
    parts = common.estimate_peak_memory(SMALL, run_args())
    assert parts["static"] == 16 * params
    assert parts["peak"] == pytest.approx(1.15 * (parts["static"]
                                                  + max(parts["training"], parts["generation"],
                                                                         parts["evaluation"])))
    with_reference = common.estimate_peak_memory(SMALL, run_args(beta=0.04))
    assert with_reference["static"] == parts["static"] + 2 * params  # a frozen bf16 copy
    sharded = common.estimate_peak_memory(SMALL, run_args(fsdp=True), processes=8)
    assert sharded["static"] == 2 * params
    assert (common.estimate_peak_memory(SMALL, run_args(gradient_checkpointing=True))["training"]
            < parts["training"])


@pytest.fixture
def model_folder(tmp_path):
    Qwen2Config(**QWEN_7B).save_pretrained(tmp_path / "qwen7b")
    # no intermediate_size: an architecture the estimate skips
    GPT2Config().save_pretrained(tmp_path / "gpt2")
    return tmp_path


def test_a_run_that_does_not_fit_warns_in_one_line(model_folder, capsys):
    common.check_memory(run_args(model_name=str(model_folder / "qwen7b")), device_bytes=8 * 2**30)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: estimated peak memory ")
    assert "exceeds this GPU's 8 GiB (static 113 GiB" in err  # 7.6e9 parameters x 16 bytes


def test_no_warning_when_it_fits_on_the_cpu_or_for_an_unknown_architecture(model_folder, capsys,
                                                                           monkeypatch):
    args = run_args(model_name=str(model_folder / "qwen7b"))
    common.check_memory(args, device_bytes=2**50)  # fits
    common.check_memory(run_args(model_name=str(model_folder / "gpt2")), device_bytes=8 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    common.check_memory(args)  # the CPU: no check at all
    assert capsys.readouterr().err == ""


def test_check_shared_args_warns_on_a_small_gpu(model_folder, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda _: SimpleNamespace(total_memory=80 * 2**30))
    args = load_algorithm("grpo").Args(model_name=str(model_folder / "qwen7b"), task="math",
                                       max_new_tokens=1024, micro_batch_tokens=16384)
    common.check_shared_args(args)  # the flag checks pass, then the estimate warns
    assert capsys.readouterr().err.count("warning: estimated peak memory") == 1


@pytest.mark.slow
def test_measured_activation_slopes_match_the_formula():
    """The per-token bytes per decoder layer that benchmarks/memory_model.py counts on a tiny config
    equal what common.memory_coefficients says, with and without gradient checkpointing (formula and
    measurement cannot drift)."""
    spec = importlib.util.spec_from_file_location("memory_model",
                                                  REPO_ROOT / "benchmarks" / "memory_model.py")
    memory_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory_model)
    formula = common.memory_coefficients(memory_model.QWEN["tiny"])
    args = memory_model.Args()
    plain = memory_model.measure_training("tiny", args, False, torch.float32)
    checkpointed = memory_model.measure_training("tiny", args, True, torch.float32)
    assert plain["flash"]  # no (T, T) attention matrix, as on a GPU
    assert plain["per_layer"] == pytest.approx(formula["layer"], rel=0.02)
    assert checkpointed["per_layer"] == pytest.approx(formula["checkpointed"], rel=0.02)
    assert checkpointed["other"] == pytest.approx(formula["recompute"], rel=0.05)
