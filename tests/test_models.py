import pytest
import torch

from pp_flower.models import UNet, build_classifier, count_parameters


def test_resnet20_shape_and_size():
    net = build_classifier("resnet20")
    assert net(torch.rand(4, 3, 32, 32)).shape == (4, 10)
    # He et al.'s ResNet-20 (option-A shortcuts) has 0.27 M parameters
    assert count_parameters(net) == 269_722


def test_vgg16_bn_shape_and_size():
    net = build_classifier("vgg16")
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13 and len(bns) == 13
    # the authors' head (lib/vgg.py): Dropout, 512→512, ReLU, Dropout, 512→512, ReLU, 512→10
    linears = [m for m in net.classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 512), (512, 10)]
    assert sum(isinstance(m, torch.nn.Dropout) for m in net.classifier) == 2
    assert count_parameters(net) == 14_723_136 + 512 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10


def test_unet_range_widths_and_shape():
    net = UNet(base=8)
    for x in (torch.rand(3, 3, 32, 32), torch.full((3, 3, 32, 32), 50.0), torch.full((3, 3, 32, 32), -50.0)):
        y = net(x)
        assert y.shape == x.shape
        assert y.min() >= 0.0 and y.max() <= 1.0
    paper = UNet()  # the paper's widths 64 → 1024
    widths = [block[0].out_channels for block in paper.down]
    assert widths == [64, 128, 256, 512, 1024]


def test_unet_paper_matches_the_authors():
    """The authors' U-Net (lib/unet.py) has 34,527,171 parameters at width 64 (biased convs, Upsample + conv up-path,
    raw input); v0.1's transposed-conv U-Net keeps its 31,037,763."""
    paper = UNet(64, arch="paper")
    assert count_parameters(paper) == 34_527_171
    assert all(m.bias is not None for m in paper.modules() if isinstance(m, torch.nn.Conv2d))
    assert all(isinstance(up[0], torch.nn.Upsample) and up[0].mode == "nearest" for up in paper.up)
    assert isinstance(paper.normalize, torch.nn.Identity)  # raw [0, 1] images, as the authors feed them
    assert count_parameters(UNet(64, arch="ours")) == 31_037_763
    assert UNet(16).arch == "paper"  # the default
    with pytest.raises(ValueError, match="Unknown U-Net"):
        UNet(8, arch="nope")


def test_models_normalise_inside():
    from pp_flower.models import Normalize

    n = Normalize()
    x = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(n(x), torch.zeros_like(x), atol=1e-6)
    assert isinstance(build_classifier("resnet20").normalize, Normalize)
