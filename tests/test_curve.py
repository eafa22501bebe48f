"""The learning curve (pp_flower.curve): it trains the in-process reference's h_θ step for step, resumes to the
same weights, and measures what its docstring says."""

from __future__ import annotations

import json

import pytest
import torch

from pp_flower.curve import CurveConfig, measure, pairwise_rms, run_curve
from pp_flower.data import load_splits
from pp_flower.features import load_feature_net
from pp_flower.models import ResNet20

TINY = dict(unet_base=4, unet_depth=2, batch_size=8, eval_every=2, eval_images=12, precision="fp32")


@pytest.fixture(scope="module")
def small(data_dir):
    return load_splits(data_dir, limit_train=64, limit_eval=24)


def _psi(seed: int) -> ResNet20:
    torch.manual_seed(seed)
    return ResNet20().eval().requires_grad_(False)


def test_curve_trains_exactly_the_in_process_reference_and_resumes_to_the_same_weights(tmp_path, small, vgg_weights):
    from pp_flower.reference import train_in_process
    from pp_flower.data import user_shards

    phi, psi = load_feature_net(vgg_weights), _psi(1)
    cfg = CurveConfig(**TINY)
    whole = run_curve(small, psi, None, phi, cfg, 5, tmp_path / "a", tmp_path / "wa", log=lambda *_: None)
    # the same 5 steps in two sittings: 3, then a rerun of the same command extended to 5
    run_curve(small, psi, None, phi, cfg, 3, tmp_path / "b", tmp_path / "wb", log=lambda *_: None)
    resumed = run_curve(small, psi, None, phi, cfg, 5, tmp_path / "b", tmp_path / "wb", log=lambda *_: None)
    assert [p["step"] for p in whole["points"]] == [0, 2, 4, 5]
    assert [p["step"] for p in resumed["points"]] == [0, 2, 3, 4, 5]  # the point at the first sitting's end stays
    for a, b in zip(whole["points"], [p for p in resumed["points"] if p["step"] != 3]):
        assert a["val-l-trans"] == b["val-l-trans"] and a["psi-accuracy"] == b["psi-accuracy"]

    ids = small.train_ids[user_shards(len(small.train_ids), 1, "iid", 0)[0]]
    net, _ = train_in_process(cfg.app_config(), psi, phi, small.train_all.images, small.train_all.labels, ids,
                              max_steps=5)
    for name in ("wa", "wb"):
        state = torch.load(tmp_path / name / "last.pt", weights_only=True)["net"]
        for key, value in net.state_dict().items():
            assert torch.equal(state[key], value), (name, key)
    doc = json.loads((tmp_path / "a" / "curve.json").read_text())
    assert doc["path"].startswith("in-process reference") and doc["n-train"] == 64 and doc["n-eval"] == 12


def test_a_resume_point_of_another_recipe_is_refused(tmp_path, small, vgg_weights):
    from pp_flower.errors import PPFlowerError

    phi, psi = load_feature_net(vgg_weights), _psi(1)
    run_curve(small, psi, None, phi, CurveConfig(**TINY), 2, tmp_path / "o", tmp_path / "w", log=lambda *_: None)
    with pytest.raises(PPFlowerError, match="another curve configuration"):
        run_curve(small, psi, None, phi, CurveConfig(**{**TINY, "lr": 0.05}), 4, tmp_path / "o", tmp_path / "w",
                  log=lambda *_: None)


def test_measure_reports_collapse_saturation_and_the_observer(small, vgg_weights):
    phi, psi, observer = load_feature_net(vgg_weights), _psi(1), _psi(2)
    x = small.val.images[:12].float() / 255
    y = small.val.labels[:12]

    class Constant(torch.nn.Module):  # every input to one saturated image: the collapse the curve must show
        def forward(self, inp):
            return torch.ones_like(inp)

    class Identity(torch.nn.Module):
        def forward(self, inp):
            return inp

    collapsed, _ = measure(Constant(), psi, observer, phi, x, y, 0.005)
    assert collapsed["pairwise-rms"] == 0.0 and collapsed["saturated-fraction"] == 1.0
    plain, xhat = measure(Identity(), psi, observer, phi, x, y, 0.005)
    assert torch.equal(xhat, x) and plain["val-l-feat"] == 0.0
    assert plain["pairwise-rms"] == pytest.approx(pairwise_rms(x)) and plain["pairwise-rms"] > 0.1
    assert plain["observer-accuracy"] == (observer(x).argmax(1) == y).float().mean().item()
    assert plain["psi-accuracy"] == (psi(x).argmax(1) == y).float().mean().item()
    assert plain["ssim-protected-median"] == pytest.approx(1.0)
