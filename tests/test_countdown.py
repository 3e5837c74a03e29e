"""The countdown tasks: verifier tables (steps and expressions), canonical forms and distinct
solutions, the committed splits (disjoint, balanced, regenerated exactly by
benchmarks/countdown_data.py), data order."""

import json
import random
import sys

import pytest
from conftest import REPO_ROOT

import common

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import countdown_data  # noqa: E402

NUMS, TARGET = [3, 5, 7], 22  # 3 * 5 + 7 = 22, the only solution

STEP_CASES = [
    # (response, correct, parsed)
    ("3*5=15,15+7=22", True, True),
    ("5*3=15,7+15=22", True, True),  # operand order is free
    (" 3 * 5 = 15 , 15 + 7 = 22 ", True, True),  # spaces are fine
    ("3\u00d75=15,15+7=22", True, True),  # unicode times sign
    ("<answer>3*5=15,15+7=22</answer>", True, True),  # tagged answer (instruction-tuned models)
    # the last tag counts
    ("1+2=3 <answer>3+5=8</answer> <answer>3*5=15,15+7=22</answer>", True, True),
    ("3*5=015,015+7=22", True, True),  # a leading zero is the same number
    ("3*5=15,15+7=22" + " " * 300, True, True),  # trailing white space is harmless
    ("3*5=15,15+7=23", False, True),  # the last step's arithmetic is wrong
    ("3*5=16,16+6=22", False, True),  # a wrong result, then a number that is not available
    ("3*5=15,15+7=22,22*1=22", False, True),  # an extra step with a number not given
    ("3*5=15", False, True),  # 7 unused
    ("3*5=15,15+15=30", False, True),  # a result used twice
    ("3*5=15,3+7=10", False, True),  # 3 used twice, 5's product left over
    ("7+15=22", False, True),  # 15 was never computed
    ("7-5=2,2*3=6", False, True),  # a valid solution for another target
    ("5-7=2,2*3=6", False, True),  # 5 - 7 is negative: no non-negative result can be written
    ("7/5=1,1*3=3", False, True),  # 7 / 5 is not an integer
    ("3/0=0,0+7=7", False, True),  # division by zero is never exact
    ("3*5=15;15+7=22", False, False),  # steps are separated by commas
    ("3*5=15,15+7=22,", False, False),  # trailing comma
    ("3*5+7=22", False, False),  # an expression inside a step
    ("3*5+7", False, False),  # the expression format
    ("3*5=15,15+7=22=22", False, False),
    ("-3*5=15,15+7=22", False, False),  # unary minus
    ("\uff13*5=15,15+7=22", False, False),  # full-width digit 3
    ("3\u00b2=9", False, False),  # superscript two
    ("3*5=15,15+7=22" * 20, False, False),  # over 200 characters: not parsed at all (bounded work)
    ("", False, False),
    ("   ", False, False),
    ("__import__('os')", False, False),  # no eval, ever
    ("three times five is fifteen", False, False),
    (None, False, False),  # not even a string
]


@pytest.mark.parametrize("response,correct,parsed", STEP_CASES)
def test_step_verifier_table(response, correct, parsed):
    assert common.verify_countdown(NUMS, TARGET, response) == (correct, parsed)


EXPRESSION_CASES = [
    ("3*5+7", True, True),
    ("7+5*3", True, True),
    ("(5*3)+7", True, True),
    (" 3 * 5 + 7 ", True, True),
    ("((3*5))+7", True, True),
    ("3\u00d75+7", True, True),
    ("3*5+7=22", False, False),  # '=' is not part of an expression
    ("3*5=15,15+7=22", False, False),  # the step format
    ("3*5+7+0", False, True),  # extra number
    ("3*5+7+7-7", False, True),  # number reused
    ("5*3+8", False, True),  # wrong numbers
    ("3+5+7", False, True),  # wrong value
    ("7/(5-5)*3", False, False),  # division by zero
    ("(3*5+7", False, False),
    ("3*5+7)", False, False),
    ("3**5+7", False, False),
    ("-3*5+7", False, False),
    ("(" * 150 + "3" + ")" * 150, False, False),  # deeply nested and long
    ("9" * 150, False, True),  # huge literal, not a given number
    ("<answer>3*5+7</answer>", True, True),
    (None, False, False),
]


@pytest.mark.parametrize("response,correct,parsed", EXPRESSION_CASES)
def test_expression_verifier_table(response, correct, parsed):
    assert common.verify_countdown(NUMS, TARGET, response, steps=False) == (correct, parsed)


def test_expression_fractions_on_the_way_are_exact():
    assert common.verify_countdown([1, 3, 6], 2, "6*(1/3)", steps=False)[0]  # 1/3 is not a float
    assert common.verify_countdown([4, 6, 9], 6, "4/6*9", steps=False)[0]  # 2/3 * 9 = 6 exactly


def test_chained_steps_read_an_operand_as_the_latest_equal_result():
    # 2+4 makes a second 6: either reading uses every number once, so the answer is correct; the
    # tree reads the chained one (the product of the computed 6 and 3), plus the given 6.
    answer = "2+4=6,6*3=18,18+6=24"
    assert common.verify_countdown([6, 2, 4, 3], 24, answer) == (True, True)
    assert common.parse_countdown(answer)[1] == ("+", ("*", ("+", 2, 4), 3), 6)


def key(answer: str, steps: bool = True) -> str:
    return common.get_task("countdown" if steps else "countdown-expr").answer_key(answer)


def test_canonical_form_is_blind_to_commutation_and_associativity_only():
    assert key("13+17=30,30/5=6") == key("17+13=30,30/5=6") == key("(13+17)/5", steps=False)
    # (1+2)+4, 1+(2+4), (4+1)+2
    assert key("1+2=3,3+4=7") == key("2+4=6,1+6=7") == key("4+1=5,5+2=7")
    assert (key("9-(4-2)", steps=False) == key("9+2-4", steps=False) == key("4-2=2,9-2=7")
            != key("9-4=5,5-2=3"))
    assert key("8*3/4", steps=False) == key("8/4*3", steps=False) == key("8*(3/4)", steps=False)
    assert key("2*3=6,6+4=10") != key("3+4=7,2*7=14") != key("2*4=8,8+3=11")
    # different operations stay different
    assert key("5*1=5", steps=True) != key("5/1=5", steps=True)


def test_counts_of_distinct_solutions_match_hand_counts():
    # 6 from 1 2 3: 1+2+3, 1*2*3, 2*3/1 (and their reorderings);
    # 6 from 17 13 5: only (13+17)/5; 22 from 3 5 7: 3*5+7.
    for nums, target, hand_count in (([1, 2, 3], 6, 3), ([17, 13, 5], 6, 1), ([3, 5, 7], 22, 1)):
        groups = countdown_data.solutions(nums, target)
        assert len(groups) == hand_count
        rng = random.Random(0)
        renderings = [countdown_data.render_steps(tree, rng) for trees in groups.values()
                      for tree in trees for _ in range(8)]
        assert all(common.verify_countdown(nums, target, text) == (True, True)
                   for text in renderings)
        # what eval/distinct_correct counts
        assert len({key(text) for text in renderings}) == hand_count


@pytest.mark.slow
def test_committed_splits_are_regenerated_exactly_disjoint_and_balanced():
    for name, spec in countdown_data.SPECS.items():
        splits = countdown_data.make_splits(spec)
        keys = {}
        for split, rows in splits.items():
            path = REPO_ROOT / "benchmarks" / "data" / name / f"{split}.jsonl"
            assert [json.loads(line)
                    for line in path.read_text().splitlines()] == rows, (name, split)
            # numbers and target, or the expression
            keys[split] = {countdown_data.instance_key(r) for r in rows}
            assert len(keys[split]) == len(rows)
            levels = dict(spec.levels)  # how many numbers -> the largest
            # an expression may be worth 0; a target to reach is at least 1
            lowest = 0 if spec.arithmetic else 1
            assert all(max(r["nums"]) <= levels[len(r["nums"])]
                       and lowest <= r["target"] <= spec.max_target for r in rows)
            assert all(common.verify_countdown(r["nums"], r["target"], r["expression"],
                                               steps=False)[0]
                       for r in rows if "expression" in r)
        for a, b in ((a, b) for a in keys for b in keys if a < b):
            assert not keys[a] & keys[b], (name, a, b)
        for split in ("test", "val") if not spec.arithmetic else ():
            subsets = [r["subset"] for r in splits[split]]
            assert subsets[:4] == ["one_solution", "several_solutions"] * 2
            assert (subsets.count("one_solution") == subsets.count("several_solutions")
                    == len(subsets) // 2)
            assert all((r["solutions"] == 1) == (r["subset"] == "one_solution")
                       for r in splits[split])
    task = common.get_task("countdown")
    assert (len(task.items("train")) == 4000
            and len(task.items("test")) == len(task.items("val")) == 512)


def test_eval_items_add_the_second_skill():
    task = common.get_task("countdown")
    items = task.eval_items("val", 8)
    assert items[:8] == task.items("val")[:8] and len(items) == 12
    assert all(item["subset"] == "second_skill" and "expression" in item for item in items[8:])
    arith = common.get_task("arith")
    assert arith.eval_items("test", 8) == arith.items("test")[:8]
    item = {"nums": [3, 5, 2], "target": 13, "expression": "3+5*2"}
    assert task.prompt(item) == "3+5*2=" and task.verify(item, "5*2=10,3+10=13") == (True, True)
    # computed in the wrong order: another value
    assert task.verify(item, "3+5=8,8*2=16") == (False, True)


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


# Property tests: the verifier never raises, always answers 0 or 1, accepts every correct answer we
# build, and the canonical form does not depend on how a solution is written.
from fractions import Fraction  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=4), st.integers(-50, 500),
       st.text(max_size=300), st.booleans())
def test_verifier_never_raises_on_any_text(nums, target, response, steps):
    correct, parsed = common.verify_countdown(nums, target, response, steps)
    assert isinstance(correct, bool) and isinstance(parsed, bool) and (parsed or not correct)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("0123456789+-*/=, ()")), max_size=60), st.booleans())
def test_verifier_never_raises_on_near_miss_answers(chars, steps):
    correct, parsed = common.verify_countdown([3, 5, 7], 22, "".join(chars), steps)
    assert parsed or not correct


@st.composite
def step_tree_over(draw, nums):
    """A random expression tree over exactly these numbers whose intermediate results are
    non-negative integers (the step rules), with its value; None when a drawn operation breaks the
    rules."""
    nodes = [(n, n) for n in nums]
    while len(nodes) > 1:
        i, j = draw(st.permutations(range(len(nodes))))[:2]
        (ta, va), (tb, vb) = nodes[i], nodes[j]
        op = draw(st.sampled_from("+-*/"))
        value = countdown_data.step_value(op, va, vb)
        if value is None:
            return None
        nodes = [n for k, n in enumerate(nodes) if k not in (i, j)] + [((op, ta, tb), value)]
    return nodes[0]


def _walk(tree) -> tuple[int, list[int]]:
    """(value, values of the tree's steps)."""
    if isinstance(tree, int):
        return tree, []
    (va, ra), (vb, rb) = _walk(tree[1]), _walk(tree[2])
    value = countdown_data.step_value(tree[0], va, vb)
    return value, ra + rb + [value]


@settings(max_examples=300, deadline=None)
@given(st.data(), st.lists(st.integers(1, 25), min_size=2, max_size=4))
def test_every_constructed_solution_is_accepted_and_written_any_way_has_one_form(data, nums):
    drawn = data.draw(step_tree_over(nums))
    if drawn is None:
        return
    tree, value = drawn
    _, results = _walk(tree)
    leaves = countdown_data.leaves(tree)
    # a step value equal to a given number or to another step's: see the next test
    steps = results[:-1]
    ambiguous = bool(set(steps) & set(leaves)) or len(set(steps)) < len(steps)
    seed = data.draw(st.integers(0, 10**6))
    rng = random.Random(seed)
    texts = [countdown_data.render_steps(tree, rng) for _ in range(4)]
    for text in texts:
        spaced = text.replace("+", " + ") if seed % 2 else text
        assert common.verify_countdown(nums, value, spaced) == (True, True)
        assert common.verify_countdown(nums, value + 1, text) == (False, True)
    if not ambiguous:
        assert len({key(text) for text in texts}) == 1
        assert key(texts[0]) == common.canonical_form(tree)
    expression = render_expression(tree)
    assert common.verify_countdown(nums, value, expression, steps=False) == (True, True)
    assert key(expression, steps=False) == common.canonical_form(tree)
    assert common.parse_countdown(expression, steps=False)[0] == Fraction(value)


def test_a_result_equal_to_an_unused_given_number_is_read_as_the_result():
    # Known limitation, pinned: with 14 both given and a result, `1+14` after `2*7=14` is read as 1
    # + (2*7). Both orders of the same solution (2*7)*(1+14) are accepted, but one reads as
    # (1+2*7)*14: another form, so
    # distinct_correct can count one solution twice when it is written in both orders. Two steps
    # with equal results are the same case: in `8+8=16,10+6=16,16/16=1` the later 16 is read first.
    nums = [1, 2, 7, 14]
    first, second = "2*7=14,1+14=15,14*15=210", "1+14=15,2*7=14,15*14=210"
    assert (common.verify_countdown(nums, 210, first) == common.verify_countdown(nums, 210, second)
            == (True, True))
    assert key(second) == common.canonical_form(("*", ("*", 2, 7), ("+", 1, 14)))
    assert key(first) == common.canonical_form(("*", ("+", 1, ("*", 2, 7)), 14)) != key(second)


def render_expression(tree) -> str:
    if isinstance(tree, int):
        return str(tree)
    op, a, b = tree
    return f"({render_expression(a)}{op}{render_expression(b)})"
