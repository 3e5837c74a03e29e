"""Kill a run with SIGKILL part way, resume it, and get exactly the metrics of an uninterrupted run."""

import json
import subprocess
import sys

import pytest
from conftest import ALGORITHMS, REPO_ROOT, SETUP_FLAGS, kill_after_first_checkpoint, records, run_python

EXTRA_FLAGS = {  # flags that make a short run exercise the method's own checkpointed state
    **SETUP_FLAGS,  # DPH-RL: a non-empty rehearsal set
    "prime": ["--acc-low", "0", "--acc-high", "1"],  # the PRM trains at every step: its weights and optimizer matter
}
NUM_STEPS = 10
FLAGS = ["--num-steps", str(NUM_STEPS), "--prompts-per-step", "4", "--group-size", "4", "--eval-prompts", "8",
         "--eval-samples", "2", "--final-eval-samples", "4", "--eval-every", "3", "--checkpoint-every", "2",
         "--log-completions-every", "0"]


def start(name, out):
    argv = [sys.executable, f"algorithms/{name}.py", *FLAGS, *EXTRA_FLAGS.get(name, []), "--output-dir", str(out)]
    return subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_killed_and_resumed_run_matches_an_uninterrupted_one(name, tmp_path):
    full = start(name, tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stderr.read()[-2000:]

    victim = start(name, tmp_path / "killed")
    run_dir = kill_after_first_checkpoint(victim, tmp_path / "killed", victim.kill)  # SIGKILL
    assert records(run_dir)[-1]["step"] < NUM_STEPS

    resumed = run_python([f"algorithms/{name}.py", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (full_dir,) = (tmp_path / "full").iterdir()
    assert records(run_dir) == records(full_dir)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({}))
    result = run_python(["algorithms/grpo.py", "--resume", str(tmp_path / "nowhere")])
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith("error: cannot resume")
    assert "Traceback" not in result.stderr
