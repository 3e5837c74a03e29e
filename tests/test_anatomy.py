"""Every algorithm file has grpo.py's anatomy: the same experiment, model & data and scale flags (names, order, defaults),
the same imports of shared code, and no import from another algorithm file."""

import ast

import pytest
from conftest import ALGORITHMS, REPO_ROOT

ALGORITHMS_DIR = REPO_ROOT / "algorithms"
SHARED_FIELDS_END = "fsdp"  # the last field of the "Scale" group, after "Experiment" and "Model & data"


def shared_args_fields(name: str) -> list[tuple[str, str, str]]:
    """(name, annotation, default) of Args' fields up to the end of the scale group."""
    tree = ast.parse((ALGORITHMS_DIR / f"{name}.py").read_text())
    args_class = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args")
    fields = []
    for statement in args_class.body:
        if isinstance(statement, ast.AnnAssign):
            fields.append((statement.target.id, ast.unparse(statement.annotation), ast.unparse(statement.value)))
            if statement.target.id == SHARED_FIELDS_END:
                return fields
    raise AssertionError(f"{name}.py: Args has no field {SHARED_FIELDS_END}")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_experiment_and_model_flags_match_grpo(name):
    assert shared_args_fields(name) == shared_args_fields("grpo")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_no_import_across_algorithm_files(name):
    tree = ast.parse((ALGORITHMS_DIR / f"{name}.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "common" in imported and not imported & (set(ALGORITHMS) - {name})
