"""Turn a suite's per-run results files into `benchmarks/results/<suite>/README.md`: tables with
tests, plots, claims.

    # reads benchmarks/results/countdown/runs/*.json
    python benchmarks/report.py --suite countdown

The results files (one per run, written by `benchmarks/run.py`) are committed, so every number here
can be recomputed without rerunning anything. Each method is read against GRPO and against its
matched control (the suite file's `control`): mean difference over seeds with a 95% CI and the p of
a paired t-test (`benchmarks/stats.py`; the seeds are shared: one seed, one prompt order and base
model). A difference with p >= 0.05 is reported as "no difference measured". A hand-written
`discussion.md` in the destination folder is kept and included.
"""

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats  # noqa: E402
from run import load_suite  # noqa: E402

COV_SCRIPTS = ("grpo", "clip_cov", "kl_cov")  # the same advantage (GRPO's), so the same covariance


@dataclass
class Args:
    suite: str = "countdown"
    """suite name (benchmarks/suites/<name>.toml) or path"""
    dest: str = ""
    """folder with runs/*.json, for README.md and plots (default: benchmarks/results/<suite>)"""
    failed: list[str] = field(default_factory=list)
    """runs that failed (listed in the report)"""


# -- reading ---------------------------------------------------------------------------------------


def load_results(folder: Path) -> dict[str, list[dict]]:
    """{row: [run, ...]} from `folder/*.json`, sorted by seed; every eval record also gets
    `eval/[subset/]mean@n`."""
    rows: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        run["evals"] = [with_mean_at_n(record) for record in run["evals"]]
        rows.setdefault(run["row"], []).append(run)
    return {row: sorted(runs, key=lambda r: r["seed"]) for row, runs in rows.items()}


def with_mean_at_n(record: dict) -> dict:
    """The record with every `eval/[subset/]mean@<n>` also under `eval/[subset/]mean@n` (n differs
    between runs)."""
    return {**record, **{k.split("mean@")[0] + "mean@n": v for k, v in record.items()
                         if "/mean@" in k and k.split("mean@")[1].isdigit()}}


def final(run: dict) -> dict:
    """The last evaluation record (the base's only one), with the last probe entropy and
    accuracy."""
    record = dict(run["evals"][-1]) if run["evals"] else {}
    if run["probe"]:
        record["probe/entropy"], record["probe/accuracy"] = run["probe"][-1][1], run["probe"][-1][2]
    return record


def top_k(runs: list[dict]) -> int:
    """The largest power of two k <= n / 4 for the final samples n (pass@k's estimate is reliable
    well below n)."""
    n = min(int(k.split("@")[1]) for run in runs for k in run["evals"][-1]
            if k.startswith("eval/mean@") and k.split("@")[1].isdigit())
    return 2 ** int(math.log2(max(1, n // 4)))


def values(runs: list[dict], key: str) -> dict[int, float]:
    """{seed: final value of `key`} over the runs that have it."""
    return {run["seed"]: final(run)[key] for run in runs if key in final(run)}


def fmt(vals, digits: int = 3) -> str:
    vals = list(vals.values()) if isinstance(vals, dict) else list(vals)
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def compare(a: dict[int, float], b: dict[int, float]) -> stats.Comparison:
    """a - b: paired over shared seeds; against a single value (the base, evaluated once) a
    one-sample t-test."""
    if len(b) == 1 and len(a) > 1:
        value = next(iter(b.values()))
        return stats.paired(a, {seed: value for seed in a})
    return stats.paired(a, b)


def verdict(c: stats.Comparison, direction: str) -> str:
    """reproduced (p < 0.05 in the claimed direction), contradicted (p < 0.05 the other way), else
    no difference."""
    if math.isnan(c.p):
        return "not testable (too few runs)"
    if c.p >= 0.05:
        return "no difference measured"
    return "reproduced" if (c.diff > 0) == (direction == "higher") else "contradicted"


# -- the frontier ----------------------------------------------------------------------------------


def frontier_points(groups: dict[str, list[dict]], suite: dict,
                    k: int) -> list[tuple[float, float]]:
    """(pass@1, pass@k) of every frontier point, each the mean over a row's seeds (the upper
    envelope of single runs would be biased up by their noise): the base at each temperature, and
    GRPO (rows marked `frontier`) along its learning-rate sweep and through training (every
    evaluation that drew enough samples for pass@k)."""
    points = []
    for row in [r for r in groups if r.startswith("base")] + [r for r, spec in suite["rows"].items()
                                                               if spec.get("frontier")]:
        by_step: dict[int, list[dict]] = {}
        for run in groups.get(row, []):
            for record in run["evals"]:
                if f"eval/pass@{k}" in record:
                    by_step.setdefault(record["step"], []).append(record)
        for records in by_step.values():
            points.append((statistics.mean(r["eval/pass@1"] for r in records),
                           statistics.mean(r[f"eval/pass@{k}"] for r in records)))
    return points


def envelope(points: list[tuple[float, float]], x: float) -> float:
    """The frontier at pass@1 = x: the best pass@k among the points with pass@1 >= x (a point better
    on both dominates), interpolated linearly between the envelope's corners. Beyond the best pass@1
    on the frontier it stays at that point's pass@k: a method there is above only if it beats the
    frontier's end on both."""
    corners = []
    for px, py in sorted(points, key=lambda p: (-p[0], -p[1])):  # from the best pass@1 down
        if not corners or py > corners[-1][1]:
            corners.append((px, py))
    corners.reverse()  # by rising pass@1, falling pass@k
    if not corners:
        return math.nan
    if x >= corners[-1][0]:
        return corners[-1][1]
    if x <= corners[0][0]:
        return corners[0][1]
    for (x0, y0), (x1, y1) in zip(corners, corners[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return math.nan


def above_frontier(runs: list[dict], points, k: int) -> stats.Comparison:
    """Per seed: the run's pass@k minus the frontier's at the run's pass@1; mean, CI and p of a
    one-sample t-test."""
    margins = {run["seed"]: (final(run)[f"eval/pass@{k}"]
                             - envelope(points, final(run)["eval/pass@1"]))
               for run in runs}
    return stats.paired(margins, {s: 0.0 for s in margins})


# -- the entropy-performance law -------------------------------------------------------------------


def law_points(runs: list[dict]) -> tuple[list[float], list[float]]:
    """(probe entropy, probe accuracy) at every probe of every run: a fixed set of prompts, so batch
    difficulty does not move the points."""
    points = [(h, r) for run in runs for _, h, r in run["probe"]]
    return [p[0] for p in points], [p[1] for p in points]


def batch_points(runs: list[dict]) -> tuple[list[float], list[float]]:
    """(entropy, accuracy) of every training batch: the old way, where each batch's difficulty moves
    both."""
    points = [(h, r) for run in runs
              for (_, h), (_, r) in zip(run["train"].get("losses/entropy", []),
                                        run["train"].get("charts/accuracy", []))]
    return [p[0] for p in points], [p[1] for p in points]


def law_table(groups: dict[str, list[dict]]) -> str:
    lines = ["| row | probes | probe entropy first → last | probe accuracy first → last "
             "| law on the probe: a, b, R² | line on the probe: slope, R² "
             "| law on training batches: a, R² |",
             "|---|---|---|---|---|---|---|"]
    for row, runs in groups.items():
        entropy, accuracy = law_points(runs)
        if len(entropy) < 3:
            continue
        law, line = stats.fit_entropy_law(entropy, accuracy), stats.fit_line(entropy, accuracy)
        batches = stats.fit_entropy_law(*batch_points(runs))
        first = [run["probe"][0] for run in runs if run["probe"]]
        last = [run["probe"][-1] for run in runs if run["probe"]]
        lines.append(f"| {row} | {len(entropy)} | "
                     f"{fmt([p[1] for p in first])} → {fmt([p[1] for p in last])} | "
                     f"{fmt([p[2] for p in first])} → {fmt([p[2] for p in last])} | "
                     f"{-law.slope:.3f}, {law.intercept:.3f}, {law.r2:.2f} | "
                     f"{line.slope:.3f}, {line.r2:.2f} | "
                     f"{-batches.slope:.3f}, {batches.r2:.2f} |")
    return "\n".join(lines)


# -- tables ----------------------------------------------------------------------------------------


def results_table(groups: dict[str, list[dict]], suite: dict, k: int) -> str:
    ks = sorted({min(4, k), k} - {1})
    header = ["row", "what", "seeds", "greedy acc", "mean@n (pass@1)", *[f"pass@{j}" for j in ks],
              "distinct correct", "second skill mean@n", "probe entropy", "s / step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, runs in groups.items():
        what = suite["rows"].get(row, {}).get("what", "") if not row.startswith("base") else \
            f"base model, temperature {row.split('_T')[1]} (evaluation only)"
        cells = [row, what, str(len(runs))] + [fmt(values(runs, key)) for key in (
            "eval/greedy_acc", "eval/mean@n", *[f"eval/pass@{j}" for j in ks])]
        cells += [fmt(values(runs, "eval/distinct_correct"), 2),
                  fmt(values(runs, "eval/second_skill/mean@n")),
                  fmt(values(runs, "probe/entropy")),
                  fmt([r["step_seconds"] for r in runs if r["step_seconds"]], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(groups: dict[str, list[dict]], suite: dict, k: int) -> str:
    metrics = [("eval/mean@n", "mean@n"), (f"eval/pass@{k}", f"pass@{k}"),
               ("probe/entropy", "probe entropy"),
               ("eval/second_skill/mean@n", "second skill mean@n")]
    lines = ["| row | against | " + " | ".join(name for _, name in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for row, spec in suite["rows"].items():  # every row against its control and against GRPO
        for against in dict.fromkeys(x for x in (spec.get("control"), spec.get("vs", "grpo"))
                                     if x and x != row):
            if row not in groups or against not in groups:
                continue
            cells = []
            for key, _ in metrics:
                a, b = values(groups[row], key), values(groups[against], key)
                cells.append(compare(a, b).text() if a and b else "–")
            lines.append(f"| {row} | {against} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims_table(groups: dict[str, list[dict]], suite: dict, k: int) -> str:
    lines = ["| paper | claim | measured (a − b, 95% CI, p) | verdict |", "|---|---|---|---|"]
    for claim in suite.get("claims", []):
        if claim.get("untestable"):
            lines.append(f"| {claim['paper']} | {claim['claim']} | – | "
                         f"not testable here: {claim['untestable']} |")
            continue
        key = claim["metric"].replace("@k", f"@{k}")
        a_runs, b_runs = groups.get(claim["a"], []), groups.get(claim["b"], [])
        if claim.get("b") == "step0":  # a change within a row: its first probe against its last
            index = 1 if key == "probe/entropy" else 2
            a = {run["seed"]: run["probe"][-1][index] for run in a_runs if run["probe"]}
            b = {run["seed"]: run["probe"][0][index] for run in a_runs if run["probe"]}
        else:
            a, b = values(a_runs, key), values(b_runs, key)
        if not a or not b:
            lines.append(f"| {claim['paper']} | {claim['claim']} | (rows not run) | – |")
            continue
        c = compare(a, b)
        what = f"{claim['a']} − {claim['b']}, {key}: {c.text()}"
        lines.append(f"| {claim['paper']} | {claim['claim']} | {what} | "
                     f"{verdict(c, claim['direction'])} |")
    return "\n".join(lines)


def frontier_table(groups: dict[str, list[dict]], suite: dict, k: int) -> str:
    points = frontier_points(groups, suite, k)
    lines = [f"| row | pass@1 | pass@{k} | frontier's pass@{k} at that pass@1 | "
             "margin (95% CI, p) | above? |",
             "|---|---|---|---|---|---|"]
    for row, spec in suite["rows"].items():
        if spec.get("frontier") or row not in groups:
            continue
        runs = groups[row]
        at = statistics.mean(envelope(points, final(r)["eval/pass@1"]) for r in runs)
        c = above_frontier(runs, points, k)
        above = ("yes" if c.p < 0.05 and c.diff > 0
                 else "below" if c.p < 0.05 else "no difference measured")
        if math.isnan(c.p):
            above = "no test (one seed)"
        elif statistics.mean(final(r)["eval/pass@1"] for r in runs) > max(x for x, _ in points):
            above += " (pass@1 past the frontier's end)"
        lines.append(f"| {row} | {fmt(values(runs, 'eval/pass@1'))} | "
                     f"{fmt(values(runs, f'eval/pass@{k}'))} | {at:.3f} | {c.text()} | {above} |")
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------------------


def plot_all(groups: dict[str, list[dict]], suite: dict, k: int,
             dest: Path) -> list[tuple[str, str]]:
    """Writes the PNGs; returns (title, file name) pairs in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    trained = {row: runs for row, runs in groups.items() if not row.startswith("base")}
    base = next((runs[0] for row, runs in groups.items() if row == "base_T1.0"), None)
    colors = {row: plt.cm.tab20(i % 20) for i, row in enumerate(groups)}

    def finish(fig, ax, xlabel: str, ylabel: str, title: str, file_name: str):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(dest / file_name, dpi=110)
        plt.close(fig)
        made.append((title, file_name))

    def band(ax, row, series: list[dict[int, float]], label: str):
        """mean over seeds with a ±1 std band, at the steps every seed has"""
        steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
        if not steps:
            return
        mean = [statistics.mean(s[t] for s in series) for t in steps]
        std = [statistics.stdev(s[t] for s in series) if len(series) > 1 else 0.0 for t in steps]
        ax.plot(steps, mean, label=label, color=colors[row],
                marker="o" if len(steps) < 12 else None, ms=3)
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)],
                        [m + s for m, s in zip(mean, std)], color=colors[row], alpha=0.15)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, runs in trained.items():
        band(ax, row, [{r["step"]: r["eval/mean@n"] for r in run["evals"]} for run in runs], row)
    if base:
        ax.axhline(final(base)["eval/mean@n"], color="k", ls="--", lw=1, label="base (T 1.0)")
    finish(fig, ax, "step", "test mean@n (pass@1)",
           "test accuracy vs step (mean ± std over seeds)", "accuracy.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, runs in trained.items():
        if all(run["probe"] for run in runs):
            band(ax, row, [{p[0]: p[1] for p in run["probe"]} for run in runs], row)
    finish(fig, ax, "step", "token entropy on the probe prompts",
           "entropy vs step (fixed probe set; mean ± std)", "entropy.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, runs in trained.items():
        if suite["rows"].get(row, {}).get("script", row) in COV_SCRIPTS:
            series = []
            for run in runs:
                points = run["train"].get("losses/cov", [])
                smooth = [statistics.mean(v for _, v in points[max(0, i - 9):i + 1])
                          for i in range(len(points))]
                series.append({step: value for (step, _), value in zip(points, smooth)})
            band(ax, row, series, row)
    finish(fig, ax, "step", "cov(log p, A), 10-step mean",
           "covariance vs step (rows with GRPO's advantage only)", "cov.png")

    if base:  # pass@k against k as the difference from the base, where the claims live
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ks = [2**i for i in range(int(math.log2(k)) + 1)
              if all(f"eval/pass@{2**i}" in final(run) for runs in groups.values() for run in runs)]
        ax.axhline(0, color="k", ls="--", lw=1, label="base (T 1.0)")
        for row, runs in groups.items():
            if row == "base_T1.0":
                continue
            diffs = [[final(run)[f"eval/pass@{j}"] - final(base)[f"eval/pass@{j}"] for j in ks]
                     for run in runs]
            mean = [statistics.mean(d[i] for d in diffs) for i in range(len(ks))]
            std = [statistics.stdev(d[i] for d in diffs) if len(diffs) > 1 else 0.0
                   for i in range(len(ks))]
            ax.errorbar(ks, mean, yerr=std, label=row, color=colors[row], capsize=2, lw=1,
                        ls=":" if row.startswith("base") else "-")
        ax.set_xscale("log", base=2)
        finish(fig, ax, "k", "pass@k minus the base's (T 1.0)",
               f"pass@k vs k up to k = {k}, relative to the base", "pass_at_k.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = frontier_points(groups, suite, k)
    if points:
        xs = sorted({p[0] for p in points})
        grid = [xs[0] + i * (xs[-1] - xs[0]) / 100 for i in range(101)]
        ax.plot(grid, [envelope(points, x) for x in grid], color="0.6", lw=4, alpha=0.5,
                label="frontier")
    for row, runs in groups.items():
        style = (dict(marker="s", ms=4)
                 if row.startswith("base") or suite["rows"].get(row, {}).get("frontier")
                 else dict(marker="o", ms=6))
        xs, ys = ([final(r)["eval/pass@1"] for r in runs],
                  [final(r).get(f"eval/pass@{k}", math.nan) for r in runs])
        ax.errorbar([statistics.mean(xs)], [statistics.mean(ys)],
                    xerr=[statistics.stdev(xs) if len(xs) > 1 else 0],
                    yerr=[statistics.stdev(ys) if len(ys) > 1 else 0], label=row, color=colors[row],
                    capsize=2, **style)
    finish(fig, ax, "pass@1 (test)", f"pass@{k} (test)",
           f"diversity frontier: pass@1 vs pass@{k} (mean ± std)", "frontier.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, runs in trained.items():
        entropy, accuracy = law_points(runs)
        if len(entropy) < 3:
            continue
        law, line = stats.fit_entropy_law(entropy, accuracy), stats.fit_line(entropy, accuracy)
        ax.scatter(entropy, accuracy, s=4, alpha=0.4, color=colors[row])
        grid = [min(entropy) + i * (max(entropy) - min(entropy)) / 50 for i in range(51)]
        ax.plot(grid, [law.slope * math.exp(h) + law.intercept for h in grid], color=colors[row],
                label=f"{row}: exp R² {law.r2:.2f}, linear R² {line.r2:.2f}")
    finish(fig, ax, "token entropy H (probe)", "accuracy R (probe)",
           "R = −a·exp(H) + b on the probe set, per row", "law.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [row for row in groups if values(groups[row], "eval/second_skill/mean@n")]
    for i, row in enumerate(names):
        v = list(values(groups[row], "eval/second_skill/mean@n").values())
        ax.bar(i, statistics.mean(v), yerr=statistics.stdev(v) if len(v) > 1 else 0,
               color=colors[row], capsize=2)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    values_all = [v for row in names
                  for v in values(groups[row], "eval/second_skill/mean@n").values()]
    if values_all:
        ax.set_ylim(min(values_all) - 0.05, max(values_all) + 0.03)
    finish(fig, ax, "", "second skill mean@n (never trained)",
           "forgetting: the untrained skill after training", "forgetting.png")
    return made


def write_report(dest: Path, suite: dict, failed: list[str] = ()) -> Path:
    groups = load_results(dest / "runs")
    if not groups:
        raise SystemExit(f"error: no results files in {dest / 'runs'}")
    order = [r for r in groups if r.startswith("base")] + [r for r in suite["rows"] if r in groups]
    groups = {row: groups[row] for row in order + sorted(set(groups) - set(order))}
    k = top_k([run for runs in groups.values() for run in runs])
    plots = [] if suite.get("tuning") else plot_all(groups, suite, k, dest)
    seconds = sum(run["wall_seconds"] for runs in groups.values() for run in runs)
    any_run = next(run for runs in groups.values() for run in runs
                   if not run["row"].startswith("base"))
    config = any_run["config"]
    lines = [f"# Benchmark results: {suite['name']}", "",
             f"Generated by `python benchmarks/report.py --suite {suite['name']}` "
             "from the per-run files in [`runs/`](runs/) "
             f"(made by `python benchmarks/run.py --suite {suite['name']}`; each file holds its "
             "exact command). "
             f"Model `{config['model_name']}`, task `{config['task']}`, "
             f"{config['num_steps']} steps, "
             f"{config.get('eval_split', 'test')} split, "
             f"sampling temperature {config['temperature']}; mean ± std over seeds; "
             f"the final evaluation draws n = {config['final_eval_samples']} samples per prompt "
             f"and pass@k is shown up to k = n/4 = {k}. "
             f"{sum(map(len, groups.values()))} runs, "
             f"{seconds / 3600:.1f} h of run time in all.", ""]
    if not suite.get("tuning"):
        lines += ["## Results", "", results_table(groups, suite, k), ""]
    if failed:
        lines += [f"Failed runs (not in the tables): {', '.join(failed)}.", ""]
    if suite.get("tuning"):  # validation runs: the table, and the choices in discussion.md
        lines += ["## Results", "",
                  "Step 0 (the base, evaluated in each run before training) → the last step:", "",
                  tuning_table(groups), ""]
    else:
        lines += sections(groups, suite, k) + [f"## {title}\n\n![{title}]({file_name})\n"
                                               for title, file_name in plots]
    discussion = dest / "discussion.md"
    if discussion.exists():
        lines += ["## Discussion", "", discussion.read_text().strip(), ""]
    (dest / "README.md").write_text("\n".join(lines) + "\n")
    return dest / "README.md"


def tuning_table(groups: dict[str, list[dict]]) -> str:
    lines = ["| row | mean@n | pass@8 | second skill mean@n |", "|---|---|---|---|"]
    for row, runs in groups.items():
        cells = []
        for key in ("eval/mean@n", "eval/pass@8", "eval/second_skill/mean@n"):
            first = [run["evals"][0][key] for run in runs if key in run["evals"][0]]
            cells.append(f"{fmt(first)} → {fmt(values(runs, key))}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sections(groups: dict[str, list[dict]], suite: dict, k: int) -> list[str]:
    return ["## Each method against GRPO and against its matched control", "",
            "a − b over the shared seeds: mean difference [95% CI], p of a paired t-test "
            "(against the base, evaluated once, a one-sample t-test). "
            "p ≥ 0.05: no difference measured.", "",
            comparison_table(groups, suite, k), "",
            "## Claims", "", claims_table(groups, suite, k), "",
            f"## The diversity frontier (pass@1 against pass@{k})", "",
            "The frontier is the upper envelope of the base model across sampling temperatures "
            "and of GRPO along its step size (the rows marked frontier: learning rates, "
            "4 mini-batches) and through training (its evaluations with enough samples for "
            f"pass@{k}), each point a mean over seeds. A method has a diversity effect only "
            f"above it: per seed, its pass@{k} minus the frontier's at its own pass@1; one-sample "
            "t-test over seeds. Past the frontier's best pass@1 the frontier stays at that "
            "point's pass@k.", "",
            frontier_table(groups, suite, k), "",
            "## The entropy-performance law on the probe set", "",
            "Probe entropy and accuracy (fixed training prompts, fixed sampling seed) at every "
            "probe step of every run of a row, fitted with the law and with a straight line.", "",
            law_table(groups), ""]


if __name__ == "__main__":
    args = tyro.cli(Args)
    suite = load_suite(args.suite)
    dest = Path(args.dest or Path(__file__).resolve().parent / "results" / suite["name"])
    print(f"report written to {write_report(dest, suite, args.failed)}")
