"""The house rules of docs/ARCHITECTURE.md as checks: import arrows point one way, and no module outside
strategies/ knows a strategy by its name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("launcher", "cluster", "training", "strategies")
# The contract: every package may import these, and they import nothing of sharpen but each other.
CONTRACT = {"launcher", "launcher.spec", "launcher.method_spec", "launcher.plan", "launcher.errors"}
# Which packages each package may import besides the contract (launcher → cluster → training → strategies).
ALLOWED = {
    "launcher": {"launcher", "cluster", "training", "strategies"},
    "cluster": {"cluster", "training"},  # training: the rank's entry point that cluster/local.py starts
    "training": {"training", "strategies"},
    "strategies": {"strategies"},
}
# The one training module that may import cluster/: the composition root of a rank.
COMPOSITION_ROOT = "training.worker"
# The job file's vocabulary: the schema's choices, and the words other tools use for them.
SCHEMA_MODULES = {"launcher.spec", "launcher.job_messages"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[module_name(path)] = ast.parse(path.read_text(), filename=str(path))
    return found


def imported(name: str, tree: ast.Module) -> set[str]:
    """Every sharpen module `name` imports, at the top or inside a function (relative imports resolved)."""
    out = set()
    is_package = (REPO / Path(*name.split(".")) / "__init__.py").is_file()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from launcher import spec` imports launcher.spec; `from launcher import __version__` launcher
            targets = [f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t.split(".")[0] in PACKAGES}
    return out


def is_module(name: str) -> bool:
    path = REPO / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def arrow_violations() -> list[str]:
    problems = []
    for name, tree in modules().items():
        package = name.split(".")[0]
        for target in sorted(imported(name, tree)):
            if target == name or target in CONTRACT and name not in CONTRACT:
                continue
            if name in CONTRACT:
                if target not in CONTRACT:
                    problems.append(f"{name} is a contract module but imports {target}")
                continue
            allowed = ALLOWED[package] | ({"cluster"} if name == COMPOSITION_ROOT else set())
            if target.split(".")[0] not in allowed:
                problems.append(f"{name} imports {target}: {package}/ may import {sorted(allowed)} and the contract")
            elif package == "training" and target.startswith("cluster") and name != COMPOSITION_ROOT:
                problems.append(f"{name} imports {target}: only {COMPOSITION_ROOT} may import cluster/")
    return problems


def test_imports_point_one_way():
    assert arrow_violations() == []


def test_the_check_sees_an_arrow_against_the_flow(tmp_path, monkeypatch):
    """A module written against the flow is caught (the rule is not vacuous)."""
    bad = REPO / "training" / "_layout_probe.py"
    bad.write_text("def f():\n    from launcher.planner import build_plan\n    from cluster import slurm\n")
    try:
        problems = arrow_violations()
    finally:
        bad.unlink()
    assert any("training._layout_probe imports launcher.planner" in p for p in problems)
    assert any("training._layout_probe imports cluster.slurm" in p for p in problems)


def strategy_names() -> set[str]:
    from strategies import registered_names

    return set(registered_names())


def name_leaks() -> list[str]:
    names = strategy_names()
    problems = []
    for name, tree in modules().items():
        if name.startswith("strategies") or name in SCHEMA_MODULES:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in names or node.value == "zero":
                    problems.append(f"{name}:{node.lineno}: the strategy name {node.value!r}")
    return problems


def test_no_strategy_is_known_by_name_outside_strategies():
    """A branch on a strategy's name outside strategies/ means a method is missing from its interface."""
    assert name_leaks() == []


@pytest.mark.parametrize("name", ["ddp", "zero3"])
def test_the_name_check_sees_a_branch_on_a_name(name):
    bad = REPO / "training" / "_layout_probe.py"
    bad.write_text(f"def f(plan):\n    return plan.strategy == {name!r}\n")
    try:
        problems = name_leaks()
    finally:
        bad.unlink()
    assert f"training._layout_probe:2: the strategy name {name!r}" in problems


def bench_imports(root: Path) -> list[str]:
    """Every import of bench/ in the Python files under `root`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            else:
                continue
            found += [f"{path.relative_to(root)}:{node.lineno} imports {t}" for t in targets if t.split(".")[0] == "bench"]
    return found


def test_tests_import_nothing_from_bench():
    """What tests share lives in tests/support/ (bench/ may import it); a test that imports bench/ breaks
    when a benchmark changes."""
    assert bench_imports(REPO / "tests") == []


def test_test_files_have_unique_names():
    """pytest imports test modules by basename (no packages under tests/): two test files of one name in
    different directories stop the whole collection."""
    seen: dict[str, Path] = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        assert path.name not in seen, f"{path} and {seen[path.name]} share a name"
        seen[path.name] = path
