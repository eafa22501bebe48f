"""Every random stream of pp-flower derives its seed here, from the run's seed and a purpose.

Distinct purposes (``"order"``, ``"augment"``, ``"user"``, ``"split"``…) get independent streams, and a stream is
a pure function of its parts, so any batch of any run can be rebuilt (resume, replay after a fault).
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *parts: int | str) -> int:
    """The one place sub-seeds come from: stable across processes and Python versions, distinct per purpose."""
    digest = hashlib.blake2b(repr((int(seed), *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative 63-bit seed


def generator(seed: int, *parts: int | str) -> torch.Generator:
    """A torch.Generator seeded with :func:`derive_seed` (batch order, augmentation, …)."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))
