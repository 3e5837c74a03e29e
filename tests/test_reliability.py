"""Checkpoints, RNG capture, resume bookkeeping,
the non-finite guard and `save_pretrained` in common.py."""

import json
import random
import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import base_with_sampling_defaults
from transformers import AutoModelForCausalLM, GenerationConfig

import common


def draw():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(),
            torch.multinomial(torch.ones(50), 5).tolist())


def test_checkpoint_restores_every_random_state_and_the_sampler(tmp_path):
    common.seed_everything(7)
    sampler = common.PromptSampler([{"i": i} for i in range(10)], 4, seed=7)
    sampler.next_batch()
    common.save_checkpoint(tmp_path, 3, {"sampler": sampler.state_dict(), "extra": [1, 2]})
    expected = (draw(), sampler.next_batch(), sampler.next_batch(), sampler.next_batch())

    common.seed_everything(123)  # disturb everything, then restore
    restored = common.PromptSampler([{"i": i} for i in range(10)], 4, seed=999)
    checkpoint = common.load_checkpoint(tmp_path)
    restored.load_state_dict(checkpoint["sampler"])
    assert checkpoint["step"] == 3 and checkpoint["extra"] == [1, 2]
    assert (draw(), restored.next_batch(), restored.next_batch(), restored.next_batch()) == expected


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    common.save_checkpoint(tmp_path, 1, {"weights": torch.ones(2)})

    def dies_midway(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # stands in for SIGKILL during the write

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(tmp_path, 2, {"weights": torch.zeros(2)})
    monkeypatch.undo()
    checkpoint = common.load_checkpoint(tmp_path)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["weights"], torch.ones(2))


def test_missing_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(common.UserInputError, match="no checkpoint to resume from"):
        common.load_checkpoint(tmp_path)
    (tmp_path / common.CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(common.UserInputError, match="corrupt or incomplete"):
        common.load_checkpoint(tmp_path)


@dataclass
class ToyArgs:
    output_dir: str = "runs"
    num_steps: int = 200
    learning_rate: float = 1e-4
    resume: str = ""
    track: bool = False


def test_resume_uses_the_saved_config_and_only_num_steps_from_the_command_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"output_dir": "x", "num_steps": 50,
                                                      "learning_rate": 3e-4,
                                                      "resume": "", "track": False}))
    run = str(tmp_path)
    restored = common.resume_config(ToyArgs(resume=run), ToyArgs, ["--resume", run])
    assert (restored.learning_rate, restored.num_steps, restored.resume) == (3e-4, 50, run)
    extended = common.resume_config(ToyArgs(num_steps=80, resume=run), ToyArgs,
                                    ["--resume", run, "--num-steps", "80"])
    assert extended.num_steps == 80
    # --num-steps equal to the Args default (200) still extends: what counts is that it was given
    to_default = common.resume_config(ToyArgs(resume=run), ToyArgs,
                                      ["--num_steps=200", "--resume", run])
    assert to_default.num_steps == 200
    # a flag given with the run's own value is fine;
    # another value is refused in one line, naming the flag
    same = common.resume_config(ToyArgs(learning_rate=3e-4, resume=run), ToyArgs,
                                ["--learning-rate", "3e-4"])
    assert same.learning_rate == 3e-4
    for argv, args, flag in ((["--learning-rate", "1.0"], ToyArgs(learning_rate=1.0, resume=run),
                              "--learning-rate"),
                             (["--track"], ToyArgs(track=True, resume=run), "--track"),
                             (["--output_dir=y"], ToyArgs(output_dir="y", resume=run),
                              "--output-dir")):
        with pytest.raises(common.UserInputError) as error:
            common.resume_config(args, ToyArgs, ["--resume", run, *argv])
        assert str(error.value).startswith(f"--resume keeps the run's own settings; {flag} was "
                                           "given")
        assert "\n" not in str(error.value)
    assert common.resume_config(ToyArgs(), ToyArgs, []) == ToyArgs()  # no --resume: unchanged
    (tmp_path / "config.json").write_text(json.dumps({"unknown_field": 1}))
    with pytest.raises(common.UserInputError, match="not this script's config"):
        common.resume_config(ToyArgs(resume=run), ToyArgs, [])


def test_given_flags_reads_every_spelling():
    argv = ["--num-steps", "3", "--learning_rate=1", "--no-track", "--resume", "x", "--not-a-field",
            "5", "-h"]
    assert common.given_flags(ToyArgs, argv) == {"num_steps", "learning_rate", "track", "resume"}


def test_resumed_logger_drops_records_written_after_the_checkpoint(tmp_path):
    args = ToyArgs(output_dir=str(tmp_path))
    logger = common.RunLogger(args, "run")
    for step in range(6):
        logger.log(step, {"x": step})
    logger.close()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "x"')  # torn by a kill mid-write
    resumed = common.RunLogger(ToyArgs(output_dir=str(tmp_path), resume=str(tmp_path / "run")),
                               "ignored", resume_step=3)
    resumed.log(4, {"x": 40})
    resumed.close()
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]


def test_non_finite_guard_skips_and_then_stops():
    guard = common.NonFiniteGuard(patience=3)
    assert guard.step_ok(torch.tensor(1.0))
    assert not guard.step_ok(torch.tensor(float("nan")))
    assert not guard.step_ok(torch.tensor(float("inf")))
    # a good step resets
    assert guard.step_ok(torch.tensor(2.0)) and guard.in_a_row == 0 and guard.skipped == 2
    guard.step_ok(torch.tensor(float("nan")))
    guard.step_ok(torch.tensor(float("nan")))
    with pytest.raises(common.TrainingStopped, match="3 optimizer steps in a row"):
        guard.step_ok(torch.tensor(float("nan")))


def test_a_nan_loss_leaves_the_parameters_untouched(random_model):
    model, _ = random_model
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, guard = torch.optim.AdamW(model.parameters(), lr=1e-3), common.NonFiniteGuard()
    ids = torch.tensor([[3, 4, 5, 6]])
    logp = common.response_logprobs(model, ids, torch.ones_like(ids), 2).logp
    (logp.sum() * float("nan")).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if guard.step_ok(grad_norm):
        optimizer.step()
    assert guard.skipped == 1 and all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_saved_model_has_the_asked_dtype_and_the_base_generation_config(tmp_path):
    base = base_with_sampling_defaults(tmp_path / "base")
    model, tokenizer = common.load_model_and_tokenizer(str(base))
    assert model.generation_config.top_k is None  # sampling runs without the base's defaults
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # stands in for training
    common.save_pretrained(model, tokenizer, tmp_path / "bf16", "bfloat16")
    # trained in fp32 on the CPU: saved in fp32
    common.save_pretrained(model, tokenizer, tmp_path / "auto")
    for folder, dtype in (("bf16", torch.bfloat16), ("auto", torch.float32)):
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / folder)
        for name, value in model.state_dict().items():
            assert torch.equal(saved.state_dict()[name], value.to(dtype)), (folder, name)
        generation = GenerationConfig.from_pretrained(tmp_path / folder)
        assert (generation.to_dict() == GenerationConfig.from_pretrained(base).to_dict()
                and generation.top_k == 20)


# ---- run folders and resume files ----------------------------------------------------------------
def test_every_run_gets_its_own_folder(tmp_path):
    args = ToyArgs(output_dir=str(tmp_path))
    # as three runs started in the same second
    loggers = [common.RunLogger(args, "same-name") for _ in range(3)]
    assert ([logger.run_dir.name for logger in loggers]
            == ["same-name", "same-name-2", "same-name-3"])
    for i, logger in enumerate(loggers):
        logger.log(0, {"x": i})
        logger.close()
        assert json.loads((logger.run_dir / "metrics.jsonl").read_text()) == {"step": 0, "x": i}


def test_a_resume_killed_while_rewriting_its_files_leaves_them_intact(tmp_path, monkeypatch):
    logger = common.RunLogger(ToyArgs(output_dir=str(tmp_path)), "run")
    for step in range(6):
        logger.log(step, {"x": step})
    logger.close()
    run_dir = logger.run_dir
    before = {name: (run_dir / name).read_text() for name in ("config.json", "metrics.jsonl")}

    def killed(*_):
        # stands in for SIGKILL after the new file is written, before it replaces the old one
        raise KeyboardInterrupt

    monkeypatch.setattr(common.os, "replace", killed)
    # the resume drops metrics.jsonl's records after the checkpoint
    with pytest.raises(KeyboardInterrupt):
        common.RunLogger(ToyArgs(num_steps=9, resume=str(run_dir)), "run", resume_step=3)
    assert {name: (run_dir / name).read_text() for name in before} == before
    monkeypatch.undo()
    resumed = common.RunLogger(ToyArgs(num_steps=9, resume=str(run_dir)), "run", resume_step=3)
    monkeypatch.setattr(common.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):  # ... and rewrites config.json with its first record
        resumed.log(4, {"x": 4})
    assert (run_dir / "config.json").read_text() == before["config.json"]
    monkeypatch.undo()
    resumed.log(4, {"x": 4})
    resumed.close()
    assert ([r["step"]
             for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
            == [0, 1, 2, 3, 4])
    assert json.loads((run_dir / "config.json").read_text())["num_steps"] == 9
    with pytest.raises(common.UserInputError, match="--num-steps 2 is below the run's checkpoint"):
        common.RunLogger(ToyArgs(num_steps=2, resume=str(run_dir)), "run", resume_step=3)


def test_a_flipped_byte_in_a_checkpoint_never_resumes_silently(tmp_path):
    weights = torch.randn(1000)
    common.save_checkpoint(tmp_path, 1, {"weights": weights, "sampler": {"pos": 3}})
    path = tmp_path / common.CHECKPOINT_FILE
    data = path.read_bytes()
    inside_weights = data.find(weights.numpy().tobytes()) + 2000
    outcomes = Counter()
    for position in [inside_weights, *range(0, len(data), len(data) // 60)]:
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        path.write_bytes(bytes(flipped))
        try:
            checkpoint = common.load_checkpoint(tmp_path)
        except common.UserInputError as error:
            assert str(error).startswith(f"checkpoint {path} is corrupt") and "\n" not in str(error)
            outcomes["corrupt" if "checksum" not in str(error) else "checksum"] += 1
            if position == inside_weights:
                assert "checksum does not match" in str(error)
            continue
        # a byte nothing reads (zip padding, a name field): the content must be unchanged
        outcomes["loaded"] += 1
        assert torch.equal(checkpoint["weights"], weights) and checkpoint["sampler"] == {"pos": 3}
    assert outcomes["checksum"] >= 1 and outcomes["corrupt"] >= 1, outcomes


def test_a_checkpoint_of_another_script_or_version_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["algorithms/grpo.py"])
    common.save_checkpoint(tmp_path, 1, {"weights": torch.ones(2)})
    assert common.load_checkpoint(tmp_path)["script"] == "grpo"
    monkeypatch.setattr(sys, "argv", ["algorithms/prime.py"])
    with pytest.raises(common.UserInputError,
                       match=r"written by grpo.py, not prime.py; resume it with its own script"):
        common.load_checkpoint(tmp_path)
    old = torch.load(tmp_path / common.CHECKPOINT_FILE, weights_only=False)
    del old["sha256"], old["script"]
    torch.save(old, tmp_path / common.CHECKPOINT_FILE)
    with pytest.raises(common.UserInputError,
                       match="carries no checksum .written by an older version"):
        common.load_checkpoint(tmp_path)
