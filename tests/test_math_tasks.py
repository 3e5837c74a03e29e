"""GSM8K / MATH tasks: answer checking with math-verify, loading local folders in the hub's format, bad rows."""

import json
import threading

import pytest

import common

ANSWER_CASES = [
    # (gold, response, correct, parsed)
    ("72", "so the total is \\boxed{72}.", True, True),
    ("72", "Natalia sold 48 + 24 = 72 clips.\n#### 72", True, True),  # GSM8K style
    ("72", "#### 72\n", True, True),
    ("72", "\\boxed{72.0}", True, True),
    ("\\frac{1}{2}", "\\boxed{0.5}", True, True),  # equivalent forms
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", True, True),
    ("\\frac{1}{2}", "\\boxed{1/2}", True, True),
    ("\\frac{1}{2}", "\\boxed{\\frac12}", True, True),
    ("\\frac{3}{4}", "x = \\boxed{\\frac{3}{4}}", True, True),  # nested braces inside \boxed
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt{3}}{2}}", True, True),
    ("\\sqrt{2}", "\\boxed{\\sqrt 2}", True, True),
    ("5", "\\boxed{\\boxed{5}}", True, True),  # \boxed nesting
    ("10", "\\boxed{10 \\text{ cm}}", True, True),  # units
    ("18", "\\boxed{\\$18}", True, True),  # currency
    ("1000", "\\boxed{1,000}", True, True),  # thousands separator
    ("x^2+1", "\\boxed{1+x^2}", True, True),  # symbolic equivalence
    ("(1,2)", "\\boxed{(1, 2)}", True, True),
    ("-3", "\\boxed{-3}", True, True),
    ("3", "\\boxed{-3}", False, True),
    ("72", "\\boxed{73}", False, True),
    ("72", "\\boxed{72} wait, no: \\boxed{70}", False, True),  # the last answer counts
    ("72", "\\boxed{seventy-two}", False, True),
    ("72", "The answer is 72", False, False),  # no final answer
    ("72", "\\boxed{72", False, False),  # unbalanced
    ("72", "\\boxed{}", False, False),  # empty answer
    ("72", "", False, False),
    ("72", None, False, False),
    ("3", "\\boxed{" + "9" * 2000 + "}", False, False),  # enormous answer: not parsed at all
    ("2", "\\boxed{9**9**9}", False, True),
]


@pytest.mark.parametrize("gold,response,correct,parsed", ANSWER_CASES)
def test_answer_checking_table(gold, response, correct, parsed):
    assert common.verify_math(gold, response) == (correct, parsed)


def test_power_tower_is_cut_by_the_timeout_in_the_main_thread():
    assert common.verify_math("2", "\\boxed{9^{9^{9}}}") == (False, True)


def test_verification_works_outside_the_main_thread():
    results = []
    cases = [("\\frac{1}{2}", "\\boxed{0.5}"), ("3", "so \\boxed{4}"), ("2", "\\boxed{9^{9^{9}}}")]  # the last: a timeout
    worker = threading.Thread(target=lambda: results.extend(common.verify_math(gold, text) for gold, text in cases))
    worker.start()
    worker.join(timeout=120)  # a hang guard: the power tower would run for hours without a timeout
    assert not worker.is_alive() and results == [(True, True), (False, True), (False, True)]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.fixture
def gsm8k_folder(tmp_path):
    rows = [{"question": f"Tom has {i} apples and buys {i + 1} more. How many now?",
             "answer": f"{i}+{i + 1}={2 * i + 1}\n#### {2 * i + 1}"} for i in range(10)]
    bad = [{"question": "", "answer": "#### 1"}, {"question": "No final answer?", "answer": "It is 3."},
           {"answer": "#### 4"}, {"question": "Thousands?", "answer": "#### 1,234"}]
    write_jsonl(tmp_path / "train.jsonl", rows + bad)
    write_jsonl(tmp_path / "test.jsonl", rows[:3])
    return tmp_path


def test_gsm8k_from_a_local_folder(gsm8k_folder, capsys):
    task = common.get_task("gsm8k", dataset=str(gsm8k_folder))
    train, val, test = task.train_items(), task.items("val"), task.items("test")
    # 10 good rows + the thousands one, 3 malformed rows skipped; the last 10% (one row) is the validation split
    assert len(train) == 10 and len(val) == 1 and len(test) == 3
    assert "skipped 3 malformed row(s)" in capsys.readouterr().err
    assert train[0] == {"question": "Tom has 0 apples and buys 1 more. How many now?", "gold": "1"}
    assert val[0]["gold"] == "1234" and val[0] not in train
    assert task.eval_items("val", 5) == val and task.eval_items("test", 2) == test[:2]
    assert task.prompt(train[0]).endswith("put your final answer within \\boxed{}.\n")
    assert task.verify(train[3], "3 + 4 = 7, so \\boxed{7}") == (True, True)


def test_math_gold_from_answer_or_boxed_solution(tmp_path):
    rows = [{"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "answer": "\\frac{1}{2}"},
            {"problem": "Two plus two?", "solution": "Clearly $\\boxed{4}$."},  # no answer field: from the solution
            {"problem": "Broken", "solution": "no box here"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:1])
    task = common.get_task("math", dataset=str(tmp_path))
    assert [item["gold"] for item in task.train_items()] == ["\\frac{1}{2}", "4"]
    assert task.verify(task.items("test")[0], "so \\boxed{0.5}") == (True, True)


def test_chat_template_is_used_when_the_tokenizer_has_one(gsm8k_folder, embedded):
    _, tokenizer = embedded
    chat_tokenizer = type(tokenizer).from_pretrained(common.REPO_ROOT / common.EMBEDDED_MODEL)
    chat_tokenizer.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<assistant>"
    task = common.get_task("gsm8k", dataset=str(gsm8k_folder), tokenizer=chat_tokenizer)
    prompt = task.prompt(task.items("test")[0])
    assert prompt.startswith("<user>Tom has 0 apples") and prompt.endswith("</user><assistant>")
    countdown = common.get_task("countdown", tokenizer=chat_tokenizer)
    assert "<answer>" in countdown.prompt({"nums": [1, 2, 3], "target": 6})
    assert common.get_task("countdown", tokenizer=tokenizer).prompt({"nums": [1, 2, 3], "target": 6}) == "1 2 3>6:"


@pytest.mark.parametrize("dataset,message", [
    ("some-org/not-cached-anywhere", "offline: pass a local path"),
    ("./no/such/folder", "dataset folder not found"),
])
def test_unreachable_dataset_is_a_clear_error(dataset, message):
    with pytest.raises(common.UserInputError, match=message):
        common.get_task("gsm8k", dataset=dataset).train_items()


def test_single_file_empty_dataset_and_generated_task(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "no hashes"}])
    write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(common.UserInputError, match="single file"):
        common.get_task("gsm8k", dataset=str(tmp_path / "train.jsonl")).train_items()
    with pytest.raises(common.UserInputError, match="has no usable rows"):
        common.get_task("gsm8k", dataset=str(tmp_path)).train_items()
    with pytest.raises(common.UserInputError, match="reads no dataset"):
        common.get_task("countdown", dataset=str(tmp_path))
