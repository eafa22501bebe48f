"""Pixel-based image encryption (W. Sirichotedumrong, T. Maekawa, Y. Kinoshita, H. Kiya, ICIP 2019).

Two key-driven steps per pixel: negative–positive transformation (p ↦ 255 − p, i.e. p XOR 255, for the
pixels whose key bit is 1) and colour-component shuffling (one of the 6 permutations of R, G, B per pixel).
With ``per_image=True`` ("without key management") every image gets its own key, drawn from ``key`` and the
image's index; decryption then needs that index too.
"""

from __future__ import annotations

from itertools import permutations

import torch

_PERMS = torch.tensor(list(permutations(range(3))))  # (6, 3)


class PixelEncryption:
    """Keyed pixel-wise encryption of uint8 images (N, 3, H, W); the output has the same shape and dtype."""

    channels = 3

    def __init__(self, key: int, per_image: bool = False):
        self.key, self.per_image = key, per_image

    def _keys(self, n: int, h: int, w: int, indices: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.per_image:
            g = torch.Generator().manual_seed(self.key)
            flip = torch.rand(3, h, w, generator=g) < 0.5
            perm = torch.randint(0, 6, (h, w), generator=g)
            return flip.expand(n, 3, h, w), perm.expand(n, h, w)
        if indices is None:
            indices = torch.arange(n)
        flips, perms = [], []
        for i in indices.tolist():
            g = torch.Generator().manual_seed(self.key * 1_000_003 + int(i))
            flips.append(torch.rand(3, h, w, generator=g) < 0.5)
            perms.append(torch.randint(0, 6, (h, w), generator=g))
        return torch.stack(flips), torch.stack(perms)

    def encrypt(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        n, _, h, w = images.shape
        flip, perm = self._keys(n, h, w, indices)
        negated = torch.where(flip, 255 - images, images)
        order = _PERMS[perm].permute(0, 3, 1, 2)  # (N, 3, H, W): source channel for each output channel
        return torch.gather(negated, 1, order)

    def decrypt(self, encrypted: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        n, _, h, w = encrypted.shape
        flip, perm = self._keys(n, h, w, indices)
        order = _PERMS[perm].permute(0, 3, 1, 2)
        negated = torch.empty_like(encrypted).scatter_(1, order, encrypted)
        return torch.where(flip, 255 - negated, negated)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] float images → encrypted [0, 1] float images (for ψ or an attack).

        Per-image keys: every call draws fresh image indices (a seeded stream), so an attacker never sees
        two images under the same key, as in the scheme "without key management".
        """
        images = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        indices = None
        if self.per_image:
            if not hasattr(self, "_stream"):
                self._stream = torch.Generator().manual_seed(self.key + 1)
            indices = torch.randint(0, 2**40, (len(images),), generator=self._stream)
        return self.encrypt(images, indices).float().div(255).to(x.device)
