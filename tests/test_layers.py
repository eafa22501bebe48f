"""The layers of docs/architecture.md hold: each package imports only the layers below it, and the FAB ships
exactly the packages a SuperNode runs."""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pp_flower", "strategies", "sims", "runtime", "experiments", "cli")  # lowest layer first
SUPERNODE_ENTRY = "sims/main.py"  # the app a SuperNode (and the SuperLink's ServerApp) loads from the FAB


def _module_names(path: Path) -> set[str]:
    """Every absolute import in ``path``, lazy ones inside functions included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return names


def _imports(package: str) -> dict[str, set[str]]:
    return {str(path.relative_to(ROOT)): _module_names(path) for path in sorted((ROOT / package).rglob("*.py"))}


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{file} imports {name}" for file, names in _imports(package).items() for name in sorted(names)
            if name.split(".")[0] in forbidden]


def test_the_library_imports_nothing_above_it():
    assert _offenders("pp_flower", ("strategies", "sims", "runtime", "experiments", "cli")) == []


def test_the_provider_imports_neither_the_apps_nor_the_runtime():
    assert _offenders("strategies", ("sims", "runtime", "experiments", "cli")) == []


def test_the_runtime_runs_apps_by_name_and_imports_none():
    """runtime/ is the same layer as flwr: it loads an app module by name (and asks it for optional hooks)."""
    assert _offenders("runtime", ("sims", "experiments", "cli")) == []


def test_the_apps_import_neither_the_experiments_nor_the_cli():
    assert _offenders("sims", ("experiments", "cli")) == []


def test_the_experiments_do_not_import_the_cli():
    assert _offenders("experiments", ("cli",)) == []


def test_nothing_imports_the_cli():
    """Only the tests drive the CLI in-process; no package and no benchmark imports it."""
    users = [f"{f} imports {name}" for package in (*PACKAGES[:-1], "benchmarks")
             for f, names in _imports(package).items() for name in sorted(names) if name.split(".")[0] == "cli"]
    assert users == []


def _file_of(module: str) -> Path | None:
    """The first-party file of ``module`` (a module or a package's __init__), None for anything else."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None  # `from pkg import name` where name is not a module


def _reachable(entry: str) -> set[str]:
    """Every first-party file reachable by import from ``entry`` (lazy imports included), packages' __init__ too."""
    seen, todo = set(), [ROOT / entry]
    while todo:
        path = todo.pop()
        rel = path.relative_to(ROOT).as_posix()
        if rel in seen:
            continue
        seen.add(rel)
        for name in _module_names(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
                found = _file_of(".".join(parts[:i]))
                if found is not None:
                    todo.append(found)
    return seen


def _fab_files() -> list[str]:
    """The files `flwr run .` / `flwr build` put in the FAB, by Flower's own filter and pyproject's fab-include."""
    from flwr.cli.build import get_filtered_fab_paths

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    files = {p.relative_to(ROOT).as_posix(): p for top in (*PACKAGES, "tests", "benchmarks", "docs")
             for p in (ROOT / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return get_filtered_fab_paths(files, config)


def test_the_fab_ships_exactly_what_a_supernode_runs():
    shipped = set(_fab_files())
    needed = _reachable(SUPERNODE_ENTRY)
    assert needed - shipped == set(), "imported by the app but not in pyproject's fab-include"
    shipped_packages = {f.split("/")[0] for f in shipped}
    assert shipped_packages == {f.split("/")[0] for f in needed}  # and no package the app never imports
    assert not shipped_packages & {"experiments", "cli", "tests", "benchmarks", "docs"}, sorted(shipped_packages)
