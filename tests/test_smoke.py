"""End-to-end runs of every algorithm script in a subprocess with a tiny budget, and every script's
`--help` (bad command lines: tests/test_bad_input.py)."""

import json
import runpy
import sys

import pytest
from conftest import ALGORITHMS, REPO_ROOT, SETUP_FLAGS, run_python

TINY_BUDGET = ["--num-steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--eval-prompts",
               "8",
               "--eval-samples", "2", "--final-eval-samples", "4", "--log-completions-every", "1"]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_help(name, monkeypatch, capsys):
    # the script's `__main__` as `python algorithms/<name>.py --help` runs it,
    # in this process (no start-up to pay)
    monkeypatch.setattr(sys, "argv", [f"algorithms/{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "algorithms" / f"{name}.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--model-name" in out and "--learning-rate" in out


@pytest.mark.slow
@pytest.mark.parametrize("name", ALGORITHMS)
def test_end_to_end_tiny_budget(name, tmp_path):
    # run from another working directory:
    # the script must find common.py and the embedded model itself
    result = run_python([str(REPO_ROOT / "algorithms" / f"{name}.py"), *TINY_BUDGET,
                         *SETUP_FLAGS.get(name, []), "--output-dir", str(tmp_path), "--save-model"],
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert ({"charts/accuracy", "losses/policy_loss", "losses/entropy", "losses/cov", "time/step"}
            <= set(records[1]))
    assert ({"eval/greedy_acc", "eval/mean@4", "eval/pass@4", "eval/distinct_correct"}
            <= set(records[0]) & set(records[2]))
    assert json.loads((run_dir / "config.json").read_text())["num_steps"] == 2
    assert ((run_dir / "completions.jsonl").exists()
            and (run_dir / "model" / "model.safetensors").exists())
    # no library progress bars
    assert "Loading weights" not in result.stderr and "Writing model" not in result.stderr


@pytest.mark.slow
def test_grpo_with_reference_and_minibatches(tmp_path):
    result = run_python(["algorithms/grpo.py", *TINY_BUDGET, "--output-dir", str(tmp_path),
                         "--beta", "0.04", "--num-mini-batches", "2", "--num-epochs", "2",
                         "--micro-batch-size", "3", "--loss-agg", "seq-mean-token-sum-norm",
                         "--no-scale-rewards", "--rollout", "continuous"])
    assert result.returncode == 0, result.stderr[-3000:]
    # no library noise (continuous batching's psutil lines, progress bars)
    assert result.stderr == ""
    (run_dir,) = tmp_path.iterdir()
    step1 = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert step1["losses/kl"] >= 0 and step1["charts/learning_rate"] == 1e-4
