"""Every ``bash`` block of the README runs, as written, in a fresh directory (tests/readme_commands.py shrinks
the budgets to tiny sizes). Installing (pip, venv) and the test command itself are what CI already runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SHELL_PRELUDE = r"""
set -eo pipefail
PY="{python}"
ppflower() {{ "$PY" -m tests.readme_commands ppflower "$@"; }}
flower-simulation() {{ "$PY" -m tests.readme_commands flower-simulation "$@"; }}
pip() {{ echo "[readme] skipped: pip $*"; }}
python3() {{ if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && : > "$3/bin/activate"; else "$PY" "$@"; fi; }}
python() {{
    if [ "$1 $2" = "-m pytest" ]; then echo "[readme] skipped: the test suite (CI runs it)"; else "$PY" "$@"; fi
}}
"""


def readme_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_the_blocks_this_test_runs():
    commands = " ".join(readme_blocks())
    for command in ("ppflower demo", "ppflower train-classifier", "flower-simulation", "ppflower deploy-local",
                    "ppflower attack", "ppflower protect", "ppflower classify", "ppflower reproduce"):
        assert command in commands, command


@pytest.mark.slow
def test_every_readme_command_block_runs(tmp_path, data_dir, vgg_weights, splits):
    from torchvision.utils import save_image

    from pp_flower.data import to_float

    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(Path(data_dir).resolve().parents[1])  # the README's ../shared
    photos = work / "my_photos"
    photos.mkdir()
    for i in range(3):
        save_image(to_float(splits.test.images[i]), photos / f"photo{i}.png")
    script = SHELL_PRELUDE.format(python=sys.executable)
    for i, block in enumerate(readme_blocks()):
        script += f'\necho "[readme] --- block {i + 1} ---"\n{block}\n'
    # as in CI: the data and φ's weights come from ../shared (the README's export block sets the same paths)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PPFLOWER_QUIET": "1"}
    proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    (tmp_path / "readme.log").write_text(log)
    last = re.findall(r"\[readme\] --- block (\d+) ---", proc.stdout)
    assert proc.returncode == 0, f"README block {last[-1] if last else '?'} failed:\n{log[-4000:]}"
    assert "Traceback" not in log
    # what the blocks wrote is what the README says they write
    assert json.loads((work / "runs/demo/simulation/run.json").read_text())["users"]
    assert (work / "runs/sim/user-0/best.pt").exists() and (work / "runs/sim/attack/summary.json").exists()
    users = json.loads((work / "runs/deploy-local/run/run.json").read_text())["users"]
    assert [u["steps-applied"] for u in users] == [2, 2]  # 64 images, 2 users, batch 16
    assert sorted(p.name for p in (work / "protected").iterdir()) == ["photo0.png", "photo1.png", "photo2.png"]
    assert "photo0.png\t" in proc.stdout  # ψ's label of each protected photo
    assert (work / "results/readme-smoke/table1.md").exists()
    assert torch.load(work / "runs/classifier/best.pt", weights_only=True)["kind"] == "classifier"


@pytest.mark.parametrize("program, args, expected", [
    ("ppflower", ["train-classifier", "--epochs", "200", "--out", "runs/c"],
     ["train-classifier", "--epochs", "1", "--out", "runs/c", "--limit-train", "256", "--limit-eval", "64"]),
    ("flower-simulation", ["--num-supernodes", "4", "--run-config", 'alpha=0.005 epochs=3 run-dir="r"'],
     ["--num-supernodes", "2", "--run-config",
      'alpha=0.005 epochs=1 run-dir="r" limit-train=64 limit-eval=20 batch-size=16 unet-base=4 unet-depth=2 '
      'eval-chunk=10 num-threads=1']),
])
def test_the_shrinker_keeps_the_command_and_changes_only_the_budget(program, args, expected):
    from tests.readme_commands import shrink

    assert shrink(program, args) == expected


# ------------------------------------------------------------------------------- the Configuration section

CODE_DIRS = ("pp_flower", "strategies", "sims", "runtime", "experiments", "cli", "benchmarks", "tests")


def readme_section(title: str) -> str:
    """The README's ``## title`` section, up to the next ``## `` heading."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def table_rows(section: str) -> dict[str, list[str]]:
    """Markdown table rows of ``section`` by their first cell's backticked names (``| `a`, `b` | …`` → a, b)."""
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            for name in re.findall(r"`([^`]+)`", cells[0]):
                rows[name] = cells
    return rows


def toml_value(value) -> str:
    """A default as one writes it in a run config (and in pyproject.toml)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def test_the_readme_lists_every_run_config_key_with_its_default():
    from dataclasses import fields

    from pp_flower.config import AppConfig

    rows = table_rows(readme_section("Configuration").split("### Node config")[0])
    missing = [k for k in AppConfig.keys() if k not in rows]
    assert not missing, f"run-config keys missing from the README's Configuration section: {missing}"
    wrong = {f.name.replace("_", "-"): (rows[f.name.replace("_", "-")][1], toml_value(f.default))
             for f in fields(AppConfig) if rows[f.name.replace("_", "-")][1].strip("`") != toml_value(f.default)}
    assert not wrong, f"README default (shown, actual) differs: {wrong}"
    stale = [k for k in rows if k not in AppConfig.keys()]
    assert not stale, f"the README's run-config table lists keys AppConfig does not have: {stale}"


def test_the_readme_lists_every_node_config_key_and_environment_variable():
    section = readme_section("Configuration")
    sources = [p for d in CODE_DIRS for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh")
               and "__pycache__" not in p.parts]
    code = {p: p.read_text() for p in sources}
    # every PPFLOWER_* name the code uses (a name ending in "_" is a prefix: PPFLOWER_TEST_SESSION_<uuid>)
    variables = {v for text in code.values() for v in re.findall(r"PPFLOWER_[A-Z0-9_]+", text)}
    assert len(variables) > 10
    listed = table_rows(section.split("### Environment variables")[1])
    missing = sorted(v for v in variables if not any(name == v or (v.endswith("_") and name.startswith(v))
                                                     for name in listed))
    assert not missing, f"PPFLOWER_* variables missing from the README's table of environment variables: {missing}"
    # every node-config key the app reads
    node_code = "\n".join(text for p, text in code.items() if p.parts[len(ROOT.parts)] in ("sims", "runtime"))
    keys = set(re.findall(r"node_config(?:\.get\(|\[)\s*[\"']([a-z-]+)[\"']", node_code))
    keys |= set(re.findall(r"[\"']([a-z-]+)[\"']", re.search(r"NODE_KEYS = \(([^)]*)\)", node_code).group(1)))
    assert {"out-dir", "data-dir", "user-trainer", "trainer-socket"} <= keys
    rows = table_rows(section.split("### Node config")[1].split("### ")[0])
    missing = sorted(keys - set(rows))
    assert not missing, f"node-config keys missing from the README's Configuration section: {missing}"


def test_the_readme_lists_every_command():
    import tomllib

    import typer

    from cli.ppflower import app

    section = readme_section("Configuration")
    commands = [f"ppflower {name}" for name in typer.main.get_command(app).commands]
    scripts = [name for name in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
               if name != "ppflower"]
    missing = [c for c in commands + scripts if f"`{c}`" not in section]
    assert not missing, f"commands missing from the README's Configuration section: {missing}"
