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
python() {{ if [ "$1 $2" = "-m pytest" ]; then echo "[readme] skipped: the test suite (CI runs it)"; else "$PY" "$@"; fi; }}
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
