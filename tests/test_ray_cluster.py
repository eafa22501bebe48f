"""The simulation attaches to a separately started Ray cluster (here a head on loopback) instead of its own."""

from __future__ import annotations

import pytest
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.deploy_local import free_port
from pp_flower.config import format_run_config
from tests.test_flower_app import TINY

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_simulation_runs_on_a_separately_started_ray_head(tmp_path, classifier_ckpt):
    """The head (and so every user's trainer) was started elsewhere: another working directory, another
    PPFLOWER_DATA_DIR, no PPFLOWER_VGG_WEIGHTS. The users must still read the driver's data set and φ, and a
    relative run dir must land in the driver's directory (issue 23, kind 12)."""
    from tests.test_run_faults import _tiny_image_folder

    port = free_port()
    # a temp dir of its own: other Ray drivers on this machine must not discover this cluster by accident
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    head_env = {**env, "PPFLOWER_DATA_DIR": str(_tiny_image_folder(tmp_path / "other-data"))}
    head_env.pop("PPFLOWER_VGG_WEIGHTS", None)
    (tmp_path / "head").mkdir()
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2", "--block",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=head_env,
                            start_new_session=True, cwd=tmp_path / "head")
    try:
        deadline = time.time() + 120
        while subprocess.run([str(BIN / "ray"), "status", f"--address=127.0.0.1:{port}"], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None, head.stdout.read()
            assert time.time() < deadline, "the Ray head did not come up"
            time.sleep(1)
        driver = tmp_path / "driver"
        driver.mkdir()
        run_dir = driver / "runs" / "sim"
        rc = format_run_config({**TINY, "classifier": str(classifier_ckpt), "run-dir": "runs/sim", "epochs": 1})
        root = Path(__file__).resolve().parents[1]
        sim = subprocess.Popen([sys.executable, "-m", "runtime.flower_simulation", "--num-supernodes", "2",
                                "--ray-address", f"127.0.0.1:{port}", "--run-config", rc],
                               env={**env, "PYTHONPATH": str(root)}, cwd=driver, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        output, _ = sim.communicate(timeout=600)
        assert sim.returncode == 0, output[-3000:]
        # the simulation's driver and its ClientApp actors ran in the head's session (not a Ray of their own)
        logs = Path(temp_dir) / "session_latest" / "logs"
        assert list(logs.glob(f"python-core-driver-*_{sim.pid}.log")), sorted(p.name for p in logs.iterdir())
        assert any("ClientAppActor" in p.read_text(errors="replace") for p in logs.glob("worker-*.err"))
        run = json.loads((run_dir / "run.json").read_text())
        assert [u["steps-applied"] for u in run["users"]] == [2, 2]
        assert all(u["test"] for u in run["users"])
        assert not (tmp_path / "head" / "runs").exists()  # nothing landed in the head's working directory
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the cluster's processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
