"""The countdown task: verifier table, solver, deterministic disjoint splits, data order."""

import pytest

import common

NUMS, TARGET = [3, 5, 7], 22  # 3 * 5 + 7 = 22, (7 - 3) * 5 + ... etc.

VERIFIER_CASES = [
    # (response, correct, parsed)
    ("3*5+7", True, True),
    ("7+5*3", True, True),
    ("(5*3)+7", True, True),
    (" 3 * 5 + 7 ", True, True),  # spaces are fine
    ("((3*5))+7", True, True),  # redundant parentheses are fine
    ("3\u00d75+7", True, True),  # unicode times sign
    ("3*5+7=22", False, False),  # '=' is not part of an expression
    ("3*5+7+0", False, True),  # extra number
    ("3*5+7+7-7", False, True),  # number reused
    ("5*3+8", False, True),  # wrong numbers (7 missing, 8 not given)
    ("3*5", False, True),  # number missing
    ("3+5+7", False, True),  # wrong value (15)
    ("7/(5-5)*3", False, False),  # division by zero
    ("(3*5+7", False, False),  # unbalanced parentheses
    ("3*5+7)", False, False),  # unbalanced parentheses
    ("", False, False),  # empty
    ("   ", False, False),  # blank
    ("3**5+7", False, False),  # exponent attempt
    ("3^5+7", False, False),  # exponent attempt
    ("-3*5+7", False, False),  # unary minus is not allowed
    ("\uff13*5+7", False, False),  # full-width digit 3
    ("3\u00b2*5+7", False, False),  # superscript two
    ("3*5+7" + "*1" * 200, False, False),  # very long input: not parsed at all (bounded work)
    ("3*5+7" + " " * 300, True, True),  # trailing white space is harmless
    ("(" * 150 + "3" + ")" * 150, False, False),  # deeply nested and long
    ("9" * 150, False, True),  # huge literal, not a given number
    ("__import__('os')", False, False),  # no eval, ever
    ("three times five plus seven", False, False),
    ("<answer>3*5+7</answer>", True, True),  # tagged answer (instruction-tuned models)
    ("think... <answer>1+2</answer> <answer>7+3*5</answer>", True, True),  # the last tag counts
    (None, False, False),  # not even a string
]


@pytest.mark.parametrize("response,correct,parsed", VERIFIER_CASES)
def test_verifier_table(response, correct, parsed):
    assert common.verify_countdown(NUMS, TARGET, response) == (correct, parsed)


def test_fractions_on_the_way_are_exact():
    assert common.verify_countdown([1, 3, 6], 2, "6*(1/3)")[0]  # 1/3 is not representable in floating point
    assert common.verify_countdown([2, 3, 3], 1, "3/3/(2-1)")[0] is False  # 2 is used, 1 is not given
    assert common.verify_countdown([4, 6, 9], 6, "4/6*9")[0]  # 2/3 * 9 = 6 exactly


def test_solver_finds_only_correct_answers_and_counts_commutations_once():
    solutions = common.solve_countdown([17, 13, 5], 6)
    assert solutions == ["(13+17)/5", "(17+13)/5"]
    assert common.count_countdown_solutions([17, 13, 5], 6) == 1
    many = common.solve_countdown([9, 9, 1], 81)
    assert all(common.verify_countdown([9, 9, 1], 81, s)[0] for s in many)
    assert {"9*9*1", "9*9/1", "9/(1/9)"} <= set(many)


def test_splits_are_fixed_disjoint_and_diverse():
    task = common.get_task("countdown")
    train, test = task.train_items(), task.test_items()
    assert len(test) == 512 and len(train) == task.n_train
    key = lambda item: (tuple(sorted(item["nums"])), item["target"])  # noqa: E731
    assert not {key(i) for i in train} & {key(i) for i in test}
    assert len({key(i) for i in test}) == len(test)
    counts = [common.count_countdown_solutions(i["nums"], i["target"]) for i in test]
    assert counts.count(1) == 256 and sum(c >= 2 for c in counts) == 256
    # Regenerating from scratch gives the same items (the split does not depend on process state or seeds).
    cached = dict(common._SPLITS)
    common._SPLITS.clear()
    try:
        assert task.test_items() == test and task.train_items()[:50] == train[:50]
    finally:
        common._SPLITS.update(cached)


def test_prompt_format():
    task = common.get_task("countdown")
    assert task.prompt({"nums": [5, 10, 4], "target": 30}) == "5 10 4>30:"


def test_unknown_task_is_a_clear_error():
    with pytest.raises(common.UserInputError, match="unknown task 'nope'"):
        common.get_task("nope")


def test_prompt_sampler_is_seeded_and_covers_each_pass_once():
    items = [{"i": i} for i in range(10)]
    a, b = common.PromptSampler(items, 5, seed=3), common.PromptSampler(items, 5, seed=3)
    first_pass = a.next_batch() + a.next_batch()
    assert first_pass == b.next_batch() + b.next_batch()
    assert sorted(x["i"] for x in first_pass) == list(range(10))
    with pytest.raises(common.UserInputError, match="empty"):
        common.PromptSampler([], 4, seed=0)


# Property tests: the verifier never raises, always answers 0 or 1, and accepts every correct expression we build.
from fractions import Fraction  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=4), st.integers(-50, 500), st.text(max_size=300))
def test_verifier_never_raises_on_any_text(nums, target, response):
    correct, parsed = common.verify_countdown(nums, target, response)
    assert isinstance(correct, bool) and isinstance(parsed, bool) and (parsed or not correct)


@st.composite
def expression_over(draw, nums):
    """A random expression tree over exactly these numbers, rendered with full parentheses, and its exact value."""
    nodes = [(str(n), Fraction(n)) for n in nums]
    while len(nodes) > 1:
        i, j = draw(st.permutations(range(len(nodes))))[:2]
        (ta, va), (tb, vb) = nodes[i], nodes[j]
        op = draw(st.sampled_from("+-*/" if vb != 0 else "+-*"))
        value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else None}[op]
        nodes = [n for k, n in enumerate(nodes) if k not in (i, j)] + [(f"({ta}{op}{tb})", value)]
    return nodes[0]


@settings(max_examples=300, deadline=None)
@given(st.data(), st.lists(st.integers(1, 25), min_size=2, max_size=4))
def test_verifier_accepts_every_constructed_correct_expression(data, nums):
    text, value = data.draw(expression_over(nums))
    if value.denominator == 1:  # the task's targets are integers
        spaced = data.draw(st.booleans())
        assert common.verify_countdown(nums, int(value), text.replace("+", " + ") if spaced else text) == (True, True)
        assert common.verify_countdown(nums, int(value) + 1, text) == (False, True)
