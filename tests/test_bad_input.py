"""Bad input at every entry point:
a clear one-line error or a reward of 0, in bounded time, never a deep traceback."""

import dataclasses
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import tyro
from conftest import ALGORITHMS, load_algorithm, refuse_in_the_quick_tier, run_python

import common

NUMS, TARGET = [3, 5, 7], 22

# ---- model output -> reward 0 --------------------------------------------------------------------
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
        # a hang guard, not a speed test: the extraction is linear and the parser sees at most 200
        # characters (a quadratic scan of these megabyte inputs takes minutes)
        assert time.perf_counter() - start < 5


MATH_OUTPUTS = [
    ("no final answer", "I think it is seventy-two."),
    ("enormous", "\\boxed{" + "1" * 100_000 + "}"),
    ("deeply nested braces", "\\boxed{" + "{" * 10_000 + "72" + "}" * 10_000 + "}"),
    ("non-UTF-8", "\\boxed{7\udcff2}"),
    ("hostile power", "\\boxed{9**9**9}"),
    ("bytes, not text", b"\\boxed{72}"),
    # each box's brace scan restarted: did not return in 180 s
    ("many unclosed boxes", "\\boxed{" * 20_000),
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
    """Golds over MAX_MATH_ANSWER_CHARS make their row malformed (skipped and counted) and get
    reward 0 if passed to verify_math directly, without being parsed."""
    nested = "{" * 10_000 + "1" + "}" * 10_000
    rows = [{"problem": "Fine", "answer": "4"}, {"problem": "Nested", "answer": nested},
            {"problem": "Boxes", "solution": "\\boxed{" * 20_000},
            {"problem": "Long", "solution": "\\boxed{" + "9" * 10**6 + "}"}]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    start = time.perf_counter()
    assert (common.get_task("math", dataset=str(tmp_path)).items("test")
            == [{"question": "Fine", "gold": "4"}])
    assert common.verify_math(nested, "\\boxed{1}") == (False, False)
    assert common.verify_math("9" * 10**6, "\\boxed{9}") == (False, False)
    assert time.perf_counter() - start < 10


# ---- dataset rows -> skipped and counted; nothing usable -> one clear error ----------------------
BAD_ROWS = [
    ("missing question", {"answer": "#### 3"}),
    ("missing answer", {"question": "What is 1+2?"}),
    ("question of the wrong type", {"question": 12, "answer": "#### 3"}),
    ("answer of the wrong type", {"question": "What is 1+2?", "answer": ["#### 3"]}),
    ("empty prompt", {"question": "   ", "answer": "#### 3"}),
    ("non-numeric target", {"question": "What is 1+2?", "answer": "#### three"}),
    ("no #### marker", {"question": "What is 1+2?", "answer": "3"}),
    # Arabic-Indic 3: no answer matches it
    ("non-ASCII digit", {"question": "What is 1+2?", "answer": "#### \u0663"}),
    ("a million digits", {"question": "What is 1+2?", "answer": "#### " + "9" * 10**6}),
]


@pytest.mark.parametrize("label,row", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_malformed_dataset_row_is_skipped(label, row, tmp_path):
    good = {"question": "What is 2+2?", "answer": "#### 4"}
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    assert (common.get_task("gsm8k", dataset=str(tmp_path)).train_items()
            == [{"question": "What is 2+2?", "gold": "4"}])
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


# ---- checkpoints -> one clear error --------------------------------------------------------------
def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    common.save_checkpoint(tmp_path, 1, {"weights": torch.randn(1000)})
    data = (tmp_path / common.CHECKPOINT_FILE).read_bytes()
    (tmp_path / common.CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(common.UserInputError, match="corrupt or incomplete"):
        common.load_checkpoint(tmp_path)


# ---- command line -> one line on stderr, non-zero exit, no traceback -----------------------------
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
    (["--group-size", "1"], "error: --group-size 1: must be >= 2: the group is the baseline"),
    (["--num-mini-batches", "3"],
     "error: --num-mini-batches 3: must divide prompts_per_step x group_size = 128"),
    (["--task", "countdown", "--dataset", "x"], "error: task countdown is generated"),
    (["--task", "gsm8k", "--dataset", "./no/such/folder", "--max-new-tokens", "64"],
     "error: dataset folder not found"),
    (["--task", "gsm8k"],
     "error: --max-new-tokens 512: leaves no room for a prompt: the model's position limit is 128"),
    (["--resume", "RUN_WITHOUT_CONFIG"], "error: cannot resume"),
    (["--resume", "CORRUPT_RUN"], "error: checkpoint"),
    (["--temperature", "0"], "error: --temperature 0.0: must be in (0, 100]"),
    (["--micro-batch-tokens", "-1"], "error: --micro-batch-tokens -1: must be >= 0"),
    (["--max-new-tokens", "0"], "error: --max-new-tokens 0: must be >= 1"),
    (["--fsdp", "--rollout", "continuous", "--model-name", "./no/such/folder"],
     "error: --rollout continuous: does not"),
    (["--micro-batch-tokens", "32", "--model-name", "./no/such/folder"],
     "error: --micro-batch-tokens 32: smaller"),
    (["--task", "gsm8k", "--micro-batch-tokens", "500", "--model-name", "./no/such/folder"],
     # gsm8k's own length
     "error: --micro-batch-tokens 500: smaller than one row: a prompt and up to 512"),
    (["--rollout", "vllm"], None),  # tyro's own message: not one of generate, static, continuous
    (["--loss-agg", "bogus"], None),  # tyro's own message
    (["--learning-rate", "fast"], None),
]


@pytest.mark.slow
@pytest.mark.parametrize("flags,message", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_bad_command_line_gives_one_clear_line(flags, message, tmp_path):
    replacements = {"RUN_WITHOUT_CONFIG": str(tmp_path / "nowhere"), "CORRUPT_RUN": None}
    if "CORRUPT_RUN" in flags:
        replacements["CORRUPT_RUN"] = str(_corrupt_run(tmp_path))
    argv = [replacements.get(f) or f for f in flags]
    # a resume takes no other flag
    output = [] if "--resume" in flags else ["--output-dir", str(tmp_path / "runs")]
    result = run_python(["algorithms/grpo.py", *argv, *output])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    if message:
        assert result.stderr.strip().splitlines()[-1].startswith(message)
    else:  # tyro's own message names the flag
        assert flags[0] in result.stderr
    if message and message.startswith("error: --"):  # a flag's value: a usage error, as argparse's
        assert result.returncode == 2


# ---- flags out of range -> `error: --flag VALUE: why`, exit code 2, before any model loads -------
NAN, INF = float("nan"), float("inf")
# (script, field, value): checked in-process by common.check_flags on the script's own Args
BAD_FLAGS = [
    ("grpo", "num_steps", 0), ("grpo", "num_steps", -1), ("grpo", "prompts_per_step", 0),
    ("grpo", "group_size", 0), ("grpo", "micro_batch_size", 0), ("grpo", "eval_prompts", 0),
    ("grpo", "eval_prompts", -1), ("grpo", "eval_samples", -1), ("grpo", "final_eval_samples", -1),
    ("grpo", "num_epochs", 0), ("grpo", "num_mini_batches", 0), ("grpo", "top_k", -1),
    ("grpo", "max_new_tokens", 0), ("grpo", "learning_rate", NAN), ("grpo", "learning_rate", INF),
    ("grpo", "learning_rate", -1e-4), ("grpo", "learning_rate", 1e39), ("grpo", "probe_every", -1),
    ("grpo", "probe_prompts", 0), ("grpo", "temperature", INF), ("grpo", "temperature", 0.0),
    ("grpo", "temperature", 1e6), ("grpo", "top_p", 0.0), ("grpo", "top_p", 1.5),
    ("grpo", "top_p", NAN), ("grpo", "beta", -1.0), ("grpo", "beta", NAN),
    ("grpo", "clip_eps_low", 2.0), ("grpo", "clip_eps_low", -0.1), ("grpo", "clip_eps_high", 0.0),
    ("grpo", "max_grad_norm", -1.0), ("grpo", "max_grad_norm", NAN), ("grpo", "max_grad_norm", 0.0),
    ("grpo", "eval_every", -1), ("grpo", "checkpoint_every", -5),
    ("grpo", "log_completions_every", -1), ("grpo", "seed", -1), ("grpo", "seed", 2**32),
    ("grpo", "exp_name", "a/b"), ("grpo", "exp_name", ".."), ("grpo", "exp_name", ""),
    ("grpo", "micro_batch_tokens", -1),
    ("prime", "prm_beta", 0.0), ("prime", "prm_learning_rate", -1.0),
    ("prime", "prm_learning_rate", 2.0), ("prime", "prm_max_grad_norm", NAN),
    ("prime", "acc_low", -0.5), ("prime", "acc_high", 1.5), ("prime", "gamma", 2.0),
    ("clip_cov", "clip_cov_ratio", 0.0), ("clip_cov", "clip_cov_ratio", 1.5),
    ("clip_cov", "clip_cov_ub", INF), ("clip_cov", "clip_cov_lb", NAN),
    ("clip_cov", "clip_eps_low", 1.5),
    ("kl_cov", "kl_cov_ratio", 0.0), ("kl_cov", "kl_cov_coef", -1.0),
    ("kl_cov", "num_mini_batches", 0),
    ("em_rl", "entropy_coef", -0.001), ("em_rl", "beta", INF), ("em_rl", "group_size", 0),
    ("dph_rl", "eta", -0.1), ("dph_rl", "alpha", 1.0), ("dph_rl", "alpha", 0.0),
    ("dph_rl", "alpha", -0.5), ("dph_rl", "presample_k", 0), ("dph_rl", "rehearsal_threshold", 0),
    ("dph_rl", "pool_prompts", 0), ("dph_rl", "rehearsal_batch_size", 0),
    ("rover", "rho", 0.0), ("rover", "rho", NAN), ("rover", "beta", -1.0),
    ("rover", "temperature", NAN),
]


# flags with no FLAG_RULES entry on purpose: checked elsewhere (tyro's choices, resume_config, model
# and data loading) or free-form
UNCHECKED_FLAGS = {
    "torch_deterministic", "cuda", "track", "wandb_project_name", "wandb_entity", "save_model",
    "save_dtype", "resume", "model_name", "task", "dataset", "eval_split", "bf16",
    "gradient_checkpointing", "rollout", "fsdp", "scale_rewards", "loss_agg", "prm_update",
    "prm_ref", "filter_truncated", "method", "reward_type", "reward_norm", "divergence", "std_norm",
    "eval_base",
}


@pytest.fixture(scope="module")
def args_classes():
    return {name: load_algorithm(name).Args for name in ALGORITHMS}


@pytest.mark.parametrize("script,field,value", BAD_FLAGS,
                         ids=[f"{s}-{f}={v}" for s, f, v in BAD_FLAGS])
def test_flag_out_of_range_is_refused(script, field, value, args_classes):
    args = dataclasses.replace(args_classes[script](), **{field: value})
    with pytest.raises(common.FlagError,
                       match=f"^--{field.replace('_', '-')} {re.escape(str(value))}: "):
        common.check_flags(args)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_default_flags_and_range_edges_pass(name, args_classes):
    common.check_flags(args_classes[name]())
    edges = {"eval_every": 0, "checkpoint_every": 0, "log_completions_every": 0, "eval_samples": 0,
             "top_k": 0, "top_p": 1.0, "temperature": 100.0, "seed": 2**32 - 1, "beta": 0.0,
             "clip_eps_low": 1.0, "micro_batch_tokens": 0, "max_new_tokens": 1, "gamma": 0.0,
             "prm_learning_rate": 0.0, "eta": 0.0, "learning_rate": 0.0, "probe_every": 0}
    args = args_classes[name]()
    common.check_flags(dataclasses.replace(args,
                                           **{k: v for k, v in edges.items() if hasattr(args, k)}))


def test_output_folder_must_be_writable(tmp_path, args_classes):
    (tmp_path / "a_file").write_text("x")
    args = args_classes["grpo"]()
    # created by the run
    common.check_flags(dataclasses.replace(args, output_dir=str(tmp_path / "new" / "deeper")))
    for bad in (tmp_path / "a_file", tmp_path / "a_file" / "runs"):
        with pytest.raises(common.FlagError,
                           match="^--output-dir .*: is not a folder that can be written"):
            common.check_flags(dataclasses.replace(args, output_dir=str(bad)))
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_every_field_has_a_rule_or_is_deliberately_unchecked(args_classes):
    """A new numeric flag without a FLAG_RULES entry fails here;
    run-time fields are hidden from the command line."""
    seen = set()
    for name, args_class in args_classes.items():
        for field in dataclasses.fields(args_class):
            seen.add(field.name)
            if "Suppress" in str(field.type):  # run-time field: not a flag
                assert field.name not in common.FLAG_RULES, (name, field.name)
                continue
            assert ((field.name in common.FLAG_RULES)
                    != (field.name in UNCHECKED_FLAGS)), (name, field.name)
            if field.type in (int, float, int | None, float | None):
                assert field.name in common.FLAG_RULES, (
                    f"{name}.py: numeric flag --{field.name} has no range rule")
    assert set(common.FLAG_RULES) | UNCHECKED_FLAGS <= seen  # no stale rule


def test_run_time_fields_are_not_flags(args_classes, monkeypatch, capsys):
    for name, field in (("grpo", "batch-size"), ("grpo", "mini-batch-size"),
                        ("dph_rl", "rehearsal-prompts"), ("prime", "batch-size")):
        # tyro reads the help texts from the source
        monkeypatch.setitem(sys.modules, name, load_algorithm(name))
        assert tyro.cli(args_classes[name], args=["--seed", "3"]).seed == 3
        with pytest.raises(SystemExit):
            tyro.cli(args_classes[name], args=[f"--{field}", "3"])
        assert f"--{field}" in capsys.readouterr().err  # tyro names the unknown flag


# (script, flags, the whole error line or None): each through a subprocess, before any model loads
CLI_FLAG_CASES = [
    # divided by before any check ran: a ZeroDivisionError traceback
    ("grpo", ["--num-mini-batches", "0"], None),
    ("grpo", ["--max-grad-norm", "-1"], None),
    ("prime", ["--prm-beta", "nan"], None),
    ("clip_cov", ["--clip-eps-low", "2"], None),
    ("kl_cov", ["--eval-every", "-1"], None),
    ("em_rl", ["--learning-rate", "inf"], None),
    ("dph_rl", ["--exp-name", "a/b"], None),
    ("dph_rl", ["--divergence", "alpha", "--alpha", "1.5"],
     "error: --alpha 1.5: must be strictly between 0 and 1"),
    ("rover", ["--output-dir", "README.md"], None),
    # cross-flag checks of the scripts: the same line and exit code
    ("grpo", ["--num-mini-batches", "3"], None),
    ("clip_cov", ["--clip-cov-lb", "5", "--clip-cov-ub", "1"],
     "error: --clip-cov-lb 5.0: must be below --clip-cov-ub 1.0"),
    ("prime", ["--acc-low", "0.9", "--acc-high", "0.1"],
     "error: --acc-low 0.9: must be <= --acc-high 0.1"),
    ("em_rl", ["--entropy-coef", "0.01", "--method", "em-ft"],
     "error: --entropy-coef 0.01: is an EM-RL term; EM-FT's loss already is the entropy"),
    ("dph_rl", ["--rehearsal-threshold", "99"], None),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,flags,line", CLI_FLAG_CASES,
                         ids=[f"{s} {' '.join(f)}" for s, f, _ in CLI_FLAG_CASES])
def test_bad_flag_exits_2_with_one_line_in_seconds(script, flags, line, tmp_path):
    start = time.perf_counter()
    result = run_python([f"algorithms/{script}.py", "--output-dir", str(tmp_path), *flags,
                         "--model-name", "./no/such/folder"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == line if line else last.startswith(f"error: {flags[0]} ")  # tyro gives -1 as -1.0
    # a hang guard: no model, no data (a few seconds of imports)
    assert time.perf_counter() - start < 60
    assert not any(tmp_path.iterdir())  # refused before any run folder was made


# ---- non-finite weights after a step -> the run stops in one line --------------------------------
def test_non_finite_weights_after_a_step_stop_the_run():
    """Finite gradients, a finite learning rate, and still inf weights:
    the guard checks the weights after each step."""
    weights = torch.nn.Parameter(torch.ones(3))
    # each step moves the weights by -3e37
    optimizer = torch.optim.AdamW([weights], lr=3e37, weight_decay=0.0)
    guard = common.NonFiniteGuard(optimizer)
    for _ in range(11):  # -3.3e38 after 11 steps: still finite, no false alarm
        weights.grad = torch.ones(3)
        assert guard.step_ok(weights.grad.norm())
        optimizer.step()
    weights.grad = torch.ones(3)
    with pytest.raises(common.TrainingStopped,
                       match="^the weights are not finite after optimizer step 12 "):
        optimizer.step()  # -inf
    assert guard.skipped == 0
    with torch.no_grad():
        weights.copy_(torch.tensor([1.0, float("nan"), 1.0]))
    with pytest.raises(common.TrainingStopped, match="weights are not finite"):
        guard.check_weights(optimizer)


# ---- a hostile megabyte of model output -> graded in well under a second, both tasks -------------
MEGABYTE = 1_000_000
HOSTILE_MEGABYTES = [  # (task, label, response): each about 1 MB
    ("countdown", "opening tags", "<answer>" * (MEGABYTE // 8)),
    ("countdown", "steps inside tags", "<answer>" + "3*5=15," * (MEGABYTE // 7) + "</answer>"),
    ("countdown", "parentheses", "(" * MEGABYTE),
    ("countdown", "digits", "9" * MEGABYTE),
    ("math", "open braces", "{" * MEGABYTE),
    ("math", "unclosed boxes", "\\boxed{" * (MEGABYTE // 7)),
    ("math", "nested boxes", "\\boxed{" * (MEGABYTE // 16) + "1" + "}" * (MEGABYTE // 16)),
    ("math", "answer phrases", "The answer is 7 " * (MEGABYTE // 16)),
    ("math", "dollars", "$" * MEGABYTE),
    ("math", "closing braces", "\\boxed{1" + "}" * MEGABYTE),
    # past MAX_RESPONSE_CHARS: not seen
    ("math", "a box then a megabyte of text", "\\boxed{72}" + "x" * MEGABYTE),
]


@pytest.mark.parametrize("task,label,response", HOSTILE_MEGABYTES,
                         ids=[f"{t}-{c}" for t, c, _ in HOSTILE_MEGABYTES])
def test_a_hostile_megabyte_is_graded_in_well_under_a_second(task, label, response):
    """Extraction is one linear pass over a bounded tail and parsing sees a capped answer: about 30
    ms at worst on a 2-core laptop. The bound is a hang guard (the quadratic scan of these inputs
    took minutes), not a speed test."""
    common.verify_math("1", "\\boxed{1}")  # math-verify's imports, once
    start = time.perf_counter()
    if task == "countdown":
        verdicts = [common.verify_countdown(NUMS, TARGET, response, steps)
                    for steps in (True, False)]
        keys = [common.get_task(name).answer_key(response)
                for name in ("countdown", "countdown-expr")]
    else:
        verdicts = [common.verify_math("72", response)]
        keys = [common.get_task("math").answer_key(response)]
    assert time.perf_counter() - start < 1.0
    assert (all(correct is False for correct, _ in verdicts)
            and all(isinstance(key, str) for key in keys))


# ---- models -> one line before training ----------------------------------------------------------
@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    """Folders of broken models, each made from the embedded one."""
    from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM, T5Config

    root, source = tmp_path_factory.mktemp("models"), common.REPO_ROOT / common.EMBEDDED_MODEL
    folders = {name: root / name
               for name in ("empty", "no_tokenizer", "truncated", "small_vocab", "bert", "t5",
                                              "bad_config", "no_eos")}
    for folder in folders.values():
        folder.mkdir()
    for name in ("no_tokenizer", "truncated", "small_vocab", "bert", "t5", "bad_config", "no_eos"):
        for file in source.iterdir():
            if name != "no_tokenizer" or not file.name.startswith("tokenizer"):
                (folders[name] / file.name).write_bytes(file.read_bytes())
    weights = folders["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    model = AutoModelForCausalLM.from_pretrained(source)
    model.config.vocab_size = 10  # the tokenizer has 23 tokens
    AutoModelForCausalLM.from_config(model.config).save_pretrained(folders["small_vocab"])
    BertForMaskedLM(BertConfig(vocab_size=23, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(folders["bert"])
    T5Config(vocab_size=23, d_model=32, num_layers=1, num_heads=2,
             d_ff=64).save_pretrained(folders["t5"])
    (folders["bad_config"] / "config.json").write_text("{not json")
    for file in ("config.json", "generation_config.json", "tokenizer_config.json"):
        path = folders["no_eos"] / file
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                    if k not in ("eos_token_id", "eos_token", "pad_token_id",
                                                 "pad_token")}))
    return folders


BAD_MODELS = [
    ("empty", "model folder '.*' has no config.json"),
    ("no_tokenizer", "model '.*' has no usable tokenizer: the folder has no tokenizer files"),
    ("truncated", "could not read the weights of model '.*': Error while deserializing header"),
    ("small_vocab",
     "model '.*': its tokenizer has 23 tokens but the model's embedding only 10 rows"),
    ("bert", "model '.*' is not a causal \\(decoder-only\\) language model: BertForMaskedLM"),
    ("t5", "model '.*' is not a causal \\(decoder-only\\) language model"),
    ("bad_config", "could not load model '.*': "),
    ("no_eos", "model '.*' has no end-of-sequence token"),
]


@pytest.mark.parametrize("name,message", BAD_MODELS, ids=[c[0] for c in BAD_MODELS])
def test_a_broken_model_is_one_clear_line(name, message, bad_models):
    with pytest.raises(common.UserInputError, match=f"^{message}"):
        common.load_model_and_tokenizer(str(bad_models[name]))


@pytest.mark.slow
def test_a_broken_model_stops_a_script_in_one_line(bad_models):
    result = run_python(["algorithms/grpo.py", "--model-name", str(bad_models["bert"])])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: model '{bad_models['bert']}' is not a "
                                                  "causal (decoder-only) "
                                                  "language model: BertForMaskedLM"]


# the embedded model has 128 positions; (max_new_tokens, max_prompt_length, message or the limit)
POSITION_CASES = [
    (32, None, 96), (100, 28, 28),
    (128, None,
     "--max-new-tokens 128: leaves no room for a prompt: the model's position limit is 128 tokens"),
    (100, 29, "--max-prompt-length 29: \\+ --max-new-tokens 100 exceeds the model's position limit "
              "of 128 tokens"),
]


@pytest.mark.parametrize("new,prompt,expected", POSITION_CASES)
def test_prompt_and_response_must_fit_the_models_positions(new, prompt, expected, embedded):
    args = dataclasses.replace(load_algorithm("grpo").Args(), max_new_tokens=new,
                               max_prompt_length=prompt)
    if isinstance(expected, int):
        assert common.check_position_limit(embedded[0], args) == expected
        return
    with pytest.raises(common.FlagError, match=f"^{expected}$"):
        common.check_position_limit(embedded[0], args)


def test_prompts_over_the_length_limit_are_left_out_with_a_count(embedded, capsys):
    tokenizer = embedded[1]
    task = common.get_task("countdown", tokenizer=tokenizer, max_prompt_length=12)
    items = task.train_items()
    assert 3000 < len(items) < 4000
    assert (max(len(tokenizer(task.prompt(item), add_special_tokens=False).input_ids)
                for item in items) == 12)
    assert (f"left out {4000 - len(items)} of 4000 prompts longer than --max-prompt-length "
            "12" in capsys.readouterr().err)
    assert all(len(tokenizer(task.prompt(i)).input_ids) <= 12 for i in task.eval_items("test", 64))
    with pytest.raises(common.UserInputError,
                       match="every prompt is longer than --max-prompt-length 5 tokens"):
        common.get_task("countdown", tokenizer=tokenizer, max_prompt_length=5).train_items()


def test_a_huge_question_is_left_out_not_trained_on(tmp_path, embedded, capsys):
    rows = [{"question": "What is 2+2?", "answer": "#### 4"},
            {"question": "1 " * 32_000, "answer": "#### 3"}]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    task = common.get_task("gsm8k", str(tmp_path), embedded[1], max_prompt_length=96)
    assert [item["gold"] for item in task.train_items()] == ["4"]
    assert "left out 1 of 2 prompts longer than --max-prompt-length 96" in capsys.readouterr().err


# ---- data files -> one line naming the file and row ----------------------------------------------
BAD_FILES = [  # (label, train file name, its bytes, message); test.jsonl is fine
    ("empty file", "train.jsonl", b"",
     "could not load the train split of dataset '.*': .*/train.jsonl is empty"),
    ("invalid JSON", "train.jsonl",
     b'{"question": "q", "answer": "#### 2"}\n{"question": "q", "answer"\n',
     "could not load the train split .*/train.jsonl, line 2: not valid JSON"),
    ("not an object", "train.jsonl", b'{"question": "q", "answer": "#### 2"}\n[1, 2]\n',
     "could not load the train split .*/train.jsonl, line 2: not a JSON object"),
    ("corrupt parquet", "train.parquet", b"PAR1 not really parquet",
     "could not load the train split of dataset"),
    ("no train file", "other.jsonl", b'{"question": "q", "answer": "#### 2"}\n',
     "dataset folder '.*' has no train file \\(train.jsonl, train.parquet, ...\\)"),
]


@pytest.mark.parametrize("label,name,content,message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_an_unreadable_data_file_is_one_line_naming_it(label, name, content, message, tmp_path):
    (tmp_path / name).write_bytes(content)
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 2"}) + "\n")
    with pytest.raises(common.UserInputError, match=f"^{message}"):
        common.get_task("gsm8k", dataset=str(tmp_path)).train_items()


def test_undecodable_bytes_skip_their_row_with_a_line_naming_file_and_row(tmp_path, capsys):
    good = b'{"question": "What is 2+2?", "answer": "#### 4"}\n'
    (tmp_path / "train.jsonl").write_bytes(good + b'{"question": "What is 2+\xff2?", "answer": '
                                                  b'"#### 4"}\n')
    (tmp_path / "test.jsonl").write_bytes(good)
    assert (common.get_task("gsm8k", dataset=str(tmp_path)).train_items()
            == [{"question": "What is 2+2?", "gold": "4"}])
    assert (f"warning: {tmp_path / 'train.jsonl'} (train): skipped 1 malformed row(s): 1 with "
            "bytes that are not "
            "UTF-8 (e.g. row 1)") in capsys.readouterr().err


@pytest.mark.slow
def test_golds_are_parsed_once_at_load_in_bounded_time(tmp_path, capsys, monkeypatch):
    """A gold math-verify cannot compare in time is skipped at load (not re-tried for every
    response); the others are parsed once and every response is compared with the cached parse."""
    rows = [{"problem": "Tower", "answer": "9^{9^{9^{9}}}"},
            {"problem": "Half", "answer": "\\frac{1}{2}"},
            {"problem": "Plain", "answer": "12"}]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    common._parsed_gold.cache_clear()
    start = time.perf_counter()
    task = common.get_task("math", dataset=str(tmp_path))
    assert [item["gold"] for item in task.items("test")] == ["\\frac{1}{2}", "12"]
    # a hang guard: one timeout for the tower
    assert time.perf_counter() - start < 4 * common.MATH_TIMEOUT
    assert ("1 with a gold answer math-verify cannot parse or compare within 5 s (e.g. row "
            "0)" in capsys.readouterr().err)
    parsed = common._parsed_gold.cache_info().currsize
    assert task.verify({"gold": "\\frac{1}{2}"}, "\\boxed{0.5}") == (True, True)
    assert common._parsed_gold.cache_info().currsize == parsed  # the load's parse, reused


# ---- progress, Ctrl-C, a full disk ---------------------------------------------------------------
def test_evaluation_prints_progress_lines(embedded, capsys, monkeypatch):
    monkeypatch.setattr(common, "PROGRESS_SECONDS", 0.0)
    task = common.get_task("countdown")
    items = task.eval_items("test", 6)  # and 3 of the second skill
    # 3 prompts per sampled batch
    common.evaluate(*embedded, task, items, 4, sampling=common.Sampling(8), batch_size=12)
    lines = capsys.readouterr().out.splitlines()
    # one greedy batch, then three sampled ones
    assert lines[0].startswith("evaluating, greedy: 9/9 prompts (")
    assert ([line.split(" (")[0] for line in lines[1:]]
            == [f"evaluating, 4 samples each: {n}/9 prompts" for n in (3, 6, 9)])


def _start_run(out_dir: Path, *flags: str) -> subprocess.Popen:
    refuse_in_the_quick_tier()
    return subprocess.Popen([sys.executable, "algorithms/grpo.py", "--output-dir", str(out_dir),
                             "--eval-prompts", "8", "--final-eval-samples", "2",
                             "--prompts-per-step", "4", "--group-size", "4", *flags],
                            cwd=common.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            # as a terminal's Ctrl-C: a test runner started in the background (`cmd
                            # &`) passes on an ignored SIGINT, and Python then installs no
                            # KeyboardInterrupt handler
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _lines_until(proc: subprocess.Popen, prefix: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"the run ended before printing {prefix!r}: {proc.stderr.read()[-2000:]}")


@pytest.mark.slow
def test_ctrl_c_exits_in_seconds_with_the_resume_command(tmp_path):
    proc = _start_run(tmp_path, "--checkpoint-every", "1")
    first = _lines_until(proc, "run folder: ")
    # the line came through the pipe while the run goes on (line-buffered stdout)
    assert proc.poll() is None
    run_dir = first[-1].removeprefix("run folder: ").strip()
    _lines_until(proc, "step 2/")
    checkpoint = Path(run_dir) / common.CHECKPOINT_FILE
    while not checkpoint.exists() or torch.load(checkpoint, weights_only=False)["step"] < 2:
        time.sleep(0.1)  # the step-2 checkpoint is written right after its line
    proc.send_signal(signal.SIGINT)
    start = time.perf_counter()
    _, err = proc.communicate(timeout=60)
    assert time.perf_counter() - start < 15  # a hang guard: about 1-3 s
    assert "Traceback" not in err
    step = torch.load(checkpoint, weights_only=False)["step"]
    assert err.strip().splitlines()[-1] == (f"interrupted: the last checkpoint is step {step} in "
                                            f"{run_dir}; continue "
                                            f"with: python algorithms/grpo.py --resume {run_dir}")


@pytest.mark.slow
def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    proc = _start_run(tmp_path, "--checkpoint-every", "0")
    run_dir = _lines_until(proc, "run folder: ")[-1].removeprefix("run folder: ").strip()
    proc.send_signal(signal.SIGINT)  # during the evaluation of the base model
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("interrupted: no checkpoint was saved yet in "
                                            f"{run_dir} (see "
                                            "--checkpoint-every); nothing to resume")


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_the_last_one(tmp_path, monkeypatch):
    common.save_checkpoint(tmp_path, 1, {"weights": torch.ones(3)})
    monkeypatch.setitem(common.RUN_STATE, "run_dir", tmp_path)

    def half_then_full(obj, f):
        f.write(b"x" * 1000)  # a partial file that would keep the disk full
        _full_disk()

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(common.TrainingStopped,
                       match=f"^could not write to {re.escape(str(tmp_path))}: no space left "
                       "on the device; the last checkpoint is step 1 in "
                       f"{re.escape(str(tmp_path))}; continue with: "):
        common.save_checkpoint(tmp_path, 2, {"weights": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [common.CHECKPOINT_FILE]  # no .tmp left
    monkeypatch.undo()
    assert common.load_checkpoint(tmp_path)["weights"].tolist() == [1.0, 1.0, 1.0]


def test_ctrl_c_inside_a_checkpoint_write_is_one_line_and_leaves_the_last_one(
        tmp_path, monkeypatch, capsys):
    """Ctrl-C while torch.save writes reaches the script as torch's RuntimeError ("unexpected pos
    ..."), raised while handling the KeyboardInterrupt: still the one `interrupted:` line, and the
    partial file is gone."""
    common.save_checkpoint(tmp_path, 1, {"weights": torch.ones(3)})
    monkeypatch.setitem(common.RUN_STATE, "run_dir", tmp_path)
    real_save = torch.save

    class InterruptedFile:  # SIGINT's KeyboardInterrupt arrives inside the third write
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, InterruptedFile(f)))
    with pytest.raises(BaseException) as raised:
        common.save_checkpoint(tmp_path, 2, {"weights": torch.zeros(3, 1000)})
    assert isinstance(raised.value.__context__, KeyboardInterrupt)  # torch's own error, on top
    assert sorted(p.name for p in tmp_path.iterdir()) == [common.CHECKPOINT_FILE]  # no .tmp left
    capsys.readouterr()
    common._excepthook(raised.type, raised.value, raised.tb)
    assert capsys.readouterr().err == (f"interrupted: the last checkpoint is step 1 in {tmp_path}; "
                                       f"continue with: python {sys.argv[0]} --resume {tmp_path}\n")
    monkeypatch.undo()
    assert common.load_checkpoint(tmp_path)["weights"].tolist() == [1.0, 1.0, 1.0]


def test_a_full_disk_while_logging_or_rewriting_a_file_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(os, "fsync", _full_disk)
    with pytest.raises(common.TrainingStopped,
                       match=f"^could not write to {re.escape(str(tmp_path))}: no space left"):
        common.atomic_write(tmp_path / "config.json", "{\"new\": 1}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert (tmp_path / "config.json").read_text() == "{}"
    logger = common.RunLogger.__new__(common.RunLogger)
    logger.enabled, logger.run_dir, logger.wandb = True, tmp_path, None
    logger.metrics_file = SimpleNamespace(write=_full_disk, flush=lambda: None)
    with pytest.raises(common.TrainingStopped, match="no space left on the device"):
        logger.log(1, {"loss": 0.5})


@pytest.mark.slow
def test_a_full_disk_stops_a_script_in_one_line(tmp_path):
    """The whole script, with every write failing as on a full disk once the run folder exists."""
    code = ("import errno, runpy, sys, torch\n"
            "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "torch.save = full\n"
            "sys.argv = ['algorithms/grpo.py', *sys.argv[1:]]\n"
            "runpy.run_path('algorithms/grpo.py', run_name='__main__')\n")
    result = run_python(["-c", code, "--output-dir", str(tmp_path), "--num-steps", "1",
                         "--eval-prompts", "4", "--final-eval-samples", "0", "--prompts-per-step",
                         "2", "--group-size", "2", "--checkpoint-every", "1"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    assert result.stderr.strip().splitlines()[-1] == (f"error: could not write to {run_dir}: no "
                                                      "space left on the "
                                                      "device; no checkpoint was saved yet in "
                                                      f"{run_dir} (see "
                                                      "--checkpoint-every); nothing to resume")
    assert not list(run_dir.glob("*.tmp"))
