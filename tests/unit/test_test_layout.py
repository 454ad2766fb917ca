"""The tests' own layout: a test module imports helpers from support modules, never from another test module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def test_no_test_module_is_imported_by_another_module() -> None:
    offending = [
        f"{path.relative_to(TESTS.parent)} imports {module}"
        for path in sorted(TESTS.rglob("*.py"))
        for module in imported_modules(path)
        if module.startswith("tests.") and module.rpartition(".")[2].startswith("test_")
    ]
    assert not offending, offending


def test_the_check_sees_such_an_import(tmp_path: Path) -> None:
    module = tmp_path / "example.py"
    module.write_text("from tests.unit.test_gateway_hub import x\nimport tests.integration.test_broker\n")
    assert imported_modules(module) == ["tests.unit.test_gateway_hub", "tests.integration.test_broker"]
