"""No silent wrong results, no hangs: bad sizes, classes and paths are refused up front with one clear line;
Ctrl-C stops a simulation within seconds and the rerun resumes; results go to stdout, progress never does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from pp_flower.config import format_run_config
from pp_flower.errors import PPFlowerError
from tests.conftest import processes_with

ROOT = Path(__file__).resolve().parents[1]


def write_image_folder(root: Path, classes: list[str], per_class: int, size: int) -> Path:
    """A tiny ImageFolder tree (train/ and test/) of random PNGs."""
    from torchvision.utils import save_image

    g = torch.Generator().manual_seed(0)
    for part in ("train", "test"):
        for name in classes:
            (root / part / name).mkdir(parents=True)
            for i in range(per_class):
                save_image(torch.rand(3, size, size, generator=g), root / part / name / f"{i}.png")
    return root


def _run(module: str, *args, env=None, timeout=600, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


# --------------------------------------------------------------------------------------------- Flower pin


def test_flower_patches_refuse_another_flower_version():
    from runtime.flower_patches import FLWR_SERIES, check_flower_version

    check_flower_version(f"{FLWR_SERIES}.7")
    refusal = r"flwr 1\.43\.0 is installed, but pp-flower patches internals of flwr 1\.42"
    with pytest.raises(PPFlowerError, match=refusal):
        check_flower_version("1.43.0")


def test_installed_flower_is_the_one_the_patches_were_written_for():
    """Fails with the guard's own message (what to install, where the patches are) when flwr was upgraded."""
    from runtime.flower_patches import check_flower_version

    try:
        check_flower_version()
    except PPFlowerError as exc:
        pytest.fail(str(exc))


# ------------------------------------------------------------------------------------ sizes and classes


def test_image_sizes_the_unet_cannot_take_are_refused_up_front(tmp_path, classifier_ckpt, two_user_run):
    data = write_image_folder(tmp_path / "d28", ["a", "b"], 4, 28)
    rc = format_run_config({"classifier": str(classifier_ckpt), "data-dir": str(data), "unet-depth": 4,
                            "run-dir": str(tmp_path / "run")})
    proc = _run("runtime.flower_simulation", "--num-supernodes", 1, "--run-config", rc, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "28×28" in proc.stderr and "unet-depth=2" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
    # the attacker's U-Net (depth 4) cannot take them either; h_θ of the tiny run (depth 2) could
    _, run_dir = two_user_run
    proc = _run("cli.ppflower", "attack", "--transform", run_dir / "user-0" / "best.pt", "--data-dir", data,
                "--out", tmp_path / "attack", "--epochs", 1)
    assert proc.returncode == 2 and "--unet-depth" in proc.stderr and "unet-depth=2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_classifier_classes_must_match_the_data(tmp_path, classifier_ckpt):
    from pp_flower.config import AppConfig, preflight

    three = write_image_folder(tmp_path / "three", ["cat", "dog", "frog"], 2, 32)
    cfg = AppConfig(classifier=str(classifier_ckpt), data_dir=str(three))
    with pytest.raises(PPFlowerError, match=r"trained on airplane, .* but the data has 3 classes \(cat, dog, frog\)"):
        preflight(cfg)


def test_a_one_class_data_set_is_refused(tmp_path):
    from pp_flower.data import load_datasets

    one = write_image_folder(tmp_path / "one", ["cat"], 2, 32)
    with pytest.raises(PPFlowerError, match="needs at least 2 classes"):
        load_datasets(one)


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-5"], "--lr must be > 0"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_train_classifier_refuses_bad_numbers(tmp_path, args, message):
    proc = _run("cli.ppflower", "train-classifier", "--out", tmp_path / "c", *args, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c" / "last.pt").exists()


def test_an_unwritable_run_dir_is_refused_before_any_work(tmp_path, classifier_ckpt):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc = format_run_config({"classifier": str(classifier_ckpt), "run-dir": str(blocker / "run")})
    proc = _run("runtime.flower_simulation", "--num-supernodes", 1, "--run-config", rc, timeout=300)
    assert proc.returncode == 2 and "run-dir" in proc.stderr and "not a writable directory" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr  # refused before Ray started


def test_an_unwritable_output_directory_is_one_clear_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = _run("cli.ppflower", "train-classifier", "--epochs", 1, "--limit-train", 64, "--limit-eval", 16,
                "--out", blocker / "out", timeout=300)
    assert proc.returncode == 2 and "not a writable directory" in proc.stderr and str(blocker) in proc.stderr
    assert "Traceback" not in proc.stderr and blocker.read_text() == "not a directory"


# ---------------------------------------------------------------------------------------- exit codes


def test_a_run_whose_users_ended_without_metrics_is_an_error(tmp_path):
    from sims.main import report_run

    run = {"users": [{"index": 0, "test": {"test-accuracy": 0.4, "protected-psnr": 9.0}},
                     {"index": 1, "test": {"test-accuracy": float("nan"), "protected-psnr": 9.0}},
                     {"index": 2, "test": {}}]}
    (tmp_path / "run.json").write_text(json.dumps(run))
    lines = []
    with pytest.raises(PPFlowerError, match=r"User\(s\) 1, 2 of 3 ended without finite test metrics"):
        report_run({"run-dir": str(tmp_path)}, lines.append)
    assert lines[0].startswith("user 0: test accuracy 0.4000")
    run["users"] = run["users"][:1]
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert report_run({"run-dir": str(tmp_path)}, lines.append)["users"][0]["index"] == 0


def test_zero_users_are_refused_at_once(tmp_path):
    proc = _run("runtime.flower_simulation", "--num-supernodes", 0, timeout=120)
    assert proc.returncode == 2 and "--num-supernodes must be at least 1" in proc.stderr
    proc = _run("cli.ppflower", "deploy-local", "--users", 0, "--workdir", tmp_path / "d", timeout=120)
    assert proc.returncode == 2 and "--users must be at least 1" in proc.stderr
    assert not (tmp_path / "d").exists()


# -------------------------------------------------------------------------------------- stdout is data


def test_classify_writes_only_results_to_stdout(tmp_path, classifier_ckpt, splits):
    """`ppflower classify DIR > labels.tsv`: progress must not land in the file (progress is on by default)."""
    from torchvision.utils import save_image

    from pp_flower.data import to_float

    for i in range(3):
        save_image(to_float(splits.test.images[i]), tmp_path / f"img{i}.png")
    env = {k: v for k, v in os.environ.items() if k != "PPFLOWER_QUIET"}
    proc = subprocess.run([sys.executable, "-m", "cli.ppflower", "classify", "--classifier", str(classifier_ckpt),
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["img0.png", "img1.png", "img2.png"]
    assert all(len(line.split("\t")) == 2 for line in lines) and "\x1b[" not in proc.stdout
    assert "Classifying" not in proc.stderr  # stderr is not a terminal here: no progress bar at all


# ------------------------------------------------------------------------------------------------ Ctrl-C


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := condition()):
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _long_simulation(tmp_path, classifier_ckpt, **popen):
    """A 1-user, 8-epoch flower-simulation with a resume point every step, started in its own session:
    (proc, argv, env, marker, run dir, its resume point)."""
    from tests.test_flower_app import TINY

    run_dir = tmp_path / "run"
    rc = format_run_config({**TINY, "classifier": str(classifier_ckpt), "run-dir": str(run_dir), "epochs": 8,
                            "checkpoint-every": 1})
    argv = [sys.executable, "-m", "runtime.flower_simulation", "--num-supernodes", "1", "--run-config", rc]
    marker = f"PPF_TEST_{uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), marker: "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, cwd=ROOT, start_new_session=True, **popen)
    return proc, argv, env, marker, run_dir, run_dir / "user-0" / "resume.pt"


@pytest.mark.slow
def test_ctrl_c_stops_a_simulation_at_once_and_the_rerun_resumes(tmp_path, classifier_ckpt):
    proc, argv, env, marker, run_dir, resume = _long_simulation(tmp_path, classifier_ckpt, stderr=subprocess.PIPE,
                                                                text=True)

    def trained_a_few_steps():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before Ctrl-C: {proc.communicate()[1][-2000:]}")
        return resume.exists() and torch.load(resume, weights_only=True)["progress"]["step"] >= 4

    _wait_for(trained_a_few_steps, 300, "4 steps")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("one Ctrl-C did not stop flower-simulation within 60 s")
    assert proc.returncode == 130, stderr[-2000:]
    assert "rerun the same command to resume" in stderr and "Traceback" not in stderr
    _wait_for(lambda: not processes_with(marker), 60, "every process of the run (Ray's included) to exit")
    assert not (run_dir / "run.json").exists()
    stopped_at = torch.load(resume, weights_only=True)["progress"]["step"]

    again = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from its resume point" in again.stdout + again.stderr
    run = json.loads((run_dir / "run.json").read_text())
    user = run["users"][0]
    assert user["steps-applied"] == 8 * 3 and stopped_at >= 4
    assert len(json.loads((run_dir / "user-0" / "metrics.json").read_text())["val-transform-loss-curve"]) == 8
    _wait_for(lambda: not processes_with(marker), 60, "every process of the rerun to exit")


def test_a_diverging_training_run_stops_with_a_clear_error(small_splits, tmp_path):
    from pp_flower.classifier import ClassifierConfig, train_classifier

    with pytest.raises(PPFlowerError, match=r"the loss became .*nan.* lower the learning rate"):
        train_classifier(small_splits, tmp_path, ClassifierConfig(epochs=1, batch_size=64, lr=1e12),
                         log=lambda *a: None)
    assert not (tmp_path / "metrics.json").exists()


def test_version_and_toml_run_config():
    from pp_flower.config import parse_run_config

    proc = _run("cli.ppflower", "--version", timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("pp-flower 0.") and "flwr 1.42" in proc.stdout
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write('alpha = 0.01\nclassifier = "runs/c/best.pt"\n')
    assert parse_run_config(f.name) == {"alpha": 0.01, "classifier": "runs/c/best.pt"}
    os.unlink(f.name)


@pytest.fixture(scope="module")
def small_splits(data_dir):
    from pp_flower.data import load_splits

    return load_splits(data_dir, limit_train=256, limit_eval=32)


@pytest.mark.slow
def test_a_closed_terminal_stops_a_simulation_whose_output_is_gone(tmp_path, classifier_ckpt):
    """SIGHUP after the terminal (or the parent reading the output) is gone: writing the resume line fails, and
    the run must still end and take Ray's processes with it, not hang on Flower's threads (seen: a driver left
    waiting forever after its parent was killed)."""
    proc, _, _, marker, _, resume = _long_simulation(tmp_path, classifier_ckpt, stderr=subprocess.STDOUT)
    _wait_for(lambda: proc.poll() is None and resume.exists(), 300, "the first resume point")
    proc.stdout.close()  # the reader is gone: every write now fails with EPIPE
    os.killpg(proc.pid, signal.SIGHUP)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("flower-simulation did not end within 90 s of SIGHUP with its output gone")
    # 130 when the signal comes first; a write that fails before the signal is handled ends the run with 1 (seen on
    # a loaded machine). Either way it ends, takes Ray with it, and leaves its resume point for a rerun.
    assert proc.returncode in (130, 1)
    _wait_for(lambda: not processes_with(marker), 60, "every process of the run (Ray's included) to exit")
    assert torch.load(resume, weights_only=True)["progress"]["step"] >= 1


def test_the_interrupt_path_exits_even_when_its_resume_line_cannot_be_written(monkeypatch):
    """The fix behind the test above, without its race: with stdout and stderr gone, stopping on an interrupt still
    reaches os._exit (before, the failed write skipped it and Flower's threads, blocked on the stopped Ray, held
    the process forever)."""
    import ray

    from runtime import flower_simulation, signals

    class Gone:
        def write(self, *_):
            raise BrokenPipeError(32, "Broken pipe")

        flush = write

    exits = []
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(flower_simulation, "_quiet_logs", lambda: None)
    monkeypatch.setattr(flower_simulation.os, "_exit", exits.append)
    monkeypatch.setattr(signals.signal, "signal", lambda *_: None)  # the resume line ignores further signals
    monkeypatch.setattr(sys, "stdout", Gone())
    monkeypatch.setattr(sys, "stderr", Gone())
    flower_simulation.stop_on_interrupt("a run dir")
    assert exits == [130]
