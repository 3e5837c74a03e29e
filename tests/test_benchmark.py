"""benchmarks/run.py command construction and benchmarks/report.py aggregation, on hand-made suites and metric files."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_python



def load(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run, report = load("run"), load("report")

SUITE = {"name": "toy", "shared": {"flags": ["--num-steps", "200"]}, "quick": {"flags": ["--num-steps", "10"]},
         "algorithms": {"grpo": {"flags": ["--group-size", "8"]}, "rover": {"flags": [], "quick_flags": ["--x", "1"]}}}


def test_commands_shared_then_algorithm_then_seed():
    commands = run.build_commands(SUITE, ["grpo", "rover"], 2, Path("/out"), quick=False)
    assert [(a, s) for a, s, _ in commands] == [("grpo", 1), ("grpo", 2), ("rover", 1), ("rover", 2)]
    assert commands[1][2] == ["python", "algorithms/grpo.py", "--num-steps", "200", "--group-size", "8", "--seed", "2",
                              "--exp-name", "grpo", "--output-dir", "/out/grpo"]


def test_quick_runs_one_seed_and_overrides_come_last():
    commands = run.build_commands(SUITE, ["rover"], 3, Path("/out"), quick=True)
    assert len(commands) == 1
    argv = commands[0][2]
    assert argv[2:8] == ["--num-steps", "200", "--num-steps", "10", "--x", "1"]  # tyro keeps the last value


def test_unknown_algorithm_or_suite_is_a_clear_error():
    with pytest.raises(SystemExit, match="nope not in suite"):
        run.build_commands(SUITE, ["nope"], 1, Path("/out"), quick=False)
    with pytest.raises(SystemExit, match="unknown suite"):
        run.load_suite("no-such-suite")


def test_embedded_suite_gives_every_algorithm_the_same_sample_budget():
    suite = run.load_suite("countdown")
    for algo, entry in suite["algorithms"].items():
        assert (REPO_ROOT / "algorithms" / f"{algo}.py").exists()
        flags = suite["shared"]["flags"] + entry.get("flags", [])
        value = {flag: flags[i + 1] for i, flag in enumerate(flags) if flag.startswith("--") and i + 1 < len(flags)}
        assert int(value["--prompts-per-step"]) * int(value["--group-size"]) == 128, algo


@pytest.mark.slow
def test_quick_dry_run_prints_every_command():
    result = run_python(["benchmarks/run.py", "--quick", "--dry-run"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(run.load_suite("countdown")["algorithms"])
    assert all(line.startswith("python algorithms/") and "--num-steps 10" in line for line in lines)


def write_run(root, algo, seed, greedy, entropy_acc, pass_at):
    """A hand-made run folder: base eval at step 0, two training steps, final eval at step 2."""
    run_dir = root / algo / f"countdown__{algo}__{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"seed": seed, "num_steps": 2, "model_name": "m", "task": "t",
                                                     "temperature": 1.0}))
    base = {"step": 0, "eval/greedy_acc": 0.3, "eval/mean@4": 0.25, "eval/distinct_correct": 1.0,
            **{f"eval/pass@{k}": 0.2 * k for k in (1, 2, 4)}}
    steps = [{"step": i + 1, "losses/entropy": h, "charts/accuracy": r, "time/step": 0.5}
             for i, (h, r) in enumerate(entropy_acc)]
    final = {**steps[-1], "eval/greedy_acc": greedy, "eval/mean@4": greedy, "eval/distinct_correct": 2.0,
             **{f"eval/pass@{k}": p for k, p in pass_at.items()}}
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [base, steps[0], final]) + "\n")


def test_report_aggregates_mean_and_std_over_seeds(tmp_path):
    write_run(tmp_path, "grpo", 1, 0.4, [(0.5, 0.3), (0.4, 0.4)], {1: 0.4, 2: 0.5, 4: 0.6})
    write_run(tmp_path, "grpo", 2, 0.6, [(0.5, 0.3), (0.4, 0.4)], {1: 0.6, 2: 0.7, 4: 0.8})
    groups = report.load_runs(tmp_path)
    table = report.summary_table(groups, {"grpo": {"1": 10.0, "2": 20.0}})
    grpo_row = next(line for line in table.splitlines() if line.startswith("| grpo"))
    # greedy: mean(0.4, 0.6) = 0.5, sample std sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.141; wall time 15 ± 7
    assert "| 0.500 ± 0.141 |" in grpo_row and "| 15 ± 7 |" in grpo_row
    assert table.splitlines()[2].startswith("| base model | 2 | 0.300 ± 0.000 |")
    curve = report.pass_at_k_curve(groups["grpo"], -1)
    assert list(curve) == [1, 2, 4] and curve[4][0] == pytest.approx(0.7)
    assert report.pass_at_k_curve(groups["grpo"], 0)[2][0] == pytest.approx(0.4)


def test_entropy_law_fit_recovers_known_parameters():
    a, b = 0.5, 1.2
    entropy = [0.1 * i for i in range(1, 12)]
    reward = [-a * math.exp(h) + b for h in entropy]
    fitted_a, fitted_b = report.fit_entropy_law(entropy, reward)
    assert fitted_a == pytest.approx(a) and fitted_b == pytest.approx(b)


def test_report_writes_tables_plots_and_keeps_the_discussion(tmp_path):
    runs, dest = tmp_path / "runs", tmp_path / "out"
    write_run(runs, "grpo", 1, 0.4, [(0.5, 0.3), (0.4, 0.4)], {1: 0.4, 2: 0.5, 4: 0.6})
    dest.mkdir()
    (dest / "discussion.md").write_text("Hand-written reading of the figures.")
    readme = report.write_report(runs, dest, "toy", ["rover seed 1"]).read_text()
    assert "| grpo | 1 |" in readme and "Failed runs (not in the table): rover seed 1." in readme
    assert "Hand-written reading of the figures." in readme
    for png in ("accuracy.png", "entropy.png", "cov.png", "pass_at_k.png", "accuracy_vs_entropy.png"):
        assert (dest / png).stat().st_size > 1000 and f"({png})" in readme


@pytest.mark.slow
def test_gpu_speed_script_runs_every_path_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    result = run_python(["benchmarks/gpu_speed.py", "--size", "tiny", "--batch-size", "4", "--group-size", "2",
                         "--prompt-len", "4", "--new-tokens", "6", "--train-rows", "4", "--micro-batch-size", "2",
                         "--repeats", "1", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert set(record["rollout"]) == {"generate", "static", "continuous"}
    for entry in record["rollout"].values():
        assert 0 < entry["new_tokens"] <= 4 * 6 and entry["tokens_per_s"] > 0
    assert record["rollout"]["generate"]["speedup_vs_generate"] == 1.0
    assert record["train"]["tokens"] == 4 * (4 + 6) and record["train"]["tokens_per_s"] > 0
    assert record["train"]["mfu"] is None  # no known peak on a CPU
    assert "| rollout: continuous |" in result.stdout


def test_committed_base_model_was_built_by_the_script_defaults():
    """`python benchmarks/make_tiny_base.py` with no flags rebuilds the committed model: its recorded arguments are
    the script's defaults, and it recorded every gate the README reports."""
    from dataclasses import asdict

    make_tiny_base = load("make_tiny_base")
    built = json.loads((REPO_ROOT / "benchmarks" / "tiny-countdown" / "build_metrics.json").read_text())
    defaults = asdict(make_tiny_base.Args())
    assert built["args"] == {k: v for k, v in defaults.items() if k != "measure_only"}
    n = defaults["eval_samples"]
    for key in ("eval/greedy_acc", f"eval/mean@{n}", "eval/pass@16", "eval/pass@64", f"eval/second_skill/mean@{n}",
                "eval/one_solution/pass@64", "eval/several_solutions/distinct_correct", "em_rl/sequence_reward_ranks_right",
                "em_rl/token_reward_ranks_right", "dph_rl/solved_8_of_8_share", "prime/prm_acc_before"):
        assert 0 <= built[key] <= (n if "distinct" in key else 1), key
