"""Bad input at every entry point: a clear one-line error or a reward of 0, in bounded time, never a deep traceback."""

import json
import time

import pytest
from conftest import run_python
import torch

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
    (["--task", "nope"], "error: unknown task 'nope'"),
    (["--model-name", "./no/such/folder"], "error: model folder not found"),
    (["--model-name", "some-org/not-cached-model"], "error: could not load model"),
    (["--group-size", "1"], "error: need group_size >= 2"),
    (["--num-mini-batches", "3"], "error: need group_size >= 2"),
    (["--task", "countdown", "--dataset", "x"], "error: task countdown is generated"),
    (["--task", "gsm8k", "--dataset", "./no/such/folder"], "error: dataset folder not found"),
    (["--resume", "RUN_WITHOUT_CONFIG"], "error: cannot resume"),
    (["--resume", "CORRUPT_RUN"], "error: checkpoint"),
    (["--temperature", "0"], "error: the sampling temperature must be > 0"),
    (["--micro-batch-tokens", "-1"], "error: --micro-batch-tokens must be >= 0"),
    (["--max-new-tokens", "0"], "error: --max-new-tokens must be >= 1"),
    (["--fsdp", "--rollout", "continuous", "--model-name", "./no/such/folder"], "error: --rollout continuous does not"),
    (["--micro-batch-tokens", "32", "--model-name", "./no/such/folder"], "error: --micro-batch-tokens 32 is smaller"),
    (["--task", "gsm8k", "--micro-batch-tokens", "500", "--model-name", "./no/such/folder"],
     "error: --micro-batch-tokens 500 is smaller than one row: a prompt and up to 512"),  # gsm8k's own length
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
