import pytest
import torch

from pp_flower.errors import PPFlowerError
from pp_flower.features import load_feature_net


def test_phi_relu2_2_shape_and_shipped_weights(vgg_weights):
    phi = load_feature_net(vgg_weights)
    assert phi(torch.rand(2, 3, 32, 32)).shape == (2, 128, 16, 16)
    conv0 = phi.features[0]
    # torchvision's published VGG16 IMAGENET1K_V1 values
    assert torch.allclose(conv0.bias[:3], torch.tensor([0.4034, 0.3778, 0.4644]), atol=1e-4)
    assert torch.allclose(conv0.weight[0, 0, 0], torch.tensor([-0.5537, 0.1427, 0.5290]), atol=1e-4)
    assert not any(p.requires_grad for p in phi.parameters())
    phi.train()
    assert not phi.training  # φ stays frozen in eval mode


def test_phi_layer_is_configurable(vgg_weights):
    assert load_feature_net(vgg_weights, layer=16)(torch.rand(1, 3, 32, 32)).shape == (1, 256, 8, 8)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(PPFlowerError, match="does not exist.*--vgg-weights"):
        load_feature_net(tmp_path / "nope.pth")


def test_incomplete_weights_are_refused(tmp_path, vgg_weights):
    state = torch.load(vgg_weights, weights_only=True)
    del state["features.7.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(PPFlowerError, match="features.7.weight"):
        load_feature_net(tmp_path / "partial.pth")
    with pytest.raises(PPFlowerError, match="not a state dict|Cannot read"):
        (tmp_path / "junk.pth").write_text("junk")
        load_feature_net(tmp_path / "junk.pth")


def test_phi_layers_equal_torchvisions_vgg16(vgg_weights):
    """φ is built without importing torchvision (ClientApp start-up); it must equal torchvision's VGG16."""
    from torchvision.models.vgg import cfgs, make_layers

    from pp_flower.features import vgg16_features

    ours, theirs = vgg16_features(16), make_layers(cfgs["D"])[:16]
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(ours(x), theirs(x))


# ---------------------------------------------------------------- φ's weights travel as an argument (issue #27)

def test_no_code_writes_the_user_facing_path_variables():
    """PPFLOWER_VGG_WEIGHTS / _DATA_DIR / _CACHE_DIR are read at the edge; our code passes paths as arguments."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"os\.environ\[\s*[\"']PPFLOWER_(VGG_WEIGHTS|DATA_DIR|CACHE_DIR)[\"']\s*\]\s*=|"
                         r"os\.environ\.setdefault\(\s*[\"']PPFLOWER_(VGG_WEIGHTS|DATA_DIR|CACHE_DIR)")
    writers = [str(p.relative_to(root)) for d in ("pp_flower", "strategies", "sims", "runtime", "experiments", "cli")
               for p in (root / d).rglob("*.py") if pattern.search(p.read_text())]
    assert not writers, f"these set a user-facing path variable instead of passing the path on: {writers}"


def test_attack_hands_vgg_weights_down_without_the_environment(tmp_path, monkeypatch, vgg_weights):
    """`ppflower attack --vgg-weights W` reaches attack_targets as an argument; train_attack loads φ from it."""
    from typer.testing import CliRunner

    import pp_flower.evaluation
    from cli.ppflower import app

    monkeypatch.delenv("PPFLOWER_VGG_WEIGHTS", raising=False)
    seen = {}
    monkeypatch.setattr(pp_flower.evaluation, "attack_targets", lambda **kwargs: seen.update(kwargs))
    result = CliRunner().invoke(app, ["attack", "--baseline", "pixel", "--key", "1", "--vgg-weights", str(vgg_weights),
                                      "--out", str(tmp_path / "atk"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert str(seen["vgg_weights"]) == str(vgg_weights)
    assert "PPFLOWER_VGG_WEIGHTS" not in __import__("os").environ


def test_train_attack_loads_phi_from_its_vgg_weights_argument(tmp_path, monkeypatch, data_dir, vgg_weights):
    from dataclasses import replace

    import pp_flower.features
    from pp_flower.attack import AttackConfig, train_attack
    from pp_flower.data import ImageSet, load_splits

    s = load_splits(data_dir, limit_train=64, limit_eval=16)
    crop = lambda part: ImageSet(part.images[:, :, 12:20, 12:20].contiguous(), part.labels, part.classes)  # noqa: E731
    toy = replace(s, train=crop(s.train), val=crop(s.val), test=crop(s.test))
    monkeypatch.delenv("PPFLOWER_VGG_WEIGHTS", raising=False)
    real, paths = pp_flower.features.load_feature_net, []
    monkeypatch.setattr(pp_flower.features, "load_feature_net",
                        lambda weights=None, *a, **k: paths.append(weights) or real(weights, *a, **k))
    cfg = AttackConfig(epochs=1, batch_size=32, unet_base=4, unet_depth=2, perceptual=0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_attack(lambda x: 1 - x, toy, tmp_path / "atk", cfg, vgg_weights=vgg_weights, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    assert paths == [vgg_weights]
