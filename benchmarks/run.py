"""Run every algorithm of a suite for several seeds, each as its own subprocess, then write the report.

    python benchmarks/run.py                               # every algorithm x 3 seeds on the embedded countdown suite
    python benchmarks/run.py --quick                       # 1 seed, a few steps: a smoke check of the whole pipeline
    python benchmarks/run.py --algos grpo rover --seeds 5 --workers 2
    python benchmarks/run.py --dry-run                     # print the exact commands and stop

A suite (`benchmarks/suites/<name>.toml`) fixes what every algorithm shares (model, task, steps, responses per step,
generation length, evaluation) and the per-algorithm flags, each with a comment on where its value comes from. Runs go
to `<out>/<algorithm>/<run_name>/`, one log file per run to `<out>/logs/`; a failed run is reported and the others go
on. The report (tables and plots) is written by `benchmarks/report.py` to `benchmarks/results/<suite>/`.
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


@dataclass
class Args:
    algos: list[str] = field(default_factory=list)
    """algorithms to run (default: every algorithm of the suite)"""
    seeds: int = 3
    """number of seeds per algorithm (seeds 1..N)"""
    suite: str = "countdown"
    """suite file in benchmarks/suites/ (or a path to a .toml file)"""
    workers: int = 2
    """runs in parallel; each gets max(1, cpu_count // workers) torch threads"""
    quick: bool = False
    """1 seed and the suite's [quick] overrides (few steps): checks the pipeline end to end in minutes"""
    dry_run: bool = False
    """print the commands and exit"""
    out: str = ""
    """folder for the runs (default runs/bench/<suite>, or runs/bench/<suite>-quick)"""
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
    return suite


def build_commands(suite: dict, algos: list[str], seeds: int, out: Path, quick: bool) -> list[tuple[str, int, list[str]]]:
    """(algorithm, seed, argv) for every run, argv relative to the repository root: shared flags, then the
    algorithm's, then the quick overrides (suite-wide, then the algorithm's `quick_flags`), then the run's own seed and
    folder. Later flags win in tyro, so overrides really override."""
    unknown = [a for a in algos if a not in suite["algorithms"]]
    if unknown:
        raise SystemExit(f"error: {', '.join(unknown)} not in suite {suite['name']!r} (has: {', '.join(suite['algorithms'])})")
    commands = []
    for algo in algos:
        flags = list(suite["shared"]["flags"]) + list(suite["algorithms"][algo].get("flags", []))
        if quick:
            flags += list(suite.get("quick", {}).get("flags", [])) + list(suite["algorithms"][algo].get("quick_flags", []))
        for seed in range(1, (1 if quick else seeds) + 1):
            argv = ["python", f"algorithms/{algo}.py", *flags, "--seed", str(seed), "--exp-name", algo,
                    "--output-dir", str(out / algo)]
            commands.append((algo, seed, argv))
    return commands


def run_one(argv: list[str], log_path: Path, threads: int) -> tuple[int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1")}
    start = time.time()
    with open(log_path, "w") as log:
        log.write(" ".join(argv) + "\n\n")
        log.flush()
        returncode = subprocess.run([sys.executable, *argv[1:]], cwd=REPO_ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT).returncode
    return returncode, time.time() - start


if __name__ == "__main__":
    args = tyro.cli(Args)
    suite = load_suite(args.suite)
    out = Path(args.out or f"runs/bench/{suite['name']}{'-quick' if args.quick else ''}").resolve()
    commands = build_commands(suite, args.algos or list(suite["algorithms"]), args.seeds, out, args.quick)
    if args.dry_run:
        for _, _, argv in commands:
            print(" ".join(argv))
        sys.exit(0)

    (out / "logs").mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // max(1, args.workers))
    print(f"{len(commands)} runs of suite {suite['name']!r}, {args.workers} at a time, {threads} thread(s) each -> {out}")
    start, failed, run_seconds = time.time(), [], {}
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(run_one, argv, out / "logs" / f"{algo}__{seed}.log", threads): (algo, seed)
                   for algo, seed, argv in commands}
        for done, future in enumerate(as_completed(futures), 1):
            algo, seed = futures[future]
            returncode, seconds = future.result()
            run_seconds[(algo, seed)] = seconds
            status = "ok" if returncode == 0 else f"FAILED (exit {returncode}, see {out / 'logs' / f'{algo}__{seed}.log'})"
            if returncode != 0:
                failed.append(f"{algo} seed {seed}")
            print(f"[{done}/{len(commands)}] {algo} seed {seed}: {status} in {seconds:.0f}s "
                  f"(elapsed {time.time() - start:.0f}s)", flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    for (algo, seed), seconds in run_seconds.items():
        timings.setdefault(algo, {})[str(seed)] = round(seconds, 1)
    timings_file.write_text(json.dumps(timings, indent=2) + "\n")
    if args.report:
        dest = BENCHMARKS / "results" / (suite["name"] + ("-quick" if args.quick else ""))
        report_argv = [sys.executable, str(BENCHMARKS / "report.py"), "--runs", str(out), "--dest", str(dest),
                       "--suite", suite["name"], "--algos", *suite["algorithms"], "--failed", *failed]
        sys.exit(subprocess.run(report_argv, cwd=REPO_ROOT).returncode or (1 if failed else 0))
    sys.exit(1 if failed else 0)
