"""The code's shape, as the project keeps it: only the runner imports the Ray adapter (whose
Ray Train part only the adapter imports), and functions and modules stay small enough to
read (the argparse builder excepted)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("qsearch", "strategies", "spaces") for p in (ROOT / d).glob("*.py"))
MAX_FUNCTION, MAX_MODULE, MAX_STRATEGY = 60, 450, 350
EXEMPT = {("cli.py", "build_parser")}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_only_the_runner_imports_the_ray_adapter():
    users = [p.name for p in SOURCES if "qsearch.ray_tune" in imported_modules(p)]
    assert users == ["runner.py"]


def test_only_the_ray_adapter_imports_ray():
    users = [p.name for p in SOURCES
             if any(m == "ray" or m.startswith("ray.") for m in imported_modules(p))]
    assert users == ["ray_train.py", "ray_tune.py"]


def test_only_the_ray_adapter_imports_its_ray_train_part():
    users = [p.name for p in SOURCES if "qsearch.ray_train" in imported_modules(p)]
    assert users == ["ray_tune.py"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_functions_and_modules_stay_small(path):
    tree = ast.parse(path.read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION and (path.name, n.name) not in EXEMPT]
    assert long == []
    is_strategy = path.parent.name == "strategies" and not path.name.startswith("_")
    limit = MAX_STRATEGY if is_strategy else MAX_MODULE
    assert len(path.read_text().splitlines()) <= limit
