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
    assert count_parameters(net) == 14_728_266  # 13 conv+BN layers of VGG16 + Linear(512, 10)


def test_unet_range_widths_and_shape():
    net = UNet(base=8)
    for x in (torch.rand(3, 3, 32, 32), torch.full((3, 3, 32, 32), 50.0), torch.full((3, 3, 32, 32), -50.0)):
        y = net(x)
        assert y.shape == x.shape
        assert y.min() >= 0.0 and y.max() <= 1.0
    paper = UNet()  # the paper's widths 64 → 1024
    widths = [block[0].out_channels for block in paper.down]
    assert widths == [64, 128, 256, 512, 1024]
    assert 31_000_000 < count_parameters(paper) < 31_100_000


def test_models_normalise_inside():
    from pp_flower.models import Normalize

    n = Normalize()
    x = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(n(x), torch.zeros_like(x), atol=1e-6)
    assert isinstance(build_classifier("resnet20").normalize, Normalize)
