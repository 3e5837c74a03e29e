"""The embedded benchmark's instances, drawn once and committed to benchmarks/data/ (see its
README).

    # rewrites benchmarks/data/countdown/ and benchmarks/data/arith/
    python benchmarks/countdown_data.py

countdown: an instance draws its level (how many numbers, the largest), then its numbers uniformly,
then its target uniformly among the values in 1..max_target that the numbers reach under the step
rules of `common.verify_countdown` (every intermediate result a non-negative integer, written out),
so every instance has a solution whose step answer fits the generation length. arith: a random
expression whose every intermediate result is a non-negative integer. The splits are disjoint (by
sorted numbers and target, or by expression), taken in this order from one seeded stream:
- test and val (512 each): for countdown, half with exactly one solution up to commutation and
  associativity (`subset` one_solution), half with several (several_solutions), interleaved. Val is
  for tuning, test for reported numbers.
- train: the prompts RL trains on.
- sft: the supervised examples of the base model (benchmarks/make_tiny_base.py); RL never sees them.
countdown rows also hold `solutions`, the number of distinct solutions up to commutation and
associativity.
"""
import json
import random
import sys
from fractions import Fraction
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Spec:
    name: str
    levels: tuple[tuple[int, int], ...]
    """(how many numbers, largest number) of each difficulty level; an instance draws its level
    uniformly"""
    max_target: int
    n_train: int = 4000
    n_sft: int = 30000
    n_test: int = 512
    n_val: int = 512
    max_answer_chars: int = 31
    """the shortest step answer must fit 32 generated tokens with its EOS"""
    arithmetic: bool = False
    """instances are expressions to compute step by step (`3+5*2=`), not targets to reach"""


SPECS = {
    # Three levels: two numbers (one operation to find: easy), three, four (hard). Two numbers up to
    # 20 would make only ~600 instances, too few for four disjoint splits, so they go up to 99. Four
    # numbers stop at 10: up to 20, their three-step answers (3-digit intermediate results) made a
    # training step ~2.2x as slow as the previous task's; three numbers go up to 30, which keeps
    # enough prompts the base model cannot solve (pass@64 <= 0.95).
    "countdown": Spec("countdown", levels=((2, 99), (3, 30), (4, 10)), max_target=200),
    "arith": Spec("arith", levels=((3, 20),), max_target=400, arithmetic=True),
}


def step_value(op: str, a: int, b: int) -> int | None:
    """a op b if it is a non-negative integer (a result the step rules can write), else None: the
    verifier's arithmetic (`common._apply`), so instances and checks cannot disagree."""
    value = common._apply(op, Fraction(a), Fraction(b))
    return int(value) if value is not None and value >= 0 and value.denominator == 1 else None


@lru_cache(maxsize=None)
def step_trees(nums: tuple[int, ...]) -> list[tuple[int, object]]:
    """Every expression tree over all of `nums` (sorted) whose intermediate results are non-negative
    integers, as `(value, tree)`: a dynamic programme over subsets. + and * appear once per
    unordered pair of operands."""
    full = (1 << len(nums)) - 1
    table = {1 << i: [(n, n)] for i, n in enumerate(nums)}
    for subset in range(1, full + 1):
        if subset in table:
            continue
        found = []
        left = (subset - 1) & subset
        while left:  # every ordered split (left, right) of the subset
            right = subset ^ left
            for va, ta in table[left]:
                for vb, tb in table[right]:
                    for op in "+-*/" if left < right else "-/":
                        value = step_value(op, va, vb)
                        if value is not None:
                            found.append((value, (op, ta, tb)))
            left = (left - 1) & subset
        table[subset] = found
    return table[full]


def render_steps(tree, rng: random.Random | None = None) -> str:
    """The step answer of a tree (`13+17=30,30/5=6`); with `rng`, a random one of its equivalent
    renderings (which side of an operation is computed first, the operand order of + and *)."""
    steps = []

    def emit(node) -> int:
        if isinstance(node, int):
            return node
        op, a, b = node
        if rng is not None and rng.random() < 0.5:
            vb = emit(b)
            va = emit(a)
        else:
            va = emit(a)
            vb = emit(b)
        value = step_value(op, va, vb)
        if rng is not None and op in "+*" and rng.random() < 0.5:
            va, vb = vb, va
        steps.append(f"{va}{op}{vb}={value}")
        return value

    emit(tree)
    return ",".join(steps)


def solutions(nums: list[int], target: int) -> dict[str, list]:
    """Every solution tree of an instance, grouped by canonical form (commutation and
    associativity)."""
    groups: dict[str, list] = {}
    for value, tree in step_trees(tuple(sorted(nums))):
        if value == target:
            groups.setdefault(common.canonical_form(tree), []).append(tree)
    return groups


@lru_cache(maxsize=None)
def reachable_targets(spec: Spec, nums: tuple[int, ...]) -> list[int]:
    """The targets in 1..max_target that `nums` (sorted) reach with a step answer short enough."""
    return sorted({value for value, tree in step_trees(nums)
                   if 1 <= value <= spec.max_target
                   and len(render_steps(tree)) <= spec.max_answer_chars})


def render_expression(tree, parent: str = "", right: bool = False) -> str:
    """A tree as an expression with the fewest parentheses (`3+5*2`, `(3+5)*2`, `9-(4-2)`)."""
    if isinstance(tree, int):
        return str(tree)
    op, a, b = tree
    text = f"{render_expression(a, op)}{op}{render_expression(b, op, right=True)}"
    outer, inner = ({"+": 1, "-": 1, "*": 2, "/": 2}.get(parent, 0),
                    {"+": 1, "-": 1, "*": 2, "/": 2}[op])
    return f"({text})" if inner < outer or (inner == outer and right and parent in "-/") else text


def leaves(tree) -> list[int]:
    """The numbers of a tree, left to right (as the expression writes them)."""
    return [tree] if isinstance(tree, int) else leaves(tree[1]) + leaves(tree[2])


def draw_expression(spec: Spec, rng: random.Random) -> dict:
    """A random expression over random numbers whose every intermediate result is a non-negative
    integer."""
    while True:
        n_numbers, max_number = rng.choice(spec.levels)
        nodes = [rng.randint(1, max_number) for _ in range(n_numbers)]
        values = list(nodes)
        while len(nodes) > 1:
            i, j = rng.sample(range(len(nodes)), 2)
            op = rng.choice("+-*/")
            value = step_value(op, values[i], values[j])
            if value is None:
                break
            nodes = [n for k, n in enumerate(nodes) if k not in (i, j)] + [(op, nodes[i], nodes[j])]
            values = [v for k, v in enumerate(values) if k not in (i, j)] + [value]
        if (len(nodes) == 1 and values[0] <= spec.max_target
                and len(render_steps(nodes[0])) <= spec.max_answer_chars):
            tree = nodes[0]
            return {"nums": leaves(tree), "target": values[0],
                    "expression": render_expression(tree)}


def draw_instance(spec: Spec, rng: random.Random) -> dict:
    if spec.arithmetic:
        return draw_expression(spec, rng)
    while True:
        n_numbers, max_number = rng.choice(spec.levels)
        nums = [rng.randint(1, max_number) for _ in range(n_numbers)]
        reachable = reachable_targets(spec, tuple(sorted(nums)))
        if reachable:
            return {"nums": nums, "target": rng.choice(reachable)}


def instance_key(item: dict):
    """What makes two instances the same: the expression to compute, or the sorted numbers and the
    target."""
    return item.get("expression") or (tuple(sorted(item["nums"])), item["target"])


def make_splits(spec: Spec) -> dict[str, list[dict]]:
    """test and val (balanced subsets, interleaved, for targets to reach), train, then sft."""
    rng = random.Random(f"{spec.name}-instances")
    seen: set = set()
    splits = {}
    for split, size in (("test", spec.n_test), ("val", spec.n_val), ("train", spec.n_train)):
        balanced = split in ("test", "val") and not spec.arithmetic
        subsets = {"one_solution": [], "several_solutions": []} if balanced else {"": []}
        while sum(map(len, subsets.values())) < size:
            item = draw_instance(spec, rng)
            if instance_key(item) in seen:
                continue
            if not spec.arithmetic:
                item["solutions"] = len(solutions(item["nums"], item["target"]))
            subset = ("" if "" in subsets
                      else "one_solution" if item["solutions"] == 1 else "several_solutions")
            if len(subsets[subset]) < size // len(subsets):
                subsets[subset].append({**item, "subset": subset} if subset else item)
                seen.add(instance_key(item))
        splits[split] = [item for group in zip(*subsets.values()) for item in group]
    splits["sft"] = []
    while len(splits["sft"]) < spec.n_sft:
        item = draw_instance(spec, rng)
        if instance_key(item) not in seen:
            seen.add(instance_key(item))
            if not spec.arithmetic:
                item["solutions"] = len(solutions(item["nums"], item["target"]))
            splits["sft"].append(item)
    return splits


def write_splits(spec: Spec, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in make_splits(spec).items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{folder / split}.jsonl: {len(rows)} instances")


if __name__ == "__main__":
    for spec in SPECS.values():
        write_splits(spec, DATA / spec.name)
