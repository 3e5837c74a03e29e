"""Every algorithm file has grpo.py's anatomy: the same experiment, model & data and scale flags
(names, order, defaults), the same imports of shared code, no import from another algorithm file,
the same source for a function copied into several files, and grpo.py's `TRY NOT TO MODIFY` blocks:
a diff between two files shows only the method."""

import ast
import re

import pytest
from conftest import ALGORITHMS, REPO_ROOT

ALGORITHMS_DIR = REPO_ROOT / "algorithms"
# the last field of the "Scale" group, after "Experiment" and "Model & data"
SHARED_FIELDS_END = "fsdp"


def shared_args_fields(name: str) -> list[tuple[str, str, str]]:
    """(name, annotation, default) of Args' fields up to the end of the scale group."""
    tree = ast.parse((ALGORITHMS_DIR / f"{name}.py").read_text())
    args_class = next(node for node in tree.body if isinstance(node, ast.ClassDef)
                      and node.name == "Args")
    fields = []
    for statement in args_class.body:
        if isinstance(statement, ast.AnnAssign):
            fields.append((statement.target.id, ast.unparse(statement.annotation),
                           ast.unparse(statement.value)))
            if statement.target.id == SHARED_FIELDS_END:
                return fields
    raise AssertionError(f"{name}.py: Args has no field {SHARED_FIELDS_END}")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_experiment_and_model_flags_match_grpo(name):
    assert shared_args_fields(name) == shared_args_fields("grpo")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_no_import_across_algorithm_files(name):
    tree = ast.parse((ALGORITHMS_DIR / f"{name}.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "common" in imported and not imported & (set(ALGORITHMS) - {name})


def top_level_functions(name: str) -> dict[str, str]:
    """{function name: ast.dump of its definition, docstring included} of an algorithm file's
    top-level functions."""
    tree = ast.parse((ALGORITHMS_DIR / f"{name}.py").read_text())
    return {node.name: ast.dump(node) for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_a_function_copied_into_several_files_is_the_same_everywhere():
    # CleanRL's copies drift apart; these may not:
    # same code and same docstring (ast.dump ignores comments and layout)
    copies = {}  # function name -> {its ast.dump: files with it}
    for name in ALGORITHMS:
        for function, dump in top_level_functions(name).items():
            copies.setdefault(function, {}).setdefault(dump, []).append(name)
    drifted = {function: list(versions.values()) for function, versions in copies.items()
               if len(versions) > 1}
    assert not drifted, f"copies differ between the files listed together: {drifted}"
    shared = {function for function, versions in copies.items()
              if sum(map(len, versions.values())) > 1}
    assert ({"grpo_advantages", "ppo_clip_loss", "aggregate_loss", "k3_kl", "token_covariance"}
            <= shared)


BANNER = re.compile(r"^( *)# (TRY NOT TO MODIFY|ALGO LOGIC): ([^;]*)")


def banner_blocks(name: str) -> list[tuple[str, str, list[str]]]:
    """(kind, title, lines) of each banner block of a file: the lines from a
    `# TRY NOT TO MODIFY: title` or `# ALGO LOGIC: title` comment (the title ends at the first ";")
    to the next such comment or to the first line indented less than the comment, without the
    trailing blank lines."""
    lines = (ALGORITHMS_DIR / f"{name}.py").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if BANNER.match(line)]
    blocks = []
    for start in starts:
        indent, kind, title = BANNER.match(lines[start]).groups()
        end = start + 1
        while end < len(lines) and not BANNER.match(lines[end]) and (
                not lines[end].strip()
                or len(lines[end]) - len(lines[end].lstrip()) >= len(indent)):
            end += 1
        body = lines[start:end]
        while not body[-1].strip():
            body.pop()
        blocks.append((kind, title.strip(), body))
    return blocks


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_shared_block_is_grpos(name):
    """Everything outside ALGO LOGIC is the same in every file: each `TRY NOT TO MODIFY` block
    equals grpo.py's block of the same title, and each of grpo.py's is in the file, or the file says
    that its method changes that block by an `ALGO LOGIC` banner of the same title (e.g. prime.py's
    checkpoint, which holds the PRM too). No exceptions."""
    shared = {title: body for kind, title, body in banner_blocks("grpo")
              if kind == "TRY NOT TO MODIFY"}
    assert len(shared) >= 8
    blocks = banner_blocks(name)
    for kind, title, body in blocks:
        if kind == "TRY NOT TO MODIFY":
            assert title in shared, f"{name}.py: a shared block grpo.py does not have: {title!r}"
            assert body == shared[title], f"{name}.py: the block {title!r} differs from grpo.py's"
    assert set(shared) <= {title for _, title, _ in blocks}, f"{name}.py lacks shared blocks"
