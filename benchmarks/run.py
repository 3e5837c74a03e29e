"""Run a benchmark suite: the base model evaluated once per temperature, then every row (an
algorithm, or a matched control) for several seeds, each run its own subprocess; then write the
report.

    # the main suite: methods + controls x 3 seeds (~60 min, 2 cores)
    python benchmarks/run.py
    # 1 seed, a few steps: checks the whole pipeline in minutes
    python benchmarks/run.py --quick
    # GRPO, Clip-Cov, KL-Cov (and lr 0) for 600 steps: the law
    python benchmarks/run.py --suite countdown-long
    python benchmarks/run.py --rows grpo rover --seeds 5 --workers 2
    # print the exact commands and stop
    python benchmarks/run.py --dry-run

A suite (`benchmarks/suites/<name>.toml`) fixes what every row shares (model, task, steps, responses
per step, evaluation) and each row's script, flags and matched control, each value with a comment on
where it comes from. Runs go to `<out>/<row>/<run_name>/`, one log per run to `<out>/logs/`; a
failed run is reported and the others go on. After each run its small results file (eval records,
probe entropy, per-step curves) is written to `benchmarks/results/<suite>/runs/`, from which
`benchmarks/report.py` writes the tables, tests and plots.
"""

import json
import os
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import tyro

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
# per step, kept in the results file
TRAIN_CURVES = ("charts/accuracy", "losses/entropy", "losses/cov")


@dataclass
class Args:
    rows: list[str] = field(default_factory=list)
    """rows to run (default: every row of the suite)"""
    seeds: int = 0
    """seeds per row, from the suite's `first_seed` (default: the suite's `seeds`, else 3)"""
    suite: str = "countdown"
    """suite file in benchmarks/suites/ (or a path to a .toml file)"""
    workers: int = 2
    """runs in parallel; each gets max(1, cpu_count // workers) torch threads"""
    quick: bool = False
    """1 seed and the suite's [quick] overrides (few steps): the whole pipeline in minutes"""
    dry_run: bool = False
    """print the commands and exit"""
    out: str = ""
    """folder for the runs (default runs/bench/<suite>, or runs/bench/<suite>-quick)"""
    dest: str = ""
    """folder for the results (default benchmarks/results/<suite>, or .../<suite>-quick)"""
    report: bool = True
    """write the report when the runs are done"""


def load_suite(name: str) -> dict:
    path = Path(name) if name.endswith(".toml") else BENCHMARKS / "suites" / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (BENCHMARKS / "suites").glob("*.toml")))
        raise SystemExit(f"error: unknown suite {name!r} (known: {known})")
    with open(path, "rb") as f:
        suite = tomllib.load(f)
    suite.setdefault("name", path.stem)
    for row, spec in suite["rows"].items():
        for key in ("control", "vs"):
            if (spec.get(key) and spec[key] not in suite["rows"]
                    and not spec[key].startswith("base")):
                raise SystemExit(f"error: suite {suite['name']}: row {row}'s {key} {spec[key]!r} "
                                 "is not a row")
    return suite


@dataclass
class Job:
    row: str
    seed: int
    argv: list[str]  # relative to the repository root, starting with "python"
    # the run folder (base) or the folder that will hold the run's one folder (a row's seed)
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.row}__{self.seed}"

    @property
    def command(self) -> str:
        """The command without its output folder (this machine's): what the results file records."""
        at = self.argv.index("--output-dir")
        return " ".join(self.argv[:at] + self.argv[at + 2:])


def build_jobs(suite: dict, rows: list[str], seeds: int, out: Path, quick: bool) -> list[Job]:
    """Every job of the suite: the base model at each temperature of `[base]` (evaluation only, seed
    1), then every row x seed (a row's own `seeds` wins). A row's argv: shared flags, the row's,
    then the quick overrides (suite-wide, then the row's `quick_flags`), then the run's own seed and
    folder. Later flags win in tyro, so overrides really override."""
    unknown = [r for r in rows if r not in suite["rows"]]
    if unknown:
        raise SystemExit(f"error: {', '.join(unknown)} not in suite {suite['name']!r} "
                         f"(has: {', '.join(suite['rows'])})")
    jobs = []
    base = suite.get("base", {})
    for temperature in base.get("temperatures", []):
        flags = list(base.get("flags", [])) + (list(base.get("quick_flags", [])) if quick else [])
        row = f"base_T{temperature}"
        jobs.append(Job(row, 1,
                        ["python", "benchmarks/evaluate.py", *flags,
                         "--temperature", str(temperature),
                         "--exp-name", row, "--output-dir", str(out / "base")],
                        out / "base" / row))
    for row in rows:
        spec = suite["rows"][row]
        flags = list(suite["shared"]["flags"]) + list(spec.get("flags", []))
        if quick:
            flags += (list(suite.get("quick", {}).get("flags", []))
                      + list(spec.get("quick_flags", [])))
        first = suite.get("first_seed", 1)  # a tuning suite uses seeds that no reported run uses
        for seed in range(first, first + (1 if quick else spec.get("seeds", seeds))):
            folder = out / row / f"seed{seed}"
            jobs.append(Job(row, seed,
                            ["python", f"algorithms/{spec.get('script', row)}.py", *flags,
                             "--seed", str(seed), "--exp-name", row, "--output-dir", str(folder)],
                            folder))
    return jobs


def run_one(job: Job, log_path: Path, threads: int) -> tuple[int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1")}
    start = time.time()
    with open(log_path, "w") as log:
        log.write(" ".join(job.argv) + "\n\n")
        log.flush()
        returncode = subprocess.run([sys.executable, *job.argv[1:]], cwd=REPO_ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT).returncode
    return returncode, time.time() - start


def _round(value, digits: int = 5):
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def results_file(run_dir: Path, job: Job, seconds: float) -> dict:
    """The small record of one run that the report reads and the repository keeps: its command,
    config, every evaluation record, the probe's entropy and accuracy, and the per-step training
    curves (5 significant digits)."""
    config = json.loads((run_dir / "config.json").read_text())
    config.pop("output_dir", None)  # this machine's folder
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    evals = [{k: _round(v) for k, v in r.items() if k == "step" or k.startswith("eval/")}
             for r in records if "eval/greedy_acc" in r]
    probe = [[r["step"], _round(r["probe/entropy"]), _round(r["probe/accuracy"])]
             for r in records if "probe/entropy" in r]
    train = {key: [[r["step"], _round(r[key])] for r in records if key in r]
             for key in TRAIN_CURVES}
    step_seconds = [r["time/step"] for r in records if "time/step" in r]
    return {"row": job.row, "seed": job.seed, "command": job.command, "config": config,
            "evals": evals, "probe": probe, "train": {k: v for k, v in train.items() if v},
            "wall_seconds": round(seconds, 1),
            "step_seconds": (round(sum(step_seconds) / len(step_seconds), 3)
                             if step_seconds else None)}


def run_dir_of(job: Job) -> Path:
    """The run folder a job wrote: the base's own, or the newest run folder in the row's seed
    folder."""
    if (job.folder / "metrics.jsonl").is_file():
        return job.folder
    dirs = ([d for d in job.folder.iterdir() if (d / "metrics.jsonl").is_file()]
            if job.folder.is_dir() else [])
    if not dirs:
        raise FileNotFoundError(f"no run folder with metrics in {job.folder}")
    return max(dirs, key=lambda d: (d / "metrics.jsonl").stat().st_mtime)


def cached_result(dest: Path, job: Job) -> bool:
    """A results file of this job made by exactly this command (relative to the repository)
    exists."""
    path = dest / "runs" / f"{job.name}.json"
    try:
        return json.loads(path.read_text())["command"] == job.command
    except (OSError, ValueError, KeyError):
        return False


def eta(start: float, done: list[tuple[Job, float]], remaining: list[Job], workers: int) -> str:
    """Elapsed time and the remaining time estimated from the finished jobs of the same kind (an
    evaluation of the base or a training run; a kind with none finished yet counts as the slowest
    job so far)."""
    elapsed = time.time() - start
    if not done:
        return f"elapsed {elapsed / 60:.1f} min"

    def kind(job: Job) -> bool:
        return job.row.startswith("base_")

    slowest = max(seconds for _, seconds in done)
    left = 0.0
    for job in remaining:
        same = [seconds for other, seconds in done if kind(other) == kind(job)]
        left += sum(same) / len(same) if same else slowest
    return f"elapsed {elapsed / 60:.1f} min, ~{left / max(1, workers) / 60:.0f} min remaining"


if __name__ == "__main__":
    args = tyro.cli(Args)
    suite = load_suite(args.suite)
    tag = suite["name"] + ("-quick" if args.quick else "")
    out = Path(args.out or f"runs/bench/{tag}").resolve()
    dest = Path(args.dest or BENCHMARKS / "results" / tag).resolve()
    seeds = args.seeds or suite.get("seeds", 3)
    jobs = build_jobs(suite, args.rows or list(suite["rows"]), seeds, out, args.quick)
    if args.dry_run:
        for job in jobs:
            print(" ".join(job.argv))
        sys.exit(0)

    (out / "logs").mkdir(parents=True, exist_ok=True)
    (dest / "runs").mkdir(parents=True, exist_ok=True)
    cached = [job for job in jobs if job.row.startswith("base_") and cached_result(dest, job)]
    if cached:  # the base model does not change: its evaluation by the same command is reused
        print(f"base model: reusing {', '.join(job.row for job in cached)} from {dest / 'runs'} "
              "(same command)")
        jobs = [job for job in jobs if job not in cached]
    threads = max(1, (os.cpu_count() or 1) // max(1, args.workers))
    print(f"{len(jobs)} runs of suite {suite['name']!r}, {args.workers} at a time, "
          f"{threads} thread(s) each -> {out}", flush=True)
    start, failed, finished = time.time(), [], []
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(run_one, job, out / "logs" / f"{job.name}.log", threads): job
                   for job in jobs}
        for done, future in enumerate(as_completed(futures), 1):
            job = futures[future]
            returncode, seconds = future.result()
            finished.append((job, seconds))
            status = "ok"
            try:
                if returncode != 0:
                    raise RuntimeError(f"exit {returncode}")
                record = results_file(run_dir_of(job), job, seconds)
                (dest / "runs" / f"{job.name}.json").write_text(json.dumps(record) + "\n")
            except (RuntimeError, OSError, ValueError, KeyError) as exc:
                failed.append(job.name)
                status = f"FAILED ({exc}; see {out / 'logs' / f'{job.name}.log'})"
            remaining = [j for j in jobs if j not in [f for f, _ in finished]]
            print(f"[{done}/{len(jobs)}] {job.row} seed {job.seed}: {status} in {seconds:.0f} s | "
                  f"{eta(start, finished, remaining, args.workers)}", flush=True)
    print(f"all runs done in {(time.time() - start) / 60:.1f} min"
          + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""), flush=True)
    if args.report:
        report_argv = [sys.executable, str(BENCHMARKS / "report.py"), "--suite", str(args.suite),
                       "--dest", str(dest), "--failed", *failed]
        sys.exit(subprocess.run(report_argv, cwd=REPO_ROOT).returncode or (1 if failed else 0))
    sys.exit(1 if failed else 0)
