"""benchmarks/bench_steps.py's decisions, as pure functions (fast): per-step time from two run lengths, the steady
time inside a loop, the reference check that refuses to report, the app's split, and waiting for a run's processes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_steps", ROOT / "benchmarks" / "bench_steps.py")
bench = sys.modules["bench_steps"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_per_step_from_two_run_lengths_cancels_start_up():
    start_up, step = 17.0, 0.6
    walls = {n: [start_up + n * step + noise for noise in (0.3, 0.0)] for n in (4, 14)}
    assert bench.per_step_from_walls(walls[4], walls[14], 4, 14) == pytest.approx(step)
    with pytest.raises(ValueError):
        bench.per_step_from_walls(walls[4], walls[14], 14, 4)
    with pytest.raises(ValueError):
        bench.per_step_from_walls([], walls[14], 4, 14)


def test_steady_per_step_leaves_the_warm_up_out():
    stamps = [3.0, 3.5, 4.5, 5.5, 6.5]  # step 0 ends at 3 s (start-up and a slow first step), then 1 s per step
    assert bench.steady_per_step(stamps, 1) == pytest.approx(0.875)
    assert bench.steady_per_step(stamps, 2) == pytest.approx(1.0)
    for bad in (0, 5):
        with pytest.raises(ValueError):
            bench.steady_per_step(stamps, bad)


def test_the_check_passes_a_quiet_machine():
    assert bench.check_cycle(1.12, 1.10, [1.15, 1.08], 0.10) == ""


def test_the_check_refuses_the_issue_24_measurement():
    """Issue #24: 1.12 s/step alone, 4.46 s/step inside the old benchmark (beside the app's lingering processes)."""
    why = bench.check_cycle(1.12, 1.12, [4.464], 0.10)
    assert "right after the app" in why and "1.1200" in why and "4.4640" in why


def test_the_check_allows_slow_drift_between_the_lone_runs_but_not_outside_them():
    assert bench.check_cycle(1.10, 1.25, [1.18, 1.22], 0.10) == ""  # drifted 14 %: the beside runs lie between
    assert bench.check_cycle(1.10, 1.25, [1.40], 0.10) != ""         # 12 % above the slower lone run
    assert bench.check_cycle(1.10, 1.25, [0.97], 0.10) != ""         # 12 % below the faster one


def test_the_check_refuses_a_machine_that_drifted_too_fast():
    assert "drifted too fast" in bench.check_cycle(1.0, 1.25, [1.1], 0.10)


def test_the_apps_split_from_run_json():
    run = {"rounds": [{"seconds": 5.0, "ended": 15.0, "images": 16, "user-compute": 4.0, "provider-compute": 0.5},
                      {"seconds": 1.0, "ended": 16.1, "images": 16, "user-compute": 0.6, "provider-compute": 0.3},
                      {"seconds": 1.2, "ended": 17.4, "images": 16, "user-compute": 0.7, "provider-compute": 0.3},
                      {"seconds": 0.4, "ended": 17.9, "images": 0, "user-compute": 0.3, "provider-compute": 0.0}],
           "timing": {"wait": 6.0, "steps": 4}}
    split = bench.app_split(run, warmup=1)
    assert split["round"] == pytest.approx(1.1)
    assert split["user"] == pytest.approx(0.65)
    assert split["provider"] == pytest.approx(0.3)
    assert split["messaging"] == pytest.approx(0.15)
    assert split["waiting"] == pytest.approx(1.5)
    assert split["steady"] == pytest.approx(1.2)  # (17.4 − 15.0) / 2: round ends, the warm-up and last round out
    row = {"config": "64x16", "in-process steady": 1.0, "in-process whole-run": 1.05, "Flower whole-run": 1.2,
           "Flower steady": split["steady"], "speed Flower÷in-process": 0.875, "per cycle": "0.86 0.88 0.90",
           **split, "between rounds": 0.1}
    text = bench.table([row])
    assert text.splitlines()[2].startswith("| 64x16 | 1.000 | 1.050 | 1.200 | 1.200 | 0.88 | 0.86 0.88 0.90 | 1.100 |")


def test_ray_sessions_name_their_driver():
    line = "raylet --session_dir=/tmp/ray/session_2026-11-30_13-07-44_526273_28696 --foo"
    assert bench.RAY_SESSION.search(line).group(1) == "28696"


def test_a_run_is_waited_for_until_its_processes_are_gone(tmp_path):
    run_dir = tmp_path / "run-that-lingers"
    child = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(60)", str(run_dir)])
    try:
        prev = bench.Run("app", 1, run_dir, [])
        assert child.pid in {p.pid for p in bench.leftovers(prev)}
        with pytest.raises(SystemExit, match="still alive after 0.3 s"):
            bench.wait_until_gone(prev, timeout=0.3)
    finally:
        child.kill()
        child.wait()
    assert child.pid not in {p.pid for p in bench.leftovers(prev)}


def test_recorded_commands_name_no_path_of_the_machine(tmp_path):
    """results_steps_*.json is committed: its commands say python, repo-relative paths and $BENCH."""
    base = tmp_path / "bench-steps-x"
    cmd = [sys.executable, str(bench.ROOT / "benchmarks" / "bench_steps.py"), "--reference",
           str(base / "01-ref"), "--classifier", str(base / "psi.pt")]
    assert bench.shown(cmd, base) == ("python benchmarks/bench_steps.py --reference $BENCH/01-ref "
                                            "--classifier $BENCH/psi.pt")
