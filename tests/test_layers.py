"""The layers of docs/architecture.md hold: each package imports only the layers below it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[str, set[str]]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{file} imports {name}" for file, names in _imports(package).items() for name in sorted(names)
            if name.split(".")[0] in forbidden or name in forbidden]


def test_the_library_imports_neither_the_provider_nor_the_apps():
    assert _offenders("pp_flower", ("strategies", "sims")) == []


def test_the_provider_does_not_import_the_apps():
    assert _offenders("strategies", ("sims",)) == []


def test_nothing_imports_the_cli():
    users = [f for package in ("pp_flower", "strategies", "sims", "benchmarks")
             for f, names in _imports(package).items() if "sims.cli" in names]
    assert users == []
