"""Kill a run with SIGKILL part way, resume it, and get exactly the metrics of an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_python

ALGORITHMS = sorted(p.stem for p in (REPO_ROOT / "algorithms").glob("*.py"))
EXTRA_FLAGS = {  # flags that make a short run exercise the method's own checkpointed state
    "prime": ["--acc-low", "0", "--acc-high", "1"],  # the PRM trains at every step: its weights and optimizer matter
    "dph_rl": ["--pool-prompts", "16", "--presample-k", "4", "--rehearsal-threshold", "1"],  # a non-empty rehearsal set
}
NUM_STEPS = 10
FLAGS = ["--num-steps", str(NUM_STEPS), "--prompts-per-step", "4", "--group-size", "4", "--eval-prompts", "8",
         "--eval-samples", "2", "--final-eval-samples", "4", "--eval-every", "3", "--checkpoint-every", "2",
         "--log-completions-every", "0"]
TIMING = ("time/", "charts/tokens_per_sec")


def records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


def start(name, out):
    argv = [sys.executable, f"algorithms/{name}.py", *FLAGS, *EXTRA_FLAGS.get(name, []), "--output-dir", str(out)]
    return subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_killed_and_resumed_run_matches_an_uninterrupted_one(name, tmp_path):
    full = start(name, tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stderr.read()[-2000:]

    victim = start(name, tmp_path / "killed")
    deadline = time.time() + 600
    while time.time() < deadline:  # kill it once the step-2 checkpoint exists, wherever it then is
        run_dirs = list((tmp_path / "killed").glob("*/checkpoint.pt"))
        if run_dirs or victim.poll() is not None:
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    (run_dir,) = (tmp_path / "killed").iterdir()
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
