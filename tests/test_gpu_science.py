"""benchmarks/gpu_science.sh --dry: the GPU run that settles issue 25, rehearsed on CPU at tiny sizes, so the script
a lent GPU gets once is known to run end to end."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_science_dry_runs_every_stage_and_writes_its_summary(tmp_path, data_dir, vgg_weights):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PPFLOWER_QUIET": "1"}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_science.sh"), "--dry"], capture_output=True,
                         text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    science = json.loads((tmp_path / "out" / "science.json").read_text())
    assert science["dry"] is True and science["device"].startswith("cpu")
    assert science["curve-steps"] == 6 and 0 <= science["psi-test-accuracy"] <= 1
    assert {"best-ITN", "best-ITN+feat"} <= set(science["attacks"]) or len(science["attacks"]) == 2
    curve = json.loads((tmp_path / "out" / "curve" / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 3, 6]
    assert (tmp_path / "out" / "curve" / "fig_curve.png").stat().st_size > 0
    assert (tmp_path / "out" / "attack" / "fig7_psnr_boxplot.png").stat().st_size > 0


def test_gpu_science_refuses_an_unknown_argument():
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_science.sh"), "--dyr"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.strip() == "error: unknown argument '--dyr' (expected --dry)"
