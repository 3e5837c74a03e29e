"""Print Markdown tables from run folders, grouped by exp_name, with mean ± std over seeds.

    # base (step 0) and final test metrics
    python benchmarks/summarize.py runs/countdown__grpo__*
    # a metric against the step
    python benchmarks/summarize.py runs/* --curve losses/entropy --every 25

Each run folder is what an algorithm script writes: `config.json` and `metrics.jsonl`.
"""

import argparse
import json
import statistics
from pathlib import Path

from report import with_mean_at_n  # the same folder: one alias of mean@<n> for both scripts

COLUMNS = ["eval/greedy_acc", "eval/mean@n", "eval/pass@8", "eval/pass@64", "eval/distinct_correct",
           "eval/second_skill/mean@n"]


def read_run(run_dir: Path) -> dict:
    """One run folder as {"config": dict, "records": [dict, ...]} (the lines of metrics.jsonl)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    return {"config": json.loads((run_dir / "config.json").read_text()), "records": records}


def evals(run: dict) -> list[dict]:
    """Evaluation records, each `eval/[subset/]mean@<n>` also under `eval/[subset/]mean@n`."""
    return [with_mean_at_n(record) for record in run["records"] if "eval/greedy_acc" in record]


def load_run(run_dir: Path) -> dict:
    """Returns {"name", "seed", "base": {...}, "final": {...}, "final_step", "records"} from one run
    folder."""
    run = read_run(run_dir)
    run_evals = evals(run)
    if not run_evals:
        raise ValueError(f"{run_dir}: no evaluation recorded")
    config = run["config"]
    return {"name": config["exp_name"], "seed": config["seed"],
            "base": run_evals[0], "final": run_evals[-1],
            "final_step": run_evals[-1]["step"],
            "records": {r["step"]: r for r in run["records"]}}


def group_by_name(runs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["name"], []).append(run)
    return groups


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(runs: list[dict]) -> str:
    lines = ["| run | seeds | " + " | ".join(c.removeprefix("eval/") for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for name, group in group_by_name(runs).items():
        for stage in ("base", "final"):
            cells = [mean_std([r[stage][c] for r in group if c in r[stage]]) for c in COLUMNS]
            # step 0, or the first evaluation of a run with --no-eval-base
            first = group[0]["base"]["step"]
            label = (f"{name} (step {first})" if stage == "base"
                     else f"{name} (step {group[0]['final_step']})")
            lines.append(f"| {label} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(runs: list[dict], key: str, every: int) -> str:
    """`key` at steps 0, every, 2*every, ... (rows) for each exp_name (columns), mean ± std over
    seeds."""
    groups = group_by_name(runs)
    steps = sorted({step for run in runs for step in run["records"] if step % every == 0})
    lines = [f"| step | {' | '.join(groups)} |", "|---|" + "---|" * len(groups)]
    for step in steps:
        cells = [mean_std([r["records"][step][key]
                           for r in group if key in r["records"].get(step, {})])
                 for group in groups.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return f"{key}\n\n" + "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument("--curve",
                        help="print this metric against the step instead of the base/final table")
    parser.add_argument("--every", type=int, default=25, help="step interval of the --curve table")
    cli = parser.parse_args()
    runs = [load_run(p) for p in cli.runs]
    print(curve_table(runs, cli.curve, cli.every) if cli.curve else table(runs))
