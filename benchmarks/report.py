"""Turn a folder of benchmark runs into `benchmarks/results/<suite>/README.md` with tables and PNG plots.

    python benchmarks/report.py --runs runs/bench/countdown --dest benchmarks/results/countdown

`--runs` holds one sub-folder per algorithm with that algorithm's run folders (what `benchmarks/run.py` writes).
Tables are mean ± std over seeds. A hand-written `discussion.md` in the destination folder is kept and included.
"""

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import tyro

PASS_KS = [1, 4, 16, 64]


@dataclass
class Args:
    runs: str
    """folder with one sub-folder of run folders per algorithm"""
    dest: str
    """folder to write README.md and the plots to"""
    suite: str = "countdown"
    """suite name, for the title"""
    failed: list[str] = field(default_factory=list)
    """runs that failed (listed in the report)"""
    algos: list[str] = field(default_factory=list)
    """the order of the algorithms in tables and legends (default: alphabetical)"""


def read_run(run_dir: Path) -> dict:
    """One run folder as {"config": dict, "records": [dict, ...]} (the lines of metrics.jsonl)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"config": json.loads((run_dir / "config.json").read_text()), "records": records}


def load_runs(root: Path) -> dict[str, list[dict]]:
    """{algorithm: [run, ...]} from `root/<algorithm>/<run>/`; runs without records are skipped."""
    groups: dict[str, list[dict]] = {}
    for metrics_file in sorted(root.glob("*/*/metrics.jsonl")):
        run = read_run(metrics_file.parent)
        if run["records"]:
            groups.setdefault(metrics_file.parent.parent.name, []).append(run)
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def evals(run: dict) -> list[dict]:
    """Evaluation records (step, metrics) with every `eval/[subset/]mean@<n>` also under the common key
    `eval/[subset/]mean@n`."""
    out = []
    for record in run["records"]:
        if "eval/greedy_acc" in record:
            record = dict(record)
            record.update({k.split("mean@")[0] + "mean@n": v for k, v in record.items()
                           if "/mean@" in k and k.split("mean@")[1].isdigit()})  # eval/mean@64 -> eval/mean@n, ...
            out.append(record)
    return out


def finished(run: dict) -> bool:
    last = evals(run)
    return bool(last) and last[-1]["step"] == run["config"]["num_steps"]


def pass_at_k_curve(runs: list[dict], stage: int) -> dict[int, tuple[float, float]]:
    """{k: (mean, std)} over runs of the base (stage 0) or final (stage -1) evaluation's pass@k."""
    keys = [set(k for k in evals(r)[stage] if k.startswith("eval/pass@")) for r in runs]
    common_keys = set.intersection(*keys) if keys else set()
    ks = sorted(int(k.split("@")[1]) for k in common_keys)
    return {k: mean_std([evals(r)[stage][f"eval/pass@{k}"] for r in runs]) for k in ks}


def fit_entropy_law(entropy: list[float], reward: list[float]) -> tuple[float, float]:
    """Least-squares fit of R = -a * exp(H) + b (linear in exp(H)). Returns (a, b)."""
    x = [math.exp(h) for h in entropy]
    x_mean, y_mean = statistics.mean(x), statistics.mean(reward)
    sxx = sum((xi - x_mean) ** 2 for xi in x)
    if sxx == 0:
        return 0.0, y_mean
    slope = sum((xi - x_mean) * (yi - y_mean) for xi, yi in zip(x, reward)) / sxx
    return -slope, y_mean - slope * x_mean


def law_points(runs: list[dict]) -> tuple[list[float], list[float]]:
    """(entropy, training accuracy) of every training step of every run."""
    points = [(r["losses/entropy"], r["charts/accuracy"]) for run in runs for r in run["records"]
              if "losses/entropy" in r and "charts/accuracy" in r]
    return [p[0] for p in points], [p[1] for p in points]


def second_skill(records: list[dict]) -> str:
    """mean@n on the second skill (a skill the runs do not train: a fall is forgetting), or – for a task without one."""
    return fmt([e["eval/second_skill/mean@n"] for e in records if "eval/second_skill/mean@n" in e])


def summary_table(groups: dict[str, list[dict]], timings: dict) -> str:
    header = ["algorithm", "seeds", "greedy acc", "mean@n"] + [f"pass@{k}" for k in PASS_KS] + [
        "final entropy", "distinct correct", "second skill mean@n", "law a", "law b", "wall time (s)", "s / step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base_runs = [run for runs in groups.values() for run in runs if evals(run) and evals(run)[0]["step"] == 0]
    if base_runs:
        base = [evals(run)[0] for run in base_runs]
        cells = ["base model", str(len(base)), fmt([e["eval/greedy_acc"] for e in base]),
                 fmt([e["eval/mean@n"] for e in base])]
        cells += [fmt([e[f"eval/pass@{k}"] for e in base if f"eval/pass@{k}" in e]) for k in PASS_KS]
        cells += ["–", fmt([e["eval/distinct_correct"] for e in base], 2), second_skill(base)] + ["–"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    for algo, runs in groups.items():
        done = [run for run in runs if finished(run)]
        if not done:
            lines.append(f"| {algo} | 0 | " + " | ".join(["–"] * (len(header) - 2)) + " |")
            continue
        final = [evals(run)[-1] for run in done]
        last_entropy = [statistics.mean([r["losses/entropy"] for r in run["records"] if "losses/entropy" in r][-10:])
                        for run in done]
        a, b = fit_entropy_law(*law_points(done))
        seconds = [timings.get(algo, {}).get(str(run["config"]["seed"])) for run in done]
        cells = [algo, str(len(done)), fmt([e["eval/greedy_acc"] for e in final]), fmt([e["eval/mean@n"] for e in final])]
        cells += [fmt([e[f"eval/pass@{k}"] for e in final if f"eval/pass@{k}" in e]) for k in PASS_KS]
        cells += [fmt(last_entropy), fmt([e["eval/distinct_correct"] for e in final], 2), second_skill(final),
                  f"{a:.3f}", f"{b:.3f}",
                  fmt([s for s in seconds if s is not None], 0),
                  fmt([statistics.mean([r["time/step"] for r in run["records"] if "time/step" in r]) for run in done])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_all(groups: dict[str, list[dict]], dest: Path) -> list[tuple[str, str]]:
    """Writes the PNGs; returns (title, file name) pairs in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def finish(fig, ax, xlabel: str, ylabel: str, title: str, file_name: str, legend_size: int = 8):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)
        fig.tight_layout()
        fig.savefig(dest / file_name, dpi=110)
        plt.close(fig)
        made.append((title, file_name))

    def curve(key: str, title: str, file_name: str, from_evals: bool = False, smooth: int = 10):
        fig, ax = plt.subplots(figsize=(6, 4))
        for algo, runs in groups.items():
            series = []
            for run in runs:
                rows = evals(run) if from_evals else [r for r in run["records"] if key in r]
                series.append({r["step"]: r[key] for r in rows if key in r})
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if not steps:
                continue
            means = [statistics.mean(s[step] for s in series) for step in steps]
            if not from_evals and smooth > 1:
                means = [statistics.mean(means[max(0, i - smooth + 1): i + 1]) for i in range(len(means))]
            ax.plot(steps, means, label=algo, marker="o" if from_evals else None)
        finish(fig, ax, "step", key, title, file_name)

    curve("eval/mean@n", "test accuracy (mean@n) vs step", "accuracy.png", from_evals=True)
    curve("losses/entropy", "token entropy vs step (10-step moving mean)", "entropy.png")
    curve("losses/cov", "covariance(logp, A) vs step (10-step moving mean)", "cov.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    first = True
    for algo, runs in groups.items():
        done = [run for run in runs if finished(run)]
        if not done:
            continue
        if first:
            base = pass_at_k_curve(done, 0)
            ax.plot(list(base), [m for m, _ in base.values()], "k--", label="base model")
            first = False
        final = pass_at_k_curve(done, -1)
        ax.errorbar(list(final), [m for m, _ in final.values()], yerr=[s for _, s in final.values()], label=algo, capsize=2)
    ax.set_xscale("log", base=2)
    finish(fig, ax, "k", "pass@k (test)", "pass@k vs k after training", "pass_at_k.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for algo, runs in groups.items():
        entropy, accuracy = law_points(runs)
        if len(entropy) < 2:
            continue
        a, b = fit_entropy_law(entropy, accuracy)
        dots = ax.scatter(entropy, accuracy, s=3, alpha=0.25)
        grid = [min(entropy) + i * (max(entropy) - min(entropy)) / 50 for i in range(51)]
        ax.plot(grid, [-a * math.exp(h) + b for h in grid], color=dots.get_facecolor()[0][:3],
                label=f"{algo}: R = -{a:.2f} e^H + {b:.2f}")
    finish(fig, ax, "token entropy H", "training accuracy R", "accuracy vs entropy with the fitted law R = -a exp(H) + b",
           "accuracy_vs_entropy.png", legend_size=7)
    return made


def write_report(runs_root: Path, dest: Path, suite: str, failed: list[str], order: list[str] = ()) -> Path:
    groups = load_runs(runs_root)
    if not groups:
        raise SystemExit(f"error: no runs with metrics under {runs_root}")
    groups = {a: groups[a] for a in [*[a for a in order if a in groups], *sorted(set(groups) - set(order))]}
    shown_root = os.path.relpath(runs_root.resolve(), Path(__file__).resolve().parents[1])
    dest.mkdir(parents=True, exist_ok=True)
    timings_file = runs_root / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    plots = plot_all(groups, dest)
    any_config = next(iter(groups.values()))[0]["config"]
    lines = [f"# Benchmark results: {suite}", "",
             f"Generated by `benchmarks/report.py` from `{shown_root}` (runs made by `benchmarks/run.py --suite {suite}`).",
             f"Model `{any_config['model_name']}`, task `{any_config['task']}`, {any_config['num_steps']} steps. "
             "Mean ± std over seeds; test metrics on the final step (n samples per prompt at temperature "
             f"{any_config['temperature']}); final entropy = mean of the last 10 steps; law a, b = least-squares fit of "
             "training accuracy R = -a exp(H) + b over every step.", "", summary_table(groups, timings), ""]
    if failed:
        lines += [f"Failed runs (not in the table): {', '.join(failed)}.", ""]
    lines += [f"## {title}\n\n![{title}]({file_name})\n" for title, file_name in plots]
    discussion = dest / "discussion.md"
    if discussion.exists():
        lines += ["## Discussion", "", discussion.read_text().strip(), ""]
    (dest / "README.md").write_text("\n".join(lines) + "\n")
    return dest / "README.md"


if __name__ == "__main__":
    args = tyro.cli(Args)
    print(f"report written to {write_report(Path(args.runs), Path(args.dest), args.suite, args.failed, args.algos)}")
