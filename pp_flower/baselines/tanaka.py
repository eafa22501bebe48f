"""Learnable image encryption (M. Tanaka, "Learnable Image Encryption", ICCE-TW 2018).

Encryption, per M×M block (M = 4): every 8-bit value p is split into its upper and lower 4-bit parts
(p >> 4, p & 15), so an RGB block gives M·M·6 components; the components of every block are shuffled with
one key-driven permutation, and the components selected by the key are reversed (v ↦ 15 − v). The
encrypted image has 6 channels with values 0…15. The classifier sees it through an *adaptation network*:
a block-wise convolution (kernel = stride = M) followed by 1×1 layers and a re-arrangement of each block's
M·M·3 outputs back into an M×M×3 block (``PixelShuffle``), which yields a 3-channel image for ψ.
"""

from __future__ import annotations

import torch
from torch import nn

from pp_flower.errors import PPFlowerError


def split_nibbles(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) → uint8 (N, 6, H, W): upper 4 bits in channels 0–2, lower 4 bits in 3–5."""
    return torch.cat([images >> 4, images & 15], dim=1)


def merge_nibbles(components: torch.Tensor) -> torch.Tensor:
    upper, lower = components[:, :3], components[:, 3:]
    return (upper << 4) | lower


def to_blocks(x: torch.Tensor, m: int) -> torch.Tensor:
    """(N, C, H, W) → (N, H/m · W/m, m·m·C): one row of components per block."""
    n, c, h, w = x.shape
    return x.view(n, c, h // m, m, w // m, m).permute(0, 2, 4, 3, 5, 1).reshape(n, (h // m) * (w // m), m * m * c)


def from_blocks(blocks: torch.Tensor, c: int, h: int, w: int, m: int) -> torch.Tensor:
    n = blocks.shape[0]
    return blocks.view(n, h // m, w // m, m, m, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)


def block_scramble(blocks: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Shuffle the components of every block with the same permutation."""
    return blocks[..., permutation]


def check_block_size(size: tuple[int, int], block: int = 4, what: str = "The images") -> None:
    """Tanaka's limit: the encryption and its adaptation network work on M×M blocks, so both sides must be
    multiples of M (4)."""
    if size[0] % block or size[1] % block:
        fit = (size[0] // block * block, size[1] // block * block)
        raise PPFlowerError(f"{what} are {size[0]}×{size[1]}, but Tanaka's encryption works on {block}×{block} blocks "
                            f"and needs sides divisible by {block}: crop or resize them (e.g. to {fit[0]}×{fit[1]}).")


class TanakaEncryption:
    """Keyed block-wise encryption; ``encrypt``/``decrypt`` work on uint8 images (N, 3, H, W).

    Limits: sides divisible by the block size (:func:`check_block_size`)."""

    channels = 6

    def __init__(self, key: int, block: int = 4):
        self.key, self.block = key, block
        g = torch.Generator().manual_seed(key)
        size = block * block * 6
        self.permutation = torch.randperm(size, generator=g)
        self.inverse = torch.argsort(self.permutation)
        self.reverse = torch.rand(size, generator=g) < 0.5

    def _check(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[2] % self.block or images.shape[3] % self.block:
            raise ValueError(f"H and W must be multiples of the block size {self.block}")

    def encrypt(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) → uint8 (N, 6, H, W) with values 0…15."""
        self._check(images)
        _, _, h, w = images.shape
        blocks = block_scramble(to_blocks(split_nibbles(images), self.block), self.permutation)
        blocks = torch.where(self.reverse, 15 - blocks, blocks)
        return from_blocks(blocks, 6, h, w, self.block)

    def decrypt(self, encrypted: torch.Tensor) -> torch.Tensor:
        _, _, h, w = encrypted.shape
        blocks = to_blocks(encrypted, self.block)
        blocks = torch.where(self.reverse, 15 - blocks, blocks)
        return merge_nibbles(from_blocks(block_scramble(blocks, self.inverse), 6, h, w, self.block))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] float images → encrypted images as float in [0, 1] (components / 15), for ψ or an attack."""
        images = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        return self.encrypt(images).float().div(15).to(x.device)


class AdaptationNetwork(nn.Module):
    """Tanaka's adaptation network: block-wise conv (kernel = stride = M), 1×1 layers, block re-arrangement.

    Input (N, 6, H, W) encrypted components in [0, 1]; output (N, 3, H, W) — the shape ψ takes.
    """

    def __init__(self, block: int = 4, in_channels: int = 6, out_channels: int = 3):
        super().__init__()
        width = block * block * out_channels
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, width, block, stride=block), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.Sigmoid(),
            nn.PixelShuffle(block),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
