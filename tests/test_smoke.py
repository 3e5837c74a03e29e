"""End-to-end runs of every algorithm script in a subprocess with a tiny budget, `--help`, and bad input."""

import json

import pytest
from conftest import ALGORITHMS, REPO_ROOT, SETUP_FLAGS, run_python

pytestmark = pytest.mark.slow  # every test runs a script in a subprocess

TINY_BUDGET = ["--num-steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--eval-prompts", "8",
               "--eval-samples", "2", "--final-eval-samples", "4", "--log-completions-every", "1"]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_help(name):
    result = run_python([f"algorithms/{name}.py", "--help"])
    assert result.returncode == 0 and "--model-name" in result.stdout and "--learning-rate" in result.stdout


@pytest.mark.parametrize("name", ALGORITHMS)
def test_end_to_end_tiny_budget(name, tmp_path):
    # run from another working directory: the script must find common.py and the embedded model itself
    result = run_python([str(REPO_ROOT / "algorithms" / f"{name}.py"), *TINY_BUDGET, *SETUP_FLAGS.get(name, []),
                  "--output-dir", str(tmp_path), "--save-model"],
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert {"charts/accuracy", "losses/policy_loss", "losses/entropy", "losses/cov", "time/step"} <= set(records[1])
    assert {"eval/greedy_acc", "eval/mean@4", "eval/pass@4", "eval/distinct_correct"} <= set(records[0]) & set(records[2])
    assert json.loads((run_dir / "config.json").read_text())["num_steps"] == 2
    assert (run_dir / "completions.jsonl").exists() and (run_dir / "model" / "model.safetensors").exists()
    assert "Loading weights" not in result.stderr and "Writing model" not in result.stderr  # no library progress bars


def test_grpo_with_reference_and_minibatches(tmp_path):
    result = run_python(["algorithms/grpo.py", *TINY_BUDGET, "--output-dir", str(tmp_path), "--beta", "0.04",
                  "--num-mini-batches", "2", "--num-epochs", "2", "--micro-batch-size", "3",
                  "--loss-agg", "seq-mean-token-sum-norm", "--no-scale-rewards", "--rollout", "continuous"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""  # no library noise (continuous batching's psutil lines, progress bars)
    (run_dir,) = tmp_path.iterdir()
    step1 = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert step1["losses/kl"] >= 0 and step1["charts/learning_rate"] == 1e-4


@pytest.mark.parametrize("flags,message", [
    (["--task", "nope"], "error: --task nope: unknown task"),
    (["--model-name", "./no/such/folder"], "error: model folder not found"),
    (["--num-mini-batches", "3"], "error: --num-mini-batches 3: must divide"),
    (["--group-size", "1"], "error: --group-size 1: must be >= 2"),
])
def test_bad_input_gives_one_line_error(flags, message, tmp_path):
    result = run_python(["algorithms/grpo.py", *flags, "--output-dir", str(tmp_path)])
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr


def test_unknown_flag_value_is_rejected_by_the_parser(tmp_path):
    result = run_python(["algorithms/grpo.py", "--loss-agg", "bogus", "--output-dir", str(tmp_path)])
    assert result.returncode != 0 and "Traceback" not in result.stderr and "loss-agg" in result.stderr
