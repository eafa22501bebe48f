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
