r"""Evaluate a model without training it: the base model's row of a benchmark suite, once per suite
and temperature.

    python benchmarks/evaluate.py --temperature 0.7 --eval-prompts 256 --samples 128 \
        --output-dir runs/base

Writes a run folder (`config.json`, and `metrics.jsonl` with one step-0 record of
`common.evaluate`'s metrics), read by `benchmarks/report.py` like a training run's. Sampling at a
lower temperature is EM-RL's free baseline (sharpening the distribution without training) and traces
the base model's pass@1 / pass@k frontier.
"""

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


@dataclass
class Args:
    model_name: str = common.EMBEDDED_MODEL
    """local folder or hub id of the model"""
    task: str = "countdown"
    """common.TASKS"""
    temperature: float = 1.0
    """sampling temperature"""
    eval_prompts: int = 512
    """number of prompts (countdown adds half as many of its second skill)"""
    eval_split: Literal["test", "val"] = "test"
    """test or val"""
    samples: int = 128
    """samples per prompt (pass@k up to this k)"""
    max_new_tokens: int | None = None
    """maximum response length (default: the task's)"""
    max_prompt_length: int | None = None
    "longer prompts are left out (default: the model's position limit minus the response length)"
    seed: int = 1
    """seed of the sampling"""
    exp_name: str = "base"
    """name of the run folder"""
    output_dir: str = "runs"
    """folder for the run folder"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    common.check_flags(args)  # the scripts' own range rules (temperature, eval_prompts, seed, ...)
    if args.samples < 0:
        raise common.FlagError("samples", args.samples, "must be >= 0 (0: greedy only)")
    if args.task not in common.TASKS:
        raise common.FlagError("task", args.task,
                               f"unknown task; choose one of: {', '.join(common.TASKS)}")
    args.max_new_tokens = args.max_new_tokens or common.TASKS[args.task].max_new_tokens
    common.seed_everything(args.seed)
    model, tokenizer = common.load_model_and_tokenizer(args.model_name)
    args.max_prompt_length = common.check_position_limit(model, args)
    task = common.get_task(args.task, None, tokenizer, args.max_prompt_length)
    items = task.eval_items(args.eval_split, args.eval_prompts)
    start = time.time()
    metrics = common.evaluate(model, tokenizer, task, items, args.samples,
                              common.Sampling(args.max_new_tokens, args.temperature))
    run_dir = Path(args.output_dir) / args.exp_name
    run_dir.mkdir(parents=True, exist_ok=True)
    common.atomic_write(run_dir / "config.json",
                        json.dumps({**asdict(args), "num_steps": 0}, indent=2) + "\n")
    record = {"step": 0, **metrics, "time/evaluate": time.time() - start}
    common.atomic_write(run_dir / "metrics.jsonl", json.dumps(record) + "\n")
    print(common.summary_line(0, 0, metrics))
    print(f"run folder: {run_dir}")
