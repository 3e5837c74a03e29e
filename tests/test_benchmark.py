"""benchmarks/run.py command construction and benchmarks/report.py aggregation,
on hand-made suites and metric files."""

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

SUITE = {"name": "toy", "shared": {"flags": ["--num-steps", "200"]},
         "quick": {"flags": ["--num-steps", "10"]},
         "base": {"temperatures": [0.5, 1.0], "flags": ["--samples", "128"],
                  "quick_flags": ["--samples", "8"]},
         "rows": {"grpo": {"flags": ["--group-size", "8"]},
                  "grpo_4mb": {"script": "grpo", "flags": ["--num-mini-batches", "4"],
                               "quick_flags": ["--x", "1"]}}}


def test_jobs_base_first_then_shared_row_and_seed_flags():
    jobs = run.build_jobs(SUITE, ["grpo", "grpo_4mb"], 2, Path("/out"), quick=False)
    assert [(j.row, j.seed) for j in jobs] == [("base_T0.5", 1), ("base_T1.0", 1), ("grpo", 1),
                                               ("grpo", 2), ("grpo_4mb", 1), ("grpo_4mb", 2)]
    assert jobs[0].argv == ["python", "benchmarks/evaluate.py", "--samples", "128", "--temperature",
                            "0.5", "--exp-name", "base_T0.5", "--output-dir", "/out/base"]
    assert jobs[0].folder == Path("/out/base/base_T0.5")
    # a row's script
    assert jobs[5].argv == ["python", "algorithms/grpo.py", "--num-steps", "200",
                            "--num-mini-batches", "4", "--seed", "2", "--exp-name", "grpo_4mb",
                            "--output-dir", "/out/grpo_4mb/seed2"]


def test_quick_runs_one_seed_and_overrides_come_last():
    jobs = run.build_jobs(SUITE, ["grpo_4mb"], 3, Path("/out"), quick=True)
    assert [j.row for j in jobs] == ["base_T0.5", "base_T1.0", "grpo_4mb"]
    assert jobs[0].argv[2:6] == ["--samples", "128", "--samples", "8"]
    assert (jobs[2].argv[2:10]
            == ["--num-steps", "200", "--num-mini-batches", "4", "--num-steps", "10", "--x", "1"])


def test_base_evaluation_is_reused_only_for_the_same_command(tmp_path):
    job = run.build_jobs(SUITE, [], 1, tmp_path / "out", quick=False)[0]
    (tmp_path / "runs").mkdir()
    assert not run.cached_result(tmp_path, job)
    (tmp_path / "runs" / f"{job.name}.json").write_text(json.dumps({"command": job.command}))
    assert run.cached_result(tmp_path, job)
    assert "--output-dir" not in job.command  # another machine's folder does not matter
    # fewer samples: not the same evaluation
    other = run.build_jobs(SUITE, [], 1, tmp_path / "out", quick=True)[0]
    assert other.name == job.name and not run.cached_result(tmp_path, other)


def test_remaining_time_is_estimated_per_kind_of_job():
    base, row, row2 = run.build_jobs(SUITE, ["grpo"], 2, Path("/out"), quick=False)[1:]
    start = run.time.time() - 120
    # one base evaluation took 60 s, one training run 240 s:
    # a base job and a training run remain, 2 workers
    assert (run.eta(start, [(base, 60.0), (row, 240.0)], [base, row2], 2)
            .endswith("~2 min remaining"))
    # none of its kind: the slowest
    assert run.eta(start, [(base, 60.0)], [row2], 1).endswith("~1 min remaining")


def test_unknown_row_suite_or_control_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="nope not in suite"):
        run.build_jobs(SUITE, ["nope"], 1, Path("/out"), quick=False)
    with pytest.raises(SystemExit, match="unknown suite"):
        run.load_suite("no-such-suite")
    bad = tmp_path / "bad.toml"
    bad.write_text('[shared]\nflags = []\n[rows.a]\ncontrol = "b"\n')
    with pytest.raises(SystemExit, match="row a's control 'b' is not a row"):
        run.load_suite(str(bad))


@pytest.mark.parametrize("name", ["countdown", "countdown-long", "countdown-tune"])
def test_committed_suites_are_consistent(name):
    """Every row runs a script that exists with 128 sampled responses per step; every control, `vs`
    and claim names a row (or a base temperature) of the suite; every method row has a matched
    control."""
    suite = run.load_suite(name)
    temperatures = {f"base_T{t}" for t in suite.get("base", {}).get("temperatures", [])}
    for row, spec in suite["rows"].items():
        assert (REPO_ROOT / "algorithms" / f"{spec.get('script', row)}.py").exists(), row
        flags = suite["shared"]["flags"] + spec.get("flags", [])
        value = {flag: flags[i + 1] for i, flag in enumerate(flags) if flag.startswith("--")
                 and i + 1 < len(flags)}
        assert int(value["--prompts-per-step"]) * int(value["--group-size"]) == 128, row
        assert spec.get("what"), row
        for key in ("control", "vs"):
            assert spec.get(key) in set(suite["rows"]) | temperatures | {None}, (row, key)
    for claim in suite.get("claims", []):
        assert (claim.get("untestable")
                or ({claim["a"], claim["b"]} <= set(suite["rows"]) | temperatures | {"step0"}))


def test_student_t_matches_tabulated_critical_values():
    stats = load("stats")
    for t, df in [(12.706, 1), (4.303, 2), (3.182, 3), (2.776, 4), (2.228, 10), (1.960, 1e6)]:
        assert stats.t_two_sided_p(t, df) == pytest.approx(0.05, abs=2e-4), df
        assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=2e-3), df
    assert stats.t_two_sided_p(0.0, 3) == pytest.approx(1.0)
    assert stats.t_two_sided_p(1.0, 2) == pytest.approx(0.42265, abs=1e-5)  # 1 - 1/sqrt(3)


def test_paired_and_welch_tests_by_hand():
    stats = load("stats")
    c = stats.paired({1: 0.30, 2: 0.32, 3: 0.35}, {1: 0.28, 2: 0.31, 3: 0.30})
    # differences 0.02, 0.01, 0.05: mean 0.02667, sd 0.02082, t = 2.2188 on 2 df
    assert c.diff == pytest.approx(0.026667, abs=1e-6) and c.p == pytest.approx(0.15673, abs=1e-4)
    assert c.high - c.diff == pytest.approx(4.3027 * 0.020817 / math.sqrt(3), rel=1e-3)
    w = stats.welch([0.30, 0.32, 0.35], [0.28, 0.31, 0.30])
    assert w.p == pytest.approx(0.20653, abs=1e-4)  # t 1.569 on 3.30 Welch-Satterthwaite df
    assert math.isnan(stats.paired({1: 0.3}, {1: 0.2}).p)  # one seed: no test, said so
    assert "no test" in stats.paired({1: 0.3}, {1: 0.2}).text()


def test_line_and_law_fits_report_r2():
    stats = load("stats")
    entropy = [0.1 * i for i in range(1, 12)]
    law = stats.fit_entropy_law(entropy, [-0.5 * math.exp(h) + 1.2 for h in entropy])
    assert (-law.slope == pytest.approx(0.5) and law.intercept == pytest.approx(1.2)
            and law.r2 == pytest.approx(1.0))
    noisy = stats.fit_line([0, 1, 2, 3], [0, 1, 0, 1])
    assert noisy.r2 == pytest.approx(0.2)  # slope 0.2: residual 0.8 of a total 1.0


def test_frontier_envelope_drops_dominated_points_and_interpolates():
    # (0.35, 0.7) is dominated by (0.4, 0.8)
    points = [(0.3, 0.9), (0.4, 0.8), (0.35, 0.7), (0.5, 0.6)]
    assert report.envelope(points, 0.4) == pytest.approx(0.8)
    assert report.envelope(points, 0.45) == pytest.approx(0.7)
    # below the lowest pass@1: its best pass@k
    assert report.envelope(points, 0.2) == pytest.approx(0.9)
    # past the end: above only if it beats the end point
    assert report.envelope(points, 0.6) == pytest.approx(0.6)


def write_result(folder, row, seed, mean, pass8, entropy, second=0.7, probe=True):
    """A hand-made results file as benchmarks/run.py writes it:
    evaluations at steps 100 and 200 (n = 32)."""
    record = {"step": 200, "eval/greedy_acc": mean, "eval/mean@32": mean, "eval/pass@1": mean,
              "eval/pass@4": (mean + pass8) / 2, "eval/pass@8": pass8, "eval/distinct_correct": 1.5,
              "eval/second_skill/mean@32": second}
    evals = ([{**record, "step": 100, "eval/mean@32": mean - 0.01}, record]
             if not row.startswith("base") else [{**record, "step": 0}])
    probes = [[step, entropy + 0.1 * (200 - step) / 200, mean - 0.05 * (200 - step) / 200]
              for step in (0, 100, 200)]
    run = {"row": row, "seed": seed, "command": "python ...",
           "config": {"model_name": "m", "task": "countdown",
           "num_steps": 200, "temperature": 1.0, "final_eval_samples": 32}, "evals": evals,
           "probe": probes if probe and not row.startswith("base") else [], "wall_seconds": 100.0,
           "step_seconds": 0.5, "train": {"losses/cov": [[1, 0.1], [2, 0.2]]}}
    (folder / f"{row}__{seed}.json").write_text(json.dumps(run))


REPORT_SUITE = {
    "name": "toy", "shared": {"flags": []},
    "rows": {"grpo": {"what": "GRPO", "frontier": True},
             "grpo_hi": {"script": "grpo", "what": "GRPO, lr x3", "frontier": True},
             "method": {"script": "clip_cov", "what": "a method", "control": "grpo"},
             "noise": {"script": "kl_cov", "what": "no effect", "control": "grpo"}},
    "claims": [{"paper": "P", "claim": "method raises accuracy", "a": "method", "b": "grpo",
                "metric": "eval/mean@n", "direction": "higher"},
               {"paper": "Q", "claim": "noise raises accuracy", "a": "noise", "b": "grpo",
                "metric": "eval/mean@n", "direction": "higher"},
               {"paper": "R", "claim": "grpo's entropy falls", "a": "grpo", "b": "step0",
                "metric": "probe/entropy", "direction": "lower"},
               {"paper": "S", "claim": "needs a GPU", "untestable": "a 7B model"}]}


def test_report_tables_tests_claims_and_plots(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    write_result(runs, "base_T1.0", 1, 0.30, 0.70, 0.0)
    write_result(runs, "base_T0.5", 1, 0.36, 0.60, 0.0)
    for seed, jitter in ((1, 0.0), (2, 0.004), (3, -0.003)):
        write_result(runs, "grpo", seed, 0.40 + jitter, 0.62 + jitter, 0.30 + jitter)
        write_result(runs, "grpo_hi", seed, 0.48 + jitter, 0.55, 0.25)
        # +0.05, far above the frontier
        write_result(runs, "method", seed, 0.45 + jitter * 1.5, 0.75 + jitter, 0.40)
        # the same as grpo within noise
        write_result(runs, "noise", seed, 0.40 - jitter, 0.62, 0.30)
    (tmp_path / "discussion.md").write_text("Hand-written reading of the figures.")
    readme = report.write_report(tmp_path, REPORT_SUITE, ["noise__4"]).read_text()
    assert "| grpo | GRPO | 3 | 0.400 ± 0.004 |" in readme  # mean ± sample std over seeds
    assert "| base_T0.5 | base model, temperature 0.5 (evaluation only) | 1 | 0.360 |" in readme
    claims = {line.split(" | ")[1]: line for line in readme.splitlines() if line.startswith("| P |")
              or line.startswith("| Q |") or line.startswith("| R |") or line.startswith("| S |")}
    assert claims["method raises accuracy"].endswith("| reproduced |")
    assert claims["noise raises accuracy"].endswith("| no difference measured |")
    # probe entropy 0.4 -> 0.3 in every seed
    assert claims["grpo's entropy falls"].endswith("| reproduced |")
    assert claims["needs a GPU"].endswith("not testable here: a 7B model |")
    method_frontier = next(line for line in readme.splitlines()
                           if line.startswith("| method | 0.45"))
    assert method_frontier.endswith("| yes |")  # pass@8 0.75 where the frontier gives ~0.57
    noise_frontier = next(line for line in readme.splitlines()
                          if line.startswith("| noise | 0.400"))
    assert noise_frontier.endswith("| no difference measured |")  # on GRPO's own frontier point
    assert ("Failed runs (not in the tables): noise__4." in readme
            and "Hand-written reading" in readme)
    compared = [line.split(" | ")[:2] for line in readme.splitlines()
                if line.startswith("| method | grpo")
                or line.startswith("| grpo_hi | grpo")]
    # each row against GRPO (its control here)
    assert compared == [["| grpo_hi", "grpo"], ["| method", "grpo"]]
    for png in ("accuracy.png", "entropy.png", "cov.png", "pass_at_k.png", "frontier.png",
                "law.png", "forgetting.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"({png})" in readme, png


@pytest.mark.slow
def test_quick_suite_runs_the_whole_pipeline(tmp_path):
    """`benchmarks/run.py --quick` (every row and base temperature of the suite, a few steps) makes
    a results file per run and a report with every table and plot."""
    out, dest = tmp_path / "runs", tmp_path / "results"
    result = run_python(["benchmarks/run.py", "--quick", "--out", str(out), "--dest", str(dest)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    suite = run.load_suite("countdown")
    expected = len(suite["rows"]) + len(suite["base"]["temperatures"])
    assert len(list((dest / "runs").glob("*.json"))) == expected
    assert f"[{expected}/{expected}]" in result.stdout and "remaining" in result.stdout
    readme = (dest / "README.md").read_text()
    for heading in ("## Results", "## Claims", "## The diversity frontier",
                    "## The entropy-performance law"):
        assert heading in readme
    assert (dest / "frontier.png").is_file() and (dest / "law.png").is_file()


@pytest.mark.slow
def test_gpu_speed_script_runs_every_path_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    result = run_python(["benchmarks/gpu_speed.py", "--size", "tiny", "--batch-size", "4",
                         "--group-size", "2", "--prompt-len", "4", "--new-tokens", "6",
                         "--train-rows", "4", "--micro-batch-size", "2", "--repeats", "1", "--out",
                         str(out)])
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
    """`python benchmarks/make_tiny_base.py` with no flags rebuilds the committed model: its
    recorded arguments are the script's defaults, and it recorded every gate the README reports."""
    from dataclasses import asdict

    make_tiny_base = load("make_tiny_base")
    built = json.loads((REPO_ROOT / "benchmarks" / "tiny-countdown"
                        / "build_metrics.json").read_text())
    defaults = asdict(make_tiny_base.Args())
    assert built["args"] == {k: v for k, v in defaults.items() if k != "measure_only"}
    n = defaults["eval_samples"]
    for key in ("eval/greedy_acc", f"eval/mean@{n}", "eval/pass@16", "eval/pass@64",
                f"eval/second_skill/mean@{n}", "eval/one_solution/pass@64",
                "eval/several_solutions/distinct_correct", "em_rl/sequence_reward_ranks_right",
                "em_rl/token_reward_ranks_right", "dph_rl/solved_8_of_8_share",
                "prime/prm_acc_before"):
        assert 0 <= built[key] <= (n if "distinct" in key else 1), key
