"""Shared fixtures. Real data and φ weights come from ../shared (or PPFLOWER_DATA_DIR / PPFLOWER_VGG_WEIGHTS)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# every process a test starts inherits this marker: at the end no process may still carry it (pytest_sessionfinish)
SESSION_MARKER = f"PPFLOWER_TEST_SESSION_{uuid.uuid4().hex}"
os.environ[SESSION_MARKER] = "1"
SHARED = ROOT.parent / "shared"
os.environ.setdefault("PPFLOWER_QUIET", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
if not os.environ.get("PPFLOWER_DATA_DIR") and (SHARED / "data" / "cifar10-jpeg").is_dir():
    os.environ["PPFLOWER_DATA_DIR"] = str(SHARED / "data" / "cifar10-jpeg")
if not os.environ.get("PPFLOWER_VGG_WEIGHTS") and (SHARED / "weights" / "vgg16_imagenet_features_0-15.pth").is_file():
    os.environ["PPFLOWER_VGG_WEIGHTS"] = str(SHARED / "weights" / "vgg16_imagenet_features_0-15.pth")


def _require(var: str) -> str:
    value = os.environ.get(var)
    if not value or not Path(value).exists():
        pytest.fail(f"{var} is not set to an existing path; the tests need the real CIFAR-10 images and VGG16 weights "
                    "(../shared has both).")
    return value


@pytest.fixture(scope="session")
def data_dir() -> str:
    return _require("PPFLOWER_DATA_DIR")


@pytest.fixture(scope="session")
def vgg_weights() -> str:
    return _require("PPFLOWER_VGG_WEIGHTS")


@pytest.fixture(scope="session")
def splits(data_dir):
    from pp_flower.data import load_splits

    return load_splits(data_dir)


@pytest.fixture(scope="session")
def classifier_ckpt(tmp_path_factory, splits) -> Path:
    """A small ψ (ResNet-20) trained briefly on real images — enough for gradients to carry signal."""
    from pp_flower.classifier import ClassifierConfig, train_classifier
    from pp_flower.data import load_splits

    out = tmp_path_factory.mktemp("classifier")
    small = load_splits(os.environ["PPFLOWER_DATA_DIR"], limit_train=512, limit_eval=200)
    train_classifier(small, out, ClassifierConfig(epochs=1, batch_size=64), log=lambda *a: None)
    return out / "best.pt"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def two_user_run(tmp_path_factory, classifier_ckpt):
    """A finished 2-user Flower simulation (tiny), with every message recorded: (log, run_dir)."""
    from tests.test_flower_app import TINY
    from pp_flower.config import AppConfig
    from runtime.flower_simulation import simulate
    from sims.main import client_app, make_server_app, start_trainers

    run_dir = tmp_path_factory.mktemp("two-users") / "run"
    log = []
    config = AppConfig.from_run_config({**TINY, "classifier": str(classifier_ckpt), "run-dir": str(run_dir),
                                        "epochs": 1}).to_run_config()
    simulate(make_server_app(lambda direction, msg: log.append((direction, msg))), client_app, 2, config,
             start_trainers=start_trainers)
    return log, run_dir


def processes_with(marker: str) -> list[int]:
    """Live processes (zombies aside) whose environment carries ``marker``, this one excluded."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            ours = marker.encode() in (entry / "environ").read_bytes()
            if ours and "\nState:\tZ" not in (entry / "status").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def pytest_sessionfinish(session, exitstatus):
    """No suite run leaves a process behind: after Ray's shutdown, wait (up to 60 s) for every process any test
    started — Ray's, SuperLinks, SuperNodes, trainers — to exit; report and fail the run if one survives."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
    deadline = time.monotonic() + 60
    while (left := processes_with(SESSION_MARKER)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        names = []
        for pid in left:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(bytes(1), b" ").decode()
                names.append(f"{pid}: {cmdline[:200]}")
            except OSError:
                continue
        if names:
            print("\nprocesses left behind by the test session:\n  " + "\n  ".join(names))
            session.exitstatus = 1
