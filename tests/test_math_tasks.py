"""GSM8K / MATH tasks: answer checking with math-verify,
loading local folders in the hub's format, bad rows."""

import json
import threading
import time

import math_verify
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
    ("72", "The answer is 72", True, True),  # no box: the lenient fallback
    ("72", "I think it is 72", False, False),  # no final answer
    ("72", "\\boxed{72", False, False),  # unbalanced
    ("72", "\\boxed{}", False, False),  # empty answer
    ("72", "\\boxed{ }", False, False),
    ("72", "", False, False),
    ("72", None, False, False),
    ("3", "\\boxed{" + "9" * 2000 + "}", False, False),  # enormous answer: not parsed at all
    ("2", "\\boxed{9**9**9}", False, True),
]


@pytest.mark.parametrize("gold,response,correct,parsed", ANSWER_CASES)
def test_answer_checking_table(gold, response, correct, parsed):
    assert common.verify_math(gold, response) == (correct, parsed)


EXTRACTION_CASES = [
    ("\\boxed{5} and then \\boxed{}", "5"),  # an empty trailing box is skipped
    ("\\boxed{10}. Wait, no: \\boxed{12}", "12"),  # a self-correction: the last box counts
    ("so it is \\boxed 5", "5"),  # a box around one token, without braces
    ("\\boxed{\\boxed{5}}", "5"),
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("final answer: 72", "72"),
    ("**Answer:** 72 clips.", "72"),  # markdown, units and the full stop go
    ("answer is 72.", "72"),
    ("The answer is \\(72\\).", "72"),
    ("The answer is 5 \\text{ dollars}.", "5 \\text{ dollars}"),  # no cut inside braces
    ("The answer is 10. No wait, the answer is: 12", "12"),  # the last phrase counts
    # "answer is <word>" is not an answer
    ("The answer is 7. I checked that the answer is correct.", "7"),
    ("48 + 24 = 72\n#### 72", "72"),
    ("the answer is not obvious", None),
    ("\\boxed{72", None),  # never closed
]


@pytest.mark.parametrize("response,answer", EXTRACTION_CASES)
def test_final_answer_extraction(response, answer):
    assert common.extract_final_answer(response) == answer


# Realistic model outputs: multi-step reasoning, self-corrections, units,
# equivalent forms, no box at all.
REALISTIC_CASES = [
    # (gold, response, correct): GSM8K
    ("72", "Natalia sold 48 clips in April.\nIn May she sold half as many: 48 / 2 = 24 clips.\n"
           "Altogether she sold 48 + 24 = 72 clips.\n\nThe answer is \\boxed{72}.", True),
    ("10", "Weng earns 12 / 60 = $0.2 per minute.\nFor 50 minutes she earns 0.2 x 50 = "
           "$10.\n\\boxed{10}", True),
    ("5", "Betty has 100 / 2 = 50 dollars. Her parents give 15 and her grandparents 2 x 15 = 30.\n"
          "She still needs 100 - 50 - 15 - 30 = 5 dollars.\n\\boxed{5 \\text{ dollars}}", True),
    ("18",
     "Janet's ducks lay 16 eggs. She uses 3 + 4 = 7, so she sells 16 - 7 = 9 eggs at $2 each.\n"
           "9 x 2 = 18, so she makes \\boxed{\\$18} every day.", True),
    ("18", "She sells 9 eggs for $2 each, so she earns $\\boxed{\\$18.00}$.", True),
    ("10", "The ticket costs \\boxed{\\$10.50}.", False),
    ("3", "A robe takes 2 bolts of blue fiber and half that much white: 2 / 2 = 1.\n"
          "Total: 2 + 1 = \\boxed{3} bolts.", True),
    ("70000", "The house cost 80,000 + 50,000 = 130,000. Its value rose by 80,000 x 1.5 = 120,000, "
              "to 200,000.\n"
              "Profit: 200,000 - 130,000 = \\boxed{70,000}.", True),
    # thin-space thousands separator
    ("1234", "Adding the two lots: 1\\,000 + 234 = \\boxed{1\\,234}", True),
    ("1234", "So the total is $\\boxed{1{,}234}$ marbles.", True),
    # pinned: math-verify does not read a plain space as one
    ("1000", "That makes \\boxed{1 000} grams.", False),
    ("540", "James runs 3 sprints of 60 m, 3 times a week: 3 x 3 = 9 sprints.\n9 x 60 = 540 "
            "meters.\n\\boxed 540", True),
    ("-4", "The temperature drops from 8 to 8 - 12 = -4 degrees.\n\\boxed{-4}", True),
    ("-4", "The temperature drops from 8 by 12 degrees, so it is 12 - 8 = \\boxed{4} degrees.",
     False),
    ("25", "He spent 15 of 60 dollars, which is 15 / 60 = 0.25 = \\boxed{25\\%} of his money.",
     True),
    ("20", "Each friend gets 60 / 4 = 15 cookies, so the answer is \\boxed{15}.", False),
    ("20", "There are 5 rows of 4 chairs: 5 x 4 = \\boxed{20}.\n\nLet me double check: 5 x 4 = 20. "
           "Yes, \\boxed{20}.",
     True),
    ("12", "First I get 3 x 4 = \\boxed{10}.\nWait, that's wrong: 3 x 4 = 12, so the answer is "
           "\\boxed{12}.", True),
    ("10", "First I get 3 x 4 = \\boxed{10}.\nWait, that's wrong: 3 x 4 = 12, so the answer is "
           "\\boxed{12}.", False),
    # an empty trailing box is skipped
    ("42", "So she has 6 x 7 = 42 stickers.\n\\boxed{42}\n\\boxed{}", True),
    # pinned: bare words in a box are read as variables (\text{} is fine)
    ("32", "He pays \\boxed{32 dollars}.", False),
    # gold in minutes: no unit conversion
    ("150", "The trip takes \\boxed{2.5 \\text{ hours}}.", False),
    ("7", "Tom has 3 apples and gets 4 more: 3 + 4 = 7.\nThe answer is 7", True),
    ("7", "Tom has 3 apples and gets 4 more: 3 + 4 = 7.\nThe final answer is $7$. I hope it is "
          "correct.", True),
    ("7", "3 + 4 = 7 apples.\nAnswer: 7", True),
    ("7", "3 + 4 = 7 apples.\n**Answer:** 7 apples", True),
    ("7", "3 + 4 = 7\n#### 7", True),
    ("8", "3 + 4 = 7\n#### 7", False),
    ("7", "The answer is 7. I double-checked and the answer is correct.", True),
    # the last phrase
    ("9", "Let me compute. 4 + 5 = 9. Hmm, maybe the answer is 10? No: final answer: 9.", True),
    ("9", "4 + 5 = 9, but the question asks for twice that, so the answer is 18.", False),
    ("160", "The speed is 40 km/h for 4 hours: 40 x 4 = 160.\nThe answer is: $160$ km", True),
    ("0.5", "Half a pizza: \\boxed{\\frac{1}{2}}", True),
    ("12", "There are 12 eggs in a dozen, and she has one dozen.", False),  # no final answer
    ("12", "", False),
    ("12", "\\boxed{twelve}", False),
    ("3", "Let x be the number of cats. Then 2x + 4 = 10, so 2x = 6 and \\boxed{x = 3}.", True),
    # MATH
    ("\\frac{1}{2}",
     "The probability is $\\frac{3}{6}$, which simplifies to $\\boxed{\\frac{1}{2}}$.", True),
    ("\\frac{1}{2}", "The probability is $3/6 = \\boxed{0.5}$.", True),
    ("\\frac{1}{2}", "So $P = \\boxed{\\dfrac{1}{2}}$.", True),
    ("\\frac{1}{3}", "Rounding, the probability is about $\\boxed{0.33}$.", False),
    ("\\frac{2}{3}", "The probability is $\\boxed{\\frac{3}{2}}$.", False),
    ("3.5", "The mean is $\\boxed{3\\frac{1}{2}}$.", True),  # a mixed number
    ("2\\sqrt{3}", "The side is $\\sqrt{12} = \\boxed{2\\sqrt{3}}$.", True),
    ("2\\sqrt{3}", "The side is $\\boxed{\\sqrt{12}}$.", True),
    ("90^\\circ",
     "The angles sum to 180, so the third angle is $180 - 30 - 60 = \\boxed{90^\\circ}$.", True),
    ("90", "The third angle is $\\boxed{90^{\\circ}}$.", True),
    ("\\frac{\\pi}{3}", "The angle is $\\boxed{\\frac{\\pi}{3}}$ radians.", True),
    # pinned: math-verify does not convert degrees
    ("\\frac{\\pi}{3}", "The angle is $\\boxed{60^\\circ}$.", False),
    ("(-\\infty, 2]",
     "Solving $3x - 1 \\le 5$ gives $x \\le 2$, i.e. $x \\in \\boxed{(-\\infty, 2]}$.", True),
    # open vs closed end
    ("(-\\infty, 2]", "Solving $3x - 1 \\le 5$ gives $\\boxed{(-\\infty, 2)}$.", False),
    ("(2, 5)", "The lines meet at $\\boxed{(2,5)}$.", True),
    ("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}",
     "Subtracting, $\\mathbf{v} = \\boxed{\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}}$.", True),
    ("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}",
     "$\\mathbf{v} = \\boxed{\\begin{pmatrix} -2 \\\\ 1 \\end{pmatrix}}$.",
     False),
    ("x^2 + 2x + 1", "Expanding $(x+1)^2$ gives $\\boxed{x^2+2x+1}$.", True),
    ("x^2 + 2x + 1", "Expanding $(x+1)^2$ gives $\\boxed{x^2+1}$.", False),
    ("-2, 3", "Factoring, $(x+2)(x-3) = 0$, so $x = \\boxed{3, -2}$.", True),
    ("10", "The area is $\\boxed{10 \\text{ cm}^2}$.", True),
    ("\\text{(C)}", "Only choice (C) satisfies both conditions. $\\boxed{\\text{(C)}}$", True),
    ("\\text{(C)}", "The answer is $\\boxed{C}$.", True),
    ("2", "The remainder is $\\boxed{5}$. Actually, let me recompute: $2^{10} = 1024 = 7 \\cdot "
          "146 + 2$, "
          "so the remainder is $\\boxed{2}$.", True),
    ("5", "The remainder is $\\boxed{5}$. Actually, let me recompute: $2^{10} = 1024 = 7 \\cdot "
          "146 + 2$, "
          "so the remainder is $\\boxed{2}$.", False),
    ("\\frac{7}{4}", "Hence $a + b = \\frac{3}{4} + 1 = \\boxed{\\frac74}$.", True),
    ("3", "Therefore $n = \\boxed{3", False),  # truncated: the box never closes
    ("1", "We find $\\boxed{\\frac{1}{2}}$. Hmm, doubling gives \\boxed{1}", True),
]


@pytest.mark.parametrize("gold,response,correct", REALISTIC_CASES)
def test_realistic_answers(gold, response, correct):
    assert common.verify_math(gold, response)[0] is correct


def test_gold_is_parsed_once_per_prompt(monkeypatch):
    parsed = []
    real_parse = math_verify.parse
    monkeypatch.setattr(math_verify, "parse",
                        lambda text, **kw: parsed.append(text) or real_parse(text, **kw))
    common._parsed_gold.cache_clear()
    group = ["so \\boxed{17}", "so \\boxed{18}", "The answer is 17", "#### 16", "\\boxed{17.0}",
             "\\boxed{34/2}"]
    assert [common.verify_math("17", r)[0] for r in group] == [True, False, True, False, True, True]
    # each response once, the gold once (not once per response)
    assert len(parsed) == 1 + len(group)
    assert common.verify_math("17", "\\boxed{17}") == (True, True) and len(parsed) == 2 + len(group)
    assert common._parsed_gold.cache_info().currsize == 1


@pytest.mark.slow
def test_hostile_gold_costs_one_timeout():
    """A gold that parses at once but makes every comparison run into the timeout costs that timeout
    once, in the main thread and in the helper process that serves other threads (each has its
    cache)."""
    tower = "9^{9^{9^{9}}}"

    def check_four() -> tuple[list, float]:
        start = time.perf_counter()
        results = [common.verify_math(tower, f"\\boxed{{{i}}}") for i in range(4)]
        return results, time.perf_counter() - start

    common._parsed_gold.cache_clear()
    results, seconds = check_four()
    assert results == [(False, True)] * 4 and seconds < 2 * common.MATH_TIMEOUT  # not 4 timeouts
    in_thread = []
    worker = threading.Thread(target=lambda: in_thread.extend([common.verify_math("1", "1"),
                                                               check_four()]))
    worker.start()
    worker.join(timeout=120)
    assert (not worker.is_alive() and in_thread[1][0] == [(False, True)] * 4
            and in_thread[1][1] < 2 * common.MATH_TIMEOUT)


@pytest.mark.slow
def test_power_tower_is_cut_by_the_timeout_in_the_main_thread():
    assert common.verify_math("2", "\\boxed{9^{9^{9}}}") == (False, True)


@pytest.mark.slow
def test_verification_works_outside_the_main_thread():
    results = []
    # the last: a timeout
    cases = [("\\frac{1}{2}", "\\boxed{0.5}"), ("3", "so \\boxed{4}"), ("2", "\\boxed{9^{9^{9}}}")]
    worker = threading.Thread(target=lambda: results.extend(common.verify_math(gold, text)
                                                            for gold, text in cases))
    worker.start()
    worker.join(timeout=120)  # a hang guard: the power tower would run for hours without a timeout
    assert not worker.is_alive() and results == [(True, True), (False, True), (False, True)]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.fixture
def gsm8k_folder(tmp_path):
    rows = [{"question": f"Tom has {i} apples and buys {i + 1} more. How many now?",
             "answer": f"{i}+{i + 1}={2 * i + 1}\n#### {2 * i + 1}"} for i in range(10)]
    bad = [{"question": "", "answer": "#### 1"},
           {"question": "No final answer?", "answer": "It is 3."},
           {"answer": "#### 4"}, {"question": "Thousands?", "answer": "#### 1,234"}]
    write_jsonl(tmp_path / "train.jsonl", rows + bad)
    write_jsonl(tmp_path / "test.jsonl", rows[:3])
    return tmp_path


def test_gsm8k_from_a_local_folder(gsm8k_folder, capsys):
    task = common.get_task("gsm8k", dataset=str(gsm8k_folder))
    train, val, test = task.train_items(), task.items("val"), task.items("test")
    # 10 good rows + the thousands one, 3 malformed rows skipped;
    # the last 10% (one row) is the validation split
    assert len(train) == 10 and len(val) == 1 and len(test) == 3
    assert "skipped 3 malformed row(s)" in capsys.readouterr().err
    assert train[0] == {"question": "Tom has 0 apples and buys 1 more. How many now?", "gold": "1"}
    assert val[0]["gold"] == "1234" and val[0] not in train
    assert task.eval_items("val", 5) == val and task.eval_items("test", 2) == test[:2]
    assert task.prompt(train[0]).endswith("put your final answer within \\boxed{}.\n")
    assert task.verify(train[3], "3 + 4 = 7, so \\boxed{7}") == (True, True)


def test_math_gold_from_answer_or_boxed_solution(tmp_path):
    rows = [{"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$.",
             "answer": "\\frac{1}{2}"},
            # no answer field: from the solution
            {"problem": "Two plus two?", "solution": "Clearly $\\boxed{4}$."},
            {"problem": "Broken", "solution": "no box here"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:1])
    task = common.get_task("math", dataset=str(tmp_path))
    assert [item["gold"] for item in task.train_items()] == ["\\frac{1}{2}", "4"]
    assert task.verify(task.items("test")[0], "so \\boxed{0.5}") == (True, True)


def test_chat_template_is_used_when_the_tokenizer_has_one(gsm8k_folder, embedded):
    _, tokenizer = embedded
    chat_tokenizer = type(tokenizer).from_pretrained(common.REPO_ROOT / common.EMBEDDED_MODEL)
    chat_tokenizer.chat_template = (
        "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<assistant>")
    task = common.get_task("gsm8k", dataset=str(gsm8k_folder), tokenizer=chat_tokenizer)
    prompt = task.prompt(task.items("test")[0])
    assert prompt.startswith("<user>Tom has 0 apples") and prompt.endswith("</user><assistant>")
    countdown = common.get_task("countdown", tokenizer=chat_tokenizer)
    assert "<answer>" in countdown.prompt({"nums": [1, 2, 3], "target": 6})
    assert (common.get_task("countdown", tokenizer=tokenizer).prompt({"nums": [1, 2, 3],
                                                                      "target": 6}) == "1 2 3>6:")


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
