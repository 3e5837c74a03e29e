"""Bad input at every entry point: a clear one-line error or a reward of 0, in bounded time, never a deep traceback."""

import dataclasses
import json
import re
import sys
import time

import pytest
import torch
import tyro
from conftest import ALGORITHMS, load_algorithm, run_python

import common

NUMS, TARGET = [3, 5, 7], 22

# ---- model output -> reward 0 ----------------------------------------------------------------------------------------
COUNTDOWN_OUTPUTS = [
    ("empty", ""),
    ("only white space", " \n\t "),
    ("enormous", "3*5+7" * 200_000),
    ("non-UTF-8 (lone surrogates)", "3*5+\udcff7"),
    ("replacement characters", "3*5+\ufffd7"),
    ("NUL bytes", "3*5\x00+7"),
    ("bytes, not text", b"3*5+7"),
    ("None", None),
    ("hostile power tower", "9**9**9"),
    ("hostile caret tower", "9^9^9"),
    ("deeply nested parentheses", "(" * 10_000 + "3*5+7" + ")" * 10_000),
    ("huge literal", "9" * 100_000),
    ("huge literals in an expression", "3*5+7+" + "9" * 150),
    ("python code", "__import__('os').system('true')"),
    ("division by zero", "3*5+7/(5-5)"),
    ("division by zero in a step", "5-5=0,7/0=0,3*5=15"),
    ("many opening tags", "<answer>" * 200_000),
    ("an unclosed tag", "<answer>" + "3*5=15," * 150_000),
    ("a megabyte inside tags", "<answer>" + "1" * 1_000_000 + "</answer>"),
    ("a megabyte of steps", "3*5=15," * 150_000 + "15+7=22"),
    ("128k characters inside tags", "<answer>" + "(3*5+7)" * 18_300 + "</answer>"),
]


@pytest.mark.parametrize("label,response", COUNTDOWN_OUTPUTS, ids=[c[0] for c in COUNTDOWN_OUTPUTS])
def test_countdown_bad_output_gets_reward_zero(label, response):
    for steps in (True, False):
        start = time.perf_counter()
        correct, parsed = common.verify_countdown(NUMS, TARGET, response, steps)
        assert correct is False and isinstance(parsed, bool)
        # a hang guard, not a speed test: the extraction is linear and the parser sees at most 200 characters
        # (a quadratic scan of these megabyte inputs takes minutes)
        assert time.perf_counter() - start < 5


MATH_OUTPUTS = [
    ("no final answer", "I think it is seventy-two."),
    ("enormous", "\\boxed{" + "1" * 100_000 + "}"),
    ("deeply nested braces", "\\boxed{" + "{" * 10_000 + "72" + "}" * 10_000 + "}"),
    ("non-UTF-8", "\\boxed{7\udcff2}"),
    ("hostile power", "\\boxed{9**9**9}"),
    ("bytes, not text", b"\\boxed{72}"),
    ("many unclosed boxes", "\\boxed{" * 20_000),  # each box's brace scan restarted: did not return in 180 s
    ("a megabyte of open braces", "{" * 1_000_000),
    ("many answer phrases", "The answer is 7 " * 60_000),
    ("a long line after the answer phrase", "The answer is " + "(" * 200_000),
]


@pytest.mark.parametrize("label,response", MATH_OUTPUTS, ids=[c[0] for c in MATH_OUTPUTS])
def test_math_bad_output_gets_reward_zero(label, response):
    start = time.perf_counter()
    assert common.verify_math("72", response)[0] is False
    # a hang guard: extraction is one linear pass; the power is cut by math-verify's 5 s timeout
    assert time.perf_counter() - start < 3 * common.MATH_TIMEOUT


def test_hostile_gold_answers_are_bounded(tmp_path):
    """Golds over MAX_MATH_ANSWER_CHARS make their row malformed (skipped and counted) and get reward 0 if passed to
    verify_math directly, without being parsed."""
    nested = "{" * 10_000 + "1" + "}" * 10_000
    rows = [{"problem": "Fine", "answer": "4"}, {"problem": "Nested", "answer": nested},
            {"problem": "Boxes", "solution": "\\boxed{" * 20_000},
            {"problem": "Long", "solution": "\\boxed{" + "9" * 10**6 + "}"}]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    start = time.perf_counter()
    assert common.get_task("math", dataset=str(tmp_path)).items("test") == [{"question": "Fine", "gold": "4"}]
    assert common.verify_math(nested, "\\boxed{1}") == (False, False)
    assert common.verify_math("9" * 10**6, "\\boxed{9}") == (False, False)
    assert time.perf_counter() - start < 10


# ---- dataset rows -> skipped and counted; nothing usable -> one clear error -----------------------------------------
BAD_ROWS = [
    ("missing question", {"answer": "#### 3"}),
    ("missing answer", {"question": "What is 1+2?"}),
    ("question of the wrong type", {"question": 12, "answer": "#### 3"}),
    ("answer of the wrong type", {"question": "What is 1+2?", "answer": ["#### 3"]}),
    ("empty prompt", {"question": "   ", "answer": "#### 3"}),
    ("non-numeric target", {"question": "What is 1+2?", "answer": "#### three"}),
    ("no #### marker", {"question": "What is 1+2?", "answer": "3"}),
    ("non-ASCII digit", {"question": "What is 1+2?", "answer": "#### \u0663"}),  # Arabic-Indic 3: no answer matches it
    ("a million digits", {"question": "What is 1+2?", "answer": "#### " + "9" * 10**6}),
]


@pytest.mark.parametrize("label,row", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_malformed_dataset_row_is_skipped(label, row, tmp_path):
    good = {"question": "What is 2+2?", "answer": "#### 4"}
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    assert common.get_task("gsm8k", dataset=str(tmp_path)).train_items() == [{"question": "What is 2+2?", "gold": "4"}]
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    for split in ("train", "test"):
        (only_bad / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(common.UserInputError, match="no usable rows"):
        common.get_task("gsm8k", dataset=str(only_bad)).train_items()


def test_splits_with_different_columns_are_a_clear_error(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"answer": "#### 3"}) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 3"}) + "\n")
    with pytest.raises(common.UserInputError, match="could not load the train split"):
        common.get_task("gsm8k", dataset=str(tmp_path)).train_items()


# ---- checkpoints -> one clear error ----------------------------------------------------------------------------------
def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    common.save_checkpoint(tmp_path, 1, {"weights": torch.randn(1000)})
    data = (tmp_path / common.CHECKPOINT_FILE).read_bytes()
    (tmp_path / common.CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(common.UserInputError, match="corrupt or incomplete"):
        common.load_checkpoint(tmp_path)


# ---- command line -> one line on stderr, non-zero exit, no traceback --------------------------------------------------
def _corrupt_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"num_steps": 2}))
    (run_dir / common.CHECKPOINT_FILE).write_bytes(b"garbage")
    return run_dir


CLI_CASES = [
    (["--task", "nope"], "error: --task nope: unknown task"),
    (["--model-name", "./no/such/folder"], "error: model folder not found"),
    (["--model-name", "some-org/not-cached-model"], "error: could not load model"),
    (["--group-size", "1"], "error: need group_size >= 2"),
    (["--num-mini-batches", "3"], "error: need group_size >= 2"),
    (["--task", "countdown", "--dataset", "x"], "error: task countdown is generated"),
    (["--task", "gsm8k", "--dataset", "./no/such/folder"], "error: dataset folder not found"),
    (["--resume", "RUN_WITHOUT_CONFIG"], "error: cannot resume"),
    (["--resume", "CORRUPT_RUN"], "error: checkpoint"),
    (["--temperature", "0"], "error: --temperature 0.0: must be in (0, 100]"),
    (["--micro-batch-tokens", "-1"], "error: --micro-batch-tokens -1: must be >= 0"),
    (["--max-new-tokens", "0"], "error: --max-new-tokens 0: must be >= 1"),
    (["--fsdp", "--rollout", "continuous", "--model-name", "./no/such/folder"], "error: --rollout continuous: does not"),
    (["--micro-batch-tokens", "32", "--model-name", "./no/such/folder"], "error: --micro-batch-tokens 32: smaller"),
    (["--task", "gsm8k", "--micro-batch-tokens", "500", "--model-name", "./no/such/folder"],
     "error: --micro-batch-tokens 500: smaller than one row: a prompt and up to 512"),  # gsm8k's own length
    (["--rollout", "vllm"], None),  # tyro's own message: not one of generate, static, continuous
    (["--loss-agg", "bogus"], None),  # tyro's own message
    (["--learning-rate", "fast"], None),
]


@pytest.mark.parametrize("flags,message", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_bad_command_line_gives_one_clear_line(flags, message, tmp_path):
    replacements = {"RUN_WITHOUT_CONFIG": str(tmp_path / "nowhere"), "CORRUPT_RUN": None}
    if "CORRUPT_RUN" in flags:
        replacements["CORRUPT_RUN"] = str(_corrupt_run(tmp_path))
    argv = [replacements.get(f) or f for f in flags]
    output = [] if "--resume" in flags else ["--output-dir", str(tmp_path / "runs")]  # a resume takes no other flag
    result = run_python(["algorithms/grpo.py", *argv, *output])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    if message:
        assert result.stderr.strip().splitlines()[-1].startswith(message)


# ---- flags out of range -> `error: --flag VALUE: why`, exit code 2, before any model loads ------------------------------
NAN, INF = float("nan"), float("inf")
BAD_FLAGS = [  # (script, field, value): checked in-process by common.check_flags on the script's own Args
    ("grpo", "num_steps", 0), ("grpo", "num_steps", -1), ("grpo", "prompts_per_step", 0), ("grpo", "group_size", 0),
    ("grpo", "micro_batch_size", 0), ("grpo", "eval_prompts", 0), ("grpo", "eval_prompts", -1),
    ("grpo", "eval_samples", -1), ("grpo", "final_eval_samples", -1), ("grpo", "num_epochs", 0),
    ("grpo", "num_mini_batches", 0), ("grpo", "top_k", -1), ("grpo", "max_new_tokens", 0),
    ("grpo", "learning_rate", NAN), ("grpo", "learning_rate", INF), ("grpo", "learning_rate", -1e-4),
    ("grpo", "learning_rate", 0.0), ("grpo", "learning_rate", 1e39), ("grpo", "temperature", INF),
    ("grpo", "temperature", 0.0), ("grpo", "temperature", 1e6), ("grpo", "top_p", 0.0), ("grpo", "top_p", 1.5),
    ("grpo", "top_p", NAN),
    ("grpo", "beta", -1.0), ("grpo", "beta", NAN), ("grpo", "clip_eps_low", 2.0), ("grpo", "clip_eps_low", -0.1),
    ("grpo", "clip_eps_high", 0.0), ("grpo", "max_grad_norm", -1.0), ("grpo", "max_grad_norm", NAN),
    ("grpo", "max_grad_norm", 0.0), ("grpo", "eval_every", -1), ("grpo", "checkpoint_every", -5),
    ("grpo", "log_completions_every", -1), ("grpo", "seed", -1), ("grpo", "seed", 2**32),
    ("grpo", "exp_name", "a/b"), ("grpo", "exp_name", ".."), ("grpo", "exp_name", ""), ("grpo", "micro_batch_tokens", -1),
    ("prime", "prm_beta", 0.0), ("prime", "prm_learning_rate", -1.0), ("prime", "prm_learning_rate", 2.0),
    ("prime", "prm_max_grad_norm", NAN), ("prime", "acc_low", -0.5), ("prime", "acc_high", 1.5), ("prime", "gamma", 2.0),
    ("clip_cov", "clip_cov_ratio", 0.0), ("clip_cov", "clip_cov_ratio", 1.5), ("clip_cov", "clip_cov_ub", INF),
    ("clip_cov", "clip_cov_lb", NAN), ("clip_cov", "clip_eps_low", 1.5),
    ("kl_cov", "kl_cov_ratio", 0.0), ("kl_cov", "kl_cov_coef", -1.0), ("kl_cov", "num_mini_batches", 0),
    ("em_rl", "entropy_coef", -0.001), ("em_rl", "beta", INF), ("em_rl", "group_size", 0),
    ("dph_rl", "eta", -0.1), ("dph_rl", "alpha", 1.0), ("dph_rl", "alpha", 0.0), ("dph_rl", "presample_k", 0),
    ("dph_rl", "rehearsal_threshold", 0), ("dph_rl", "pool_prompts", 0), ("dph_rl", "rehearsal_batch_size", 0),
    ("rover", "rho", 0.0), ("rover", "rho", NAN), ("rover", "beta", -1.0), ("rover", "temperature", NAN),
]


@pytest.fixture(scope="module")
def args_classes():
    return {name: load_algorithm(name).Args for name in ALGORITHMS}


@pytest.mark.parametrize("script,field,value", BAD_FLAGS, ids=[f"{s}-{f}={v}" for s, f, v in BAD_FLAGS])
def test_flag_out_of_range_is_refused(script, field, value, args_classes):
    args = dataclasses.replace(args_classes[script](), **{field: value})
    with pytest.raises(common.FlagError, match=f"^--{field.replace('_', '-')} {re.escape(str(value))}: "):
        common.check_flags(args)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_default_flags_and_range_edges_pass(name, args_classes):
    common.check_flags(args_classes[name]())
    edges = {"eval_every": 0, "checkpoint_every": 0, "log_completions_every": 0, "eval_samples": 0, "top_k": 0,
             "top_p": 1.0, "temperature": 100.0, "seed": 2**32 - 1, "beta": 0.0, "clip_eps_low": 1.0,
             "micro_batch_tokens": 0, "max_new_tokens": 1, "gamma": 0.0, "prm_learning_rate": 0.0, "eta": 0.0}
    args = args_classes[name]()
    common.check_flags(dataclasses.replace(args, **{k: v for k, v in edges.items() if hasattr(args, k)}))


def test_output_folder_must_be_writable(tmp_path, args_classes):
    (tmp_path / "a_file").write_text("x")
    args = args_classes["grpo"]()
    common.check_flags(dataclasses.replace(args, output_dir=str(tmp_path / "new" / "deeper")))  # created by the run
    for bad in (tmp_path / "a_file", tmp_path / "a_file" / "runs"):
        with pytest.raises(common.FlagError, match="^--output-dir .*: is not a folder that can be written"):
            common.check_flags(dataclasses.replace(args, output_dir=str(bad)))
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_every_field_has_a_rule_or_is_deliberately_unchecked(args_classes):
    """A new numeric flag without a FLAG_RULES entry fails here; run-time fields are hidden from the command line."""
    seen = set()
    for name, args_class in args_classes.items():
        for field in dataclasses.fields(args_class):
            seen.add(field.name)
            if "Suppress" in str(field.type):  # run-time field: not a flag
                assert field.name not in common.FLAG_RULES, (name, field.name)
                continue
            assert (field.name in common.FLAG_RULES) != (field.name in common.UNCHECKED_FLAGS), (name, field.name)
            if field.type in (int, float, int | None, float | None):
                assert field.name in common.FLAG_RULES, f"{name}.py: numeric flag --{field.name} has no range rule"
    assert set(common.FLAG_RULES) | common.UNCHECKED_FLAGS <= seen  # no stale rule


def test_run_time_fields_are_not_flags(args_classes, monkeypatch, capsys):
    for name, field in (("grpo", "batch-size"), ("grpo", "mini-batch-size"), ("dph_rl", "rehearsal-prompts"),
                        ("prime", "batch-size")):
        monkeypatch.setitem(sys.modules, name, load_algorithm(name))  # tyro reads the help texts from the source
        assert tyro.cli(args_classes[name], args=["--seed", "3"]).seed == 3
        with pytest.raises(SystemExit):
            tyro.cli(args_classes[name], args=[f"--{field}", "3"])
        assert f"--{field}" in capsys.readouterr().err  # tyro names the unknown flag


CLI_FLAG_CASES = [  # (script, flags): each through a subprocess, before any model loads (the model folder is missing)
    ("grpo", ["--num-mini-batches", "0"]),  # divided by before any check ran: a ZeroDivisionError traceback
    ("grpo", ["--max-grad-norm", "-1"]),
    ("prime", ["--prm-beta", "nan"]),
    ("clip_cov", ["--clip-eps-low", "2"]),
    ("kl_cov", ["--eval-every", "-1"]),
    ("em_rl", ["--learning-rate", "inf"]),
    ("dph_rl", ["--exp-name", "a/b"]),
    ("rover", ["--output-dir", "README.md"]),
]


@pytest.mark.parametrize("script,flags", CLI_FLAG_CASES, ids=[f"{s} {' '.join(f)}" for s, f in CLI_FLAG_CASES])
def test_bad_flag_exits_2_with_one_line_in_seconds(script, flags):
    start = time.perf_counter()
    result = run_python([f"algorithms/{script}.py", *flags, "--model-name", "./no/such/folder"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {flags[0]} ")  # tyro gives -1 as -1.0
    assert time.perf_counter() - start < 60  # a hang guard: no model, no data (a few seconds of imports)


# ---- non-finite weights after a step -> the run stops in one line ----------------------------------------------------
def test_non_finite_weights_after_a_step_stop_the_run():
    """Finite gradients, a finite learning rate, and still inf weights: the guard checks the weights after each step."""
    weights = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weights], lr=3e37, weight_decay=0.0)  # each step moves the weights by -3e37
    guard = common.NonFiniteGuard(optimizer)
    for _ in range(11):  # -3.3e38 after 11 steps: still finite, no false alarm
        weights.grad = torch.ones(3)
        assert guard.step_ok(weights.grad.norm())
        optimizer.step()
    weights.grad = torch.ones(3)
    with pytest.raises(common.TrainingStopped, match="^the weights are not finite after optimizer step 12 "):
        optimizer.step()  # -inf
    assert guard.skipped == 0
    with torch.no_grad():
        weights.copy_(torch.tensor([1.0, float("nan"), 1.0]))
    with pytest.raises(common.TrainingStopped, match="weights are not finite"):
        guard.check_weights(optimizer)
