"""φ_k: the frozen VGG16 (ImageNet) feature extractor of the feature loss, up to relu2_2 by default.

Weights come from a local state-dict file (``--vgg-weights`` / ``PPFLOWER_VGG_WEIGHTS``) or from torchvision's
``IMAGENET1K_V1`` checkpoint (its cache, or a download). If neither is reachable the user gets a clear error;
φ is never silently left with random weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from pp_flower.errors import PPFlowerError
from pp_flower.models import Normalize

RELU2_2 = 9  # torchvision vgg16().features[:9] ends with relu2_2; [:16] ends with relu3_3
WEIGHTS_HELP = (
    "Give a state-dict file of torchvision's VGG16 IMAGENET1K_V1 features with --vgg-weights or "
    "PPFLOWER_VGG_WEIGHTS, or let torchvision download/cache the weights (needs network access once)."
)
_CACHE: dict[tuple, nn.Module] = {}
# torchvision's VGG configuration "D" (VGG16): conv widths, "M" = 2×2 max pooling
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_features(layer: int) -> nn.Sequential:
    """torchvision's ``vgg16().features[:layer]``: the same layers and state-dict keys, built without importing
    torchvision — every deployed ClientApp message starts a fresh process, and that import costs ~2 s there."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_CONFIG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = v
    return nn.Sequential(*layers[:layer])


class FeatureNet(nn.Module):
    """[0, 1] images → VGG16 features ``features[:layer]`` (ImageNet-normalised input, frozen, eval mode)."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.normalize = Normalize()
        self.features = features
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureNet":  # φ is always frozen
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))


def resolve_weights_path(weights: str | os.PathLike | None) -> Path | None:
    if weights is None or str(weights) == "":
        weights = os.environ.get("PPFLOWER_VGG_WEIGHTS") or None
    return Path(weights).expanduser() if weights else None


def _torchvision_state_dict() -> dict[str, torch.Tensor]:
    from torchvision.models import VGG16_Weights, vgg16

    try:
        return vgg16(weights=VGG16_Weights.IMAGENET1K_V1).state_dict()
    except Exception as exc:  # noqa: BLE001 - offline machines land here
        raise PPFlowerError(f"VGG16 ImageNet weights are not reachable ({exc}). {WEIGHTS_HELP}") from exc


def load_feature_net(weights: str | os.PathLike | None = None, layer: int = RELU2_2,
                     device: str | torch.device = "cpu") -> FeatureNet:
    """φ_k up to ``features[:layer]`` with ImageNet weights (cached per process: it is read-only)."""
    path = resolve_weights_path(weights)
    key = (str(path), layer, str(device))
    if key in _CACHE:
        return _CACHE[key]
    features = vgg16_features(layer)
    if path is None:
        state = _torchvision_state_dict()
    else:
        if not path.is_file():
            raise PPFlowerError(f"VGG weights file {path} does not exist. {WEIGHTS_HELP}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise PPFlowerError(f"Cannot read VGG weights file {path}: {exc}. {WEIGHTS_HELP}") from exc
        if not isinstance(state, dict):
            raise PPFlowerError(f"{path} is not a state dict. {WEIGHTS_HELP}")
    needed = {f"features.{k}" for k in features.state_dict()}
    sub = {k.removeprefix("features."): v for k, v in state.items() if k in needed}
    missing = sorted(needed - {f"features.{k}" for k in sub})
    if missing:
        raise PPFlowerError(
            f"VGG weights {path or 'from torchvision'} lack {', '.join(missing)} needed for layer {layer}. "
            f"{WEIGHTS_HELP}"
        )
    try:
        features.load_state_dict(sub)
    except RuntimeError as exc:
        raise PPFlowerError(f"VGG weights {path} do not fit VGG16: {exc}") from exc
    net = FeatureNet(features).to(device)
    _CACHE[key] = net
    return net
