"""Kill a run with SIGKILL part way, resume it,
and get exactly the metrics of an uninterrupted run."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import (ALGORITHMS, REPO_ROOT, SETUP_FLAGS, kill_after_first_checkpoint, records,
                      run_python)
from test_smoke import TINY_BUDGET

import common

pytestmark = pytest.mark.slow  # every test runs a script in a subprocess

EXTRA_FLAGS = {  # flags that make a short run exercise the method's own checkpointed state
    **SETUP_FLAGS,  # DPH-RL: a non-empty rehearsal set
    # the PRM trains at every step: its weights and optimizer matter
    "prime": ["--acc-low", "0", "--acc-high", "1"],
}
NUM_STEPS = 10
FLAGS = ["--num-steps", str(NUM_STEPS), "--prompts-per-step", "4", "--group-size", "4",
         "--eval-prompts", "8", "--eval-samples", "2", "--final-eval-samples", "4", "--eval-every",
         "3", "--checkpoint-every", "2", "--log-completions-every", "0"]


def start(name, *flags):
    argv = [sys.executable, f"algorithms/{name}.py", *flags]
    return subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_killed_and_resumed_run_matches_an_uninterrupted_one(name, tmp_path):
    # the uninterrupted run goes on while the other is killed and resumed (separate folders)
    flags = [*FLAGS, *EXTRA_FLAGS.get(name, [])]
    full, victim = start(name, *flags, "--output-dir", str(tmp_path / "full")), \
        start(name, *flags, "--output-dir", str(tmp_path / "killed"))
    run_dir = kill_after_first_checkpoint(victim, tmp_path / "killed", victim.kill)  # SIGKILL
    assert records(run_dir)[-1]["step"] < NUM_STEPS

    resumed = start(name, "--resume", str(run_dir))
    for run in (resumed, full):
        assert run.wait(timeout=600) == 0, run.stderr.read()[-2000:]
    (full_dir,) = (tmp_path / "full").iterdir()
    assert records(run_dir) == records(full_dir)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({}))
    result = run_python(["algorithms/grpo.py", "--resume", str(tmp_path / "nowhere")])
    assert (result.returncode != 0
            and result.stderr.strip().splitlines()[-1].startswith("error: cannot resume"))
    assert "Traceback" not in result.stderr


def test_runs_started_together_get_separate_complete_folders(tmp_path):
    """A parallel sweep: the same script and flags started at once
    (the same second, mostly) into one output folder."""
    argv = [sys.executable, "algorithms/grpo.py", *TINY_BUDGET, "--output-dir", str(tmp_path)]
    runs = [subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    folders = sorted(tmp_path.iterdir())
    assert len(folders) == 2
    # each run printed, and wrote into, its own folder
    assert (sorted(line for out, _ in outputs for line in out.splitlines()
                   if line.startswith("run folder: "))
            == [f"run folder: {folder}" for folder in folders])
    for folder in folders:
        assert [r["step"] for r in records(folder)] == [0, 1, 2]
        assert json.loads((folder / "config.json").read_text())["num_steps"] == 2


def test_resume_extends_refuses_other_flags_and_foreign_checkpoints(tmp_path):
    first = run_python(["algorithms/grpo.py", *TINY_BUDGET, "--checkpoint-every", "1",
                        "--output-dir", str(tmp_path)])
    assert first.returncode == 0, first.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()

    changed = run_python(["algorithms/grpo.py", "--resume", str(run_dir), "--learning-rate",
                          "1e-3"])
    assert changed.returncode != 0 and "Traceback" not in changed.stderr
    assert changed.stderr.strip().splitlines() == ["error: --resume keeps the run's own settings; "
                                                   "--learning-rate was "
                                                   "given (0.001, the run has 0.0001); only "
                                                   "--num-steps may change"]

    extended = run_python(["algorithms/grpo.py", "--resume", str(run_dir), "--num-steps", "3"])
    assert extended.returncode == 0, extended.stderr[-2000:]
    assert [r["step"] for r in records(run_dir)] == [0, 1, 2, 3]
    assert json.loads((run_dir / "config.json").read_text())["num_steps"] == 3

    # prime's checkpoint (here: grpo's, relabelled with a valid
    # checksum) copied into a grpo run folder
    path = run_dir / common.CHECKPOINT_FILE
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["sha256"]
    checkpoint["script"] = "prime"
    torch.save({**checkpoint, "sha256": common._digest(checkpoint).hexdigest()}, path)
    foreign = run_python(["algorithms/grpo.py", "--resume", str(run_dir), "--num-steps", "4"])
    assert foreign.returncode != 0 and "Traceback" not in foreign.stderr
    assert foreign.stderr.strip().splitlines()[-1] == (f"error: checkpoint {path} was written by "
                                                       "prime.py, not grpo.py; "
                                                       "resume it with its own script")
