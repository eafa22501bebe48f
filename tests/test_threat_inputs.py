"""The threat model's new inputs (issue #22): label inference, the wire and the restorer options, as a user meets
them — each fault one clear line, no silent wrong result, nothing lost."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pp_flower.errors import PPFlowerError


def _attack(*args: str):
    from typer.testing import CliRunner

    from cli.ppflower import app

    result = CliRunner().invoke(app, ["attack", *args])
    return result.exit_code, (result.output or "") + str(result.exception or "")


def test_label_inference_of_a_run_is_what_each_user_measured(two_user_run):
    """`ppflower attack --labels` recomputes from the kept gradients exactly what each user reported, above chance
    is not asserted here (a 1-epoch toy run): equality with the user's own measurement is."""
    from pp_flower.evaluation import label_inference

    _, run_dir = two_user_run
    reports = label_inference(run_dir, out=run_dir / "labels-out")
    assert [r["user"] for r in reports] == [0, 1]
    for r in reports:
        mine = json.loads((run_dir / f"user-{r['user']}" / "metrics.json").read_text())["label-leakage"]
        assert {k: r[k] for k in mine} == mine and r["chance"] == 0.1 and r["n-images"] > 10
    assert json.loads((run_dir / "labels-out" / "labels.json").read_text())["users"] == reports
    # every user's checkpoints say which wire their x̂ travelled on (an attack on a lone checkpoint needs it)
    from pp_flower.checkpoints import load_transform_net

    assert load_transform_net(run_dir / "user-0" / "best.pt")[1]["wire"] == "uint8"


def test_label_inference_faults_are_one_line(two_user_run, tmp_path):
    from pp_flower.evaluation import label_inference, wire_of_run
    from tests.test_robustness import write_image_folder

    _, run_dir = two_user_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.lock"))
    small = write_image_folder(tmp_path / "small", ["a", "b"], 2, 32)  # other data: the probe's ids lie beyond it
    with pytest.raises(PPFlowerError, match="not the run's data"):
        label_inference(copy, data_dir=small, out=tmp_path / "o1")
    (copy / "user-1" / "label-probe.pt").write_text("hello")  # garbage where a probe should be
    with pytest.raises(PPFlowerError, match="user-1/label-probe.pt: cannot read a LabelProbe"):
        label_inference(copy, out=tmp_path / "o2")
    for text in ("[1, 2]", '{"config": "x"}', '{"config": {"wire": "bogus"}}', "{"):
        (copy / "run.json").write_text(text)
        with pytest.raises(PPFlowerError) as refused:
            wire_of_run(copy)
        assert "\n" not in str(refused.value) and "run.json" in str(refused.value)


@pytest.mark.parametrize("args,needle", [
    (["--labels"], "--labels needs --run-dir"),
    (["--labels", "--run-dir", "{run}", "--strong"], "--strong"),
    (["--labels", "--run-dir", "{run}", "--wire", "bogus"], "--wire"),
    (["--labels", "--run-dir", "{run}", "--baseline", "tanaka"], "--baseline"),
    (["--transform", "{run}/user-0/best.pt", "--restorer-lr", "0.02"], "--restorer-lr"),
    (["--transform", "{run}/user-0/best.pt", "--restorer-lr", "0"], "--restorer-lr"),
    (["--transform", "{run}/user-0/best.pt", "--restorer-perceptual-weight", "nan"], "--restorer-perceptual-weight"),
    (["--transform", "{run}/user-0/best.pt", "--wire", "uint16"], "--wire"),
    (["--transform", "{run}/user-0/best.pt", "--wire", "float32"], "uint8 wire"),  # not the run's: refused
    (["--baseline", "pixel", "--key", "1", "--wire", "float32"], "8-bit"),
    (["--transform", "{run}/user-0/best.pt", "--observer", "{run}"], "is not a file"),
])
def test_attack_options_that_cannot_hold_are_refused_before_any_work(two_user_run, tmp_path, args, needle):
    _, run_dir = two_user_run
    out = tmp_path / "out"
    code, text = _attack(*[a.replace("{run}", str(run_dir)) for a in args], "--out", str(out), "--epochs", "1")
    assert code != 0 and needle in text and "Traceback" not in text, text
    assert not list(out.glob("*/attack.json"))  # nothing trained


def test_the_label_probe_survives_a_resume(tmp_path, splits):
    """A user resumed from its resume point keeps the gradients it had received (else a rerun of a finished run
    would report no label leakage, and a resumed one would measure only what came after the restart)."""
    from pp_flower import protocol
    from pp_flower.user import UserTrainer
    from tests.test_live_users import _meta

    ids = {"train": splits.train_ids[:16].numpy(), "val": splits.val_ids[:8].numpy(),
           "test": splits.test_ids[:8].numpy()}
    grad = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32) * 1e-3
    trainer = UserTrainer(num_threads=1)
    trainer.setup("k", _meta(tmp_path), ids)
    trainer.call("k", 0, "step", {"grad-step": protocol.NO_INDEX, "want": 0})
    trainer.call("k", 0, "step", {"grad-step": 0, "want": protocol.NO_INDEX}, {protocol.GRAD: {"grad": grad}})
    before = trainer.users["k"].probe
    assert len(before) == 16
    trainer.users["k"].save_resume_point()
    again = UserTrainer(num_threads=1)
    again.setup("k2", _meta(tmp_path), ids, resume=True)
    after = again.users["k2"].probe
    assert torch.equal(after.ids(), before.ids()) and torch.equal(after.gradients()[1], before.gradients()[1])
