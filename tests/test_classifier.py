import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pp_flower.checkpoints import load_checkpoint, load_classifier, load_transform_net
from pp_flower.errors import PPFlowerError

ARGS = ["--model", "resnet20", "--epochs", "2", "--limit-train", "384", "--limit-eval", "100", "--batch-size", "32",
        "--checkpoint-every", "1", "--device", "cpu"]


def _cli(out, *extra):
    return [sys.executable, "-m", "cli.ppflower", "train-classifier", *ARGS, "--out", str(out), *extra]


def test_train_classifier_writes_checkpoint_and_metrics(classifier_ckpt):
    from pp_flower.classifier import evaluate
    from pp_flower.data import load_splits

    metrics = json.loads((classifier_ckpt.parent / "metrics.json").read_text())
    small = load_splits(os.environ["PPFLOWER_DATA_DIR"], limit_train=512, limit_eval=200)  # as the fixture trained it
    again = evaluate(load_classifier(classifier_ckpt)[0], small.test, "cpu")
    assert metrics["test-accuracy"] == again["accuracy"] and metrics["n-test"] == 200  # best.pt's, on the test split
    assert len(metrics["history"]) == 1 and "val-loss" in metrics["history"][0]
    model, blob = load_classifier(classifier_ckpt)
    assert blob["arch"] == "resnet20" and not model.training


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL mid-run, restart: it resumes from last.pt and ends exactly where an uninterrupted run ends."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cli(full), check=True, capture_output=True, env={**os.environ, "PPFLOWER_QUIET": "1"})
    proc = subprocess.Popen(_cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PPFLOWER_QUIET": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "last.pt").exists() and proc.poll() is None:
            blob = torch.load(killed / "last.pt", weights_only=True)
            if blob["progress"]["step"] >= 3 or blob["progress"]["epoch"] >= 1:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    resumed = subprocess.run(_cli(killed), check=True, capture_output=True, text=True,
                             env={**os.environ, "PPFLOWER_QUIET": "1"})
    assert "Resuming from" in resumed.stdout
    a = load_checkpoint(full / "last.pt", "classifier")["state_dict"]
    b = load_checkpoint(killed / "last.pt", "classifier")["state_dict"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key
    m = json.loads((killed / "metrics.json").read_text())
    assert len(m["history"]) == 2


def test_wrong_checkpoint_kind_is_refused(classifier_ckpt, tmp_path):
    with pytest.raises(PPFlowerError, match="holds a classifier ψ trained on plain images, but a transformation"):
        load_transform_net(classifier_ckpt)
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PPFlowerError, match="is not a pp-flower checkpoint"):
        load_classifier(tmp_path / "x.pt")
    with pytest.raises(PPFlowerError, match="does not exist"):
        load_classifier(tmp_path / "missing.pt")
