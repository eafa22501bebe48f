"""The networks: ψ (ResNet-20, VGG16-BN, CIFAR variants) and h_θ (U-Net). All take [0, 1] images.

ImageNet mean/std normalisation is the first layer of every model, as in the reference design, so callers
never normalise by hand and protected images x̂ = h_θ(x) live in the same [0, 1] space as plain ones.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pp_flower.errors import PPFlowerError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIFIERS = ("resnet20", "vgg16")


class Normalize(nn.Module):
    """(x − mean) / std with ImageNet statistics, as a layer."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# --- ResNet-20 (He et al. 2016, Sec. 4.2: 6n+2 layers, n=3, widths 16/32/64, option-A shortcuts) ---------


class _ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by 2 and zero-pad the channels (He et al.'s option A)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR. Limits: any image size; in training, batches of ≥ 2 images when the last stage is 1×1
    (sides ≤ 4; :func:`check_trainable`)."""

    def __init__(self, num_classes: int = 10, n: int = 3):
        super().__init__()
        self.normalize = Normalize()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class VGG16BN(nn.Module):
    """VGG16 with batch norm, CIFAR variant as in the authors' ``lib/vgg.py``: torchvision's 13 conv layers
    (1×1×512 after five poolings on 32×32), then their 512-512-classes head with dropout.

    Limits: both sides ≥ 32 (five 2×2 poolings; :func:`check_classifier_input`)."""

    def __init__(self, num_classes: int = 10):
        from torchvision.models.vgg import cfgs, make_layers

        super().__init__()
        self.normalize = Normalize()
        self.features = make_layers(cfgs["D"], batch_norm=True)
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Dropout(), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(self.normalize(x))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


def smallest_bn_map(arch: str, size: tuple[int, int], depth: int = 4) -> int:
    """Pixels per channel of the smallest feature map a BatchNorm layer of ``arch`` normalises (resnet20, vgg16,
    unet): in training a batch needs more than one value per channel there."""
    h, w = size
    if arch == "resnet20":  # two stride-2 stages (3×3 convs, padding 1)
        for _ in range(2):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h * w
    if arch in ("vgg16", "vgg16bn", "vgg16_bn"):  # BN runs before each of the 5 poolings: the last at size/16
        return max(h // 16, 0) * max(w // 16, 0)
    return (h // 2**depth) * (w // 2**depth)  # the U-Net's bottleneck


def check_classifier_input(arch: str, size: tuple[int, int], what: str = "The images") -> None:
    """ψ's limits. ResNet-20 takes any size; VGG16-BN pools five times (2×2), so both sides must be ≥ 32."""
    if arch in ("vgg16", "vgg16bn", "vgg16_bn") and min(size) < 32:
        raise PPFlowerError(f"{what} are {size[0]}×{size[1]}, but VGG16-BN pools five times and needs sides of at "
                            "least 32 pixels: use --model resnet20, or resize the images to at least 32×32.")


def check_trainable(arch: str, size: tuple[int, int], batch_size: int, n_train: int, what: str,
                    depth: int = 4) -> None:
    """A training run every batch of which BatchNorm can normalise, checked before any work.

    Every training loop drops a last batch of a single image (pp_flower.transform.steps_per_epoch), so batches
    hold at least 2 images when ``batch_size`` ≥ 2; with ``batch_size`` 1, each BatchNorm layer needs more than
    one pixel per channel (the U-Net's bottleneck at depth 5 on 32×32 images is 1×1). One training image in
    all can never be a batch of two."""
    if n_train < 2:
        raise PPFlowerError(f"{what}: {n_train} training image(s); BatchNorm needs batches of at least 2 images: "
                            "use more images (--limit-train ≥ 2, or 0 for all).")
    if batch_size < 2 and smallest_bn_map(arch, size, depth) < 2:
        raise PPFlowerError(f"{what}: batch size 1 on {size[0]}×{size[1]} images leaves one value per channel in "
                            f"{arch}'s smallest BatchNorm layer (1×1), which cannot be normalised: use a batch size "
                            "of at least 2" + (f" or a smaller --unet-depth (unet-depth={depth - 1})" if arch == "unet"
                                                and depth > 1 else "") + ".")


def check_square(size: tuple[int, int], what: str = "The images") -> None:
    """The GAN baseline's generator has a learned positional map of one square size."""
    if size[0] != size[1]:
        raise PPFlowerError(f"{what} are {size[0]}×{size[1]}, but the GAN baseline's generator (a U-Net with a learned "
                            "square positional map) needs square images: crop or resize them to a square.")


def build_classifier(arch: str, num_classes: int = 10) -> nn.Module:
    """ψ by name: ``resnet20`` or ``vgg16`` (VGG16-BN)."""
    if arch == "resnet20":
        return ResNet20(num_classes)
    if arch in ("vgg16", "vgg16bn", "vgg16_bn"):
        return VGG16BN(num_classes)
    raise ValueError(f"Unknown classifier '{arch}' (expected one of {', '.join(CLASSIFIERS)}).")


# --- U-Net (Ronneberger et al. 2015) as the transformation network h_θ -----------------------------------


UNET_ARCHS = ("paper", "ours")


def _double_conv(cin: int, cout: int, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


def _up(cin: int, cout: int, arch: str) -> nn.Module:
    """The up-path's 2× upsampling: the authors' nearest Upsample + 3×3 conv + BN + ReLU, or a transposed conv."""
    if arch == "paper":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
    return nn.ConvTranspose2d(cin, cout, 2, stride=2)


def check_image_size(size: tuple[int, int], depth: int, what: str = "The images") -> None:
    """The U-Net's limit: a depth-``depth`` U-Net halves H and W ``depth`` times, so both sides must be divisible by
    2**depth (a 1×1 bottleneck is allowed; batches of 2+ images then train it, see :func:`check_trainable`).
    Other sizes are refused up front, naming the fixes."""
    step = 2**depth
    if size[0] % step or size[1] % step:
        fits = [d for d in range(1, depth) if size[0] % 2**d == 0 and size[1] % 2**d == 0]
        fix = f"set unet-depth={max(fits)} (--unet-depth {max(fits)})" if fits else "no depth fits them"
        raise PPFlowerError(f"{what} are {size[0]}×{size[1]}, but a U-Net of depth {depth} needs sides divisible by "
                            f"{step}: {fix}, or resize the images to a multiple of {step}.")


class UNet(nn.Module):
    """Limits: H and W divisible by 2**depth (:func:`check_image_size`); in training, batches of ≥ 2 images where
    the bottleneck is 1×1 (:func:`check_trainable`).

    U-Net with widths ``base·(1, 2, 4, 8, 16)`` (the paper: base 64 → 64…1024); sigmoid output in [0, 1].

    ``depth`` is the number of 2× downsamplings (4 in the paper; inputs must be divisible by 2**depth).
    ``arch="paper"`` is the authors' U-Net (their ``lib/unet.py``, after LeeJunHyun's): convolutions with biases,
    a nearest-Upsample + 3×3 conv + BN + ReLU up-path, raw [0, 1] input; 34.5 M parameters at base 64.
    ``arch="ours"`` (v0.1): bias-free convolutions, transposed-conv up-path, ImageNet-normalised input; 31.0 M.
    Both end in a sigmoid so that x̂ is an image in [0, 1] (the authors' output is unbounded).
    """

    def __init__(self, base: int = 64, depth: int = 4, in_channels: int = 3, out_channels: int = 3,
                 arch: str = "paper"):
        super().__init__()
        if arch not in UNET_ARCHS:
            raise ValueError(f"Unknown U-Net architecture '{arch}' (expected one of {', '.join(UNET_ARCHS)}).")
        self.base, self.depth, self.in_channels, self.arch = base, depth, in_channels, arch
        widths = [base * 2**i for i in range(depth + 1)]
        bias = arch == "paper"
        # ImageNet statistics are RGB; the authors feed raw [0, 1] images
        self.normalize = Normalize() if in_channels == 3 and arch == "ours" else nn.Identity()
        self.down = nn.ModuleList([_double_conv(in_channels, widths[0], bias)])
        self.down.extend(_double_conv(widths[i], widths[i + 1], bias) for i in range(depth))
        self.up = nn.ModuleList(_up(widths[i + 1], widths[i], arch) for i in reversed(range(depth)))
        self.up_conv = nn.ModuleList(_double_conv(2 * widths[i], widths[i], bias) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2**self.depth or x.shape[-2] % 2**self.depth:
            raise ValueError(f"U-Net of depth {self.depth} needs H and W divisible by {2**self.depth}, "
                             f"got {tuple(x.shape)}")
        skips = []
        out = self.normalize(x)
        for i, block in enumerate(self.down):
            out = block(out if i == 0 else F.max_pool2d(out, 2))
            skips.append(out)
        skips.pop()
        for up, conv in zip(self.up, self.up_conv):
            out = conv(torch.cat([skips.pop(), up(out)], dim=1))
        return torch.sigmoid(self.head(out))


class PositionalUNet(nn.Module):
    """A U-Net that also sees a learned positional map (``pos_channels`` × H × W) beside the image.

    Convolutions treat every position alike, so a plain U-Net cannot reproduce a keyed, position-dependent
    encryption such as pixel-based encryption; with the positional map it can (the GAN-based baseline's G).

    Limits: square ``size``×``size`` images only (:func:`check_square`), sides divisible by 2**depth.
    """

    def __init__(self, base: int = 16, depth: int = 4, pos_channels: int = 8, size: int = 32, arch: str = "paper"):
        super().__init__()
        self.base, self.depth, self.pos_channels, self.size, self.arch = base, depth, pos_channels, size, arch
        self.positional = nn.Parameter(torch.randn(1, pos_channels, size, size))
        self.unet = UNet(base, depth, in_channels=3 + pos_channels, arch=arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"this generator was trained on {self.size}×{self.size} images, got {tuple(x.shape)}")
        return self.unet(torch.cat([x, self.positional.expand(len(x), -1, -1, -1)], dim=1))


def unet_from_state_dict(state_dict: dict[str, torch.Tensor], base: int, depth: int, arch: str = "paper") -> UNet:
    """A U-Net holding ``state_dict``, built on the meta device so no time goes into a random initialisation."""
    with torch.device("meta"):
        net = UNet(base, depth, arch=arch)
    net.load_state_dict(state_dict, assign=True)
    if isinstance(net.normalize, Normalize):
        net.normalize = Normalize()  # its constants are not part of state dicts
    return net


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
